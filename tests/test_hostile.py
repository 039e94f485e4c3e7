"""Hostile and heavy clients, with the exact bytes that reproduced each defect (raw sockets where they matter):
floods, deep JSON, pipelined bursts, bad handshakes, capacity, caps, faked liveness, quick re-joins."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Callable

import jwt
import pytest
from conftest import (
    TIMEOUT,
    Client,
    Refused,
    Server,
    client_frame,
    join_url,
    owner_url,
    raw_request,
    unique,
    upgrade_headers,
    wait_for,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from canary.protocol import SEED, ProtocolError, parse_client_frame


def session(server: Server) -> tuple[Client, str]:
    batch, owner = server.batch()
    host = Client.connect(owner_url(server, batch, owner))
    return host, host.welcome["sessionID"]


# -- 1. floods ---------------------------------------------------------------------------------------

def test_a_member_flooding_frames_is_refused_then_closed_and_others_are_served_meanwhile(server: Server) -> None:
    host, sid = session(server)
    flooder = Client.connect(join_url(server, sid, "flooder"))
    assert host.recv()["type"] == "member_joined"
    frame = client_frame(0x1, json.dumps({"type": "setImageID", "payload": {"imageID": "img"}}).encode()) * 200
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            try:
                flooder.ws.sock.sendall(frame)
            except OSError:
                return

    pongs: list[float] = []
    health: list[float] = []
    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        until = time.monotonic() + 2.0
        while time.monotonic() < until:
            started = time.monotonic()
            host.roundtrip_after(skip=("member_left",))
            pongs.append(time.monotonic() - started)
            started = time.monotonic()
            assert server.request("GET", "/health")[0] == 200
            health.append(time.monotonic() - started)
            time.sleep(0.05)  # pacing, not waiting: the host stays within its own budget (50 frames/s)
    finally:
        stop.set()
        thread.join(TIMEOUT)
    # The flooder was told once, then closed for going on; the others never waited for it.
    messages: list[dict] = []
    assert flooder.closed_with(seen=messages) == 1008
    assert [m["code"] for m in messages if m["type"] == "error"] == ["rate_limited"]
    assert "closing member 'flooder'" in server.log()
    assert "with 1008" in server.log()
    assert max(pongs) < 1.0, f"pong round trips while flooded: max {max(pongs):.3f} s"
    assert max(health) < 1.0, f"/health while flooded: max {max(health):.3f} s"
    wait_for(lambda: [m["id"] for m in server.doc("sessions", sid)["members"]] == [], what="the flooder gone")
    host.close()


def test_a_websocket_ping_flood_is_refused_then_closed(server: Server) -> None:
    host, sid = session(server)
    member = Client.connect(join_url(server, sid, "pinger"))
    assert host.recv()["type"] == "member_joined"
    burst = client_frame(0x9, b"p") * 2000
    try:
        for _ in range(20):
            member.ws.sock.sendall(burst)
    except OSError:
        pass  # closed by the server meanwhile
    left = host.recv(timeout=10)
    assert (left["type"], left["memberID"]) == ("member_left", "pinger")
    assert member.closed_with() == 1008
    assert "closing member 'pinger'" in server.log()
    host.close()


def test_seventy_pipelined_pings_get_seventy_pongs(server: Server) -> None:
    """70 pings in one TCP write used to close the client with 1013 (63 pongs were sent)."""
    host, sid = session(server)
    host.ws.sock.sendall(client_frame(0x1, b'{"type":"ping"}') * 70)
    assert [host.recv()["type"] for _ in range(70)] == ["pong"] * 70
    host.roundtrip()
    assert "1013" not in server.log().split(sid)[-1]
    host.close()


# -- 2. deep JSON, and any frame at all --------------------------------------------------------------

def test_deeply_nested_json_gets_invalid_json_and_the_connection_lives_on(server: Server) -> None:
    host, _ = session(server)
    host.ws.sock.sendall(client_frame(0x1, b"[" * 1000 + b"]" * 1000))
    error = host.recv()
    assert (error["type"], error["code"]) == ("error", "invalid_json")
    host.ws.sock.sendall(client_frame(0x1, b'{"type":"ping","payload":' + b"[" * 5000 + b"]" * 5000 + b"}"))
    assert host.recv()["code"] == "invalid_json"
    host.roundtrip()
    assert "Traceback" not in server.log()
    assert "RecursionError" not in server.log()
    host.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(), st.binary(),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                              lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
                              max_leaves=30).map(json.dumps),
                 st.builds(lambda t, p: json.dumps({"type": t, "payload": p}),
                           st.sampled_from(["ping", "setImageID", "x", ""]),
                           st.one_of(st.none(), st.text(), st.integers(),
                                     st.dictionaries(st.text(), st.one_of(st.text(), st.integers())))),
                 st.integers(min_value=1, max_value=3000).map(lambda n: "[" * n + "]" * n),
                 st.integers(min_value=1, max_value=3000).map(lambda n: '{"a":' * n + "1" + "}" * n)))
def test_any_client_frame_is_a_request_or_an_error_never_an_exception(data: str | bytes) -> None:
    try:
        request = parse_client_frame(data)
    except ProtocolError as e:
        body = json.loads(e.event().frame(SEED).text)
        assert body["type"] == "error"
        assert body["code"] in {"binary_frame", "invalid_json", "invalid_message", "unknown_type", "invalid_payload"}
    else:
        assert request.type in {"ping", "setImageID"}


# -- 5. handshakes that cannot succeed are refused before anything is written ---------------------

@pytest.mark.parametrize(("headers", "status"), [
    (upgrade_headers(**{"Sec-WebSocket-Version": "8"}), 426),
    (upgrade_headers(**{"Sec-WebSocket-Key": ""}), 400),
    (upgrade_headers(**{"Sec-WebSocket-Key": "not-sixteen-bytes"}), 400),
    (upgrade_headers(**{"Sec-WebSocket-Key": base64.b64encode(b"x" * 15).decode()}), 400),
], ids=["version-8", "no-key", "malformed-key", "short-key"])
def test_a_bad_handshake_is_refused_and_nobody_hears_of_it(server: Server, headers: dict[str, str],
                                                           status: int) -> None:
    host, sid = session(server)
    head, sock = raw_request(server, f"/sessions/{sid}/join?userID=intruder", headers)
    sock.close()
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), head
    if status == 426:
        assert b"\r\nSec-WebSocket-Version: 13\r\n" in head
    host.roundtrip()  # no member_joined, no member_left
    assert server.doc("sessions", sid)["members"] == []
    host.close()


# -- 6, 7. capacity and caps ------------------------------------------------------------------------

def test_a_full_worker_refuses_fast_with_503_and_still_answers_health(server_factory) -> None:
    server = server_factory(MAX_CLIENTS="6")
    host, sid = session(server)
    members = [Client.connect(join_url(server, sid, f"full-{i}")) for i in range(5)]
    started = time.monotonic()
    with pytest.raises(Refused) as caught:
        Client.connect(join_url(server, sid, "one-too-many"))
    assert caught.value.status == 503
    assert time.monotonic() - started < 2.0
    head, sock = raw_request(server, f"/sessions/{sid}/join?userID=x", upgrade_headers())
    sock.close()
    assert head.startswith(b"HTTP/1.1 503 ")
    assert b"\r\nRetry-After: 5\r\n" in head
    assert server.request("GET", "/health")[0] == 200
    members.pop().close()
    wait_for(lambda: _connects(server, sid, "now-there-is-room"), what="room again")
    host.close()


def _connects(server: Server, sid: str, user: str) -> bool:
    try:
        Client.connect(join_url(server, sid, user)).close()
        return True
    except Refused:
        return False


def test_a_user_holds_at_most_its_cap_of_connections(server_factory) -> None:
    server = server_factory(MAX_CONNECTIONS_PER_USER="2")
    sessions = [session(server) for _ in range(3)]
    eve = [Client.connect(join_url(server, sid, "eve")) for _, sid in sessions[:2]]
    with pytest.raises(Refused) as caught:
        Client.connect(join_url(server, sessions[2][1], "eve"))
    assert (caught.value.status, caught.value.body["error"]) == (429, "too many connections of this user are open")
    eve.pop().close()
    wait_for(lambda: _connects(server, sessions[2][1], "eve"), what="eve's third connection, now her second")
    for client in (*eve, *(host for host, _ in sessions)):
        client.close()


def test_an_address_holds_at_most_its_cap_and_x_forwarded_for_counts_only_when_trusted(server_factory) -> None:
    server = server_factory(MAX_CONNECTIONS_PER_ADDRESS="3", TRUSTED_PROXIES="1")
    host, sid = session(server)
    # Behind the one trusted proxy, the address is X-Forwarded-For's last hop (the rest is the client's to forge).
    proxied = [Client.connect(join_url(server, sid, f"proxied-{i}"), header=["X-Forwarded-For: 198.51.100.4"])
               for i in range(3)]
    with pytest.raises(Refused) as caught:
        Client.connect(join_url(server, sid, "proxied-3"), header=["X-Forwarded-For: 198.51.100.4"])
    assert (caught.value.status, caught.value.body["error"]) == (429, "too many connections from this address")
    forged = Client.connect(join_url(server, sid, "forger"), header=["X-Forwarded-For: 198.51.100.4, 203.0.113.9"])
    # Loopback clients (the host above, these) are not capped: a local proxy's clients would all share it.
    local = [Client.connect(join_url(server, sid, f"local-{i}")) for i in range(3)]
    for client in (forged, *proxied, *local, host):
        client.close()


# -- 8. liveness cannot be faked ------------------------------------------------------------------

def test_unsolicited_pongs_do_not_keep_a_silent_peer_alive(server_factory) -> None:
    server = server_factory(IDLE_TIMEOUT_SECONDS="2")
    host, sid = session(server)
    faker = Client.connect(join_url(server, sid, "faker"))  # never reads, sends a pong every 0.3 s
    assert host.recv()["type"] == "member_joined"
    stop = threading.Event()

    def fake() -> None:
        while not stop.wait(0.3):
            try:
                faker.ws.sock.sendall(client_frame(0xA, b"fake"))
            except OSError:
                return

    thread = threading.Thread(target=fake, daemon=True)
    thread.start()
    try:
        left = host.recv(timeout=10)
    finally:
        stop.set()
        thread.join(TIMEOUT)
    assert (left["type"], left["memberID"]) == ("member_left", "faker")
    host.close()


# -- 9. quick re-joins, token lifetimes, JSON for 404 and 405 ---------------------------------------

def test_a_rejoin_right_after_an_abrupt_close_is_never_refused(server: Server) -> None:
    host, sid = session(server)
    member = Client.connect(join_url(server, sid, "flaky"))
    for _ in range(50):
        member.ws.sock.shutdown(socket.SHUT_RDWR)  # gone, without a close frame
        member.ws.sock.close()
        member = Client.connect(join_url(server, sid, "flaky"))
    member.close()
    host.close()


SECRET = "hostile-test-secret-" + "0123456789abcdef" * 3


@pytest.mark.parametrize("exp", [lambda now: str(now + 3600), lambda now: now + 40 * 365 * 24 * 3600],
                         ids=["string", "decades"])
def test_login_tokens_need_a_numeric_bounded_expiry(server_factory, exp: Callable[[int], object]) -> None:
    server = server_factory(JWT_SECRET=SECRET)
    batch, owner = server.batch()
    now = int(time.time())
    token = jwt.encode({"userID": owner, "iat": now, "exp": exp(now)}, SECRET, algorithm="HS256")
    with pytest.raises(Refused) as caught:
        Client.connect(owner_url(server, batch, owner) + f"&auth={token}")
    assert caught.value.status == 401


def test_unknown_paths_and_methods_answer_json(server: Server) -> None:
    status, headers, body = server.request("GET", f"/{unique('nowhere')}")
    assert (status, json.loads(body)["status"]) == (404, 404)
    assert headers["Content-Type"] == "application/json"
    status, headers, body = server.request("PUT", "/health")
    assert (status, json.loads(body)["status"]) == (405, 405)
    assert "GET" in headers["Allow"]
