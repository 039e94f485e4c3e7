"""WebSockets through flask-sock: what is set up before its handshake, and the connection a view serves.

flask-sock's `Sock.route` (routes.py) performs the handshake, simple-websocket's
`Server` sending the 101, before it calls the view; so the routes admit a
client earlier, in the blueprint's `before_request`, and call `prepare` on the
request once it is admitted. Three things simple-websocket leaves to us are
fixed there, on the environ its `Server` is built from:

* it writes with `socket.send`, which may write part of a frame; every write
  goes through `_Socket.send`, a locked `sendall`, so the writer greenlet,
  pongs and pings never interleave (a write blocked by a peer that stopped
  reading is cut by the client's write timeout, see clients.py);
* it accepts permessage-deflate whenever offered (every browser does), which
  costs 5x the memory and 3x the CPU for tiny JSON; the offer is removed from
  the request before the handshake;
* it closes the socket at once after a close frame, which can reset the
  connection before the peer read that frame; `_Socket.close` lingers.

The rest is `server_options` (the app's ``SOCK_SERVER_OPTIONS``, which
flask-sock passes to `Server`) and `Connection`, which serves a client over
flask-sock's `ws` object.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from typing import Any

from simple_websocket import ConnectionClosed, Server
from wsproto.events import Ping

__all__ = ["Connection", "ConnectionClosed", "is_upgrade", "prepare", "server_options"]

_LINGER_SECONDS = 1.0


def is_upgrade(environ: dict[str, Any]) -> bool:
    """Whether the request asks to upgrade to a WebSocket."""
    connection = environ.get("HTTP_CONNECTION", "").lower()
    return (environ.get("HTTP_UPGRADE", "").lower() == "websocket"
            and any(token.strip() == "upgrade" for token in connection.split(",")))


def server_options(*, max_message_bytes: int) -> dict[str, Any]:
    """simple-websocket `Server` options, for the app's ``SOCK_SERVER_OPTIONS``.

    No `ping_interval`: simple-websocket would then wait in a selector before
    every read (a third of the CPU of a ping round trip); each client's writer
    sends the pings (clients.py).
    """
    return {"max_message_size": max_message_bytes}


def prepare(environ: dict[str, Any]) -> None:
    """Set up an admitted upgrade request for flask-sock's handshake (see the module's docstring)."""
    if "gunicorn.socket" not in environ:
        raise RuntimeError("WebSockets need gunicorn's gevent worker (no gunicorn.socket in environ)")
    environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)  # refuse permessage-deflate
    environ["gunicorn.socket"] = _Socket(environ["gunicorn.socket"])


class _Socket:
    """The socket as simple-websocket sees it: whole, serialised, bounded writes."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()  # a greenlet lock once gevent has patched threading

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv(self, size: int) -> bytes:
        return self._sock.recv(size)

    def send(self, data: bytes) -> int:
        with self._lock:
            self._sock.sendall(data)
        return len(data)

    def abort(self) -> None:
        """Cut the connection now; blocked reads and writes fail at once."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def peer_open(self) -> bool:
        """False if the peer closed the connection or sent a close frame that is not read yet."""
        try:
            if not select.select([self._sock], [], [], 0)[0]:
                return True
            head = self._sock.recv(2, socket.MSG_PEEK)
        except OSError:
            return False
        if not head:
            return False  # the peer's end of the connection
        # A client's close frame: FIN + opcode 8, then the mask bit.
        return not (len(head) == 2 and head[0] == 0x88 and head[1] & 0x80)

    def close(self) -> None:
        """Half-close, read what the peer still sends for a moment, then close."""
        try:
            self._sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _LINGER_SECONDS
            while (left := deadline - time.monotonic()) > 0:
                self._sock.settimeout(left)
                if not self._sock.recv(4096):
                    break
        except OSError:
            pass
        self._sock.close()


def _frame(payload: bytes) -> bytes:
    """A final text frame from the server (unmasked)."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 1 << 16:
        return b"\x81\x7e" + size.to_bytes(2, "big") + payload
    return b"\x81\x7f" + size.to_bytes(8, "big") + payload


class Connection:
    """One accepted WebSocket: flask-sock's `ws`, on a socket `prepare` set up."""

    def __init__(self, ws: Server) -> None:
        if not isinstance(ws.sock, _Socket):
            raise RuntimeError("the request was not prepared for the upgrade (websocket.prepare)")
        self._ws = ws
        self._socket: _Socket = ws.sock
        self._interrupted = False

    @property
    def close_code(self) -> int:
        """The close code received or sent (1005 while none)."""
        return int(self._ws.close_reason)

    def receive(self) -> str | bytes:
        """The next message; raises `ConnectionClosed` once the connection is closed or interrupted."""
        # simple-websocket's own receive() cannot be woken without closing the socket.
        ws = self._ws
        while True:
            if self._interrupted:
                raise ConnectionClosed(ws.close_reason, ws.close_message)
            if ws.input_buffer:
                return ws.input_buffer.pop(0)
            if not ws.connected:
                raise ConnectionClosed(ws.close_reason, ws.close_message)
            ws.event.wait()
            ws.event.clear()

    def alive(self) -> bool:
        """False once the connection is closed or closing, even if the reader has not noticed yet."""
        return not self._interrupted and self._ws.connected and self._socket.peer_open()

    def interrupt(self) -> None:
        """Make `receive` raise `ConnectionClosed` now, whatever is still buffered."""
        self._interrupted = True
        self._ws.event.set()

    def send(self, *payloads: bytes) -> None:
        """Write text messages (UTF-8 payloads), in one write; raises `ConnectionClosed` or `OSError`.

        The frames are built here rather than by wsproto: a server's frames are
        not masked, so each is a header and the payload, and it saves a third of
        the cost of each write (every recipient of a broadcast pays it).
        """
        if not self._ws.connected:
            raise ConnectionClosed(self._ws.close_reason, self._ws.close_message)
        self._socket.send(b"".join(_frame(payload) for payload in payloads))

    def ping(self) -> bool:
        """Send a WebSocket ping; False (and nothing sent) if the previous one got no pong."""
        ws = self._ws
        if not ws.pong_received:
            return False
        ws.pong_received = False  # set again by simple-websocket's reader when the pong arrives
        self._socket.send(ws.ws.send(Ping()))
        return True

    def close(self, code: int, reason: str) -> None:
        """Send a close frame (if still open) and wake the receiver."""
        try:
            self._ws.close(code, reason)
            self._ws.close_reason = code
        except (ConnectionClosed, OSError):
            pass
        self.interrupt()

    def abort(self) -> None:
        """Drop the connection without a close handshake (the peer is not reading)."""
        self._socket.abort()
        self.interrupt()

    def finish(self, timeout: float) -> None:
        """Wait for the close handshake to end, cutting the connection if it does not.

        Once simple-websocket's reader has ended it has closed the socket, so
        the `ws.close()` that flask-sock calls after the view returns sends
        nothing (wsproto also refuses a second close frame): the close frame
        and its code are the ones this service chose.
        """
        self._ws.thread.join(timeout)
        if self._ws.thread.is_alive():
            self.abort()
            self._ws.thread.join(timeout)
