"""One connected client: a bounded queue and the one greenlet that writes to it.

Everything that talks to a client goes through `Client.safe_enqueue`, which
never blocks and never raises. It may be called from any greenlet of the
server's thread or from a foreign OS thread (a Firestore consumer thread when
threading is not patched): a foreign call is handed to the hub with
`loop.run_callback_threadsafe`, which also wakes the hub; gevent queues
themselves are not thread-safe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import gevent
from gevent.hub import Hub, Waiter
from gevent.monkey import get_original

from . import metrics
from .protocol import CLOSE_TRY_AGAIN_LATER, Frame, coalesce
from .websocket import Connection, ConnectionClosed

log = logging.getLogger(__name__)

_real_thread_id: Callable[[], int] = get_original("threading", "get_ident")


class _Close:
    """The queue item that ends the writer; `flush` sends what was queued first."""

    __slots__ = ("code", "flush", "reason")

    def __init__(self, code: int, reason: str, flush: bool) -> None:
        self.code, self.reason, self.flush = code, reason, flush


_TICK = object()  # queue item: a keepalive or a ping may be due
_MAX_FRAMES_PER_WRITE = 256

_Item = Frame | str | _Close | object


class _Mailbox:
    """The client's queue, for its writer alone: a list and, while the writer waits, its `Waiter`.

    gevent's `Queue` (general: many getters and putters, a size bound) cost 2.5 KiB
    per client, and a writer parked in its `get` kept a deeper stack; a client's
    queue has one reader, and its bound is counted in bytes by `Client`.
    """

    __slots__ = ("_hub", "_items", "_waiter", "_waiting")

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._items: list[_Item] = []
        # One Waiter for the mailbox's life: it is only ever switched while the writer waits in it, so it
        # never holds a value between two waits.
        self._waiter = Waiter(hub)
        self._waiting = False

    def put(self, item: _Item) -> None:
        self._items.append(item)
        if self._waiting:
            self._waiting = False
            self._hub.loop.run_callback(self._waiter.switch, None)

    def take(self) -> list[_Item]:
        """Everything queued, in order, waiting (in the writer's greenlet) until there is something."""
        while not self._items:
            self._waiting = True
            try:
                self._waiter.get()
            finally:
                self._waiting = False
        items, self._items = self._items, []
        return items

    def __len__(self) -> int:
        return len(self._items)


class _Ticker:
    """One greenlet per process for every client's timers.

    It wakes a writer when its keepalive or ping is due and cuts a connection
    whose write has been blocked longer than its write timeout, so that no
    message pays for a timer of its own (a timeout per queue wait or per socket
    write was a tenth of the CPU of a ping round trip).
    """

    def __init__(self) -> None:
        self._clients: set[Client] = set()
        self._period = 1.0
        self._greenlet: gevent.Greenlet | None = None

    def add(self, client: Client, period: float) -> None:
        self._clients.add(client)
        self._period = min(self._period, max(period / 4, 0.02))
        if self._greenlet is None or self._greenlet.dead:
            self._greenlet = gevent.spawn(self._run)

    def discard(self, client: Client) -> None:
        self._clients.discard(client)

    def _run(self) -> None:
        while self._clients:
            gevent.sleep(self._period)
            now = time.monotonic()
            for client in list(self._clients):
                client._tick(now)


_ticker = _Ticker()


class Client:
    """A WebSocket client's outbound side.

    `max_bytes` bounds what may wait to be written, in bytes: a burst whose
    size grows with the session (everyone joining at once) is not a slow
    client, a client that stopped reading is. Coalescing messages (snapshots)
    keep at most one pending per type, the newest (its `changes` merged with
    the pending one's: `protocol.coalesce`); when the other messages
    waiting exceed `max_bytes` the client is closed with 1013 rather than
    losing one silently.

    The kernel's buffers hold hundreds of small messages, so a client that
    stops reading while few messages flow is found by time, not by bytes: it
    must read what is written to it within `read_timeout` seconds (default:
    `ping_seconds`). The writer follows the messages it writes with a WebSocket
    ping, at most one every `read_timeout` / 2 seconds and only while messages
    are written (a ping a timer sends, not one per message): the peer can only
    answer it once it has read what came before it. A ping still unanswered
    when the next one is due, with messages written before it, closes the
    client with 1013; so does a write blocked for `read_timeout` (or
    `write_timeout`, the shorter). Keepalives do not count: a peer that was
    sent nothing else and answers no ping for `ping_seconds` is taken for gone
    and closed with 1008.
    """

    def __init__(self, connection: Connection, *, name: str, max_bytes: int, keepalive_seconds: float,
                 keepalive: Callable[[], Frame], ping_seconds: float | None = None,
                 write_timeout: float | None = None, read_timeout: float | None = None) -> None:
        self.name = name
        self._connection = connection
        self._max_bytes = max_bytes
        self._queued_bytes = 0  # of the queued messages that are not coalesced
        self._keepalive_seconds = keepalive_seconds
        self._keepalive = keepalive
        self._ping_seconds = ping_seconds
        if read_timeout is None and ping_seconds:
            read_timeout = ping_seconds
        self._probe_seconds = read_timeout / 2 if read_timeout else float("inf")  # ping after messages this soon
        # A write blocked this long cuts the connection.
        self._write_timeout = min((t for t in (write_timeout, read_timeout) if t), default=None)
        self._hub = gevent.get_hub()
        self._queue = _Mailbox(self._hub)
        self._pending: dict[str, Frame] = {}
        self._closing: _Close | None = None
        self._thread_id = _real_thread_id()
        now = time.monotonic()
        self._next_beat = now + keepalive_seconds
        self._next_ping = now + ping_seconds if ping_seconds else float("inf")
        self._tick_queued = False
        self._writing_since = 0.0  # when the write in progress began; 0: none
        self._written_at = 0.0  # when the first message written since the last ping was; 0: none
        self._unread_since = 0.0  # when the first message the ping in flight follows was written; 0: none
        self._gone = False  # the reader saw the connection end: nothing more is written
        connection.on_end = self._connection_ended
        # A raw greenlet: a gevent.Greenlet (links, spawn tree, values) costs 1.9 KiB more per client.
        self._writer = gevent.spawn_raw(self._write_loop)
        self._writer_ended: Waiter | None = None  # who waits for the writer to end (`stop`)
        _ticker.add(self, min(keepalive_seconds, ping_seconds or keepalive_seconds, self._probe_seconds))

    def safe_enqueue(self, frame: Frame) -> bool:
        """Queue `frame` for this client; never blocks, never raises.

        Returns False when the client is closing (the frame is dropped). From a
        foreign thread the frame is handed to the hub and True is returned.
        """
        if _real_thread_id() != self._thread_id:
            self._hub.loop.run_callback_threadsafe(self._enqueue, frame)
            return True
        return self._enqueue(frame)

    def _enqueue(self, frame: Frame) -> bool:
        if self._closing is not None:
            return False
        if frame.coalesce:
            pending = self._pending.get(frame.type)
            if pending is None:
                self._queue.put(frame.type)
            else:  # a slow client: one message says what both did
                frame = coalesce(pending, frame)
            self._pending[frame.type] = frame
            return True
        # A message bigger than the bound on its own still goes out, once nothing else waits.
        if self._queued_bytes and self._queued_bytes + len(frame.data) > self._max_bytes:
            log.warning("closing %s with %d: %d bytes queued, it is not reading",
                        self.name, CLOSE_TRY_AGAIN_LATER, self._queued_bytes)
            self._close(CLOSE_TRY_AGAIN_LATER, "client too slow", flush=False)
            self._connection.interrupt()  # leave the session now, even if the close frame waits
            return False
        self._queued_bytes += len(frame.data)
        self._queue.put(frame)
        return True

    def alive(self) -> bool:
        """False once this client is closing, or its peer closed the connection (read or not)."""
        return self._closing is None and self._connection.alive()

    def close(self, code: int, reason: str) -> None:
        """Close after writing what is already queued; safe from any thread."""
        if _real_thread_id() != self._thread_id:
            self._hub.loop.run_callback_threadsafe(self._close, code, reason, True)
        else:
            self._close(code, reason, True)

    def _close(self, code: int, reason: str, flush: bool) -> None:
        if self._closing is None:
            self._closing = _Close(code, reason, flush)
            self._queue.put(self._closing)

    def _connection_ended(self) -> None:
        """The reader saw the connection end (the peer's close frame, its end of TCP, a reset), in its greenlet
        and before anything else ran: the writer writes nothing more (no message, keepalive, ping or close)
        and ends; messages queued from now on are dropped."""
        self._gone = True
        self._close(1006, "", flush=False)

    def stop(self, timeout: float) -> None:
        """Close (if not yet) and wait for the writer to end, killing it if it will not."""
        self._close(1000, "", flush=False)
        self._join_writer(timeout)
        if not self._writer.dead:
            self._connection.abort()
            gevent.kill(self._writer)
            self._join_writer(timeout)
        _ticker.discard(self)

    def _join_writer(self, timeout: float) -> None:
        if self._writer.dead:
            return
        self._writer_ended = Waiter(self._hub)
        with gevent.Timeout(timeout, False):
            self._writer_ended.get()
        self._writer_ended = None

    def _tick(self, now: float) -> None:
        """Called by the ticker about every quarter of the shortest period."""
        if self._writing_since:
            # A write (or a close frame) blocked this long: the peer is not reading.
            limit = self._write_timeout
            if limit is not None and now - self._writing_since > limit:
                if self._closing is None:
                    log.warning("closing %s with %d: a write has been blocked for %g s, it is not reading",
                                self.name, CLOSE_TRY_AGAIN_LATER, limit)
                    self._close(CLOSE_TRY_AGAIN_LATER, "client too slow", flush=False)
                    self._connection.close_code = CLOSE_TRY_AGAIN_LATER  # the close frame cannot be written
                self._writing_since = 0.0
                self._connection.abort()  # the write fails, the writer ends; the reader returns at once
        elif not self._tick_queued and now >= min(self._next_beat, self._next_ping):
            self._tick_queued = True
            self._queue.put(_TICK)

    def _write(self, frames: list[Frame], message: bool = True) -> None:
        """Write `frames` in one write; `message`: they count for the read deadline (not a keepalive)."""
        if not frames or self._gone:
            return
        started = self._writing_since = time.monotonic()
        try:
            if len(frames) == 1:
                self._connection.send(frames[0].data)
            else:
                self._connection.send(*[frame.data for frame in frames])
        finally:
            self._writing_since = 0.0
        if message and not self._written_at:  # the first message since the last ping: follow it with one
            self._written_at = started
            if started + self._probe_seconds < self._next_ping:
                self._next_ping = started + self._probe_seconds
        metrics.sent(frames)

    def _timers(self) -> bool:
        """Send the keepalive and the ping that are due; False if the client is closed for not answering."""
        self._tick_queued = False
        if self._closing is not None:
            return True  # its close follows in the queue: no keepalive, no ping
        now = time.monotonic()
        if now >= self._next_ping:
            if not self._connection.ping():  # the previous ping is unanswered: nothing was sent
                unread = self._unread_since or self._written_at
                if unread:
                    # Messages were written before that ping: the peer has not read them (it is stuck, or gone).
                    log.warning("closing %s with %d: it is not reading (the ping that followed messages written to "
                                "it %.1f s ago is unanswered)", self.name, CLOSE_TRY_AGAIN_LATER, now - unread)
                    code, reason = CLOSE_TRY_AGAIN_LATER, "client too slow"
                else:
                    # Only keepalives were written: the peer is gone (TCP open, nothing answering).
                    log.info("closing %s: no answer to pings for %g s", self.name, 2 * (self._ping_seconds or 0))
                    code, reason = 1008, "ping timeout"
                self._closing = _Close(code, reason, flush=False)
                self._writing_since = now  # a close frame that cannot be written is cut by the ticker
                try:
                    self._connection.close(code, reason)
                finally:
                    self._writing_since = 0.0
                self._connection.abort()
                return False
            # The ping just sent follows the messages written since the previous one: it is checked (the next
            # ping) within half the read deadline; one that follows no message, within `ping_seconds`.
            self._unread_since, self._written_at = self._written_at, 0.0
            self._next_ping = now + (self._probe_seconds if self._unread_since else self._ping_seconds or float("inf"))
        if now >= self._next_beat:
            self._write([self._keepalive()], message=False)
            self._next_beat = now + self._keepalive_seconds
        return True

    def _write_loop(self) -> None:
        try:
            while True:
                # Everything queued when the writer wakes goes out in one write (one system call).
                frames: list[Frame] = []
                for item in self._queue.take():
                    if item is _TICK:
                        self._write(frames)
                        frames = []
                        if not self._timers():
                            return
                    elif isinstance(item, _Close):
                        self._write(frames)
                        if not self._gone:
                            self._writing_since = time.monotonic()  # a close frame that cannot go out is cut
                            try:
                                self._connection.close(item.code, item.reason)
                            finally:
                                self._writing_since = 0.0
                        return
                    elif self._closing is not None and not self._closing.flush:
                        pass  # skip to the close: the client is not reading
                    elif isinstance(item, str):
                        frames.append(self._pending.pop(item))
                    else:
                        self._queued_bytes -= len(item.data)  # type: ignore[union-attr]
                        frames.append(item)  # type: ignore[arg-type]
                    if len(frames) >= _MAX_FRAMES_PER_WRITE:
                        self._write(frames)
                        frames = []
                self._write(frames)
        except (ConnectionClosed, OSError) as e:
            # The peer is gone (a reset: EPIPE, ECONNRESET), or the connection was cut (a blocked write). The
            # reader is made to return at once, so the session is left now, not at the next ping.
            log.debug("writer of %s ends: %r", self.name, e)
            self._closing = self._closing or _Close(1006, "", flush=False)
            self._connection.abort()
        finally:
            self._connection.on_end = None  # no cycle between the connection and its client once the writer ends
            _ticker.discard(self)
            if self._writer_ended is not None:
                self._hub.loop.run_callback(self._writer_ended.switch, None)
