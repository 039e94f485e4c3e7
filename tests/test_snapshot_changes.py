"""The `changes` of the snapshot messages over real servers and sockets (issue 18, part 2), on both stores: exact
for sequences of adds, modifications and deletions; every document as added (`reset`) to the first snapshot of a
watch, a second client's on the same image included; merged for a client that does not read while several
changes land; `null` past `MAX_SNAPSHOT_CHANGES_BYTES`; and across two processes on one Firestore."""

from __future__ import annotations

import json
import select
import socket
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Client,
    Emulator,
    Server,
    client_frame,
    join_url,
    owner_url,
    read_frame,
    servers,
    start_server,
    unique,
    upgrade_headers,
    wait_for,
)
from google.cloud.firestore_v1.base_query import FieldFilter

LABELS, BOXES = "labels_snapshot", "bounding_boxes_snapshot"
SNAPSHOTS = (LABELS, BOXES)
COLLECTION = {LABELS: "keypoints", BOXES: "boundingBoxes"}
WAIT = 30.0  # Firestore's snapshots reach the service within a second; a busy machine is slower
OTHER = ("keepalive", "member_joined", "member_left", "owner_joined", "owner_left", "member_image")


def remove(server: Server, collection: str, doc_id: str) -> None:
    """Delete a document, as another Canary service would."""
    if server.firestore is not None:
        server.firestore.collection(collection).document(doc_id).delete()
        return
    status, _, body = server.request("DELETE", f"/dev/documents/{collection}/{doc_id}")
    assert status == 204, body


def stored(server: Server, collection: str, image: str) -> dict[str, Any]:
    """The image's documents of `collection` now, as the service would render them."""
    if server.firestore is not None:
        docs = server.firestore.collection(collection).where(filter=FieldFilter("imageID", "==", image)).get()
        return {d.id: d.to_dict() for d in docs}
    status, _, body = server.request("GET", f"/dev/documents/{collection}?field=imageID&value={image}")
    assert status == 200, body
    return json.loads(body)


def normal(changes: dict[str, Any] | None) -> dict[str, Any] | None:
    """`changes` with its lists as mappings (their order says nothing)."""
    if changes is None:
        return None
    assert set(changes) == {"reset", "added", "modified", "removed"}, changes
    ids = [d["id"] for d in changes["added"] + changes["modified"]] + changes["removed"]
    assert len(ids) == len(set(ids)), f"an ID listed twice: {changes}"
    return {"reset": changes["reset"], "added": {d["id"]: d["data"] for d in changes["added"]},
            "modified": {d["id"]: d["data"] for d in changes["modified"]}, "removed": set(changes["removed"])}


def said(reset: bool = False, added: dict[str, Any] | None = None, modified: dict[str, Any] | None = None,
         removed: set[str] | None = None) -> dict[str, Any]:
    return {"reset": reset, "added": added or {}, "modified": modified or {}, "removed": removed or set()}


class Watcher:
    """A client watching an image and keeping its copy of the image's documents as docs/protocol.md says a client
    does: replace it on a reset, apply the changes otherwise."""

    def __init__(self, client: Client, sid: str) -> None:
        self.client, self.sid = client, sid
        self.copies: dict[str, dict[str, Any]] = {LABELS: {}, BOXES: {}}

    def watch(self, image: str) -> dict[str, dict[str, Any] | None]:
        """setImageID; the first snapshot of each kind, by type."""
        self.client.send({"type": "setImageID", "payload": {"imageID": image}})
        first = dict(self.next() for _ in SNAPSHOTS)
        assert set(first) == set(SNAPSHOTS)
        return first

    def next(self, timeout: float = WAIT) -> tuple[str, dict[str, Any] | None]:
        """The next snapshot message (type, normalised changes), applied to the copy."""
        message = self.client.recv(timeout=timeout, skip=OTHER)
        assert message["type"] in SNAPSHOTS, message
        assert set(message) == {"type", "sessionID", "time", "changes"}, message
        assert message["sessionID"] == self.sid
        self.apply(message["type"], message["changes"])
        return message["type"], normal(message["changes"])

    def apply(self, kind: str, changes: dict[str, Any] | None) -> None:
        assert changes is not None, "null (past the cap) is not expected here"
        copy = {} if changes["reset"] else self.copies[kind]
        for doc_id in changes["removed"]:
            del copy[doc_id]  # a removed document is one the client was told of
        for doc in changes["added"]:
            assert doc["id"] not in copy, f"{doc['id']} added twice"
            copy[doc["id"]] = doc["data"]
        for doc in changes["modified"]:
            assert doc["id"] in copy, f"{doc['id']} modified before it was added"
            copy[doc["id"]] = doc["data"]
        self.copies[kind] = copy


