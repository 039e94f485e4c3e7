"""Sessions across real processes: two gunicorn instances sharing one Firestore emulator.

The npm fallback emulator does not isolate transactions, so two processes
writing the same session document at the same instant can lose an update there
(not on Firestore, nor on Google's emulator). These tests therefore wait for
each membership change to be seen before making the next; the interleavings
themselves are covered by the sans-I/O tests in test_processes_unit.py.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import Client, Emulator, Server, join_url, owner_url, servers, start_server, unique, wait_for
from google.cloud.firestore_v1.base_query import FieldFilter

LEASE, GRACE = "1.5", "3"
QUIET = ("keepalive", "labels_snapshot", "bounding_boxes_snapshot")


@pytest.fixture
def start(tmp_path: Path, emulator: Emulator) -> Iterator[Callable[..., Server]]:
    """Start processes of one deployment: a Firestore project of their own, so that no other test's process
    (which would clean up after these with its own graces) shares it."""
    project = unique("demo-processes")

    def start_one(**env: str) -> Server:
        settings = {"PROCESS_LEASE_SECONDS": LEASE, "RECONNECT_GRACE_SECONDS": GRACE, "WEB_CONCURRENCY": "1"}
        return start_server(tmp_path, emulator, project=project, **{**settings, **env})

    with servers(start_one) as start:
        yield start


def until(client: Client, kind: str, subject: str | None = None, timeout: float = 10) -> list[dict[str, Any]]:
    """The messages up to and including the first `kind` (about `subject`)."""
    seen = []
    while True:
        message = client.recv(timeout=timeout, skip=QUIET)
        seen.append(message)
        if message["type"] == kind and subject in (None, message.get("memberID"), message.get("ownerID")):
            return seen


def test_membership_events_reach_every_process_exactly_once(start: Callable[..., Server]) -> None:
    a, b = start(), start()
    batch, owner = a.batch()
    host = Client.connect(owner_url(a, batch, owner))
    sid = host.welcome["sessionID"]
    clients = {"host": host}
    for name, server in (("a1", a), ("b1", b), ("b2", b), ("a2", a)):
        clients[name] = Client.connect(join_url(server, sid, name))
        for other, client in clients.items():
            if other != name:
                assert [m["type"] for m in until(client, "member_joined", name)] == ["member_joined"]
    for name in ("b1", "a1"):  # one at a time: see the module's docstring
        clients.pop(name).close()
        for client in clients.values():
            assert [(m["type"], m["memberID"]) for m in until(client, "member_left", name)] == \
                [("member_left", name)]
    # A last change is a barrier: any duplicate of the events above would have come before it.
    sentinel = Client.connect(join_url(b, sid, "sentinel"))
    for client in clients.values():
        assert [m["type"] for m in until(client, "member_joined", "sentinel")] == ["member_joined"]
    doc = b.doc("sessions", sid)
    assert [m["id"] for m in doc["members"]] == ["b2", "a2", "sentinel"]

    host.close()  # the owner leaves on A: members on both processes are closed with 4000
    started = time.monotonic()
    for name, client in [*clients.items(), ("sentinel", sentinel)]:
        if name != "host":
            assert until(client, "session_closed")[-1]["sessionID"] == sid
            assert client.closed_with(skip=QUIET) == 4000
    assert time.monotonic() - started < 2
    assert b.doc("sessions", sid) is None
    for server in (a, b):
        wait_for(lambda s=server: s.stats()["sessions"] == 0, what="nothing followed any more")


def _owner_on_a_member_on_b(start: Callable[..., Server]) -> tuple[Server, Server, str, str, Client, Client]:
    a, b = start(OWNER_GRACE_SECONDS=GRACE), start(OWNER_GRACE_SECONDS=GRACE)
    batch, owner = a.batch()
    host = Client.connect(owner_url(a, batch, owner))
    member = Client.connect(join_url(b, host.welcome["sessionID"], "m"))
    return a, b, batch, owner, host, member


def test_owner_grace_resume_and_expiry(start: Callable[..., Server]) -> None:
    _, b, batch, owner, host, member = _owner_on_a_member_on_b(start)
    sid = host.welcome["sessionID"]

    host.close()
    left = until(member, "owner_left")[-1]
    assert left == {"type": "owner_left", "sessionID": sid, "ownerID": owner, "time": left["time"]}
    # Back within the grace, through the other process: the same session resumes.
    host = Client.connect(owner_url(b, batch, owner))
    assert (host.welcome["type"], host.welcome["sessionID"]) == ("session_created", sid)
    joined = until(member, "owner_joined")[-1]
    assert joined == {"type": "owner_joined", "sessionID": sid, "ownerID": owner, "time": joined["time"]}
    # The member is told at once by the owner's process; the document follows when its writer folds it in.
    wait_for(lambda: b.doc("sessions", sid)["ownerLeftAt"] is None, what="the owner back in the document")

    # Gone for longer than the grace: the session ends as if the owner had left for good.
    gone = time.monotonic()
    host.close()
    until(member, "owner_left")
    assert until(member, "session_closed", timeout=15)[-1]["sessionID"] == sid
    assert member.closed_with(skip=QUIET) == 4000
    assert time.monotonic() - gone >= float(GRACE) - 0.5
    assert b.doc("sessions", sid) is None
    assert b.doc("sessionLocks", batch) is None


def test_a_killed_owner_process_is_cleaned_up_by_the_other(start: Callable[..., Server]) -> None:
    a, b, _, _, host, member = _owner_on_a_member_on_b(start)
    sid = host.welcome["sessionID"]
    (worker,) = a.worker_pids()
    os.kill(worker, signal.SIGKILL)
    until(member, "owner_left", timeout=15)  # its lease ran out
    since = datetime.fromisoformat(b.doc("sessions", sid)["ownerLeftAt"])  # the lease's end
    assert until(member, "session_closed", timeout=20)[-1]["sessionID"] == sid
    # The grace runs from the lease's end (not from when B noticed it, nor from when the member was told).
    assert datetime.now(UTC) - since >= timedelta(seconds=float(GRACE))
    assert member.closed_with(skip=QUIET) == 4000
    assert b.doc("sessions", sid) is None


def _kill(client: Client) -> None:
    """Drop the TCP connection without a close frame, as a crashing browser would."""
    client.ws.sock.shutdown(socket.SHUT_RDWR)
    client.ws.sock.close()


def test_churn_leaves_the_store_matching_the_connected_clients(start: Callable[..., Server]) -> None:
    # 250 changes one after another: the session document may be written more often than Firestore's
    # sustained once a second here (what is tested is that the store ends up right).
    a, b = start(SESSION_WRITE_SECONDS="0.02"), start(SESSION_WRITE_SECONDS="0.02")
    batch, owner = a.batch()
    host = Client.connect(owner_url(a, batch, owner))
    sid = host.welcome["sessionID"]
    rng = random.Random(2026)
    users = [f"u{i:02}" for i in range(20)]
    connected: dict[str, Client] = {}
    for _ in range(250):
        user = rng.choice(users)
        if user in connected:
            client = connected.pop(user)
            _kill(client) if rng.random() < 0.5 else client.close()
            until(host, "member_left", user)
        else:
            connected[user] = Client.connect(join_url(rng.choice((a, b)), sid, user))
            until(host, "member_joined", user)
    doc = b.doc("sessions", sid)
    assert sorted(m["id"] for m in doc["members"]) == sorted(connected)
    presence = b.firestore.collection("sessionPresence").where(filter=FieldFilter("sessionID", "==", sid)).get()
    assert sorted(p.get("userID") for p in presence) == sorted([*connected, owner])
    for client in connected.values():
        client.close()
    host.close()
    wait_for(lambda: b.doc("sessions", sid) is None, what="the session to end")


def test_the_web_apps_flow_across_processes(start: Callable[..., Server]) -> None:
    """Owner on A, members on B: REST calls on either process, kick and stop reach the sockets on the other."""
    from test_webapp import WebApp, member  # the web app's client, without a JWT secret here

    a, b = start(), start()
    batch, owner_id = a.batch()
    owner = WebApp(a, owner_id, secret=None)
    sid = owner.create(batch)["sessionID"]
    host = owner.enter(sid)
    ann, ben = member(b, "ann", secret=None), member(b, "ben", secret=None)
    ann_ws = ann.enter(sid)  # REST and socket on B
    assert until(host, "member_joined", ann.user)[-1]["memberEmail"] == f"{ann.user}@example.com"
    ben_ws = ben.enter(sid)
    until(host, "member_joined", ben.user)
    until(ann_ws, "member_joined", ben.user)
    assert [s["ownerConnected"] for s in WebApp(b, owner_id, secret=None).active(batchID=batch)] == [True]

    # The owner's socket closes on A: B's members are told; it comes back through B.
    host.close()
    for client in (ann_ws, ben_ws):
        assert until(client, "owner_left")[-1]["ownerID"] == owner_id
    host = WebApp(b, owner_id, secret=None).enter(sid)
    for client in (ann_ws, ben_ws):
        until(client, "owner_joined")

    # A kick asked of A reaches the member on B.
    status, _ = owner.call("DELETE", f"/sessions/{sid}/members/{ann.user}?userID={owner_id}")
    assert status == 200
    assert until(ann_ws, "member_kicked")[-1]["sessionID"] == sid
    assert ann_ws.closed_with(skip=QUIET) == 4001
    until(host, "member_left", ann.user)
    until(ben_ws, "member_left", ann.user)

    # A stop asked of A ends the sockets on B.
    assert owner.call("DELETE", f"/sessions/{sid}?userID={owner_id}")[0] == 204
    for client in (host, ben_ws):
        assert [m["type"] for m in until(client, "session_closed")] == ["session_closed"]
        assert client.closed_with(skip=QUIET) == 4000
    assert a.doc("sessions", sid) is None
