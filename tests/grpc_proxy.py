"""A gRPC pass-through proxy for tests: Google's front-end stream limit, RPC counts, crashes and latency.

Real Firestore sits behind a front end that allows at most 100 concurrent HTTP/2 streams per connection;
gRPC clients queue further streams (and unary calls behind them) silently. Neither emulator has such a
limit, so tests put this proxy in front of it::

    proxy = Proxy("127.0.0.1:8080").start()  # FIRESTORE_EMULATOR_HOST=proxy.host
    ...
    proxy.calls("Commit"), proxy.open_streams("Listen")
    proxy.stop()   # every call is cut at once, as in a crash
    proxy.start()  # the same port again

Every method is forwarded generically as raw bytes (gRPC frames unary and streaming calls alike), by one
asyncio loop in a background thread shared by all proxies, not a thread per stream.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio

T = TypeVar("T")
Metadata = tuple[tuple[str, str | bytes], ...]

#: Google's front end: concurrent streams per HTTP/2 connection.
GFE_MAX_CONCURRENT_STREAMS = 100
#: HTTP/2 and gRPC transport headers, which the transports set themselves (never forwarded).
_RESERVED_HEADERS = frozenset({"content-type", "te", "host", "user-agent", "connection", "accept-encoding",
                               "content-encoding", "content-length", "transfer-encoding"})
#: Both directions carry messages of any size (Firestore allows larger ones than gRPC's 4 MB default).
_UNLIMITED_MESSAGES = (("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1))

_loop_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def _event_loop() -> asyncio.AbstractEventLoop:
    """The loop every proxy runs on (grpc.aio objects stay on the loop they were made on)."""
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="grpc-proxy", daemon=True).start()
        return _loop


def _forwardable(metadata: Sequence[tuple[str, str | bytes]] | None) -> Metadata:
    """`metadata` without pseudo headers and headers reserved to the transport (keeping rich error details)."""
    return tuple((key, value) for key, value in metadata or ()
                 if not key.startswith(":") and key not in _RESERVED_HEADERS
                 and (not key.startswith("grpc-") or key == "grpc-status-details-bin"))


def _matches(method: str, name: str | None) -> bool:
    """`name` is None (any method), the full method ("/pkg.Service/Method") or its last part ("Method")."""
    return name is None or method == name or method.rsplit("/", 1)[-1] == name


class Proxy:
    """A started-on-demand gRPC proxy on 127.0.0.1 in front of `upstream` ("host:port", insecure).

    `max_concurrent_streams` is advertised to each client connection (None: gRPC's default, unlimited);
    `latency` (seconds, may be changed while running) delays every request message before it is forwarded.
    """

    def __init__(self, upstream: str, *, max_concurrent_streams: int | None = GFE_MAX_CONCURRENT_STREAMS,
                 latency: float = 0.0, port: int = 0) -> None:
        self.upstream = upstream
        self.max_concurrent_streams = max_concurrent_streams
        self.latency = latency
        self._port = port  # 0 until the first start() picks one, then kept for restarts
        self._lock = threading.Lock()
        self._calls: Counter[str] = Counter()
        self._open: Counter[str] = Counter()
        self._peak: Counter[str] = Counter()
        self._peak_total = 0
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # the calls being forwarded (touched on the loop only)

    # -- control (from any thread) ---------------------------------------------------
    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the proxy has not been started yet")
        return self._port

    @property
    def host(self) -> str:
        """What FIRESTORE_EMULATOR_HOST should say to go through the proxy."""
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> Proxy:
        """Listen (on the same port as before, after a stop()); a no-op while running."""
        self._run(self._start())
        return self

    def stop(self) -> None:
        """Stop at once, as a crash would: every open call is cut (clients see UNAVAILABLE)."""
        self._run(self._stop())

    def calls(self, method: str | None = None) -> int:
        """How many calls of `method` ("Commit" or "/google.firestore.v1.Firestore/Commit"; None: all) began."""
        with self._lock:
            return sum(n for m, n in self._calls.items() if _matches(m, method))

    def calls_by_method(self) -> dict[str, int]:
        """Every method called since the start or the last reset ("Commit", ...), with its count."""
        with self._lock:
            return {m.rsplit("/", 1)[-1]: n for m, n in sorted(self._calls.items()) if n}

    def open_streams(self, method: str | None = None) -> int:
        """How many calls of `method` (None: all) are being forwarded right now."""
        with self._lock:
            return sum(n for m, n in self._open.items() if _matches(m, method))

    def peak_streams(self, method: str | None = None) -> int:
        """The most calls of `method` (None: of all methods together) ever forwarded at once."""
        with self._lock:
            if method is None:
                return self._peak_total
            return max((n for m, n in self._peak.items() if _matches(m, method)), default=0)

    def reset_counts(self) -> None:
        """Forget the calls and peaks counted so far (open streams stay counted)."""
        with self._lock:
            self._calls.clear()
            self._peak = Counter(+self._open)
            self._peak_total = self._open.total()

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"on {self.host}" if self.running else "stopped"
        return f"<Proxy {state} -> {self.upstream} calls={self.calls_by_method()}>"

    @staticmethod
    def _run(coroutine: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, _event_loop()).result(timeout)

    # -- on the loop -------------------------------------------------------------------
    async def _start(self) -> None:
        if self._server is not None:
            return
        options: list[tuple[str, Any]] = [*_UNLIMITED_MESSAGES, ("grpc.so_reuseport", 0)]
        if self.max_concurrent_streams is not None:
            options.append(("grpc.max_concurrent_streams", self.max_concurrent_streams))
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers((_Forwarder(self),))
        try:
            port = server.add_insecure_port(f"127.0.0.1:{self._port}")
        except RuntimeError as e:  # grpc raises RuntimeError("Failed to bind ...")
            raise OSError(f"the proxy cannot listen on 127.0.0.1:{self._port}: {e}") from e
        if not port:
            raise OSError(f"the proxy cannot listen on 127.0.0.1:{self._port}")
        self._port = port
        # A channel of its own (not shared with other channels to the upstream in this process).
        self._channel = grpc.aio.insecure_channel(
            self.upstream, options=[*_UNLIMITED_MESSAGES, ("grpc.use_local_subchannel_pool", 1)])
        await server.start()
        self._server = server

    async def _stop(self) -> None:
        server, channel = self._server, self._channel
        self._server = self._channel = None
        if server is not None:
            await server.stop(grace=None)  # cancels every call and closes every connection
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if channel is not None:
            await channel.close()

    async def _forward(self, method: str, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        """Forward one call of any kind: requests up and responses down concurrently, then the status."""
        channel = self._channel
        if channel is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the proxy is stopping")
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._lock:
            self._calls[method] += 1
            self._open[method] += 1
            self._peak[method] = max(self._peak[method], self._open[method])
            self._peak_total = max(self._peak_total, self._open.total())
        call: grpc.aio.StreamStreamCall | None = None
        pump: asyncio.Task[None] | None = None
        try:
            timeout = context.time_remaining()  # None without a deadline
            call = channel.stream_stream(method, request_serializer=None, response_deserializer=None)(
                metadata=_forwardable(context.invocation_metadata()), timeout=timeout)
            pump = asyncio.create_task(self._pump(requests, call))
            initial = _forwardable(await call.initial_metadata())
            if initial:
                await context.send_initial_metadata(initial)
            async for response in call:
                await context.write(response)
            context.set_trailing_metadata(_forwardable(await call.trailing_metadata()))
        except grpc.aio.AioRpcError as e:  # the upstream's status, for the client
            await context.abort(e.code(), e.details() or "", _forwardable(e.trailing_metadata()))
        finally:  # done, failed, or cancelled (by the client or stop()): end both sides
            if pump is not None:
                pump.cancel()
            if call is not None:
                call.cancel()
            with self._lock:
                self._open[method] -= 1
            self._tasks.discard(task)

    async def _pump(self, requests: AsyncIterator[bytes], call: grpc.aio.StreamStreamCall) -> None:
        """Client to upstream, then half-close."""
        try:
            async for request in requests:
                if self.latency > 0:
                    await asyncio.sleep(self.latency)
                await call.write(request)
            await call.done_writing()
        except (asyncio.InvalidStateError, grpc.RpcError):
            pass  # the call has ended: its status reaches the client through the response side


class _Forwarder(grpc.GenericRpcHandler):
    """Every method, as a raw-bytes stream-stream call (no (de)serializers)."""

    def __init__(self, proxy: Proxy) -> None:
        self._proxy = proxy

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        method = method.decode() if isinstance(method, bytes) else method

        async def forward(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
            await self._proxy._forward(method, requests, context)

        return grpc.stream_stream_rpc_method_handler(forward)
