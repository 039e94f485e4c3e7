"""The web app's REST calls under abuse, on the real server and both stores: session-password guessing
throttled (per user, per address, across processes), and every body validated (size, type, JSON, depth,
fields, a body cut short) with nothing written for a refused request; a hypothesis fuzz of bodies and
headers."""

from __future__ import annotations

import http.client
import itertools
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from conftest import TIMEOUT, Server, scrape, unique, value, wait_for
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from canary.store import PASSWORD_THROTTLES, SESSION_LOCKS, SESSION_PRESENCE, SESSIONS
from canary.throttle import user_key

WINDOW = 3  # seconds: the first lock-out lasts one window
#: A short window; 8 failures lock an address; X-Forwarded-For names the client (one proxy, as on Heroku);
#: a body must arrive within a second; 128 KiB bodies, so that 100,000 nested brackets reach the parser.
ENV = {"PASSWORD_WINDOW_SECONDS": str(WINDOW), "PASSWORD_LOCKOUT_MAX_SECONDS": str(2 * WINDOW),
       "PASSWORD_FAILURES_PER_ADDRESS": "8", "TRUSTED_PROXIES": "1", "BODY_TIMEOUT_SECONDS": "1",
       "MAX_BODY_BYTES": str(128 * 1024)}
JSON = "application/json"
RIGHT = "right horse battery"

_addresses = itertools.count(1)


def address() -> str:
    """A client address no other test uses (counters are kept per address, in a store shared between tests)."""
    return f"2001:db8:{os.getpid() % 0xFFFF:x}:{int(time.time()) % 0xFFFF:x}::{next(_addresses):x}"


@pytest.fixture(scope="module")
def abuse(server_factory: Callable[..., Server]) -> Server:
    return server_factory(**ENV)


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


def post(server: Server, path: str, body: bytes | None = None, *, content_type: str | None = JSON,
         headers: dict[str, str] | None = None) -> Answer:
    """A POST with exactly these headers (no Content-Type unless given; http.client adds Content-Length)."""
    all_headers = {**({"Content-Type": content_type} if content_type is not None else {}), **(headers or {})}
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        connection.request("POST", path, body=body, headers=all_headers)
        response = connection.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        connection.close()


def create(server: Server, batch: str, owner: str, password: str | None = RIGHT) -> str:
    answer = post(server, f"/sessions/{batch}?userID={owner}",
                  json.dumps({"password": password} if password else {}).encode())
    assert answer.status == 201, answer.text
    return json.loads(answer.body)["sessionID"]


def join(server: Server, sid: str, user: str, password: str, client: str | None = None) -> Answer:
    """A member's join, from `client` (an X-Forwarded-For address; None: loopback, not counted by address)."""
    headers = {"X-Forwarded-For": client} if client else {}
    return post(server, f"/sessions/{sid}/join?userID={user}", json.dumps({"password": password}).encode(),
                headers=headers)


def refused_as_text(answer: Answer, status: int) -> None:
    assert answer.status == status, (answer.status, answer.text)
    assert answer.headers["Content-Type"].startswith("text/plain"), answer.headers
    assert answer.text.endswith("\n"), answer.text
    assert "<" not in answer.text, answer.text  # not an HTML page


def guess_until_throttled(attempt: Callable[[int], Answer], limit: int = 10) -> tuple[int, Answer]:
    """Wrong passwords until one is refused 429 (at most `limit`): the 403s before it, and the 429."""
    for n in range(limit):
        answer = attempt(n)
        if answer.status == 429:
            return n, answer
        assert answer.status == 403, (answer.status, answer.text)
    raise AssertionError(f"{limit} wrong passwords, none throttled")


def throttled(answer: Answer) -> int:
    """The Retry-After of a throttled join (checked: 429, whole seconds, a text reason)."""
    refused_as_text(answer, 429)
    retry_after = answer.headers["Retry-After"]
    assert retry_after.isdigit(), retry_after
    return int(retry_after)


