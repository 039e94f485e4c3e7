"""canary.clients.Client over a fake connection, plus canary.websocket.is_upgrade.

Nothing is monkey-patched here: the gevent hub runs in the main thread and
`threading.Thread` is a real OS thread. Tests wait with bounded loops that
yield to the hub (`gevent.sleep`), so the writer greenlet can run.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import pytest

from canary import protocol
from canary.changes import Changes, Delta
from canary.clients import Client
from canary.protocol import Frame
from canary.websocket import is_upgrade

WAIT = 5.0


def wait_until(condition: Callable[[], Any], what: str, timeout: float = WAIT) -> None:
    """Yield to the hub until `condition()` holds, or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        gevent.sleep(0.01)


class FakeConnection:
    """Records what the writer does; `send` waits while `gate` is closed, like a socket nobody reads."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.gate = gevent.event.Event()
        self.gate.set()
        self.waiting = gevent.event.Event()  # a send is held at the closed gate
        self.fail_with: Exception | None = None
        self.killed = False
        self.writes = 0  # calls of send (each a write of one or more frames)

    def send(self, *payloads: bytes) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        if not self.gate.is_set():
            self.waiting.set()
        try:
            self.gate.wait()
        except gevent.GreenletExit:
            self.killed = True
            raise
        self.log.extend(("send", data.decode()) for data in payloads)
        self.writes += 1

    def close(self, code: int, reason: str) -> None:
        self.log.append(("close", code, reason))

    answering = True  # does the peer answer pings?

    def ping(self) -> bool:
        """Like Connection.ping: False when the previous ping got no pong."""
        pinged_before = self.count("ping") > 0
        self.log.append(("ping",))
        return self.answering or not pinged_before

    def abort(self) -> None:
        self.log.append(("abort",))

    def interrupt(self) -> None:
        self.log.append(("interrupt",))

    @property
    def sent(self) -> list[str]:
        return [e[1] for e in self.log if e[0] == "send"]

    @property
    def closes(self) -> list[tuple[int, str]]:
        return [(e[1], e[2]) for e in self.log if e[0] == "close"]

    def count(self, kind: str) -> int:
        return sum(1 for e in self.log if e[0] == kind)


def note(i: object) -> Frame:
    """A message that cannot be coalesced, told apart by `i`."""
    return protocol.MEMBER_JOINED(sessionID="s", memberID=str(i), time="t")


def labels(i: object) -> Frame:
    return protocol.LABELS_SNAPSHOT(sessionID="s", time=str(i), changes=None)


def boxes(i: object) -> Frame:
    return protocol.BOUNDING_BOXES_SNAPSHOT(sessionID="s", time=str(i), changes=None)


MakeClient = Callable[..., tuple[Client, FakeConnection]]


@pytest.fixture
def make_client() -> Iterator[MakeClient]:
    """Build clients on fake connections; each is unblocked and stopped at the end."""
    made: list[tuple[Client, FakeConnection]] = []

    def make(max_bytes: int = 1 << 20, keepalive_seconds: float = 60.0,
             **timers: float) -> tuple[Client, FakeConnection]:
        conn = FakeConnection()
        client = Client(conn, name="test client", max_bytes=max_bytes, keepalive_seconds=keepalive_seconds,
                        keepalive=lambda: protocol.KEEPALIVE(role="owner", sessionID="s"), **timers)
        made.append((client, conn))
        return client, conn

    yield make
    for client, conn in made:
        conn.gate.set()
        client.stop(timeout=1.0)


def block(client: Client, conn: FakeConnection) -> Frame:
    """Hold the writer inside `send` of a first frame; returns that frame."""
    conn.gate.clear()
    first = note("blocker")
    assert client.safe_enqueue(first)
    assert conn.waiting.wait(WAIT), "the writer never reached send"
    return first


# -- order and threads -----------------------------------------------------------------

def test_frames_are_written_in_order(make_client: MakeClient) -> None:
    client, conn = make_client()
    frames = [note(i) for i in range(50)]
    for frame in frames:
        assert client.safe_enqueue(frame) is True
    wait_until(lambda: len(conn.sent) == 50, "50 frames")
    assert conn.sent == [f.text for f in frames]


def test_frames_from_greenlets_and_os_threads_all_arrive(make_client: MakeClient) -> None:
    client, conn = make_client(max_bytes=10_000 * len(note(0).data))
    per_source = 500
    results: dict[str, list[bool]] = {}

    def produce(tag: str) -> None:
        results[tag] = [client.safe_enqueue(note(f"{tag}-{i}")) for i in range(per_source)]

    def produce_in_greenlet() -> None:
        results["g"] = []
        for i in range(per_source):
            results["g"].append(client.safe_enqueue(note(f"g-{i}")))
            if i % 50 == 0:
                gevent.sleep(0)

    threads = [threading.Thread(target=produce, args=(f"t{n}",)) for n in range(2)]
    for thread in threads:
        thread.start()
    greenlet = gevent.spawn(produce_in_greenlet)
    wait_until(lambda: len(conn.sent) >= 3 * per_source, "every frame to be written", timeout=20)
    for thread in threads:
        thread.join(WAIT)
    greenlet.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    assert {tag: all(ok) and len(ok) for tag, ok in results.items()} == {"t0": 500, "t1": 500, "g": 500}
    assert len(conn.sent) == 3 * per_source
    for tag in ("t0", "t1", "g"):  # each producer's frames arrive in its order
        mine = [t for t in conn.sent if f'"memberID":"{tag}-' in t]
        assert mine == [note(f"{tag}-{i}").text for i in range(per_source)]


def test_safe_enqueue_returns_false_after_close(make_client: MakeClient) -> None:
    client, conn = make_client()
    client.close(4000, "bye")
    assert client.safe_enqueue(note(1)) is False
    assert client.safe_enqueue(labels(1)) is False
    wait_until(lambda: conn.closes, "the close")
    assert client.safe_enqueue(note(2)) is False
    assert conn.sent == []


def test_a_failing_socket_ends_the_writer_without_raising(make_client: MakeClient) -> None:
    client, conn = make_client()
    conn.fail_with = OSError("broken pipe")
    assert client.safe_enqueue(note(1)) is True
    wait_until(lambda: conn.count("abort"), "the abort")
    assert client.safe_enqueue(note(2)) is False
    assert conn.sent == []


# -- coalescing and overflow --------------------------------------------------------------

def test_snapshots_coalesce_to_the_newest_and_keep_their_place(make_client: MakeClient) -> None:
    client, conn = make_client()
    first = block(client, conn)
    assert client.safe_enqueue(note("a"))
    for i in range(100):
        assert client.safe_enqueue(labels(i))
        if i == 50:
            assert client.safe_enqueue(boxes("only"))
    assert client.safe_enqueue(note("b"))
    conn.gate.set()
    wait_until(lambda: len(conn.sent) == 5, "five frames")
    gevent.sleep(0)  # one more turn: nothing else may come
    assert conn.sent == [first.text, note("a").text, labels(99).text, boxes("only").text, note("b").text]

    assert client.safe_enqueue(labels("after"))  # a sent snapshot frees its slot
    wait_until(lambda: len(conn.sent) == 6, "the next snapshot")
    assert conn.sent[-1] == labels("after").text


def test_coalesced_snapshots_merge_their_changes_and_a_reset_replaces_them(make_client: MakeClient) -> None:
    def snapshot(i: object, delta: Delta) -> Frame:
        return protocol.LABELS_SNAPSHOT(sessionID="s", time=str(i), changes=delta)

    client, conn = make_client()
    first = block(client, conn)
    added = snapshot(1, Delta(Changes({"a": {"n": 1}, "b": {"n": 1}}, {}, ()), 1000))
    assert client.safe_enqueue(added)
    assert client.safe_enqueue(snapshot(2, Delta(Changes({}, {"a": {"n": 2}}, ("b", "c")), 1000)))
    conn.gate.set()
    wait_until(lambda: len(conn.sent) == 2, "two frames")
    merged = json.loads(conn.sent[1])
    assert merged == {"type": "labels_snapshot", "sessionID": "s", "time": "2", "changes": {
        "reset": False, "added": [{"id": "a", "data": {"n": 2}}], "modified": [], "removed": ["c"]}}
    assert conn.sent[0] == first.text

    conn.waiting.clear()
    block(client, conn)
    assert client.safe_enqueue(added)
    reset = snapshot(3, Delta(Changes({"z": {"n": 0}}, {}, ()), 1000, reset=True))
    assert client.safe_enqueue(reset)  # a new watch's first snapshot: what was pending is forgotten
    big = snapshot(4, Delta(Changes({"y": {"text": "x" * 900}}, {}, ()), 1000))
    assert client.safe_enqueue(big)  # merged, past the cap of 1000 bytes: null
    conn.gate.set()
    wait_until(lambda: len(conn.sent) == 4, "the merged frame")
    assert json.loads(conn.sent[-1]) == {"type": "labels_snapshot", "sessionID": "s", "time": "4", "changes": None}


def test_overflow_closes_with_1013(make_client: MakeClient) -> None:
    client, conn = make_client(max_bytes=8 * len(note(0).data))
    first = block(client, conn)
    for i in range(8):
        assert client.safe_enqueue(note(i)) is True
    assert client.safe_enqueue(labels(1)) is True, "snapshots do not count against the limit"
    assert client.safe_enqueue(boxes(1)) is True
    assert conn.count("interrupt") == 0
    assert client.safe_enqueue(note(8)) is False
    assert conn.count("interrupt") == 1, "the session must be left at once"
    assert conn.closes == [], "the writer is still blocked"
    assert client.safe_enqueue(note(9)) is False
    assert client.safe_enqueue(labels(2)) is False
    conn.gate.set()
    wait_until(lambda: conn.closes, "the close")
    assert conn.closes == [(1013, "client too slow")]
    assert conn.sent == [first.text], "a client that is not reading gets no more frames"


def test_close_flushes_what_is_queued(make_client: MakeClient) -> None:
    client, conn = make_client()
    first = block(client, conn)
    for frame in (note("a"), labels(1), note("b")):
        assert client.safe_enqueue(frame)
    client.close(4000, "session closed")
    assert client.safe_enqueue(note("c")) is False
    conn.gate.set()
    wait_until(lambda: conn.closes, "the close")
    assert conn.log == [("send", t) for t in (first.text, note("a").text, labels(1).text, note("b").text)] \
        + [("close", 4000, "session closed")]


def test_close_from_an_os_thread(make_client: MakeClient) -> None:
    client, conn = make_client()
    assert client.safe_enqueue(note("a"))
    thread = threading.Thread(target=client.close, args=(4000, "session closed"))
    thread.start()
    thread.join(WAIT)
    wait_until(lambda: conn.closes, "the close")
    assert conn.log == [("send", note("a").text), ("close", 4000, "session closed")]


# -- keepalive and stop ---------------------------------------------------------------------

def test_keepalives_are_sent_when_idle(make_client: MakeClient) -> None:
    _, conn = make_client(keepalive_seconds=0.05)
    wait_until(lambda: sum('"type":"keepalive"' in t for t in conn.sent) >= 2, "two keepalives")
    assert all(t.startswith('{"type":"keepalive","role":"owner","sessionID":"s","time":') for t in conn.sent)


def test_stop_of_an_idle_client_closes_it(make_client: MakeClient) -> None:
    client, conn = make_client()
    client.stop(timeout=WAIT)
    assert conn.closes == [(1000, "")]
    assert conn.count("abort") == 0


def test_stop_kills_a_stuck_writer_and_aborts(make_client: MakeClient) -> None:
    client, conn = make_client()
    block(client, conn)
    started = time.monotonic()
    client.stop(timeout=0.2)
    assert time.monotonic() - started < WAIT
    assert conn.count("abort") == 1
    assert conn.killed, "the writer must be killed"
    assert conn.closes == []
    assert client.safe_enqueue(note(1)) is False


# -- the upgrade check ------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"HTTP_UPGRADE": "websocket", "HTTP_CONNECTION": "Upgrade"}, True),
        ({"HTTP_UPGRADE": "WebSocket", "HTTP_CONNECTION": "keep-alive, Upgrade"}, True),
        ({"HTTP_UPGRADE": "websocket", "HTTP_CONNECTION": "keep-alive"}, False),
        ({"HTTP_UPGRADE": "websocket", "HTTP_CONNECTION": "upgraded"}, False),
        ({"HTTP_UPGRADE": "websocket"}, False),
        ({"HTTP_UPGRADE": "h2c", "HTTP_CONNECTION": "Upgrade"}, False),
        ({"HTTP_CONNECTION": "Upgrade"}, False),
        ({}, False),
    ],
)
def test_is_upgrade(environ: dict[str, str], expected: bool) -> None:
    assert is_upgrade(environ) is expected


def test_a_write_blocked_longer_than_the_write_timeout_cuts_the_connection(make_client: MakeClient) -> None:
    client, conn = make_client(write_timeout=0.2)
    conn.gate.clear()  # the peer stopped reading: the write blocks
    client.safe_enqueue(note(1))
    conn.waiting.wait(5)
    started = time.monotonic()
    wait_until(lambda: conn.count("abort") == 1, "the connection to be cut")
    assert time.monotonic() - started >= 0.15


def test_pings_go_out_and_a_peer_that_stops_answering_is_closed_with_1008(make_client: MakeClient) -> None:
    client, conn = make_client(ping_seconds=0.05)
    wait_until(lambda: conn.count("ping") >= 3, "three pings")
    assert conn.closes == []  # a peer that answers stays
    conn.answering = False
    wait_until(lambda: conn.closes == [(1008, "ping timeout")], "the close")
    assert conn.count("abort") == 1
    assert client.safe_enqueue(note(1)) is False


def test_frames_queued_while_the_writer_waits_go_out_in_one_write(make_client: MakeClient) -> None:
    client, conn = make_client()
    first = block(client, conn)
    frames = [note(i) for i in range(20)]
    for frame in frames:
        assert client.safe_enqueue(frame)
    conn.gate.set()
    wait_until(lambda: len(conn.sent) == 21, "every frame")
    assert conn.sent == [first.text, *(f.text for f in frames)]
    assert conn.writes == 2, "the blocker, then the 20 queued behind it together"
