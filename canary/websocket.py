"""WebSockets through flask-sock: what is set up before its handshake, and the connection a view serves.

flask-sock's `Sock.route` (sockets.py) performs the handshake, simple-websocket's
`Server` sending the 101, before it calls the view; so the routes admit a
client earlier, in `before_request`, after `check_handshake` (a handshake
that cannot succeed is refused before anything is written to the store), and
call `prepare` on the request once it is admitted. Three things
simple-websocket leaves to us are fixed there, on the environ its `Server` is
built from:

* it writes with `socket.send`, which may write part of a frame; every write
  goes through `_Socket.send`: whole, straight to the socket when the kernel
  takes it, else a locked `sendall`, so the writer greenlet, pongs and pings
  never interleave (a write blocked by a peer that stopped reading is cut by
  the client's write timeout, see clients.py);
* it accepts permessage-deflate whenever offered (every browser does), which
  costs 5x the memory and 3x the CPU for tiny JSON; the offer is removed from
  the request before the handshake;
* it closes the socket at once after a close frame, which can reset the
  connection before the peer read that frame; `_Socket.close` lingers.

The rest goes through the app's ``SOCK_SERVER_OPTIONS``, which flask-sock
passes to `Server` (`server_options`). Its `thread_class` is `_InlineReader`,
which starts no thread: instead of simple-websocket's reader greenlet filling
a buffer that the view then drains, one greenlet of ours reads the socket
(`Connection.serve`), feeding wsproto's connection. So a client holds two
greenlets (its reader, its writer), not three; a message reaches the session
without a hand-off; and the reader can do what simple-websocket's cannot:
count only the pongs that answer this service's pings, refuse a ping flood,
and yield to the other greenlets every few frames so that no single socket
can hold the worker.

Once the client is connected the view returns (`Connection.detach`): the
reader is a greenlet of its own, started shallow, and the connection keeps
only wsproto's post-handshake `Connection` and the socket, whose descriptor
moves to a socket object of ours (gunicorn closes its own when the request
ends). gunicorn's request and environ, Flask's contexts, simple-websocket's
`Server` with the handshake's h11 state, and a view parked twenty frames deep
are freed: 45.5 → 25 KiB per idle connection (docs/benchmarks.md). gunicorn
then waits only for requests at a restart, so a stopping worker waits for its
connections itself (`drain`, gunicorn.conf.py's `worker_exit`), and the cap on
clients per worker is the service's own (`MAX_CLIENTS`), not gunicorn's pool.
"""

from __future__ import annotations

import base64
import binascii
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
from simple_websocket import ConnectionClosed, Server
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, Pong, TextMessage
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError

from .errors import Refusal

log = logging.getLogger(__name__)

__all__ = ["Connection", "ConnectionClosed", "check_handshake", "drain", "is_upgrade", "prepare", "server_options"]

_LINGER_SECONDS = 1.0
#: After this service's close frame, at most this much more is read (for the peer's close) from a peer that
#: does not stop sending: a client flooding the socket costs a few milliseconds to close, not tens.
_LINGER_BYTES = 16 * 1024
#: The kernel's send buffer of a WebSocket. Left to Linux's autotuning it grows to 4 MiB, which a client
#: that stops reading fills before its queue (CLIENT_QUEUE_BYTES) is even used: 4 MiB of kernel memory per
#: stalled client, and a slow consumer noticed megabytes late. Notifications are small; this holds
#: hundreds of them.
SEND_BUFFER_BYTES = 64 * 1024
_RECEIVE_BYTES = 4096
#: The reader yields to the other greenlets after this many frames read without a pause.
YIELD_EVERY_FRAMES = 8


def is_upgrade(environ: dict[str, Any]) -> bool:
    """Whether the request asks to upgrade to a WebSocket."""
    connection = environ.get("HTTP_CONNECTION", "").lower()
    return (environ.get("HTTP_UPGRADE", "").lower() == "websocket"
            and any(token.strip() == "upgrade" for token in connection.split(",")))