def nothing_created(server: Server, batch: str) -> None:
    assert server.doc(SESSION_LOCKS, batch) is None
    answer = server.request("GET", f"/sessions/active?batchID={batch}")
    assert answer[0] == 200, answer
    assert json.loads(answer[2]) == {"sessions": []}


def not_joined(server: Server, sid: str, user: str) -> None:
    """`user` is not a member, has no presence, and no failure was counted for it."""
    assert user not in [m["id"] for m in server.doc(SESSIONS, sid)["members"]]
    assert server.doc(SESSION_PRESENCE, f"{sid}_{user}") is None
    assert server.doc(PASSWORD_THROTTLES, user_key(sid, user)) is None


# -- guessing ---------------------------------------------------------------------------------------------

def test_a_guesser_is_locked_out_and_nobody_else(abuse: Server) -> None:
    batch, owner = abuse.batch()
    sid = create(abuse, batch, owner)
    mallory, where = unique("mallory"), address()
    before = scrape(abuse)
    failures, answer = guess_until_throttled(lambda _n: join(abuse, sid, mallory, "guess", where))
    assert 5 <= failures <= 9  # 5 within a window (more if the machine is slow enough for a window to pass)
    assert 1 <= throttled(answer) <= WINDOW
    assert answer.text.startswith("Too many wrong passwords; try again in ")
    # The right password is refused too, without being checked.
    assert join(abuse, sid, mallory, RIGHT, where).status == 429
    # Others are admitted meanwhile, from another address, from the guesser's (5 of its 8 failures used) or local.
    for user, client in ((unique("bob"), address()), (unique("carol"), where), (unique("dan"), None)):
        assert join(abuse, sid, user, RIGHT, client).status == 200
    after = scrape(abuse)
    assert value(after, "canary_password_failures_total") - value(before, "canary_password_failures_total") \
        == failures
    assert value(after, "canary_password_throttled_total", counter="user") \
        - value(before, "canary_password_throttled_total", counter="user") == 2
    # Allowed again after the lock-out, and the success resets the count: a new mistake is a 403 again.
    wait_for(lambda: join(abuse, sid, mallory, RIGHT, where).status == 200, timeout=WINDOW + TIMEOUT,
             what="the lock-out to end")
    assert abuse.doc(PASSWORD_THROTTLES, user_key(sid, mallory)) is None
    assert join(abuse, sid, mallory, "typo", where).status == 403


def test_an_address_guessing_under_many_user_ids_is_locked_out(abuse: Server) -> None:
    batch, owner = abuse.batch()
    sid = create(abuse, batch, owner)
    where = address()
    failures, answer = guess_until_throttled(lambda _n: join(abuse, sid, unique("puppet"), "guess", where), 16)
    assert 8 <= failures <= 15
    throttled(answer)
    # Everyone at that address waits (a NAT'd classroom would too: hence the higher threshold), nobody else.
    assert join(abuse, sid, unique("classmate"), RIGHT, where).status == 429
    assert join(abuse, sid, unique("elsewhere"), RIGHT, address()).status == 200
    assert join(abuse, sid, unique("local"), RIGHT).status == 200  # loopback: not counted by address
    assert value(scrape(abuse), "canary_password_throttled_total", counter="address") >= 2


def test_two_processes_share_the_counts(abuse: Server, server_factory: Callable[..., Server],
                                        store_kind: str) -> None:
    if store_kind == "memory":
        pytest.skip("the memory store lives in one process")
    other = server_factory(**ENV)  # a second single-worker process on the same emulator project
    batch, owner = abuse.batch()
    sid = create(abuse, batch, owner)
    mallory = unique("mallory")
    processes = (abuse, other)
    failures, answer = guess_until_throttled(lambda n: join(processes[n % 2], sid, mallory, "guess"))
    assert 5 <= failures <= 9
    throttled(answer)
    for server in processes:
        throttled(join(server, sid, mallory, RIGHT))


