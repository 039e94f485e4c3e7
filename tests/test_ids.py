"""IDs that cannot be (part of) a Firestore document key (canary/ids.py): the rules, and their refusal on both
APIs, on both stores, before anything is read or written."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import jwt
import pytest
from conftest import Client, Refused, Server, join_url, owner_url, scrape, unique
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from canary import ids
from canary.errors import Refusal
from canary.records import presence_id

# -- the rules ------------------------------------------------------------------------------------------


def reason(check: Any, value: str, *args: str) -> str:
    with pytest.raises(Refusal) as refused:
        check(value, *args)
    assert refused.value.status == 400
    return refused.value.message


@pytest.mark.parametrize("check", [ids.user_id, ids.session_id, ids.batch_id, ids.project_id])
@pytest.mark.parametrize(("value", "why"), [
    ("", "it is empty"),
    ("a/b", "it contains '/'"),
    ("/", "it contains '/'"),
    (".", "it cannot be '.' or '..'"),
    ("..", "it cannot be '.' or '..'"),
    ("__x__", "it cannot both begin and end with '__'"),
    ("__name__", "it cannot both begin and end with '__'"),
    ("____", "it cannot both begin and end with '__'"),
    ("__a\nb__", "it cannot both begin and end with '__'"),
    ("\ud800", "it is not valid UTF-8"),
    ("a\udcffb", "it is not valid UTF-8"),
])
def test_each_rule_of_a_document_id(check: Any, value: str, why: str) -> None:
    field = check.__defaults__[0]
    assert reason(check, value) == f"invalid {field}: {why}"


@pytest.mark.parametrize("check", [ids.user_id, ids.session_id, ids.batch_id, ids.project_id])
@pytest.mark.parametrize("value", ["a", "...", ".a", "a.", "a..b", "x__", "a__b", "a b", "ü", "🙂", "owner-1",
                                   "aeDwBFug1KmmHU4DFUke", "%2F", "a%2Fb", "a\\b"])
def test_what_firestore_takes_is_taken(check: Any, value: str) -> None:
    assert check(value) == value


def test_only_session_ids_cannot_begin_with_an_underscore() -> None:
    # It would begin the presence key `{sessionID}_{userID}` with `__`, which then matches `__.*__` when the
    # user ID ends with `__` (itself a valid ID).
    for session in ("_", "_a", "__a"):
        assert reason(ids.session_id, session) == "invalid sessionID: it cannot begin with '_'"
    for check in (ids.user_id, ids.batch_id, ids.project_id):
        for value in ("_", "__", "___", "_a", "__a", "a__"):  # `__.*__` needs four underscores at least
            assert check(value) == value
    assert ids.session_id("a_") == "a_"


@pytest.mark.parametrize(("check", "limit"), [(ids.user_id, ids.USER_ID_MAX_BYTES),
                                              (ids.session_id, ids.SESSION_ID_MAX_BYTES),
                                              (ids.batch_id, ids.BATCH_ID_MAX_BYTES),
                                              (ids.project_id, ids.PROJECT_ID_MAX_BYTES)])
def test_lengths_are_bytes_of_utf8_up_to_the_limit(check: Any, limit: int) -> None:
    field = check.__defaults__[0]
    assert check("a" * limit) == "a" * limit
    assert reason(check, "a" * (limit + 1)) == \
        f"invalid {field}: it is {limit + 1} bytes long in UTF-8, at most {limit} are allowed"
    # Characters of 2, 3 and 4 bytes: the limit is on bytes, not characters.
    for char in ("é", "€", "🙂"):
        size = len(char.encode())
        fits = char * (limit // size) + "a" * (limit % size)
        assert len(fits.encode()) == limit
        assert check(fits) == fits
        over = char * (limit // size + 1)
        assert len(over) <= limit < len(over.encode())
        assert f"it is {len(over.encode())} bytes long" in reason(check, over)


def test_the_limits_are_what_the_docs_say() -> None:
    assert (ids.USER_ID_MAX_BYTES, ids.SESSION_ID_MAX_BYTES, ids.BATCH_ID_MAX_BYTES) == (256, 128, 128)
    assert ids.FIRESTORE_ID_MAX_BYTES == 1500


@pytest.mark.parametrize("user", ["a" * ids.USER_ID_MAX_BYTES, "é" * (ids.USER_ID_MAX_BYTES // 2),
                                  "/" * ids.USER_ID_MAX_BYTES, "%" * ids.USER_ID_MAX_BYTES, "x__", "__x", "..", "."])
def test_every_presence_key_of_valid_ids_is_a_valid_document_id(user: str) -> None:
    """The composed key fits: the longest session ID with the user ID that percent-encodes longest."""
    for session in ("a" * ids.SESSION_ID_MAX_BYTES, "s", "a_", "a__"):
        try:
            ids.user_id(user)
        except Refusal:
            continue  # `/`, `.`, `..`: not a user ID (users/{userID} is a key too)
        key = presence_id(ids.session_id(session), user)
        assert ids.check("presence key", key, ids.FIRESTORE_ID_MAX_BYTES) == key
    longest = presence_id("a" * ids.SESSION_ID_MAX_BYTES, "é" * (ids.USER_ID_MAX_BYTES // 2))
    assert len(longest.encode()) == ids.SESSION_ID_MAX_BYTES + 1 + 3 * ids.USER_ID_MAX_BYTES <= 1500


def test_the_field_named_is_the_callers() -> None:
    assert reason(ids.user_id, "..", "memberID") == "invalid memberID: it cannot be '.' or '..'"
    assert reason(ids.user_id, "u" * 300, "userID in the session token").startswith(
        "invalid userID in the session token: it is 300 bytes long")


# -- on the real service, both APIs, both stores ----------------------------------------------------------

LONG_USER = "u" * (ids.USER_ID_MAX_BYTES + 1)
BAD_USERS = {"too-long": LONG_USER, "too-long-in-bytes": "é" * 129, "dotdot": "..", "dunder-x": "__x__",
             "dunder-name": "__name__", "slash": "a/b"}
BAD_KEYS = {"too-long": "s" * (ids.SESSION_ID_MAX_BYTES + 1), "dotdot": "..", "dunder-x": "__x__",
            "dunder-name": "__name__"}


def why(check: Any, value: str, field: str | None = None) -> str:
    """The reason the service gives for `value`."""
    return reason(check, value, *([field] if field else []))


def q(value: str) -> str:
    return quote(value, safe="")


def query(server: Server, collection: str, field: str, value: str) -> dict[str, Any]:
    """The documents of `collection` whose `field` is `value`, as the service's store has them (dev API)."""
    status, _, body = server.request("GET", f"/dev/documents/{collection}?field={field}&value={q(value)}")
    assert status == 200, body
    return json.loads(body)


