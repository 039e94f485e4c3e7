"""Session lifecycle over real sockets: create, join, leave, owner leave, and the store after each step."""

from __future__ import annotations

import base64
import json
import os
import socket
from datetime import datetime

import pytest
from conftest import IDLE, TIMEOUT, Client, Refused, Server, connect_at_once, join_url, owner_url, unique, wait_for


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


def test_health(server: Server) -> None:
    status, _headers, body = server.request("GET", "/health")
    assert (status, body) == (200, b"OK")


@pytest.mark.parametrize("path", ["/sessions/some-batch?userID=u", "/sessions/some-session/join?userID=u"])
def test_plain_get_of_a_session_route_gets_426(server: Server, path: str) -> None:
    """A plain POST there is the web app's REST call (test_webapp.py); a plain GET means neither API."""
    status, headers, body = server.request("GET", path)
    assert status == 426
    assert headers["Upgrade"] == "websocket"
    assert json.loads(body) == {"error": json.loads(body)["error"], "status": 426}
    assert "WebSocket" in json.loads(body)["error"]


def test_create_welcomes_the_owner_and_writes_the_session(server: Server) -> None:
    batch, owner = server.batch()
    project = server.doc("batches", batch)["projectID"]
    client = Client.connect(owner_url(server, batch, owner))
    welcome = client.welcome
    assert set(welcome) == {"type", "sessionID", "batchID", "role", "images", "time"}
    assert welcome["type"] == "session_created"
    assert (welcome["batchID"], welcome["role"]) == (batch, "owner")
    sid = welcome["sessionID"]
    assert len(sid) == 20
    assert sid.isalnum()
    doc = server.doc("sessions", sid)
    assert set(doc) == {"owner", "batchID", "projectID", "members", "lastUpdated"}
    assert doc["owner"] == {"id": owner, "email": f"{owner}@example.com"}
    assert (doc["batchID"], doc["projectID"], doc["members"]) == (batch, project, [])
    assert server.doc("sessionLocks", batch)["sessionID"] == sid
    client.close()


def test_session_ids_are_random(server: Server) -> None:
    ids = set()
    for _ in range(3):
        batch, owner = server.batch()
        client = Client.connect(owner_url(server, batch, owner))
        ids.add(client.welcome["sessionID"])
        client.close()
    assert len(ids) == 3


def _raw_handshake(server: Server, method: str, path: str) -> tuple[bytes, socket.socket]:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    return data, sock


def test_post_with_upgrade_headers_creates_too_and_deflate_is_refused(server: Server) -> None:
    batch, owner = server.batch()
    head, sock = _raw_handshake(server, "POST", f"/sessions/{batch}?userID={owner}")
    try:
        assert head.startswith(b"HTTP/1.1 101"), head
        assert b"sec-websocket-extensions" not in head.lower()  # permessage-deflate refused
        sid = wait_for(lambda: server.request("GET", f"/dev/documents/sessionLocks/{batch}")[0] == 200
                       and server.doc("sessionLocks", batch)["sessionID"], what="the session")
        assert server.doc("sessions", sid)["owner"]["id"] == owner
    finally:
        sock.close()
    wait_for(lambda: server.doc("sessions", sid) is None, what="the session to end")


@pytest.mark.parametrize("query", ["", "?userID=", "?userID=%20"])
def test_missing_user_id_is_400(server: Server, query: str) -> None:
    batch, _ = server.batch()
    with pytest.raises(Refused) as create:
        Client.connect(f"{server.ws}/sessions/{batch}{query}")
    with pytest.raises(Refused) as join:
        Client.connect(f"{server.ws}/sessions/whatever/join{query}")
    for refusal in (create.value, join.value):
        assert refusal.status == 400
        assert refusal.body == {"error": "the userID query parameter is required", "status": 400}