# -- bodies -------------------------------------------------------------------------------------------------

#: (body, Content-Type, status) of a create or a join that must be refused, writing nothing.
BAD_BODIES = [
    (b"[1,2,3]", JSON, 400),
    (b'"password"', JSON, 400),
    (b"null", JSON, 400),
    (b"{not json", JSON, 400),
    (b'{"password": "\xff\xfe"}', JSON, 400),
    (b'{"password": "x"}', "text/plain", 415),
    (b'{"password": "x"}', "application/x-www-form-urlencoded", 415),
    (b'{"password": "x"}', None, 415),
    (b'{"password": 5}', JSON, 400),
    (b'{"password": ["x"]}', JSON, 400),
    (b'{"password": {"x": 1}}', JSON, 400),
    (b'{"password": true}', JSON, 400),
    (json.dumps({"password": "x" * 73}).encode(), JSON, 400),
    (json.dumps({"password": "é" * 37}).encode(), JSON, 400),  # 74 bytes of UTF-8
    (b'{"password": "\\ud800"}', JSON, 400),
    (b"[" * 100_000, JSON, 400),
    (b'{"a":' * 20_000, JSON, 400),
    (b"x" * (128 * 1024 + 1), JSON, 413),
]


def test_bad_create_bodies_are_refused_and_nothing_is_written(abuse: Server) -> None:
    for body, content_type, status in BAD_BODIES:
        batch, owner = abuse.batch()
        answer = post(abuse, f"/sessions/{batch}?userID={owner}", body, content_type=content_type)
        refused_as_text(answer, status)
        nothing_created(abuse, batch)
    assert "Traceback" not in abuse.log()


def test_bad_join_bodies_are_refused_writing_nothing_and_counting_no_guess(abuse: Server) -> None:
    batch, owner = abuse.batch()
    sid = create(abuse, batch, owner)
    for body, content_type, status in BAD_BODIES:
        user = unique("member")
        answer = post(abuse, f"/sessions/{sid}/join?userID={user}", body, content_type=content_type)
        refused_as_text(answer, status)
        not_joined(abuse, sid, user)
    assert "Traceback" not in abuse.log()


def test_the_web_apps_bodies_pass_and_the_default_limit_is_16_kib(server: Server) -> None:
    batch, owner = server.batch()
    answer = post(server, f"/sessions/{batch}?userID={owner}", b"x" * (16 * 1024 + 1))
    refused_as_text(answer, 413)
    assert answer.text == "The request body is too large: at most 16384 bytes\n"
    nothing_created(server, batch)
    refused_as_text(chunked(server, f"/sessions/{batch}?userID={owner}", 16 * 1024 + 1), 413)
    nothing_created(server, batch)
    sid = create(server, batch, owner, password=None)  # {} with application/json
    assert chunked(server, f"/sessions/{sid}/join?userID={unique('member')}", 1000).status == 200
    for body, content_type in ((None, JSON), (b"", JSON), (None, None), (b"{}", JSON), (b'{"password": ""}', JSON),
                               (b'{"password": null, "extra": [1]}', "application/json; charset=utf-8")):
        user = unique("member")
        answer = post(server, f"/sessions/{sid}/join?userID={user}", body, content_type=content_type)
        assert answer.status == 200, (body, content_type, answer.text)


def chunked(server: Server, path: str, size: int) -> Answer:
    """A POST of `size` bytes of JSON without Content-Length (Transfer-Encoding: chunked)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        body = json.dumps({"password": "", "pad": "x" * (size - 27)}).encode()
        assert len(body) == size
        connection.request("POST", path, body=iter([body[:size // 2], body[size // 2:]]),
                           headers={"Content-Type": JSON}, encode_chunked=True)
        response = connection.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        connection.close()


def cut_short(server: Server, path: str) -> tuple[int, float]:
    """A POST whose Content-Length promises 100 bytes and sends 12: the answer's status and how long it took."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        started = time.monotonic()
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     "Content-Length: 100\r\n\r\n{\"password\":".encode())
        head = sock.recv(1024)
        return int(head.split(b" ", 2)[1]), time.monotonic() - started