def check_handshake(environ: dict[str, Any]) -> None:
    """Refuse, before anything else happens, a handshake that cannot succeed (RFC 6455 §4.2.1, §4.4)."""
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip() != "13":
        raise Refusal(426, "only WebSocket version 13 is supported", headers={"Sec-WebSocket-Version": "13"})
    try:
        key = base64.b64decode(environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 16:
        raise Refusal(400, "Sec-WebSocket-Key must be 16 bytes in base64")


def server_options(*, max_message_bytes: int) -> dict[str, Any]:
    """simple-websocket `Server` options, for the app's ``SOCK_SERVER_OPTIONS``.

    The reader is the view's greenlet (`_InlineReader`, `Connection.serve`),
    which also enforces `max_message_bytes`. No `ping_interval`: each client's
    writer sends the pings (clients.py).
    """
    return {"max_message_size": max_message_bytes, "thread_class": _InlineReader, "event_class": _NoEvent}


def prepare(environ: dict[str, Any]) -> None:
    """Set up an admitted upgrade request for flask-sock's handshake (see the module's docstring)."""
    if "gunicorn.socket" not in environ:
        raise RuntimeError("WebSockets need gunicorn's gevent worker (no gunicorn.socket in environ)")
    environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)  # refuse permessage-deflate
    sock = environ["gunicorn.socket"]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    environ["gunicorn.socket"] = _Socket(sock)


class _InlineReader:
    """simple-websocket's `thread_class` that starts no thread: the view's greenlet reads (`Connection.serve`)."""

    name = "canary inline reader"

    def __init__(self, target: Callable[[], None]) -> None:
        pass  # simple-websocket's own reader loop (`target`) never runs

    def start(self) -> None:
        pass


class _NoEvent:
    """simple-websocket's `event_class`: nothing waits on it (there is no reader thread to signal)."""

    def set(self) -> None:
        pass