def counters(server: Server) -> tuple[float, float, float]:
    """(store errors, 503 refusals, 400 refusals) in /metrics."""
    samples = scrape(server)
    store_errors = sum(v for (name, _), v in samples.items() if name == "canary_store_errors_total")
    refusals = {dict(labels).get("status"): v for (name, labels), v in samples.items()
                if name == "canary_refusals_total"}
    return store_errors, refusals.get("503", 0.0), refusals.get("400", 0.0)


def seed_refusal(url: str) -> tuple[int, Any]:
    with pytest.raises(Refused) as refused:
        Client.connect(url)
    return refused.value.status, refused.value.body


def webapp_socket_refusal(url: str) -> tuple[int, Any]:
    with pytest.raises(Refused) as refused:
        Client.connect(url, welcome=False)
    return refused.value.status, refused.value.body


def rest(server: Server, method: str, path: str) -> tuple[int, str, str]:
    status, headers, body = server.request(method, path)
    return status, headers.get("Content-Type", ""), body.decode()


@pytest.mark.parametrize("bad", list(BAD_USERS), ids=list(BAD_USERS))
def test_a_bad_user_id_is_refused_on_both_apis_before_anything_is_written(server: Server, bad: str) -> None:
    user = BAD_USERS[bad]
    before = counters(server)
    batch, owner = server.batch()

    # The seed's API: creating a session, and joining one.
    status, body = seed_refusal(owner_url(server, batch, q(user)))
    assert (status, body) == (400, {"error": why(ids.user_id, user), "status": 400})
    assert server.doc("sessionLocks", batch) is None
    assert query(server, "sessions", "batchID", batch) == {}
    host = Client.connect(owner_url(server, batch, owner))
    sid = host.welcome["sessionID"]
    assert seed_refusal(join_url(server, sid, q(user))) == (400, {"error": why(ids.user_id, user), "status": 400})
    host.roundtrip()  # nobody joined
    assert server.doc("sessions", sid)["members"] == []
    assert [p["userID"] for p in query(server, "sessionPresence", "sessionID", sid).values()] == [owner]
    host.close()

    # The web app's API: create, join, stop, kick (the member), the sockets' session token.
    batch, owner = server.batch()
    text = why(ids.user_id, user) + "\n"
    assert rest(server, "POST", f"/sessions/{batch}?userID={q(user)}") == (400, "text/plain; charset=utf-8", text)
    assert server.doc("sessionLocks", batch) is None
    assert query(server, "sessions", "batchID", batch) == {}
    status, _, body = server.request("POST", f"/sessions/{batch}?userID={owner}")
    assert status == 201, body
    sid = json.loads(body)["sessionID"]
    assert rest(server, "POST", f"/sessions/{sid}/join?userID={q(user)}")[::2] == (400, text)
    assert rest(server, "DELETE", f"/sessions/{sid}?userID={q(user)}")[::2] == (400, text)
    kicked = rest(server, "DELETE", f"/sessions/{sid}/members/{q(user)}?userID={owner}")
    if "/" in user:  # `%2F` is a `/` to the router: no route has that path
        assert kicked[0] == 404
    else:
        assert kicked[::2] == (400, why(ids.user_id, user, "memberID") + "\n")
    assert rest(server, "GET", f"/sessions/active?batchID={batch}&userID={q(user)}")[::2] == (400, text)
    # A session token (signed with the key the open service shares through the store) naming a bad user.
    key = server.doc("collabSettings", "devSessionTokenKey")["key"]
    now = time.time()
    token = jwt.encode({"userID": user, "sessionID": sid, "batchID": "", "purpose": "session-join",
                        "exp": int(now + 60), "iat": now}, key, algorithm="HS256")
    assert webapp_socket_refusal(f"{server.ws}/sessions/{sid}/ws/join?token={token}") == \
        (400, why(ids.user_id, user, "userID in the session token") + "\n")
    doc = server.doc("sessions", sid)
    assert doc is not None
    assert doc["members"] == []
    assert query(server, "sessionPresence", "sessionID", sid) == {}
    assert rest(server, "DELETE", f"/sessions/{sid}?userID={owner}")[0] == 204

    store_errors, unavailable, refused = counters(server)
    assert (store_errors, unavailable) == before[:2]
    assert refused - before[2] == (7 if "/" in user else 8)