def seed_session(server: Server, watchers: int = 1) -> tuple[Client, list[Watcher]]:
    """A new session (seed API): its owner's client and `watchers` members, each told of the ones after it."""
    batch, owner = server.batch()
    host = Client.connect(owner_url(server, batch, owner))
    sid = host.welcome["sessionID"]
    members = [Watcher(Client.connect(join_url(server, sid, unique("member"))), sid) for _ in range(watchers)]
    return host, members


def keypoint(image: str, n: int, **more: Any) -> dict[str, Any]:
    return {"imageID": image, "keypointID": f"k{n}", "position": {"x": n, "y": 2 * n}, "keypointLabelID": "beak",
            **more}


# -- one process, both stores ------------------------------------------------------------------------------

def test_changes_are_exact_for_adds_modifications_and_deletions(server: Server) -> None:
    image = unique("image")
    k1, k2, b1 = unique("kp"), unique("kp"), unique("bb")
    server.put("keypoints", k1, keypoint(image, 1))
    server.put("keypoints", k2, keypoint(image, 2))
    server.put("boundingBoxes", b1, {"imageID": image, "box": {"x": 0, "y": 0, "width": 4, "height": 3}})
    server.put("keypoints", unique("kp"), keypoint(unique("image"), 9))  # another image's: never mentioned
    host, (ann,) = seed_session(server)

    first = ann.watch(image)
    assert first == {LABELS: said(True, {k1: keypoint(image, 1), k2: keypoint(image, 2)}),
                     BOXES: said(True, {b1: {"imageID": image, "box": {"x": 0, "y": 0, "width": 4, "height": 3}}})}

    k3 = unique("kp")
    server.put("keypoints", k3, keypoint(image, 3))
    assert ann.next() == (LABELS, said(added={k3: keypoint(image, 3)}))
    server.put("keypoints", k1, keypoint(image, 1, position={"x": 10, "y": 11}))
    assert ann.next() == (LABELS, said(modified={k1: keypoint(image, 1, position={"x": 10, "y": 11})}))
    remove(server, "keypoints", k2)
    assert ann.next() == (LABELS, said(removed={k2}))
    server.put("boundingBoxes", b1, {"imageID": image, "box": {"x": 1, "y": 1, "width": 4, "height": 3}})
    assert ann.next() == (BOXES, said(modified={b1: {"imageID": image, "box": {"x": 1, "y": 1, "width": 4,
                                                                                "height": 3}}}))
    server.put("keypoints", k3, keypoint(unique("image"), 3))  # moved to another image: gone from this one
    assert ann.next() == (LABELS, said(removed={k3}))
    remove(server, "boundingBoxes", b1)
    assert ann.next() == (BOXES, said(removed={b1}))
    ann.client.roundtrip_after(OTHER)  # nothing else

    assert ann.copies == {LABELS: stored(server, "keypoints", image), BOXES: stored(server, "boundingBoxes", image)}
    ann.client.close()
    host.close()


def test_timestamps_are_rfc3339_strings(server: Server) -> None:
    if server.firestore is None:
        pytest.skip("only Firestore stores timestamps (the dev API writes JSON)")
    image, k1 = unique("image"), unique("kp")
    host, (ann,) = seed_session(server)
    ann.watch(image)
    server.put("keypoints", k1, keypoint(image, 1, createdAt=datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)))
    assert ann.next() == (LABELS, said(added={k1: keypoint(image, 1, createdAt="2026-03-04T05:06:07.890123Z")}))
    ann.client.close()
    host.close()


def test_a_second_client_on_the_same_image_is_told_every_document_as_added(server: Server) -> None:
    image, k1, k2 = unique("image"), unique("kp"), unique("kp")
    server.put("keypoints", k1, keypoint(image, 1))
    host, (ann, ben) = seed_session(server, watchers=2)
    assert ann.watch(image)[LABELS] == said(True, {k1: keypoint(image, 1)})
    server.put("keypoints", k2, keypoint(image, 2))
    assert ann.next() == (LABELS, said(added={k2: keypoint(image, 2)}))

    # The image's listener is ready: ben (same session) and cara (another one) get its documents now.
    assert ben.watch(image) == {LABELS: said(True, {k1: keypoint(image, 1), k2: keypoint(image, 2)}),
                                BOXES: said(True)}
    other_host, (cara,) = seed_session(server)
    assert cara.watch(image)[LABELS] == said(True, {k1: keypoint(image, 1), k2: keypoint(image, 2)})
    ann.client.roundtrip_after(OTHER)  # ann was told nothing of their arrival

    remove(server, "keypoints", k1)
    for watcher in (ann, ben, cara):
        assert watcher.next() == (LABELS, said(removed={k1})), "everyone, from the same snapshot"
    # Switching away and back starts again from a reset.
    ben.watch(unique("image"))
    assert ben.watch(image)[LABELS] == said(True, {k2: keypoint(image, 2)})
    for client in (ann.client, ben.client, cara.client, host, other_host):
        client.close()