class _Socket:
    """The socket as simple-websocket sees it: whole, serialised, bounded writes."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._lock = threading.Lock()  # a greenlet lock once gevent has patched threading
        self._waiting = 0  # writes waiting for room in the kernel's buffer (they hold the lock)

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv(self, size: int) -> bytes:
        return self._sock.recv(size)

    def settimeout(self, seconds: float | None) -> None:
        self._sock.settimeout(seconds)

    def send(self, data: bytes) -> int:
        """Write all of `data`: straight to the non-blocking socket when the kernel's buffer takes it (almost
        always: gevent's sendall costs four times as much, 11.8 against 3.3 µs for a notification here),
        else waiting for room while the other greenlets run. Writes of different greenlets never interleave:
        one that has to wait holds the lock, and the others queue behind it."""
        if self._fd < 0:  # closed: the number may belong to another socket by now
            raise OSError(errno.EBADF, "the socket is closed")
        sent = 0
        if not self._waiting:  # nobody else's write is still going out
            try:
                sent = os.write(self._fd, data)  # no greenlet switch can happen between the check and this
            except BlockingIOError:
                pass
        if sent < len(data):
            self._waiting += 1
            try:
                with self._lock:
                    self._sock.sendall(memoryview(data)[sent:])
            finally:
                self._waiting -= 1
        return len(data)

    def take_over(self) -> None:
        """Keep the connection open after the request that upgraded it ends: gunicorn closes its socket object
        then (after flask-sock's view returns), so the descriptor moves to a socket object of our own."""
        old = self._sock
        self._sock = type(old)(old.family, old.type, old.proto, fileno=old.detach())

    def abort(self) -> None:
        """Cut the connection now; blocked reads and writes fail at once."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def peer_open(self) -> bool:
        """False if the peer closed the connection or sent a close frame that is not read yet."""
        try:
            # gevent's `recv` would wait (beside the reader: ConcurrentObjectUseError) where the kernel's says
            # EAGAIN, even after a select that said readable; the peek never waits.
            head = _raw(self._sock).recv(2, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not head:
            return False  # the peer's end of the connection
        # A client's close frame: FIN + opcode 8, then the mask bit.
        return not (len(head) == 2 and head[0] == 0x88 and head[1] & 0x80)

    def close(self) -> None:
        """Half-close, read what the peer still sends for a moment (not for ever), then close."""
        try:
            self._sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _LINGER_SECONDS
            read = 0
            while (left := deadline - time.monotonic()) > 0 and read < _LINGER_BYTES:
                self._sock.settimeout(left)
                data = self._sock.recv(_RECEIVE_BYTES)
                if not data:
                    break
                read += len(data)
                gevent.sleep(0)  # a peer that keeps sending must not hold the worker
        except OSError:
            pass
        self._fd = -1
        self._sock.close()


def _raw(sock: socket.socket) -> socket.socket:
    """The kernel's socket under a gevent socket (whose calls wait for readiness in the hub)."""
    return getattr(sock, "_sock", sock)


def _frame(payload: bytes) -> bytes:
    """A final text frame from the server (unmasked), built once for the many recipients of a broadcast:
    they are written one after the other, so the last one built is almost always the one asked for."""
    global _last_framed
    if _last_framed[0] is payload:
        return _last_framed[1]
    size = len(payload)
    if size < 126:
        framed = bytes((0x81, size)) + payload
    elif size < 1 << 16:
        framed = b"\x81\x7e" + size.to_bytes(2, "big") + payload
    else:
        framed = b"\x81\x7f" + size.to_bytes(8, "big") + payload
    _last_framed = (payload, framed)
    return framed


_last_framed: tuple[bytes | None, bytes] = (None, b"")


_TEXT, _PING, _PONG = 0x1, 0x9, 0xA
_SIMPLE = frozenset((_TEXT, _PING, _PONG))
_NO_LIMIT = 1 << 62


class _Wakeup(Exception):
    """Thrown into a reader blocked in `recv` by `Connection.interrupt`."""


#: Decides about a WebSocket ping from the peer: True to answer it; False to drop it (it is over budget).
PingPolicy = Callable[[], bool]


class Connection:
    """One accepted WebSocket: flask-sock's `ws`, on a socket `prepare` set up, read by `serve`."""

    def __init__(self, ws: Server, *, max_message_bytes: int | None = None) -> None:
        if not isinstance(ws.sock, _Socket):
            raise RuntimeError("the request was not prepared for the upgrade (websocket.prepare)")
        if ws.ws.connection is None or not ws.connected:
            raise ConnectionClosed(ws.close_reason, ws.close_message)
        self._socket: _Socket = ws.sock
        #: wsproto's connection after the handshake: not simple-websocket's `Server`, whose `WSConnection` keeps
        #: the handshake's h11 state for ever. flask-sock's `ws.close()` after the view then sends nothing.
        self._wsproto = ws.ws.connection
        ws.connected = False
        self._max_message_bytes = max_message_bytes or ws.max_message_size
        self._close_code = int(CloseReason.NO_STATUS_RCVD)
        self._close_message: str | None = None
        self._interrupted = False
        self._reader: gevent.Greenlet | None = None
        self._in_recv = False
        self._ping_payload = b""
        self.pong_received = True  # the last ping was answered (or none was sent)
        self._unread: bytes | None = b""  # bytes read past the last simple frame; None once wsproto reads
        self._handover = b""
        #: False from the moment nothing more may be sent: a close frame sent or received, the peer's end of the
        #: connection or a reset seen, the connection cut. `send` and `ping` check it, so neither ever writes
        #: to a connection that is closed or closing, whichever greenlet noticed first.
        self._open = True
        self._coded = False  # the close code is decided (sent, received, or the end seen)
        #: Called once, in the reader's greenlet, when `serve` sees the connection end (the peer's close frame,
        #: its end of TCP, a reset, a protocol violation), before anything else runs: the client's writer
        #: then writes nothing more (clients.py).
        self.on_end: Callable[[], None] | None = None

    @property
    def close_code(self) -> int:
        """The close code received or sent (1005 while none; 1006 when the connection ended without one)."""
        return self._close_code

    @close_code.setter
    def close_code(self, code: int) -> None:
        """Record the code this service ends the connection with when it cannot send the close frame (the
        peer's buffers are full: the connection is cut), unless a code was already sent or received."""
        self._decide(code)

    def _decide(self, code: int, message: str | None = None) -> None:
        if not self._coded:
            self._coded = True
            self._close_code, self._close_message = int(code), message

    def _ended(self) -> None:
        """The reader saw the end of the connection: nothing more is sent on it, and its client is told now."""
        self._decide(CloseReason.ABNORMAL_CLOSURE)  # unless a close frame was sent or received: its code stays
        self._open = False
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            on_end()

    def serve(self, deliver: Callable[[str | bytes], None], ping_allowed: PingPolicy = lambda: True) -> None:
        """Read the connection in this greenlet, passing each message to `deliver`, until it is closed or
        interrupted (`finish` then completes the close handshake).

        Whole, final, masked text frames and pings and pongs (what clients send) are read by `_frames`
        (wsproto costs 17 µs a frame, this 1 µs); from the first frame of any other kind on (a close, a
        fragment, a protocol error), the connection is read by wsproto, from that frame's first byte.
        """
        self._reader = gevent.getcurrent()
        wsproto = self._wsproto
        parts: list[str | bytes] = []
        size = 0
        since_pause = 0
        try:
            while not self._interrupted:
                try:
                    self._in_recv = True
                    data = self._socket.recv(_RECEIVE_BYTES)
                except _Wakeup:
                    break
                finally:
                    self._in_recv = False
                if not data:  # the peer's end of the connection, without a close frame (or after ours)
                    self._ended()
                    return
                if self._unread is not None:
                    data = self._unread + data
                    for kind, payload in self._frames(data):
                        if kind == _TEXT:
                            deliver(payload)
                            if self._interrupted:
                                return
                        elif kind == _PING:
                            if self._open and ping_allowed():
                                self._socket.send(b"\x8a" + bytes((len(payload),)) + payload)
                        elif payload == self._ping_payload:  # a pong: only an answer to this service's ping counts
                            self.pong_received = True
                        since_pause += 1
                        if since_pause >= YIELD_EVERY_FRAMES:
                            since_pause = 0
                            gevent.sleep(0)  # let every other greenlet run: one socket never holds the worker
                    if self._unread is not None:
                        continue
                    data = self._handover  # from the first frame wsproto reads
                wsproto.receive_data(data)
                for event in wsproto.events():
                    if isinstance(event, Message):
                        size += len(event.data)
                        if self._max_message_bytes and size > self._max_message_bytes:
                            self._close_from_reader(CloseReason.MESSAGE_TOO_BIG, "Message is too big")
                            return
                        parts.append(event.data)
                        if event.message_finished:
                            message = parts[0] if len(parts) == 1 else _join(parts, event)
                            parts, size = [], 0
                            deliver(message)
                            if self._interrupted:
                                return
                    elif isinstance(event, Ping):
                        if self._open and ping_allowed():
                            self._socket.send(wsproto.send(event.response()))
                    elif isinstance(event, Pong):
                        if event.payload == self._ping_payload:  # only an answer to this service's ping counts
                            self.pong_received = True
                    elif isinstance(event, CloseConnection):
                        if wsproto.state is ConnectionState.OPEN:  # a protocol error: 1002, 1007, 1009
                            self._close_from_reader(event.code, event.reason or "")
                            return
                        self._decide(event.code, event.reason)
                        echo = self._open and wsproto.state is ConnectionState.REMOTE_CLOSING
                        # The writer is told before the echo is written (a write may let it run): it must
                        # not send a message or a ping after the close.
                        self._ended()
                        if echo:
                            self._socket.send(wsproto.send(event.response()))  # echo the peer's close
                        return
                    since_pause += 1
                    if since_pause >= YIELD_EVERY_FRAMES:
                        since_pause = 0
                        gevent.sleep(0)  # let every other greenlet run: one socket never holds the worker
        except (OSError, LocalProtocolError):  # a reset (ECONNRESET), a cut connection
            self._ended()

    def _frames(self, data: bytes) -> Iterator[tuple[int, Any]]:
        """The whole simple frames at the start of `data` (see `serve`): text messages decoded, ping and pong
        payloads. What follows them stays in `_unread` if it may be the start of one more; else reading
        passes to wsproto (`_unread` None, `_handover` the bytes from that frame on)."""
        limit = self._max_message_bytes or _NO_LIMIT
        end = len(data)
        at = 0
        while True:
            if end - at < 2:
                break
            first, second = data[at], data[at + 1]
            opcode, length = first & 0x0F, second & 0x7F
            if first & 0xF0 != 0x80 or not second & 0x80 or opcode not in _SIMPLE or length == 127 \
                    or (opcode != _TEXT and length > 125):
                self._hand_over(data[at:])  # not final, reserved bits, unmasked, a close or data frame, 64-bit
                return
            start = at + 2
            if length == 126:
                if end - start < 2:
                    break
                length = int.from_bytes(data[start:start + 2], "big")
                start += 2
            if length > limit:
                self._hand_over(data[at:])  # too big: wsproto reads it, and `serve` closes with 1009
                return
            if end - start < 4 + length:
                break
            mask = data[start:start + 4]
            payload = (int.from_bytes(data[start + 4:start + 4 + length], "big")
                       ^ int.from_bytes((mask * (length // 4 + 1))[:length], "big")).to_bytes(length, "big")
            if opcode == _TEXT:
                try:
                    text = payload.decode()
                except UnicodeDecodeError:
                    self._hand_over(data[at:])  # not UTF-8: wsproto closes with 1007
                    return
                at = start + 4 + length
                self._unread = data[at:]
                yield _TEXT, text
            else:
                at = start + 4 + length
                self._unread = data[at:]
                yield opcode, payload
        self._unread = data[at:]

    def _hand_over(self, data: bytes) -> None:
        self._unread, self._handover = None, data

    def _close_from_reader(self, code: int, reason: str) -> None:
        """The peer broke the protocol: close with `code`, the client told first (see `_ended`)."""
        frame = b""
        if self._open:
            self._open = False
            self._decide(code)
            try:
                frame = self._wsproto.send(CloseConnection(code, reason))
            except LocalProtocolError:
                pass
        self._ended()
        if frame:
            try:
                self._socket.send(frame)
            except OSError:
                pass

    def detach(self, run: Callable[[], None]) -> None:
        """Call `run` (which serves the connection) in a greenlet of its own, and let the request that upgraded
        the connection end (see the module's docstring)."""
        self._socket.take_over()
        _detached.add(self)
        _none_detached.clear()
        gevent.spawn_raw(self._run_detached, run)

    def _run_detached(self, run: Callable[[], None]) -> None:
        try:
            run()
        except BaseException:
            log.exception("serving a WebSocket failed")
            self.abort()
        finally:
            _detached.discard(self)
            if not _detached:
                _none_detached.set()

    def alive(self) -> bool:
        """False once the connection is closed or closing, even if the reader has not noticed yet."""
        return not self._interrupted and self._open and self._socket.peer_open()

    def interrupt(self) -> None:
        """Make `serve` return now, whatever is still unread (the session is left at once)."""
        self._interrupted = True
        if self._reader is not None and self._reader is not gevent.getcurrent():
            gevent.get_hub().loop.run_callback(self._wake)

    def _wake(self) -> None:
        # Runs in the hub, so the reader is parked: wake it only where it waits for the socket.
        if self._in_recv and self._reader is not None:
            self._reader.throw(_Wakeup)

    def send(self, *payloads: bytes) -> None:
        """Write text messages (UTF-8 payloads), in one write; raises `ConnectionClosed` (nothing is written)
        once the connection is closed or closing, or `OSError`.

        The frames are built here rather than by wsproto: a server's frames are
        not masked, so each is a header and the payload, and it saves a third of
        the cost of each write (every recipient of a broadcast pays it).
        """
        if not self._open:
            raise ConnectionClosed(self._close_code, self._close_message)
        if len(payloads) == 1:
            self._socket.send(_frame(payloads[0]))
        else:
            self._socket.send(b"".join([_frame(payload) for payload in payloads]))

    def ping(self) -> bool:
        """Send a WebSocket ping; False (and nothing sent) if the previous one got no answer. On a connection
        that is closed or closing nothing is sent and True is returned: its end is the reader's to report."""
        if not self._open:
            return True
        if not self.pong_received:
            return False
        self.pong_received = False  # set again by `serve` when the pong carrying this payload arrives
        self._ping_payload = os.urandom(8)
        self._socket.send(self._wsproto.send(Ping(self._ping_payload)))
        return True

    def close(self, code: int, reason: str) -> None:
        """Make `serve` return and send a close frame (unless the connection is closed or closing already).

        The reader is woken first: the client leaves its session now even if the close frame has to wait
        for room in a peer's full buffers (then the client's ticker cuts the connection).
        """
        self.interrupt()
        if self._open:
            self._open = False
            self._decide(code)
            try:
                self._socket.send(self._wsproto.send(CloseConnection(code, reason)))
            except (OSError, LocalProtocolError):
                pass

    def abort(self) -> None:
        """Drop the connection without a close handshake (the peer is not reading, or is gone)."""
        self._decide(CloseReason.ABNORMAL_CLOSURE)  # unless a code was sent, received or recorded
        self._open = False
        self._socket.abort()
        self.interrupt()

    def finish(self, timeout: float) -> None:
        """Complete the close handshake (read until the peer's close, or `timeout`), then close the socket.

        Afterwards the connection is closed: the close frame and its code are the ones this service chose.
        """
        wsproto = self._wsproto
        deadline = time.monotonic() + timeout
        read = 0
        try:
            if self._unread:  # what the fast reader left (the start of a frame): wsproto reads on from there
                wsproto.receive_data(self._unread)
                for _event in wsproto.events():
                    pass
            self._unread = None
            while (wsproto.state is ConnectionState.LOCAL_CLOSING and read < _LINGER_BYTES
                   and (left := deadline - time.monotonic()) > 0):
                self._socket.settimeout(left)
                data = self._socket.recv(_RECEIVE_BYTES)
                if not data:
                    break
                read += len(data)
                wsproto.receive_data(data)
                for _event in wsproto.events():  # up to the peer's close (the state is then CLOSED)
                    pass
                gevent.sleep(0)  # a peer that keeps sending instead must not hold the worker
        except (OSError, LocalProtocolError):
            pass
        self._decide(CloseReason.ABNORMAL_CLOSURE)
        self._open = False
        self._socket.close()


_detached: set[Connection] = set()
_none_detached = gevent.event.Event()
_none_detached.set()


def drain(timeout: float) -> int:
    """Wait up to `timeout` seconds for every connection served after its request ended (`Connection.detach`)
    to end: a stopping worker calls it, since gunicorn waits only for its request greenlets. How many are left."""
    _none_detached.wait(max(timeout, 0))
    return len(_detached)


def _join(parts: list[str | bytes], last: Message) -> str | bytes:
    if isinstance(last, TextMessage):
        return "".join(part for part in parts if isinstance(part, str))
    assert isinstance(last, BytesMessage)
    return b"".join(part for part in parts if isinstance(part, bytes | bytearray))