def test_create_refusals(server: Server) -> None:
    batch, owner = server.batch()
    with pytest.raises(Refused) as e:
        Client.connect(owner_url(server, unique("no-such-batch"), owner))
    assert e.value.status == 404
    assert e.value.body["status"] == 404

    orphan = unique("orphan")
    server.put("batches", orphan, {"projectID": unique("no-such-project"), "batchName": "x"})
    with pytest.raises(Refused) as e:
        Client.connect(owner_url(server, orphan, owner))
    assert e.value.status == 404
    assert "project" in e.value.body["error"]

    with pytest.raises(Refused) as e:
        Client.connect(owner_url(server, batch, unique("not-the-owner")))
    assert e.value.status == 403
    assert e.value.body["status"] == 403

    first = Client.connect(owner_url(server, batch, owner))
    with pytest.raises(Refused) as e:
        Client.connect(owner_url(server, batch, owner))
    assert e.value.status == 409
    assert e.value.body["status"] == 409
    first.close()
    # Once the session is over the batch is free again.
    wait_for(lambda: server.doc("sessionLocks", batch) is None, what="the lock to go")
    Client.connect(owner_url(server, batch, owner)).close()


def test_simultaneous_creates_exactly_one_wins(server: Server) -> None:
    batch, owner = server.batch()
    winners, refused = connect_at_once([owner_url(server, batch, owner)] * 8)
    assert len(winners) == 1
    assert refused == [409] * 7
    assert server.doc("sessionLocks", batch)["sessionID"] == winners[0].welcome["sessionID"]
    winners[0].close()


def test_join_refusals(server: Server) -> None:
    with pytest.raises(Refused) as e:
        Client.connect(join_url(server, unique("no-such-session"), "m"))
    assert e.value.status == 404
    assert e.value.body["status"] == 404

    batch, owner = server.batch()
    host = Client.connect(owner_url(server, batch, owner))
    sid = host.welcome["sessionID"]
    with pytest.raises(Refused) as e:
        Client.connect(join_url(server, sid, owner))
    assert e.value.status == 409
    member = Client.connect(join_url(server, sid, "m1"))
    with pytest.raises(Refused) as e:
        Client.connect(join_url(server, sid, "m1"))
    assert e.value.status == 409
    assert e.value.body["status"] == 409
    assert [m["id"] for m in server.doc("sessions", sid)["members"]] == ["m1"]
    member.close()
    host.close()


def test_join_and_leave_are_announced_and_stored(server: Server) -> None:
    batch, owner = server.batch()
    server.put("users", "ann", {"email": "ann@example.com"})
    host = Client.connect(owner_url(server, batch, owner))
    sid = host.welcome["sessionID"]
    created = _ts(server.doc("sessions", sid)["lastUpdated"])

    ann = Client.connect(join_url(server, sid, "ann"))
    assert ann.welcome == {"type": "session_joined", "sessionID": sid, "role": "member", "ownerID": owner,
                           "members": ["ann"], "images": {}, "time": ann.welcome["time"]}
    joined = host.recv()
    assert joined == {"type": "member_joined", "sessionID": sid, "memberID": "ann", "time": joined["time"]}
    doc = server.doc("sessions", sid)
    assert doc["members"] == [{"id": "ann", "email": "ann@example.com"}]
    after_ann = _ts(doc["lastUpdated"])
    assert after_ann >= created

    ben = Client.connect(join_url(server, sid, "ben"))  # no users/ben document: empty e-mail
    assert ben.welcome["members"] == ["ann", "ben"]
    for client in (host, ann):
        message = client.recv()
        assert (message["type"], message["memberID"]) == ("member_joined", "ben")
    ben.roundtrip()  # ben is not told about himself
    assert server.doc("sessions", sid)["members"] == [{"id": "ann", "email": "ann@example.com"},
                                                      {"id": "ben", "email": ""}]

    ann.close()
    for client in (host, ben):
        left = client.recv()
        assert left == {"type": "member_left", "sessionID": sid, "memberID": "ann", "time": left["time"]}
    doc = server.doc("sessions", sid)
    assert doc["members"] == [{"id": "ben", "email": ""}]
    assert _ts(doc["lastUpdated"]) >= after_ann
    host.roundtrip()
    ben.close()
    assert host.recv()["memberID"] == "ben"
    assert server.doc("sessions", sid)["members"] == []
    host.close()


