"""What only the Firestore store has: start-up against a dead backend, an emulator
restart mid-session, the gRPC thread hand-off, and the documents other services read."""

from __future__ import annotations

import subprocess
import sys
import threading

import gevent
import pytest
from conftest import (
    FIRESTORE_PROJECT,
    ROOT,
    Client,
    Emulator,
    Refused,
    connect_at_once,
    free_port,
    join_url,
    owner_url,
    start_server,
    unique,
    wait_for,
)

from canary.clients import Client as QueueClient
from canary.firestore_store import FirestoreStore
from canary.protocol import LABELS_SNAPSHOT
from canary.store import KEYPOINTS


def test_start_up_with_firestore_down_fails_with_one_clear_line() -> None:
    port = free_port()  # nothing listens there
    env = {"PATH": "/usr/bin:/bin", "PORT": str(free_port()), "CANARY_STORE": "firestore",
           "FIRESTORE_EMULATOR_HOST": f"127.0.0.1:{port}", "GCP_PROJECT_ID": FIRESTORE_PROJECT,
           "FIRESTORE_TIMEOUT_SECONDS": "2", "WEB_CONCURRENCY": "1"}
    result = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if "canary: cannot start" in line]
    assert len(lines) == 1, output
    assert "Firestore did not answer" in lines[0]


def test_x_session_id_reader_sees_owner_and_member_ids(server_factory, store_kind: str) -> None:
    if store_kind != "firestore":
        pytest.skip("reads the Firestore documents themselves")
    server = server_factory()
    batch, owner = server.batch()
    host = Client.connect(owner_url(server, batch, owner))
    sid = host.welcome["sessionID"]
    member = Client.connect(join_url(server, sid, "reader-member"))
    # What the other Canary service does with an X-Session-Id header:
    doc = server.firestore.collection("sessions").document(sid).get().to_dict()
    assert doc["owner"]["id"] == owner
    assert [m["id"] for m in doc["members"]] == ["reader-member"]
    assert doc["batchID"] == batch
    member.close()
    host.close()
    wait_for(lambda: not server.firestore.collection("sessions").document(sid).get().exists,
             what="the session document to go")


def test_the_same_user_joining_twice_at_once_gets_one_membership(server_factory, isolating_store) -> None:
    server = server_factory()
    batch, owner = server.batch()
    host = Client.connect(owner_url(server, batch, owner))
    sid = host.welcome["sessionID"]
    joined, refused = connect_at_once([join_url(server, sid, "twin")] * 6)
    assert len(joined) == 1
    assert refused == [409] * 5
    assert [m["id"] for m in server.doc("sessions", sid)["members"]] == ["twin"]
    joined[0].close()
    host.close()


def test_an_emulator_restart_mid_session_does_not_crash_the_service(tmp_path) -> None:
    port = free_port()
    emulator = Emulator.start(tmp_path, port)
    try:
        server = start_server(tmp_path, emulator, FIRESTORE_TIMEOUT_SECONDS="2")
    except BaseException:
        emulator.stop()
        raise
    try:
        batch, owner = server.batch()
        host = Client.connect(owner_url(server, batch, owner))
        sid = host.welcome["sessionID"]
        member = Client.connect(join_url(server, sid, "m"))
        assert host.recv()["type"] == "member_joined"
        image = unique("image")
        member.send({"type": "setImageID", "payload": {"imageID": image}})
        # The first watches of a freshly started emulator (a cold JVM) may take a while.
        assert {member.recv(timeout=30)["type"] for _ in range(2)} == {"labels_snapshot", "bounding_boxes_snapshot"}

        emulator.stop()
        # Down: the service answers, connected clients are served, store-bound requests fail cleanly.
        assert server.request("GET", "/health")[0] == 200
        member.roundtrip()
        with pytest.raises(Refused) as e:
            Client.connect(join_url(server, sid, "while-down"))
        assert e.value.status == 503
        assert e.value.body == {"error": "the store is unavailable; try again", "status": 503}

        emulator = Emulator.start(tmp_path, port)  # a new, empty emulator on the same address
        server.firestore = emulator.client()
        server.put(KEYPOINTS, unique("kp"), {"imageID": image, "keypointID": "k"})
        snapshots = ("keepalive", "labels_snapshot", "bounding_boxes_snapshot")
        if emulator.bundled:
            # The npm emulator does not tell a resumed watch that its document is not there: the image's watch
            # resumed on its own and delivers the change, and the session ends when its owner leaves.
            assert member.recv(timeout=30)["type"] == "labels_snapshot"
            host.close()
        else:
            # The watches resumed on their own, and the new store has no session document: the session is over
            # for everyone in it, as when its owner ends it.
            assert host.recv(timeout=30)["type"] == "session_closed"
            assert host.closed_with() == 4000
        assert member.recv(timeout=30, skip=snapshots)["type"] == "session_closed"
        assert member.closed_with() == 4000

        # New sessions are served, on the new store.
        batch, owner = server.batch()
        host = Client.connect(owner_url(server, batch, owner))
        sid = host.welcome["sessionID"]
        member = Client.connect(join_url(server, sid, "m"))
        assert host.recv()["type"] == "member_joined"
        member.send({"type": "setImageID", "payload": {"imageID": image}})
        assert {member.recv()["type"], member.recv()["type"]} == {"labels_snapshot", "bounding_boxes_snapshot"}
        server.put(KEYPOINTS, unique("kp"), {"imageID": image, "keypointID": "k2"})
        assert member.recv()["type"] == "labels_snapshot"
        host.close()
        assert member.recv(skip=snapshots)["type"] == "session_closed"
        assert member.closed_with() == 4000
        assert server.process.poll() is None
        wait_for(lambda: server.stats()["store_watches"] == 0, what="no listener left",
                 detail=lambda: server.stats(watch=True))
        assert "Traceback" not in server.log()
    finally:
        server.stop()
        emulator.stop()


class _Connection:
    """Stands in for the socket: records what the writer greenlet writes."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def send(self, *payloads: bytes) -> None:
        self.sent.extend(data.decode() for data in payloads)

    def close(self, code: int, reason: str) -> None:
        pass

    def abort(self) -> None:
        pass

    def interrupt(self) -> None:
        pass


def test_snapshot_callbacks_from_real_os_threads_reach_the_client(emulator: Emulator) -> None:
    """Without gevent's patches the Firestore consumer is a real OS thread; safe_enqueue wakes the hub."""
    store = FirestoreStore(emulator.client())
    connection = _Connection()
    client = QueueClient(connection, name="t", max_bytes=1 << 20, keepalive_seconds=30, keepalive=lambda: None)
    threads: list[threading.Thread] = []
    image = unique("image")

    def on_snapshot(_documents: object) -> None:
        threads.append(threading.current_thread())
        client.safe_enqueue(LABELS_SNAPSHOT(sessionID="s", changes=None))

    watch = store.watch_query(KEYPOINTS, "imageID", image, on_snapshot)
    try:
        with gevent.Timeout(20):
            while not connection.sent:
                gevent.sleep(0.01)  # the hub runs the writer; the foreign thread wakes it
        assert threads
        assert all(t is not threading.main_thread() for t in threads)
        store.set(KEYPOINTS, unique("kp"), {"imageID": image})
        with gevent.Timeout(20):
            while len(connection.sent) < 2:
                gevent.sleep(0.01)
        assert all('"type":"labels_snapshot"' in text for text in connection.sent)
    finally:
        watch.stop()
        client.stop(timeout=5)
        store.close()
    assert store.watch_count() == 0
