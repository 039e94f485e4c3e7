"""Per-client messages over real sockets: image watches, ping, keepalive, bad frames."""

from __future__ import annotations

import pytest
import websocket
from conftest import IDLE, Client, Server, join_url, owner_url, unique, wait_for

SNAPSHOTS = ("labels_snapshot", "bounding_boxes_snapshot")


def _session(server: Server, members: int = 1) -> tuple[Client, list[Client]]:
    batch, owner = server.batch()
    host = Client.connect(owner_url(server, batch, owner))
    sid = host.welcome["sessionID"]
    clients = [Client.connect(join_url(server, sid, f"member-{i}")) for i in range(members)]
    for _ in clients:
        assert host.recv()["type"] == "member_joined"
    for i, c in enumerate(clients):
        for _ in clients[i + 1:]:
            assert c.recv()["type"] == "member_joined"
    return host, clients


def _watch(client: Client, image: str) -> None:
    client.send({"type": "setImageID", "payload": {"imageID": image}})
    first = [client.recv(), client.recv()]
    assert sorted(m["type"] for m in first) == sorted(SNAPSHOTS)
    for m in first:
        assert set(m) == {"type", "sessionID", "time", "changes"}
        assert m["changes"] == {"reset": True, "added": [], "modified": [], "removed": []}  # a new image: none


def test_ping_pong(server: Server) -> None:
    host, _ = _session(server, members=0)
    host.send({"type": "ping"})
    pong = host.recv()
    assert set(pong) == {"type", "time"}
    assert pong["type"] == "pong"
    host.close()


def test_watches_notify_only_the_client_watching_the_image(server: Server) -> None:
    host, (ann, ben) = _session(server, members=2)
    image_a, image_b = unique("image"), unique("image")
    _watch(ann, image_a)
    _watch(ben, image_b)
    sid = host.welcome["sessionID"]

    kp = {"imageID": image_a, "keypointID": "k", "position": {"x": 1, "y": 2}, "boundingBoxID": "b",
          "keypointLabelID": "l"}
    kp_id = unique("kp")
    server.put("keypoints", kp_id, kp)
    labels = ann.recv()
    assert labels == {"type": "labels_snapshot", "sessionID": sid, "time": labels["time"], "changes": {
        "reset": False, "added": [{"id": kp_id, "data": kp}], "modified": [], "removed": []}}
    bb = {"imageID": image_a, "boundingBoxID": "b", "box": {"x": 0, "y": 0, "width": 1, "height": 1},
          "boundingBoxLabelID": "l"}
    bb_id = unique("bb")
    server.put("boundingBoxes", bb_id, bb)
    boxes = ann.recv()
    assert boxes == {"type": "bounding_boxes_snapshot", "sessionID": sid, "time": boxes["time"], "changes": {
        "reset": False, "added": [{"id": bb_id, "data": bb}], "modified": [], "removed": []}}
    # Ben (other image) and the host (no image) got nothing: their next message is the pong.
    ben.roundtrip()
    host.roundtrip()

    server.put("keypoints", unique("kp"), {"imageID": image_b, "keypointID": "k"})
    assert ben.recv()["type"] == "labels_snapshot"
    ann.roundtrip()
    for c in (host, ann, ben):
        c.close()


def test_switching_images_stops_the_previous_watches(server: Server) -> None:
    host, (ann,) = _session(server)
    old, new = unique("image"), unique("image")
    _watch(ann, old)
    assert server.stats()["image_watches"] == 2
    _watch(ann, new)
    assert server.stats()["image_watches"] == 2
    server.put("keypoints", unique("kp"), {"imageID": old, "keypointID": "k"})
    ann.roundtrip()  # nothing from the old image
    server.put("boundingBoxes", unique("bb"), {"imageID": new, "boundingBoxID": "b"})
    assert ann.recv()["type"] == "bounding_boxes_snapshot"
    ann.close()
    host.close()
    wait_for(lambda: server.stats()["image_watches"] == 0, what="watches to stop")


def test_keepalive_reaches_every_client_with_its_role(server_factory) -> None:
    server = server_factory(KEEPALIVE_SECONDS="0.3")
    host, (ann,) = _session(server)
    sid = host.welcome["sessionID"]
    for client, role in ((host, "owner"), (ann, "member")):
        beat = client.recv(skip=())
        assert beat == {"type": "keepalive", "role": role, "sessionID": sid, "time": beat["time"]}
    ann.close()
    host.close()