@pytest.mark.parametrize("bad", list(BAD_KEYS), ids=list(BAD_KEYS))
def test_a_bad_batch_or_session_id_is_refused_on_both_apis(server: Server, bad: str) -> None:
    key = BAD_KEYS[bad]
    before = counters(server)
    batch, owner = server.batch()
    host = Client.connect(owner_url(server, batch, owner))
    sid = host.welcome["sessionID"]
    ann = unique("ann")
    batch_why, session_why = why(ids.batch_id, key), why(ids.session_id, key)

    # The seed's API.
    assert seed_refusal(owner_url(server, q(key), owner)) == (400, {"error": batch_why, "status": 400})
    assert seed_refusal(join_url(server, q(key), ann)) == (400, {"error": session_why, "status": 400})
    # The web app's API: REST, and the sockets' path and token.
    assert rest(server, "POST", f"/sessions/{q(key)}?userID={owner}")[::2] == (400, batch_why + "\n")
    assert rest(server, "POST", f"/sessions/{q(key)}/join?userID={ann}")[::2] == (400, session_why + "\n")
    assert rest(server, "DELETE", f"/sessions/{q(key)}?userID={owner}")[::2] == (400, session_why + "\n")
    assert rest(server, "DELETE", f"/sessions/{q(key)}/members/{ann}?userID={owner}")[::2] == \
        (400, session_why + "\n")
    assert rest(server, "GET", f"/sessions/active?batchID={q(key)}")[::2] == (400, batch_why + "\n")
    for kind in ("create", "join"):
        assert webapp_socket_refusal(f"{server.ws}/sessions/{q(key)}/ws/{kind}?token=t") == \
            (400, session_why + "\n")
    signing_key = server.doc("collabSettings", "devSessionTokenKey")["key"]
    now = time.time()
    token = jwt.encode({"userID": owner, "sessionID": sid, "batchID": key, "purpose": "session-join",
                        "exp": int(now + 60), "iat": now}, signing_key, algorithm="HS256")
    assert webapp_socket_refusal(f"{server.ws}/sessions/{sid}/ws/create?token={token}") == \
        (400, why(ids.batch_id, key, "batchID in the session token") + "\n")

    host.roundtrip()  # nothing happened to the session
    assert server.doc("sessions", sid)["members"] == []
    assert [p["userID"] for p in query(server, "sessionPresence", "sessionID", sid).values()] == [owner]
    host.close()
    store_errors, unavailable, refused = counters(server)
    assert (store_errors, unavailable) == before[:2]
    assert refused - before[2] == 10