@pytest.fixture(scope="module")
def capped(server_factory: Callable[..., Server]) -> Server:
    return server_factory(MAX_SNAPSHOT_CHANGES_BYTES="400")


def test_changes_past_the_cap_are_null(capped: Server) -> None:
    server = capped
    image, k1, k2 = unique("image"), unique("kp"), unique("kp")
    host, (ann,) = seed_session(server)
    assert ann.watch(image)[LABELS] == said(True)
    server.put("keypoints", k1, keypoint(image, 1))
    assert ann.next() == (LABELS, said(added={k1: keypoint(image, 1)}))
    server.put("keypoints", k2, keypoint(image, 2, note="x" * 400))  # its JSON alone is over 400 bytes
    message = ann.client.recv(timeout=WAIT)
    assert message == {"type": LABELS, "sessionID": ann.sid, "time": message["time"], "changes": None}
    # A client re-fetches then; the next changes are relative to that snapshot again.
    ann.copies[LABELS] = stored(server, "keypoints", image)
    remove(server, "keypoints", k1)
    assert ann.next() == (LABELS, said(removed={k1}))

    # A first snapshot too large to list is null as well: re-fetch.
    other_host, (ben,) = seed_session(server)
    ben.client.send({"type": "setImageID", "payload": {"imageID": image}})
    firsts = {m["type"]: m["changes"] for m in (ben.client.recv(timeout=WAIT), ben.client.recv(timeout=WAIT))}
    assert firsts == {LABELS: None, BOXES: {"reset": True, "added": [], "modified": [], "removed": []}}
    for client in (ann.client, ben.client, host, other_host):
        client.close()


# -- a client that does not read: its snapshots coalesce, their changes merge --------------------------------