def test_owner_leaving_closes_every_member_with_4000_and_deletes_the_session(server: Server) -> None:
    batch, owner = server.batch()
    host = Client.connect(owner_url(server, batch, owner))
    sid = host.welcome["sessionID"]
    members = [Client.connect(join_url(server, sid, f"m{i}")) for i in range(3)]
    for m in members:
        m.send({"type": "setImageID", "payload": {"imageID": unique("img")}})
    wait_for(lambda: server.stats()["image_watches"] == 6, what="6 watches")
    host.close()
    for m in members:
        message = m.recv(skip=("keepalive", "member_joined", "labels_snapshot", "bounding_boxes_snapshot"))
        assert message == {"type": "session_closed", "sessionID": sid, "time": message["time"]}
        assert m.closed_with() == 4000
    assert server.doc("sessions", sid) is None
    assert server.doc("sessionLocks", batch) is None
    wait_for(lambda: server.stats() == IDLE, what="nothing left")


def test_a_member_joining_after_the_owner_left_is_closed(server: Server) -> None:
    batch, owner = server.batch()
    host = Client.connect(owner_url(server, batch, owner))
    sid = host.welcome["sessionID"]
    host.close()
    wait_for(lambda: server.doc("sessions", sid) is None, what="the session to end")
    with pytest.raises(Refused) as e:
        Client.connect(join_url(server, sid, "late"))
    assert e.value.status == 404


def test_everything_returns_to_zero_after_everyone_leaves(server_factory) -> None:
    server = server_factory()  # its own process, so other tests' clients do not count
    # A first client opens what the process keeps for all (Firestore: its Listen stream and its greenlets).
    batch, owner = server.batch()
    warm_up = Client.connect(owner_url(server, batch, owner))
    warm_up.send({"type": "setImageID", "payload": {"imageID": "image-0"}})
    assert {warm_up.recv()["type"] for _ in range(2)} == {"labels_snapshot", "bounding_boxes_snapshot"}
    warm_up.close()
    wait_for(lambda: server.stats() == IDLE, what="the warm-up gone")
    base = wait_for(lambda: server.stats(greenlets=True), what="stats")
    batch, owner = server.batch()
    host = Client.connect(owner_url(server, batch, owner))
    sid = host.welcome["sessionID"]
    members = [Client.connect(join_url(server, sid, f"z{i}")) for i in range(10)]
    for i, m in enumerate(members):
        m.send({"type": "setImageID", "payload": {"imageID": f"image-{i % 3}"}})
    host.send({"type": "setImageID", "payload": {"imageID": "image-0"}})
    loaded = wait_for(lambda: (s := server.stats(greenlets=True))["image_watches"] == 22 and s,
                      what="22 watches")
    assert loaded["image_listeners"] == 6  # 3 images: their listeners are shared
    assert loaded["session_listeners"] == 1
    # 6 images, the session document, its members' images, its presences (it writes them).
    assert loaded["store_watches"] == 9
    assert loaded["participants"] == 11
    assert loaded["greenlets"] > base["greenlets"]
    for m in members[:5]:
        m.close()
    host.close()
    for m in members[5:]:
        assert m.closed_with(skip=("keepalive", "member_joined", "member_left", "labels_snapshot",
                                   "bounding_boxes_snapshot", "session_closed")) == 4000
    # Idle greenlets of the server itself may end meanwhile: at most as many as before.
    wait_for(lambda: (s := server.stats(greenlets=True)).pop("greenlets") <= base["greenlets"]
             and s == {k: v for k, v in base.items() if k != "greenlets"},
             what=f"stats back to {base}", detail=lambda: server.stats(greenlets="where"),
             timeout=30)  # greenlets that end by themselves may take seconds on a busy machine; a leak stays