def test_the_longest_ids_are_taken_and_make_a_valid_presence_key(server: Server) -> None:
    """A user ID of 256 bytes that percent-encodes to 768 characters joins on both APIs, on both stores."""
    batch, owner = server.batch()
    host = Client.connect(owner_url(server, batch, owner))
    sid = host.welcome["sessionID"]
    longest = "é" * (ids.USER_ID_MAX_BYTES // 2)
    member = Client.connect(join_url(server, sid, q(longest)))
    assert member.welcome["members"] == [longest]
    assert host.recv()["memberID"] == longest
    presence = query(server, "sessionPresence", "sessionID", sid)
    assert presence[presence_id(sid, longest)]["userID"] == longest
    member.close()
    assert host.recv()["type"] == "member_left"
    host.close()

    batch, owner = server.batch()
    status, _, body = server.request("POST", f"/sessions/{batch}?userID={owner}")
    assert status == 201, body
    sid = json.loads(body)["sessionID"]
    status, _, body = server.request("POST", f"/sessions/{sid}/join?userID={q(longest)}")
    assert status == 200, body
    assert [m["id"] for m in server.doc("sessions", sid)["members"]] == [longest]
    assert rest(server, "DELETE", f"/sessions/{sid}?userID={owner}")[0] == 204


# -- fuzz: any text as a user ID, on both APIs ---------------------------------------------------------------

#: Text a URL can carry, weighted towards what Firestore keys refuse (dots, slashes, dunders, long strings).
FUZZED_USERS = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40),
    st.builds(lambda a, b: f"__{a}{b}__", st.text(max_size=5), st.text(max_size=5)),
    st.sampled_from([".", "..", "/", "a/b", "__name__", "u" * 257, "é" * 129, " ", "%2F", "\x00"]),
    st.text(st.sampled_from("._/_-aé%"), min_size=1, max_size=300),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(user=FUZZED_USERS)
def test_fuzzed_user_ids_get_no_5xx_on_either_api_and_a_refused_one_writes_nothing(fuzz_session: tuple[Server, str],
                                                                                  user: str) -> None:
    server, sid = fuzz_session
    valid = True
    try:
        ids.user_id(user.strip())  # both APIs take the user ID without surrounding blanks (none: 400)
    except Refusal:
        valid = False
    # The seed's API: a socket join.
    status, client = seed_join(join_url(server, sid, q(user)))
    assert status == (101 if valid else 400) or (valid and status == 409), (status, user)
    if client is not None:
        assert client.welcome["type"] == "session_joined"
        client.close()
    # The web app's API: a REST join.
    status, _, body = rest(server, "POST", f"/sessions/{sid}/join?userID={q(user)}")
    assert status == (200 if valid else 400) or (valid and status == 409), (status, body)
    if not valid:
        assert user not in [m["id"] for m in server.doc("sessions", sid)["members"]]
        assert user not in [p["userID"] for p in query(server, "sessionPresence", "sessionID", sid).values()]


def seed_join(url: str) -> tuple[int, Client | None]:
    """A seed socket join: (101, the client) or (the status refused, None)."""
    try:
        return 101, Client.connect(url)
    except Refused as refused:
        return refused.status, None


@pytest.fixture(scope="module")
def fuzz_session(server: Server) -> Iterator[tuple[Server, str]]:
    batch, owner = server.batch()
    host = Client.connect(owner_url(server, batch, owner))
    yield server, host.welcome["sessionID"]
    host.close()
