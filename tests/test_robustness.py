"""Dead peers, slow consumers, identity and origins, over real sockets."""

from __future__ import annotations

import socket
import time

import jwt
import pytest
from conftest import Client, Refused, Server, connect_at_once, join_url, owner_url, scrape, value, wait_for

SECRET = "test-secret-for-canary-" + "0123456789abcdef" * 3


def _token(user: str, *, secret: str = SECRET, algorithm: str = "HS256", ttl: float = 3600,
           **claims: object) -> str:
    now = int(time.time())
    payload = {"userID": user, "email": f"{user}@example.com", "iat": now, "exp": now + int(ttl), **claims}
    return jwt.encode(payload, secret, algorithm=algorithm)


@pytest.fixture(scope="module")
def idle_server(server_factory) -> Server:
    return server_factory(IDLE_TIMEOUT_SECONDS="2")


def test_a_dead_member_is_removed_within_the_idle_timeout(idle_server: Server) -> None:
    server = idle_server
    batch, owner = server.batch()
    host = Client.connect(owner_url(server, batch, owner))
    sid = host.welcome["sessionID"]
    dead = Client.connect(join_url(server, sid, "ghost"))  # never reads again: never answers pings
    assert host.recv()["type"] == "member_joined"
    since = time.monotonic()
    left = host.recv(timeout=10)  # the host reads, so it answers the server's pings
    assert (left["type"], left["memberID"]) == ("member_left", "ghost")
    assert time.monotonic() - since <= 2 + 1.0
    assert server.doc("sessions", sid)["members"] == []
    dead.close()
    host.close()


def test_a_dead_owner_ends_the_session(idle_server: Server) -> None:
    server = idle_server
    batch, owner = server.batch()
    dead_host = Client.connect(owner_url(server, batch, owner))
    sid = dead_host.welcome["sessionID"]
    member = Client.connect(join_url(server, sid, "m"))
    closed = member.recv(timeout=10)
    assert closed["type"] == "session_closed"
    assert member.closed_with() == 4000
    assert server.doc("sessions", sid) is None
    dead_host.close()


#: Members joining (then leaving) at once in each round of the busy session below, and the clients' queue: their
#: messages, all queued at once, must fit in it (the owner, who reads them, is not too slow).
BUSY_AT_ONCE, QUEUE_BYTES = 20, 16384


def test_a_client_that_stops_reading_is_closed_with_1013_and_leaves(server_factory) -> None:
    server = server_factory(CLIENT_QUEUE_BYTES=str(QUEUE_BYTES))
    batch, owner = server.batch()
    host = Client.connect(owner_url(server, batch, owner))
    sid = host.welcome["sessionID"]
    slow = Client.connect(join_url(server, sid, "slow"),
                          sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),))
    assert host.recv()["type"] == "member_joined"

    # The session is busy (members join and leave, again and again) and the slow client reads nothing, until the
    # socket buffers and then its queue are full. (A client flooding requests of its own is stopped by its
    # inbound budget first: test_hostile.py.) Long user IDs make long membership messages, so the buffers fill
    # in fewer rounds: 240 bytes, within the service's 256 (and Firestore's 1,500-byte document keys,
    # `sessionPresence/{sessionID}_{userID}`). Each round's members join at once: a store paces its commits of
    # one session document, so joins one at a time would take too long to fill the buffers before the slow
    # client's idle timeout.
    seen: list[tuple[str, str]] = []
    for i in range(300):
        busy = {f"busy-{i}-{j}-".ljust(240, "x") for j in range(BUSY_AT_ONCE)}
        joined, refused = connect_at_once(sorted(join_url(server, sid, user) for user in busy))
        assert refused == []
        for client in joined:
            client.close()
        left: set[str] = set()
        while left != busy:
            message = host.recv()
            if message["type"] == "member_left" and message["memberID"] in busy:
                left.add(message["memberID"])
            else:
                seen.append((message["type"], message["memberID"]))
        if ("member_left", "slow") in seen:
            break
    assert ("member_left", "slow") in seen
    wait_for(lambda: server.doc("sessions", sid)["members"] == [], what="no member left in the session document",
             detail=lambda: server.doc("sessions", sid))
    assert slow.closed_with(timeout=30, skip=("member_joined", "member_left", "keepalive")) == 1013
    assert "closing member 'slow'" in server.log()
    assert "with 1013" in server.log()
    wait_for(lambda: value(scrape(server), "canary_closes_total", code="1013") >= 1,
             what="the drop counted in /metrics")
    host.roundtrip_after(skip=("member_left",))
    host.close()


@pytest.fixture(scope="module")
def secure_server(server_factory) -> Server:
    return server_factory(JWT_SECRET=SECRET, CORS_ALLOW_ORIGIN="https://app.example",
                          CORS_ALLOW_CREDENTIALS="true")


def test_a_valid_token_in_the_header_or_the_query_is_accepted(secure_server: Server) -> None:
    server = secure_server
    batch, owner = server.batch()
    host = Client.connect(owner_url(server, batch, owner), header=[f"Authorization: Bearer {_token(owner)}"])
    sid = host.welcome["sessionID"]
    member = Client.connect(join_url(server, sid, "ann") + f"&auth={_token('ann')}")
    assert member.welcome["type"] == "session_joined"
    member.close()
    host.close()


@pytest.mark.parametrize(("make_token", "status"), [
    (lambda user: None, 401),
    (lambda user: "garbage", 401),
    (lambda user: _token(user, ttl=-60), 401),
    (lambda user: _token(user, secret="another-secret-0123456789abcdef0123"), 401),
    (lambda user: _token(user, algorithm="HS512"), 401),
    (lambda user: jwt.encode({"userID": user}, SECRET, algorithm="HS256"), 401),  # no exp
    (lambda user: _token("someone-else"), 403),
], ids=["missing", "garbage", "expired", "wrong-secret", "hs512", "no-exp", "other-user"])
def test_bad_tokens_are_refused_before_the_upgrade(secure_server: Server, make_token, status: int) -> None:
    server = secure_server
    batch, owner = server.batch()
    token = make_token(owner)
    for url in (owner_url(server, batch, owner), join_url(server, "any-session", owner)):
        with pytest.raises(Refused) as e:
            Client.connect(url + (f"&auth={token}" if token else ""))
        assert e.value.status == status
        assert e.value.body["status"] == status
    assert server.doc("sessionLocks", batch) is None


def test_websockets_from_other_origins_are_refused(secure_server: Server) -> None:
    server = secure_server
    batch, owner = server.batch()
    url = owner_url(server, batch, owner) + f"&auth={_token(owner)}"
    with pytest.raises(Refused) as e:
        Client.connect(url, origin="https://evil.example")
    assert e.value.status == 403
    Client.connect(url, origin="https://app.example").close()


def test_cors_headers_and_preflight(secure_server: Server) -> None:
    server = secure_server
    status, headers, _ = server.request("OPTIONS", "/sessions/x", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "GET"})
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert headers["Access-Control-Allow-Credentials"] == "true"
    assert "GET" in headers["Access-Control-Allow-Methods"]
    assert "Authorization" in headers["Access-Control-Allow-Headers"]
    status, headers, _ = server.request("GET", "/health", headers={"Origin": "https://evil.example"})
    assert status == 200
    assert "Access-Control-Allow-Origin" not in headers


def test_open_service_warns_once(server: Server) -> None:
    wait_for(lambda: "JWT_SECRET is not set" in server.log(), what="the warning")
    assert server.log().count("JWT_SECRET is not set") == 1