class SlowReader:
    """A raw WebSocket member with a small receive buffer (no autotuning), which reads only when told."""

    def __init__(self, server: Server, sid: str, user: str) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)  # before connecting: the window stays small
        sock.settimeout(WAIT)
        sock.connect(("127.0.0.1", server.port))
        request = [f"GET /sessions/{sid}/join?userID={user} HTTP/1.1", "Host: 127.0.0.1",
                   *(f"{k}: {v}" for k, v in upgrade_headers().items())]
        sock.sendall(("\r\n".join(request) + "\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            byte = sock.recv(1)
            assert byte, head
            head += byte
        assert head.startswith(b"HTTP/1.1 101"), head
        self.sock = sock
        self.skip: tuple[str, ...] = OTHER

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(client_frame(0x1, json.dumps(message).encode()))

    def recv(self) -> dict[str, Any]:
        """The next message but keepalives (WebSocket pings answered)."""
        while True:
            frame = read_frame(self.sock)
            assert frame is not None, "the connection ended"
            opcode, payload = frame
            if opcode == 0x9:
                self.sock.sendall(client_frame(0xA, payload))
            elif opcode == 0x1:
                message = json.loads(payload)
                if message["type"] not in self.skip:
                    return message
            else:
                raise AssertionError(f"unexpected frame {opcode}: {payload[:100]!r}")

    def large_frame_arriving(self) -> bool:
        """Whether the head of a frame of over 64 KiB has arrived (left unread); messages of other kinds before it
        are read."""
        while select.select([self.sock], [], [], 0)[0]:
            head = self.sock.recv(2, socket.MSG_PEEK)
            if len(head) == 2 and head[1] & 0x7F == 127:
                return True
            frame = read_frame(self.sock)  # one whole small frame
            assert frame is not None, "the connection ended"
            if frame[0] == 0x9:
                self.sock.sendall(client_frame(0xA, frame[1]))
            else:
                assert json.loads(frame[1])["type"] in OTHER, f"expected the large snapshot, got {frame}"
        return False


@pytest.fixture(scope="module")
def roomy(server_factory: Callable[..., Server]) -> Server:
    """A server that lists a 600 KB document's changes (and takes it through the dev API)."""
    return server_factory(MAX_SNAPSHOT_CHANGES_BYTES="2000000", MAX_BODY_BYTES="2000000", IDLE_TIMEOUT_SECONDS="120")


def test_changes_landing_while_a_client_does_not_read_reach_it_merged_in_one_snapshot(roomy: Server) -> None:
    server = roomy
    image = unique("image")
    e, f, a, b, c, filler = (unique(name) for name in ("e", "f", "a", "b", "c", "filler"))
    server.put("keypoints", e, keypoint(image, 1))
    server.put("keypoints", f, keypoint(image, 2))
    host, (reader,) = seed_session(server)
    slow = SlowReader(server, reader.sid, unique("slow"))
    assert slow.recv()["type"] == "session_joined"
    slow.send({"type": "setImageID", "payload": {"imageID": image}})
    firsts = {m["type"]: normal(m["changes"]) for m in (slow.recv(), slow.recv())}
    assert firsts[LABELS] == said(True, {e: keypoint(image, 1), f: keypoint(image, 2)})
    reader.watch(image)

    # A snapshot larger than every buffer between the service and the slow client: its writer blocks in it.
    big = keypoint(image, 3, note="x" * 600_000)
    server.put("keypoints", filler, big)
    assert reader.next() == (LABELS, said(added={filler: big}))
    wait_for(slow.large_frame_arriving, timeout=WAIT, what="the slow client's writer to take the large snapshot")

    # Meanwhile: added then modified, added then removed, modified then removed, removed then added, added.
    server.put("keypoints", a, keypoint(image, 4))
    server.put("keypoints", a, keypoint(image, 4, position={"x": 40, "y": 41}))
    server.put("keypoints", b, keypoint(image, 5))
    remove(server, "keypoints", b)
    server.put("keypoints", e, keypoint(image, 1, position={"x": 0, "y": 0}))
    remove(server, "keypoints", e)
    remove(server, "keypoints", f)
    server.put("keypoints", f, keypoint(image, 2, keypointLabelID="eye"))
    server.put("keypoints", c, keypoint(image, 6))
    final = {a: keypoint(image, 4, position={"x": 40, "y": 41}), c: keypoint(image, 6), filler: big,
             f: keypoint(image, 2, keypointLabelID="eye")}
    # Once the reader (same process, same snapshots) has seen the last of them, the slow client's are queued too.
    while reader.copies[LABELS] != final:
        reader.next()

    slow.send({"type": "ping"})
    large = slow.recv()
    assert (large["type"], normal(large["changes"])) == (LABELS, said(added={filler: big}))
    merged = slow.recv()
    assert merged["type"] == LABELS
    assert normal(merged["changes"]) == said(added={a: final[a], c: final[c]}, modified={f: final[f]},
                                             removed={e})
    assert slow.recv()["type"] == "pong", "the changes came in one snapshot"
    slow.sock.close()
    reader.client.close()
    host.close()


# -- two processes on one Firestore ------------------------------------------------------------------------

@pytest.fixture
def processes(tmp_path: Path, emulator: Emulator) -> Iterator[Callable[..., Server]]:
    """Service processes of one deployment (a Firestore project of their own)."""
    project = unique("demo-changes")
    with servers(lambda **env: start_server(tmp_path, emulator, project=project, **env)) as start:
        yield start


def test_watchers_on_two_processes_are_told_the_same_exact_changes(processes: Callable[..., Server]) -> None:
    a, b = processes(), processes()
    image = unique("image")
    k1, k2, k3 = unique("kp"), unique("kp"), unique("kp")
    a.put("keypoints", k1, keypoint(image, 1))  # the test is the writer: a third process
    batch, owner = a.batch()
    host = Client.connect(owner_url(a, batch, owner))
    sid = host.welcome["sessionID"]
    on_a = Watcher(host, sid)
    on_b = Watcher(Client.connect(join_url(b, sid, unique("member"))), sid)
    for watcher in (on_a, on_b):
        assert watcher.watch(image)[LABELS] == said(True, {k1: keypoint(image, 1)})

    steps = [
        (lambda: a.put("keypoints", k2, keypoint(image, 2)), said(added={k2: keypoint(image, 2)})),
        (lambda: a.put("keypoints", k1, keypoint(image, 1, keypointLabelID="eye")),
         said(modified={k1: keypoint(image, 1, keypointLabelID="eye")})),
        (lambda: remove(a, "keypoints", k2), said(removed={k2})),
        (lambda: a.put("keypoints", k3, keypoint(image, 3)), said(added={k3: keypoint(image, 3)})),
    ]
    for write, expected in steps:
        write()
        for watcher in (on_a, on_b):
            assert watcher.next() == (LABELS, expected)
    late = Watcher(Client.connect(join_url(b, sid, unique("late"))), sid)
    assert late.watch(image)[LABELS] == said(True, {k1: keypoint(image, 1, keypointLabelID="eye"),
                                                    k3: keypoint(image, 3)})
    for watcher in (on_a, on_b, late):
        assert watcher.copies[LABELS] == stored(a, "keypoints", image)
        watcher.client.close()