def test_a_body_cut_short_is_answered_within_the_timeout(abuse: Server) -> None:
    batch, owner = abuse.batch()
    status, took = cut_short(abuse, f"/sessions/{batch}?userID={owner}")
    assert status == 408
    assert 0.9 <= took < 2.5, took  # BODY_TIMEOUT_SECONDS=1
    nothing_created(abuse, batch)
    sid = create(abuse, batch, owner)
    user = unique("member")
    status, took = cut_short(abuse, f"/sessions/{sid}/join?userID={user}")
    assert status == 408
    assert took < 2.5, took
    not_joined(abuse, sid, user)


# -- fuzz ---------------------------------------------------------------------------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                  max_size=3),
                     max_leaves=8)
_passwords = st.one_of(st.text(max_size=80), st.just(RIGHT), _json)
#: A `{"password", ...}` object half of the time, else anything.
BODIES = st.one_of(
    st.builds(lambda p, extra: json.dumps({**extra, "password": p}).encode(), _passwords,
              st.dictionaries(st.text(max_size=8), _json, max_size=2)),
    st.one_of(st.none(), st.binary(max_size=64), _json.map(lambda v: json.dumps(v).encode()),
              st.integers(1, 3000).map(lambda depth: b"[" * depth + b"]" * depth)),
)
_header = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
#: JSON half of the time (the bodies are what is fuzzed then), else anything.
CONTENT_TYPES = st.one_of(st.just(JSON), st.one_of(st.none(), st.sampled_from([
    "application/json; charset=utf-8", "APPLICATION/JSON", "application/json;;", "text/plain", "",
    "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/problem+json"]), _header))
HEADERS = st.dictionaries(st.sampled_from(["X-Forwarded-For", "Authorization", "Accept", "Content-Encoding",
                                           "Origin"]), _header, max_size=3)
FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(body=BODIES, content_type=CONTENT_TYPES, headers=HEADERS)
def test_fuzzed_creates_get_no_5xx_and_a_refused_one_writes_nothing(abuse: Server, body: bytes | None,
                                                                     content_type: str | None,
                                                                     headers: dict[str, str]) -> None:
    batch, owner = abuse.batch()
    answer = post(abuse, f"/sessions/{batch}?userID={owner}", body, content_type=content_type, headers=headers)
    event(f"status {answer.status}")
    assert answer.status in (201, 400, 413, 415), (answer.status, answer.text)
    if answer.status != 201:
        refused_as_text(answer, answer.status)
        nothing_created(abuse, batch)


@pytest.fixture(scope="module")
def fuzzed_session(abuse: Server) -> str:
    batch, owner = abuse.batch()
    return create(abuse, batch, owner)


@FUZZ
@given(body=BODIES, content_type=CONTENT_TYPES, headers=HEADERS)
def test_fuzzed_joins_get_no_5xx_and_a_refused_one_writes_nothing(abuse: Server, fuzzed_session: str,
                                                                   body: bytes | None, content_type: str | None,
                                                                   headers: dict[str, str]) -> None:
    sid, user = fuzzed_session, unique("member")
    answer = post(abuse, f"/sessions/{sid}/join?userID={user}", body, content_type=content_type, headers=headers)
    event(f"status {answer.status}")
    assert answer.status in (200, 400, 403, 413, 415, 429), (answer.status, answer.text)
    if answer.status != 200:
        refused_as_text(answer, answer.status)
        assert user not in [m["id"] for m in abuse.doc(SESSIONS, sid)["members"]]
        assert abuse.doc(SESSION_PRESENCE, f"{sid}_{user}") is None


def test_no_traceback_was_logged(abuse: Server) -> None:
    assert "Traceback" not in abuse.log()