@pytest.mark.parametrize(("frame", "code"), [
    ("not json", "invalid_json"),
    ("[1, 2]", "invalid_message"),
    ("42", "invalid_message"),
    ('"ping"', "invalid_message"),
    ("null", "invalid_message"),
    ("{}", "invalid_message"),
    ('{"type": 7}', "invalid_message"),
    ('{"type": "dance"}', "unknown_type"),
    ('{"type": "setImageID"}', "invalid_payload"),
    ('{"type": "setImageID", "payload": "image-1"}', "invalid_payload"),
    ('{"type": "setImageID", "payload": {}}', "invalid_payload"),
    ('{"type": "setImageID", "payload": {"imageID": ""}}', "invalid_payload"),
    ('{"type": "setImageID", "payload": {"imageID": "  "}}', "invalid_payload"),
    ('{"type": "setImageID", "payload": {"imageID": 12}}', "invalid_payload"),
    (b"\x00\x01binary", "binary_frame"),
])
def test_bad_frames_get_an_error_and_the_connection_lives_on(server: Server, frame: str | bytes,
                                                             code: str) -> None:
    host, (ann,) = _session(server)
    if isinstance(frame, bytes):
        ann.ws.send_binary(frame)
    else:
        ann.send(frame)
    error = ann.recv()
    assert set(error) == {"type", "code", "message"}
    assert (error["type"], error["code"]) == ("error", code)
    assert error["message"]
    ann.roundtrip()
    _watch(ann, unique("image"))  # still fully working
    host.roundtrip()  # and nobody else noticed
    ann.close()
    host.close()


def test_a_frame_over_the_limit_closes_with_1009(server: Server) -> None:
    host, (ann,) = _session(server)
    sid = host.welcome["sessionID"]
    try:
        ann.send('{"type":"ping","pad":"' + "x" * (64 * 1024) + '"}')
    except (websocket.WebSocketConnectionClosedException, BrokenPipeError, ConnectionResetError):
        pytest.fail("the server cut the connection before its close frame")
    assert ann.closed_with() == 1009
    left = host.recv()
    assert (left["type"], left["memberID"]) == ("member_left", "member-0")
    assert server.doc("sessions", sid)["members"] == []
    host.close()


def test_a_frame_just_under_the_limit_is_read(server: Server) -> None:
    host, _ = _session(server, members=0)
    message = '{"type":"ping","pad":"'
    host.send(message + "x" * (64 * 1024 - len(message) - 2) + '"}')
    assert host.recv()["type"] == "pong"
    host.close()


def test_no_listener_is_left_after_many_switches(server_factory) -> None:
    """20 clients, 200 setImageID switches in all, then everyone leaves: no listener stays open."""
    server = server_factory()
    host, members = _session(server, members=19)
    clients = [host, *members]
    images = [unique("image") for _ in range(5)]
    for round_ in range(10):
        for i, client in enumerate(clients):
            client.send({"type": "setImageID", "payload": {"imageID": images[(i + round_) % len(images)]}})
    for client in clients:
        client.roundtrip_after(SNAPSHOTS)
    stats = server.stats()
    assert stats["image_watches"] == 2 * len(clients)
    assert stats["image_listeners"] == 2 * len(images)
    assert stats["store_watches"] == stats["image_listeners"] + stats["session_listeners"] + \
        stats["member_image_listeners"] + stats["session_writers"]
    for client in members:
        client.close()
    host.close()
    wait_for(lambda: server.stats() == IDLE, what="every listener closed")


def test_clients_watching_the_same_image_share_listeners(server_factory) -> None:
    """50 clients of one process on 3 images: 6 listeners, whatever the number of clients."""
    server = server_factory()
    host, members = _session(server, members=49)
    clients = [host, *members]
    images = [unique("image") for _ in range(3)]
    for i, client in enumerate(clients):
        _watch(client, images[i % 3])
    stats = server.stats()
    assert stats["image_watches"] == 100
    assert stats["image_listeners"] == 6
    # And one on the session document, one on its members' images, one on its presences.
    assert stats["store_watches"] == 6 + 1 + 1 + 1
    # Every watcher of an image is told of its changes through the shared listener.
    server.put("keypoints", unique("kp"), {"imageID": images[1], "keypointID": "k"})
    for i, client in enumerate(clients):
        if i % 3 == 1:
            assert client.recv()["type"] == "labels_snapshot"
        else:
            client.roundtrip()
    for client in members:
        client.close()
    host.close()
    wait_for(lambda: server.stats()["store_watches"] == 0, what="the listeners to stop")
