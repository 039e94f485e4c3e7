"""Closing clients, slow and dead readers, resets (issue 16, items 4 and 5).

Over real sockets: hundreds of clients closing every way while the service writes to them and pings them leave
no traceback; clients that stop reading among others that read are closed with 1013 within the read deadline
(`IDLE_TIMEOUT_SECONDS` / 2) while the readers miss nothing; a reset client leaves at once, even one whose
buffers are full. Then the writer's rules themselves: over a real `Connection` (the race between the reader
seeing the peer's close and the writer's ping) and over a fake one (when a ping closes with 1013, with 1008).
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import gevent.socket
import pytest
from conftest import Client, Server, client_frame, owner_url, raw_websocket, wait_for
from simple_websocket import Server as WsServer

from canary import protocol
from canary.clients import Client as Writer
from canary.websocket import Connection, prepare, server_options

SET_IMAGE = json.dumps({"type": "setImageID", "payload": {"imageID": "img"}}).encode()


# -- raw clients, all read by one thread ---------------------------------------------------------------

class Peer:
    """One raw WebSocket client: what it received, when, and how its connection ended."""

    def __init__(self, name: str, sock: socket.socket) -> None:
        self.name, self.sock = name, sock
        self.buffer = b""
        self.messages: list[tuple[float, dict[str, Any]]] = []
        self.pings = 0
        self.close_code: int | None = None

    def received(self, kind: str) -> list[dict[str, Any]]:
        return [m for _, m in self.messages if m["type"] == kind]


class Peers:
    """Reads every registered peer in one thread (as a browser's network stack would: at once, answering the
    service's pings), so that hundreds of clients cost one thread. Everything touching a peer's socket runs in
    that thread (`call`)."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._calls: queue.Queue[Callable[[], None]] = queue.Queue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` in the reading thread; its result."""
        done = threading.Event()
        result: list[Any] = []
        errors: list[BaseException] = []

        def run() -> None:
            try:
                result.append(fn())
            except BaseException as e:  # handed to the caller
                errors.append(e)
            finally:
                done.set()

        self._calls.put(run)
        assert done.wait(30), "the reading thread is stuck"
        if errors:
            raise errors[0]
        return result[0]

    def read(self, peer: Peer) -> None:
        self.call(lambda: self._selector.register(peer.sock, selectors.EVENT_READ, peer))

    def stop_reading(self, peer: Peer) -> None:
        self.call(lambda: self._unregister(peer))

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(10)

    def _unregister(self, peer: Peer) -> None:
        try:
            self._selector.unregister(peer.sock)
        except (KeyError, ValueError):
            pass

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                while True:
                    self._calls.get_nowait()()
            except queue.Empty:
                pass
            if not self._selector.get_map():
                self._stopped.wait(0.005)  # nothing to read: wait for a call
                continue
            for key, _ in self._selector.select(0.01):
                peer: Peer = key.data
                try:
                    data = peer.sock.recv(1 << 16)
                except OSError:
                    data = b""
                if not data:
                    self._unregister(peer)
                    continue
                peer.buffer += data
                parse(peer)


def parse(peer: Peer) -> None:
    """Take the server's whole frames out of `peer.buffer`: messages kept, pings answered, the close noted."""
    data = peer.buffer
    while len(data) >= 2:
        opcode, size, start = data[0] & 0x0F, data[1] & 0x7F, 2
        if size == 126:
            if len(data) < 4:
                break
            size, start = struct.unpack("!H", data[2:4])[0], 4
        elif size == 127:
            if len(data) < 10:
                break
            size, start = struct.unpack("!Q", data[2:10])[0], 10
        if len(data) < start + size:
            break
        payload, data = data[start:start + size], data[start + size:]
        if opcode == 0x1:
            peer.messages.append((time.monotonic(), json.loads(payload)))
        elif opcode == 0x9:
            peer.pings += 1
            try:
                peer.sock.sendall(client_frame(0xA, payload))
            except OSError:
                pass
        elif opcode == 0x8:
            peer.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
    peer.buffer = data


def drain(peer: Peer) -> None:
    """Read what `peer` left unread (it reads again) up to the end of its connection."""
    peer.sock.settimeout(10)
    while peer.close_code is None:
        try:
            data = peer.sock.recv(1 << 16)
        except OSError:
            data = b""
        if not data:
            break
        peer.buffer += data
        parse(peer)


@pytest.fixture
def peers() -> Iterator[Peers]:
    readers = Peers()
    yield readers
    readers.stop()


def session(server: Server, peers: Peers) -> tuple[Peer, str]:
    """A new session; its owner, read by `peers`."""
    batch, owner = server.batch()
    host = Client.connect(owner_url(server, batch, owner))
    peer = Peer("owner", host.ws.sock)
    peers.read(peer)
    return peer, host.welcome["sessionID"]


def join(server: Server, peers: Peers, sid: str, names: list[str], watch: bool = True) -> list[Peer]:
    """Members joining at once (eight at a time), read by `peers`, each watching "img" if `watch`."""
    joined: dict[str, Peer] = {}

    def opener(mine: list[str]) -> None:
        for name in mine:
            sock = raw_websocket(server, f"/sessions/{sid}/join?userID={name}")
            joined[name] = peer = Peer(name, sock)
            peers.read(peer)
            if watch:
                sock.sendall(client_frame(0x1, SET_IMAGE))

    threads = [threading.Thread(target=opener, args=(names[k::8],)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(joined) == len(names), f"{len(names) - len(joined)} members could not join"
    members = [joined[name] for name in names]
    if watch:
        wait_for(lambda: all(p.received("labels_snapshot") for p in members), timeout=30,
                 what="every member's watch ready")
    return members


class Changes:
    """Changes to the keypoints of "img", `per_second`, each a snapshot to every member watching it."""

    def __init__(self, server: Server, per_second: float) -> None:
        self._server, self._period = server, 1 / per_second
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Changes:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(max(0.0, started + len(self.times) * self._period - time.monotonic())):
            self.times.append(time.monotonic())
            self._server.put("keypoints", f"kp-{len(self.times) % 20}", {"imageID": "img", "n": len(self.times)})


def left_at(owner: Peer, name: str, since: float = 0.0) -> float | None:
    """When the owner heard that `name` left (after `since`)."""
    return next((t for t, m in owner.messages if m["type"] == "member_left" and m["memberID"] == name
                 and t >= since), None)


#: A log record starts with a timestamp: the service's (`2026-01-01 00:00:00,000`) or gunicorn's (`[2026-...`).
RECORD = re.compile(r"^\[?\d{4}-\d\d-\d\d[ T]")
#: Not this issue's: grpc under gevent, on Google's emulator, now and then fails to decode a Listen response
#: (docs/benchmarks.md); the service reopens the stream and loses nothing.
UNRELATED = ("grpc._common: Exception deserializing message!",)


def errors_in(log: str) -> list[str]:
    """The first line of each ERROR record or record with a traceback (gunicorn's and the service's)."""
    records: list[list[str]] = []
    for line in log.splitlines():
        if RECORD.match(line) or not records:
            records.append([line])
        else:
            records[-1].append(line)  # a traceback's lines belong to the record above them
    return [record[0] for record in records
            if ("[ERROR]" in record[0] or " ERROR " in record[0] or any("Traceback" in line for line in record))
            and not any(unrelated in record[0] for unrelated in UNRELATED)]


def tx_queue(local_port: int, remote_port: int) -> int:
    """Bytes the kernel still holds to send on the TCP connection local_port -> remote_port (/proc/net/tcp)."""
    with open("/proc/net/tcp") as table:
        lines = table.read().splitlines()[1:]
    for line in lines:
        fields = line.split()
        local, remote = fields[1].split(":")[1], fields[2].split(":")[1]
        if int(local, 16) == local_port and int(remote, 16) == remote_port:
            return int(fields[4].split(":")[0], 16)
    return 0


def reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a crashing client's kernel or a middlebox does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# -- 4. closing clients leave no traceback ---------------------------------------------------------------

#: Members closing at once, per store (on Firestore each join and leave is a commit on the emulator).
CLOSING = {"memory": 300, "firestore": 200}


def close_every_way(peers: Peers, members: list[Peer]) -> None:
    """Close every member, in one go, five ways in turn: a close frame then FIN; FIN alone; RST alone; a close
    frame then RST; a close frame, then reading on to the service's close (the whole handshake)."""

    def close_all() -> None:
        for i, peer in enumerate(members):
            sock = peer.sock
            peers._unregister(peer)
            try:
                if i % 5 in (0, 3, 4):
                    sock.sendall(client_frame(0x8, struct.pack("!H", 1001 if i % 5 == 3 else 1000)))
                if i % 5 == 4:
                    sock.shutdown(socket.SHUT_WR)
                    peers._selector.register(sock, selectors.EVENT_READ, peer)
                    continue
                if i % 5 in (2, 3):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass  # closed by the service already (it may take a slow member for a non-reader)
            sock.close()

    peers.call(close_all)


def test_hundreds_of_clients_closing_every_way_leave_no_traceback(server_factory, store_kind: str,
                                                                  peers: Peers) -> None:
    # Pings every second and keepalives twice a second when idle; while messages flow, a ping every 0.5 s.
    server = server_factory(IDLE_TIMEOUT_SECONDS="2", KEEPALIVE_SECONDS="0.5")
    start = len(server.log())
    owner, sid = session(server, peers)
    count = CLOSING[store_kind]
    members = join(server, peers, sid, [f"closing-{i}" for i in range(count)])
    with Changes(server, per_second=20):
        wait_for(lambda: all(p.pings for p in members), what="every member pinged", timeout=20)
        close_every_way(peers, members)
        wait_for(lambda: server.stats()["participants"] == 1, timeout=60, what="every member gone",
                 detail=server.stats)
    wait_for(lambda: all(left_at(owner, p.name) for p in members), timeout=30, what="every departure announced")
    log = server.log()[start:]
    assert errors_in(log) == []
    codes = re.findall(r"member 'closing-\d+' of session \S+ disconnected \(close code (\d+)\)", log)
    assert len(codes) == count
    # 1001: a close frame the service read before the RST behind it; 1013: a member it took for a slow reader.
    assert {"1000", "1006"} <= set(codes) <= {"1000", "1001", "1006", "1013"}


# -- 5. slow and dead readers -----------------------------------------------------------------------------

#: The read deadline of the server below: IDLE_TIMEOUT_SECONDS / 2.
IDLE, DEADLINE = 4.0, 2.0


def test_members_that_stop_reading_among_readers_are_closed_with_1013_within_the_deadline(
        server_factory, peers: Peers) -> None:
    server = server_factory(IDLE_TIMEOUT_SECONDS=str(IDLE))
    start = len(server.log())
    owner, sid = session(server, peers)
    readers = join(server, peers, sid, [f"reader-{i}" for i in range(40)])
    stuck = join(server, peers, sid, [f"stuck-{i}" for i in range(8)])
    with Changes(server, per_second=20) as changes:
        wait_for(lambda: len(changes.times) >= 10, what="changes flowing")
        stopped = time.monotonic()
        for peer in stuck:
            peers.stop_reading(peer)
        counted = {peer.name: len(peer.received("labels_snapshot")) for peer in readers}
        wait_for(lambda: all(left_at(owner, p.name) for p in stuck), timeout=IDLE + 5,
                 what="the stuck members gone", detail=lambda: [p.name for p in stuck if not left_at(owner, p.name)])
        after = [left_at(owner, p.name) - stopped for p in stuck]  # type: ignore[operator]
        made = len(changes.times)
        wait_for(lambda: len(changes.times) >= made + 20, what="a second more of changes")  # the readers go on
    last_change = changes.times[-1]
    # Closed by the read deadline (within it, plus the ticker's period and the time to tell the owner), with
    # 1013, not by the ping timeout (1008).
    assert max(after) < DEADLINE + 1.5, f"left {sorted(after)} s after they stopped reading"
    log = server.log()[start:]
    for peer in stuck:
        assert f"closing member '{peer.name}' of session {sid} with 1013: it is not reading" in log
        assert f"member '{peer.name}' of session {sid} disconnected (close code 1013)" in log
        drain(peer)  # it reads again: what was written to it, then the close frame
        assert peer.close_code == 1013
    # The readers were not closed, heard every departure, and got the changes.
    wait_for(lambda: all(p.messages[-1][0] >= last_change for p in readers), what="the last change read")
    for peer in readers:
        assert left_at(owner, peer.name) is None
        assert {m["memberID"] for m in peer.received("member_left")} >= {p.name for p in stuck}
        got = len(peer.received("labels_snapshot")) - counted[peer.name]
        later = sum(1 for t in changes.times if t >= stopped)
        # Snapshots coalesce only when a writer falls behind, which a reader's does not here.
        assert got >= 0.9 * later, f"{peer.name} got {got} of {later} snapshots"
    assert errors_in(log) == []


def test_a_reset_client_leaves_at_once_even_with_its_buffers_full(server_factory, peers: Peers) -> None:
    # Neither the ping timeout nor the read deadline can be what ends these clients (600 s, 300 s), and a member
    # may pipeline thousands of requests.
    server = server_factory(IDLE_TIMEOUT_SECONDS="600", INBOUND_FRAMES_PER_SECOND="100000")
    start = len(server.log())
    owner, sid = session(server, peers)
    reader, full = join(server, peers, sid, ["resets-reader", "resets-full"], watch=False)

    # A reading member resets its connection.
    peers.stop_reading(reader)
    since = time.monotonic()
    reset(reader.sock)
    wait_for(lambda: left_at(owner, reader.name), timeout=5, what="the reset reader gone")
    took = [left_at(owner, reader.name) - since]  # type: ignore[operator]

    # A member that stopped reading, whose socket buffers are full (the service's writer waits for room):
    # 6,000 requests at once, each answered with a `pong` it does not read.
    peers.stop_reading(full)
    full.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    port = full.sock.getsockname()[1]
    full.sock.sendall(client_frame(0x1, b'{"type":"ping"}') * 6000)
    wait_for(lambda: tx_queue(server.port, port) > 16 * 1024, what="the service's send buffer filled",
             detail=lambda: tx_queue(server.port, port))
    since = time.monotonic()
    reset(full.sock)
    wait_for(lambda: left_at(owner, full.name), timeout=5, what="the reset non-reader gone")
    took.append(left_at(owner, full.name) - since)  # type: ignore[operator]

    assert max(took) < 2.0, f"announced {took} s after the reset"
    log = server.log()[start:]
    for peer in (reader, full):
        assert f"member '{peer.name}' of session {sid} disconnected (close code 1006)" in log
    assert errors_in(log) == []


# -- the writer's rules, over a real connection and a fake one ----------------------------------------------

def keepalive() -> protocol.Frame:
    return protocol.KEEPALIVE(role="member", sessionID="s")


def note(i: object) -> protocol.Frame:
    return protocol.MEMBER_JOINED(sessionID="s", memberID=str(i), time="t")


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 5.0) -> None:
    """Yield to the hub until `condition()` holds (the writer and the reader run meanwhile)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        gevent.sleep(0.005)


@pytest.fixture
def hub_errors(monkeypatch: pytest.MonkeyPatch) -> list[BaseException]:
    """What greenlets raised to the hub (what the server logs as a traceback)."""
    errors: list[BaseException] = []
    monkeypatch.setattr(gevent.get_hub(), "handle_error", lambda _context, _kind, value, _tb: errors.append(value))
    return errors


def server_frames(sock: gevent.socket.socket) -> list[tuple[int, bytes]]:
    """Every frame the service wrote, up to the end of the connection."""
    data = b""
    sock.settimeout(5)
    while chunk := sock.recv(1 << 16):
        data += chunk
    frames = []
    while data:
        size, start = data[1] & 0x7F, 2
        if size == 126:
            size, start = struct.unpack("!H", data[2:4])[0], 4
        frames.append((data[0] & 0x0F, data[start:start + size]))
        data = data[start + size:]
    return frames


def test_a_writer_whose_ping_falls_due_after_the_peers_close_sends_nothing(hub_errors: list[BaseException]) -> None:
    """The race behind "LocalProtocolError: Event Ping(...) cannot be sent in state ConnectionState.CLOSED": the
    reader has read the peer's close (and answered it), the writer's ping falls due before anyone stops the
    client. Here nobody stops it: the writer must end by itself, having sent nothing after the close."""
    ours, theirs = gevent.socket.socketpair()
    environ = {"gunicorn.socket": ours, "HTTP_UPGRADE": "websocket", "HTTP_CONNECTION": "Upgrade",
               "HTTP_SEC_WEBSOCKET_VERSION": "13", "HTTP_SEC_WEBSOCKET_KEY": base64.b64encode(os.urandom(16)).decode(),
               "HTTP_HOST": "localhost", "PATH_INFO": "/", "QUERY_STRING": "", "REQUEST_METHOD": "GET"}
    prepare(environ)
    connection = Connection(WsServer(environ, **server_options(max_message_bytes=65536)))
    head = b""
    while b"\r\n\r\n" not in head:
        head += theirs.recv(1)
    # Pings only (no keepalive, whose write would end the writer another way), frequent.
    client = Writer(connection, name="closing", max_bytes=1 << 20, keepalive_seconds=60, keepalive=keepalive,
                    ping_seconds=0.04)
    reader = gevent.spawn(connection.serve, lambda _message: None)
    peer = Peer("peer", theirs)
    for i in range(3):
        client.safe_enqueue(note(i))
    theirs.settimeout(5)
    while peer.pings < 3:  # read (the hub runs meanwhile), answering the pings: the writer's timers run
        data = theirs.recv(1 << 16)
        assert data, "the connection ended"
        peer.buffer += data
        parse(peer)
    theirs.sendall(client_frame(0x8, struct.pack("!H", 1000)))
    reader.join(5)
    assert reader.dead
    wait_until(lambda: client._writer.dead, "the writer to end by itself")
    assert hub_errors == []
    assert client.safe_enqueue(note("late")) is False
    assert connection.close_code == 1000
    theirs.shutdown(socket.SHUT_WR)  # our end of TCP: the service's lingering close need not wait
    connection.finish(timeout=0.1)
    frames = server_frames(theirs)
    assert frames[-1:] == [(0x8, struct.pack("!H", 1000))], frames  # the echo of the close, and nothing after it
    assert [opcode for opcode, _ in frames].count(0x8) == 1, frames
    client.stop(timeout=1)


class FakeConnection:
    """A connection whose peer answers pings (`answering`) or not; what the writer did, with times."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.answering = True
        self._unanswered = False
        self.on_end: Callable[[], None] | None = None
        self.close_code = 1005
        self.room = gevent.event.Event()  # cleared: a write waits, as on a socket whose buffers are full
        self.room.set()

    def send(self, *payloads: bytes) -> None:
        self.room.wait()
        self.log.extend(("send", time.monotonic(), json.loads(p)["type"]) for p in payloads)

    def ping(self) -> bool:
        if self._unanswered:
            return False
        self.log.append(("ping", time.monotonic()))
        self._unanswered = not self.answering
        return True

    def close(self, code: int, reason: str) -> None:
        self.log.append(("close", time.monotonic(), code))

    def abort(self) -> None:
        self.log.append(("abort", time.monotonic()))
        self.room.set()  # the blocked write ends (on a socket: it fails)

    def interrupt(self) -> None:
        pass

    def count(self, kind: str, since: float = 0.0) -> int:
        return sum(1 for entry in self.log if entry[0] == kind and entry[1] >= since)

    @property
    def closes(self) -> list[int]:
        return [entry[2] for entry in self.log if entry[0] == "close"]


@pytest.fixture
def writer() -> Iterator[Callable[..., tuple[Writer, FakeConnection]]]:
    made: list[Writer] = []

    def make(ping_seconds: float, keepalive_seconds: float = 60.0) -> tuple[Writer, FakeConnection]:
        connection = FakeConnection()
        client = Writer(connection, name="test client", max_bytes=1 << 20, keepalive_seconds=keepalive_seconds,
                        keepalive=keepalive, ping_seconds=ping_seconds)
        made.append(client)
        return client, connection

    yield make
    for client in made:
        client.stop(timeout=1)


def test_a_client_that_stops_reading_messages_is_closed_with_1013_within_the_read_deadline(writer) -> None:
    client, connection = writer(ping_seconds=0.2)  # read deadline 0.2 s: a ping at most every 0.1 s
    for i in range(10):
        client.safe_enqueue(note(i))
        gevent.sleep(0.02)  # a message every 20 ms (pacing): the peer reads, so pings are answered
    assert connection.count("ping") >= 1
    assert connection.closes == []
    stopped = time.monotonic()
    connection.answering = False
    i = 0
    while not connection.closes:
        assert time.monotonic() - stopped < 2, "never closed"
        client.safe_enqueue(note(i := i + 1))
        gevent.sleep(0.02)
    closed = next(entry[1] for entry in connection.log if entry[0] == "close")
    assert connection.closes == [protocol.CLOSE_TRY_AGAIN_LATER]
    assert 0.09 <= closed - stopped <= 0.2 + 0.15  # a ping's worth of waiting at least, the deadline at most
    assert connection.count("abort") == 1
    assert client.safe_enqueue(note("late")) is False


def test_a_reading_client_is_pinged_at_most_twice_per_read_deadline_and_an_idle_one_as_before(writer) -> None:
    client, connection = writer(ping_seconds=0.2)  # read deadline 0.2 s: a ping at most every 0.1 s
    started = time.monotonic()
    while time.monotonic() - started < 1.0:
        client.safe_enqueue(note("busy"))
        gevent.sleep(0.01)
    busy = connection.count("ping")
    assert 4 <= busy <= 1.0 / 0.1 + 2, f"{busy} pings in a second of messages"
    quiet = time.monotonic()
    wait_until(lambda: time.monotonic() - quiet > 1.0, "a second without messages")
    assert connection.count("ping", since=quiet) <= 1.0 / 0.2 + 1  # the check, then one every 0.2 s
    assert connection.closes == []


def test_a_write_blocked_for_the_read_deadline_cuts_the_connection_as_1013(writer) -> None:
    client, connection = writer(ping_seconds=0.2)  # read deadline 0.2 s (the write timeout is longer)
    connection.room.clear()
    client.safe_enqueue(note("stuck"))
    started = time.monotonic()
    wait_until(lambda: connection.count("abort"), "the connection cut")
    cut = next(entry[1] for entry in connection.log if entry[0] == "abort")
    assert 0.15 <= cut - started <= 0.2 + 0.2
    assert connection.close_code == protocol.CLOSE_TRY_AGAIN_LATER  # no room for a close frame: recorded
    assert client.safe_enqueue(note("late")) is False


def test_a_peer_sent_only_keepalives_that_answers_no_ping_is_taken_for_gone_with_1008(writer) -> None:
    _client, connection = writer(ping_seconds=0.1, keepalive_seconds=0.02)
    connection.answering = False
    wait_until(lambda: connection.closes, "the close")
    assert connection.closes == [1008]
    assert connection.count("send") >= 2  # keepalives went out meanwhile: they do not make it a slow reader


def test_once_the_reader_saw_the_end_the_writer_writes_nothing(writer) -> None:
    client, connection = writer(ping_seconds=0.02, keepalive_seconds=0.01)
    wait_until(lambda: connection.count("ping") >= 2 and connection.count("send") >= 2, "pings and keepalives")
    assert connection.on_end is not None
    connection.on_end()  # what `Connection.serve` does when it reads the peer's close, its end, or a reset
    ended = time.monotonic()
    assert client.safe_enqueue(note("late")) is False
    wait_until(lambda: client._writer.dead, "the writer to end")
    assert [entry for entry in connection.log if entry[1] >= ended] == []  # no message, ping, keepalive or close
