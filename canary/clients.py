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
import gevent.queue
from gevent.monkey import get_original

from .protocol import CLOSE_TRY_AGAIN_LATER, Frame
from .websocket import Connection, ConnectionClosed

log = logging.getLogger(__name__)

_real_thread_id: Callable[[], int] = get_original("threading", "get_ident")


class _Close:
    """The queue item that ends the writer; `flush` sends what was queued first."""

    __slots__ = ("code", "flush", "reason")

    def __init__(self, code: int, reason: str, flush: bool) -> None:
        self.code, self.reason, self.flush = code, reason, flush


class Client:
    """A WebSocket client's outbound side.

    `limit` bounds the messages waiting to be written. Coalescing messages
    (snapshots) keep at most one pending per type, the newest; when the queue
    is full of messages that cannot be coalesced the client is closed with
    1013 rather than losing one silently.
    """

    def __init__(self, connection: Connection, *, name: str, limit: int, keepalive_seconds: float,
                 keepalive: Callable[[], Frame], ping_seconds: float | None = None) -> None:
        self.name = name
        self._connection = connection
        self._limit = limit
        self._keepalive_seconds = keepalive_seconds
        self._keepalive = keepalive
        self._ping_seconds = ping_seconds
        self._queue: gevent.queue.Queue[Frame | str | _Close] = gevent.queue.Queue()
        self._pending: dict[str, Frame] = {}
        self._closing: _Close | None = None
        self._hub = gevent.get_hub()
        self._thread_id = _real_thread_id()
        self._writer = gevent.spawn(self._write_loop)

    @property
    def closing(self) -> bool:
        return self._closing is not None

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
            already_queued = frame.type in self._pending
            self._pending[frame.type] = frame
            if not already_queued:
                self._queue.put(frame.type)
            return True
        if self._queue.qsize() - len(self._pending) >= self._limit:
            log.warning("closing %s with %d: %d messages queued, it is not reading",
                        self.name, CLOSE_TRY_AGAIN_LATER, self._limit)
            self._close(CLOSE_TRY_AGAIN_LATER, "client too slow", flush=False)
            self._connection.interrupt()  # leave the session now, even if the close frame waits
            return False
        self._queue.put(frame)
        return True

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

    def stop(self, timeout: float) -> None:
        """Close (if not yet) and wait for the writer to end, killing it if it will not."""
        self._close(1000, "", flush=False)
        self._writer.join(timeout)
        if not self._writer.dead:
            self._connection.abort()
            self._writer.kill(block=True, timeout=timeout)

    def _write_loop(self) -> None:
        connection = self._connection
        now = time.monotonic()
        next_beat = now + self._keepalive_seconds
        next_ping = now + self._ping_seconds if self._ping_seconds else float("inf")
        try:
            while True:
                now = time.monotonic()
                if now >= next_ping:
                    if not connection.ping():
                        # No pong since the last ping: the peer is gone (TCP open, nothing answering).
                        log.info("closing %s: no answer to pings for %g s", self.name, 2 * self._ping_seconds)
                        self._closing = self._closing or _Close(1008, "", flush=False)
                        connection.close(1008, "ping timeout")
                        connection.abort()
                        return
                    next_ping = now + self._ping_seconds
                if now >= next_beat:
                    connection.send(self._keepalive().text)
                    next_beat = now + self._keepalive_seconds
                try:
                    item = self._queue.get(timeout=min(next_beat, next_ping) - now)
                except gevent.queue.Empty:
                    continue
                if isinstance(item, _Close):
                    connection.close(item.code, item.reason)
                    return
                if self._closing is not None and not self._closing.flush:
                    continue  # skip to the close: the client is not reading
                connection.send(self._pending.pop(item).text if isinstance(item, str) else item.text)
        except (ConnectionClosed, OSError) as e:
            # The peer is gone or stopped reading for longer than the write timeout.
            log.debug("writer of %s ends: %r", self.name, e)
            self._closing = self._closing or _Close(1006, "", flush=False)
            connection.abort()
