"""A small asyncio WebSocket client for the benchmarks that need many connections in flight at once
(bench/storm.py) or raw frames (bench/flood.py).

Only what those need: the opening handshake (split in two, so that all TCP connections can be open before
any upgrade request is sent), RFC 6455 framing (client frames masked; no extensions, no fragmentation: the
service sends neither), and a bounded wait everywhere. It talks to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import time
from typing import Any

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA
HOST = "127.0.0.1"


def masked(payload: bytes, mask: bytes) -> bytes:
    if not payload:
        return b""
    key = (mask * (len(payload) // 4 + 1))[:len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(len(payload), "big")


def frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One client frame: FIN set, masked (as RFC 6455 requires of clients) with `mask` or a random key."""
    mask = os.urandom(4) if mask is None else mask
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + mask + masked(payload, mask)


def text(message: Any, mask: bytes | None = None) -> bytes:
    """A masked text frame carrying `message` as JSON."""
    return frame(TEXT, json.dumps(message, separators=(",", ":")).encode(), mask)


def close_frame(code: int = 1000) -> bytes:
    return frame(CLOSE, struct.pack("!H", code))


def close_code(payload: bytes) -> int:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005


class Refused(Exception):
    """The server answered the upgrade with another status than 101."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status
        self.body = body


class Closed(Exception):
    """The connection ended (close frame or EOF) while something else was expected."""

    def __init__(self, code: int) -> None:
        super().__init__(f"closed with {code}")
        self.code = code


class Connection:
    """One client connection: `connect`, then `upgrade`; frames with `recv`/`send`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
        self.reader, self.writer, self.port = reader, writer, port
        self.requested_at = 0.0  # perf_counter when the upgrade request was written
        self.upgraded_at = 0.0  # ... and when its 101 was read
        self.close_code: int | None = None

    @classmethod
    async def connect(cls, port: int, timeout: float) -> Connection:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port, limit=1 << 20), timeout)
        return cls(reader, writer, port)

    @classmethod
    async def open(cls, port: int, path: str, timeout: float) -> Connection:
        """Connect and upgrade (raises `Refused`, `TimeoutError` or `OSError`)."""
        conn = await cls.connect(port, timeout)
        try:
            await conn.upgrade(path, timeout)
        except BaseException:
            conn.abort()
            raise
        return conn

    def request_upgrade(self, path: str) -> None:
        """Write the upgrade request (without waiting for the answer: see `upgraded`)."""
        key = base64.b64encode(os.urandom(16)).decode()
        self.requested_at = time.perf_counter()
        self.writer.write((f"GET {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())

    async def upgraded(self, timeout: float) -> float:
        """The answer to `request_upgrade`: the time of the 101, or `Refused` with the status and body."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        at = time.perf_counter()
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        if status == 101:
            self.upgraded_at = at
            return at
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        body = b""
        if length:
            try:
                body = await asyncio.wait_for(self.reader.readexactly(min(length, 1 << 16)), timeout)
            except (TimeoutError, asyncio.IncompleteReadError, OSError):
                pass
        raise Refused(status, body)

    async def upgrade(self, path: str, timeout: float) -> float:
        self.request_upgrade(path)
        return await self.upgraded(timeout)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def recv(self, timeout: float | None = None) -> tuple[int, bytes]:
        """The next frame (opcode, payload); `Closed` at the end of the stream."""
        try:
            return await asyncio.wait_for(self._frame(), timeout)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.close_code = self.close_code or 1006
            raise Closed(self.close_code) from None

    async def _frame(self) -> tuple[int, bytes]:
        b0, b1 = await self.reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        mask = await self.reader.readexactly(4) if b1 & 0x80 else b""
        payload = await self.reader.readexactly(n)
        return b0 & 0x0F, masked(payload, mask) if mask else payload

    async def message(self, timeout: float | None, skip: tuple[str, ...] = ("keepalive",)) -> dict[str, Any]:
        """The next JSON text message not of a `skip` type (pings answered); `Closed` on a close frame.
        `timeout` None: no limit (the caller bounds the wait)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            opcode, payload = await self.recv(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if opcode == TEXT:
                message = json.loads(payload)
                if message.get("type") not in skip:
                    return message
            elif opcode == PING:
                self.send(frame(PONG, payload))
            elif opcode == CLOSE:
                self.close_code = close_code(payload)
                raise Closed(self.close_code)

    async def discard(self) -> int:
        """Read and drop every frame until the end of the stream, answering pings (the service closes a client
        that answers none) and noting a close frame's code; the bytes read. Frames are only skipped over,
        chunk by chunk, not parsed: cheap enough for the thousands of messages a storm sends each client."""
        total = 0
        pending = b""
        try:
            while True:
                data = await self.reader.read(1 << 16)
                if not data:
                    return total
                total += len(data)
                pending = self._skip(pending + data if pending else data)
        except (ConnectionError, OSError):
            return total

    def _skip(self, buffer: bytes) -> bytes:
        """Go over the whole frames of `buffer`; what is left of it (a frame's beginning)."""
        at, end = 0, len(buffer)
        while end - at >= 2:
            opcode, length, head = buffer[at] & 0x0F, buffer[at + 1] & 0x7F, 2
            if length == 126:
                if end - at < 4:
                    break
                length, head = int.from_bytes(buffer[at + 2:at + 4], "big"), 4
            elif length == 127:
                if end - at < 10:
                    break
                length, head = int.from_bytes(buffer[at + 2:at + 10], "big"), 10
            if buffer[at + 1] & 0x80:
                head += 4  # a masked frame (servers send none)
            if end - at < head + length:
                break
            if opcode == PING:
                self.send(frame(PONG, buffer[at + head:at + head + length]))
            elif opcode == CLOSE:
                self.close_code = close_code(buffer[at + head:at + head + length])
            at += head + length
        return buffer[at:]

    def abort(self) -> None:
        transport = self.writer.transport
        if not transport.is_closing():
            transport.abort()
