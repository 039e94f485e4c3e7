"""Benchmark: many idle clients on one worker (10,000 by default): memory, and CPU while they idle.

Run as ``.venv/bin/python bench/idle.py`` (``make bench-idle``; ``--help`` for the options). It raises the
open-files limit (the service inherits it), starts one instance of the service on the memory store (gunicorn's
gevent worker, ``WEB_CONCURRENCY=1``, ``WORKER_CONNECTIONS`` above the client count, default keepalive and ping
periods) and opens the clients from one asyncio loop: sessions of ``--per-session`` clients, an owner each,
``--concurrency`` handshakes in flight. Then, for ``--idle`` seconds, every client reads what it is sent, answers
the service's WebSocket pings (every ``IDLE_TIMEOUT_SECONDS``/2 = 30 s) and sends a ``ping`` message of its own
every ``--ping-interval`` seconds (the first at a random moment, so the load is even), while the service sends
its ``keepalive`` every 30 s. Printed: the worker's RSS before and with the clients (KiB per client), its CPU
(share of one core) and the messages exchanged during the idle window, the ``ping`` → ``pong`` round trips seen
by the clients (p50/p99/max), and the CPU of the handshakes.

With ``--tracemalloc`` the worker runs under tracemalloc (``bench/tracemalloc_conf.py``) and the Python memory
that each client adds is also printed by owner: gunicorn's request, wsproto's connection state, Flask's request
context, greenlet stacks saved while parked, the service's own objects... (RSS and CPU are then inflated by
tracemalloc itself: take those figures from a run without it).

Every wait is bounded; every process started is stopped at the end, also on Ctrl-C; only 127.0.0.1 is spoken to.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import linecache
import pickle
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import firestore_latency as fl
from fanout import BENCH, BenchError, cpu_seconds, raise_nofile, settled_rss
from firestore_latency import ROOT, Server
from wsclient import CLOSE, PING, PONG, TEXT, Closed, Connection, Refused, close_frame, frame, text

#: Open files the service and this process need besides the clients.
FD_MARGIN = 1000


#: With --tracemalloc, who holds what a client adds: the first owner whose marker is in the path of the innermost
#: traced frame; an allocation made on a line that switches greenlets is the stack slice saved while parked.
OWNERS = (("gunicorn/", "gunicorn: the request (parser, message, environ)"),
          ("wsproto/", "wsproto / h11: the handshake and connection state"),
          ("/h11/", "wsproto / h11: the handshake and connection state"),
          ("/flask/", "Flask / Werkzeug: the request context"),
          ("/werkzeug/", "Flask / Werkzeug: the request context"),
          ("flask_sock/", "flask-sock / simple-websocket"),
          ("simple_websocket/", "flask-sock / simple-websocket"),
          ("/gevent/", "gevent: greenlets, sockets, the pool"),
          ("/canary/", "the service's own objects (session logic, client, budget, store)"))
PARKED = "greenlet stacks saved while parked (the handler's and the writer's)"
SWITCHES = re.compile(r"\.(_wait|wait|get|switch|join)\(")


def owner(frame: Any) -> str:
    if SWITCHES.search(linecache.getline(frame.filename, frame.lineno)):
        return PARKED
    return next((name for marker, name in OWNERS if marker in frame.filename), "other")


async def snapshot(folder: Path, name: str, timeout: float) -> Any:
    """Ask the worker (bench/tracemalloc_conf.py) for a tracemalloc snapshot and load it."""
    (folder / f"{name}.want").touch()
    answer, deadline = folder / f"{name}.snapshot", time.monotonic() + timeout
    while not answer.exists():
        if time.monotonic() > deadline:
            raise BenchError(f"no tracemalloc snapshot from the worker within {timeout:g} s")
        await asyncio.sleep(0.2)
    return pickle.loads(answer.read_bytes())


def print_owners(before: Any, after: Any, clients: int) -> dict[str, float]:
    by_owner: dict[str, float] = {}
    for stat in after.compare_to(before, "traceback"):
        name = owner(stat.traceback[-1])
        by_owner[name] = by_owner.get(name, 0.0) + stat.size_diff / 1024 / clients
    print("    Python memory each client added (tracemalloc), by owner:")
    for name, kib in sorted(by_owner.items(), key=lambda item: -item[1]):
        if abs(kib) >= 0.05:
            print(f"      {kib:6.2f} KiB  {name}")
    print(f"      {sum(by_owner.values()):6.2f} KiB  in all (traced Python allocations; RSS adds the allocator's "
          "own overhead and what C code allocates)", flush=True)
    return by_owner


class Client:
    """One idle client: reads and counts what it is sent, answers pings, times its own pings."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.received: dict[str, int] = {}
        self.pings_sent = 0
        self.round_trips: list[float] = []
        self._sent_at: float | None = None
        self.reader: asyncio.Task[None] | None = None

    def ping(self) -> None:
        if self._sent_at is None:  # one outstanding at a time
            self._sent_at = time.perf_counter()
            self.pings_sent += 1
            self.conn.send(text({"type": "ping"}))

    async def read(self) -> None:
        """Until the connection ends."""
        with contextlib.suppress(Closed):
            while True:
                opcode, payload = await self.conn.recv()
                if opcode == TEXT:
                    kind = json.loads(payload).get("type", "?")
                    self.received[kind] = self.received.get(kind, 0) + 1
                    if kind == "pong" and self._sent_at is not None:
                        self.round_trips.append(time.perf_counter() - self._sent_at)
                        self._sent_at = None
                elif opcode == PING:
                    self.received["WebSocket ping"] = self.received.get("WebSocket ping", 0) + 1
                    self.conn.send(frame(PONG, payload))
                elif opcode == CLOSE:
                    return


def make_batches(server: Server, options: Any) -> list[tuple[str, str]]:
    """A batch (and its owner) for each session of `options.per_session` clients."""
    return [server.batch(f"idle-{n}") for n in range(-(-options.clients // options.per_session))]


async def open_clients(server: Server, options: Any, batches: list[tuple[str, str]]) -> list[Client]:
    """Sessions of `options.per_session` clients (an owner and members) on `batches`, `options.clients` in all."""
    sessions = len(batches)
    gate = asyncio.Semaphore(options.concurrency)
    clients: list[Client] = []

    async def join(path: str, welcome: str) -> dict[str, Any]:
        async with gate:
            conn = await Connection.open(server.port, path, options.timeout)
            message = await conn.message(options.timeout)
        if message.get("type") != welcome:
            raise BenchError(f"{path}: {message}")
        client = Client(conn)
        client.reader = asyncio.create_task(client.read())  # from now on: the service closes a non-reader (1013)
        clients.append(client)
        return message

    async def session(n: int, size: int) -> None:
        batch, owner = batches[n]
        created = await join(f"/sessions/{batch}?userID={owner}", "session_created")
        sid = created["sessionID"]
        await asyncio.gather(*(join(f"/sessions/{sid}/join?userID=idle-{n}-{m}", "session_joined")
                               for m in range(1, size)))

    sizes = [min(options.per_session, options.clients - n * options.per_session) for n in range(sessions)]
    await asyncio.gather(*(session(n, size) for n, size in enumerate(sizes)))
    return clients


async def measure(server: Server, options: Any) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    pid = server.worker
    batches = make_batches(server, options)  # their documents and HTTP requests are not the clients'
    figures["rss_before"] = settled_rss(pid)
    traced = await snapshot(options.tracemalloc_dir, "before", options.timeout) if options.tracemalloc else None
    cpu, began = cpu_seconds(pid), time.monotonic()
    clients = await open_clients(server, options, batches)
    figures["connect_s"] = time.monotonic() - began
    figures["connect_cpu_ms"] = (cpu_seconds(pid) - cpu) / len(clients) * 1000
    readers = [c.reader for c in clients if c.reader is not None]
    print(f"    {len(clients)} clients connected in {figures['connect_s']:.1f} s "
          f"(worker CPU {figures['connect_cpu_ms']:.2f} ms per client)", flush=True)
    figures["rss_with"] = await asyncio.to_thread(settled_rss, pid, 10.0)
    figures["kib_per_client"] = (figures["rss_with"] - figures["rss_before"]) / len(clients)
    print(f"    worker RSS {figures['rss_before'] / 1024:.1f} MiB before, {figures['rss_with'] / 1024:.1f} MiB "
          f"with the clients: {figures['kib_per_client']:.1f} KiB per client", flush=True)
    if traced is not None:
        figures["traced_kib_per_client"] = print_owners(
            traced, await snapshot(options.tracemalloc_dir, "with", options.timeout), len(clients))

    async def pinger(client: Client) -> None:
        await asyncio.sleep(random.uniform(0, options.ping_interval))
        while True:
            client.ping()
            await asyncio.sleep(options.ping_interval)

    for c in clients:  # what was received while connecting is not part of the idle window
        c.received.clear()
    pingers = [asyncio.create_task(pinger(c)) for c in clients] if options.ping_interval > 0 else []
    cpu, began = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(options.idle)
    idle_cpu, wall = cpu_seconds(pid) - cpu, time.monotonic() - began
    for task in pingers:
        task.cancel()
    figures["idle_core_percent"] = idle_cpu / wall * 100
    received: dict[str, int] = {}
    for c in clients:
        for kind, count in c.received.items():
            received[kind] = received.get(kind, 0) + count
    trips = [t for c in clients for t in c.round_trips]
    figures["received"] = received
    figures["pings_sent"] = sum(c.pings_sent for c in clients)
    figures["round_trips"] = len(trips)
    if trips:  # the percentiles every driver uses (firestore_latency.pct)
        figures["rtt_ms"] = {"p50": fl.pct(trips, 50) * 1000, "p99": fl.pct(trips, 99) * 1000,
                             "max": max(trips) * 1000}
    figures["rss_after_idle"] = server_rss = await asyncio.to_thread(settled_rss, pid)
    print(f"    idle {wall:.0f} s: worker CPU {idle_cpu:.2f} s = {figures['idle_core_percent']:.1f}% of one core; "
          f"the clients received {', '.join(f'{n} {k}' for k, n in sorted(received.items()))}; "
          f"they sent {figures['pings_sent']} pings, {len(trips)} pongs back"
          + (f" (round trip p50 {figures['rtt_ms']['p50']:.1f} ms, p99 {figures['rtt_ms']['p99']:.1f} ms, "
             f"max {figures['rtt_ms']['max']:.1f} ms)" if trips else "")
          + f"; RSS {server_rss / 1024:.1f} MiB", flush=True)

    for c in clients:
        c.conn.send(close_frame())
    _, pending = await asyncio.wait(readers, timeout=options.timeout)
    for task in pending:
        task.cancel()
    for c in clients:
        c.conn.abort()
    if pending:
        raise BenchError(f"{len(pending)} clients not closed within {options.timeout:g} s")
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10_000, help="idle clients (default 10000)")
    parser.add_argument("--per-session", type=int, default=50, help="clients per session (default 50)")
    parser.add_argument("--idle", type=float, default=90.0, help="seconds of idling measured (default 90)")
    parser.add_argument("--ping-interval", type=float, default=30.0,
                        help="seconds between a client's ping messages, 0 for none (default 30)")
    parser.add_argument("--concurrency", type=int, default=200, help="handshakes in flight (default 200)")
    parser.add_argument("--timeout", type=float, default=60.0, help="longest wait for one step (default 60 s)")
    parser.add_argument("--project", type=Path, default=ROOT,
                        help="the tree whose gunicorn.conf.py/wsgi.py is started (default: this repository)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the service's log")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="also print the Python memory per client by owner (RSS and CPU are then inflated)")
    options = parser.parse_args()
    if options.clients < 1 or options.per_session < 1:
        parser.error("--clients and --per-session must be positive")
    options.project = options.project.resolve()

    limit = raise_nofile()
    if limit < options.clients + FD_MARGIN:
        print(f"the open-files limit is {limit}; {options.clients} clients need {options.clients + FD_MARGIN}",
              file=sys.stderr)
        return 2
    hard = 4 * options.timeout + options.idle + options.clients / 50 + 120
    log_dir = fl.begin(f"Canary Collab: {options.clients} idle clients on one worker", hard, "canary-idle-")
    ok, server = False, None
    try:
        config, traced = "gunicorn.conf.py", {}
        if options.tracemalloc:
            options.tracemalloc_dir = log_dir / "tracemalloc"
            options.tracemalloc_dir.mkdir()
            config, traced = str(BENCH / "tracemalloc_conf.py"), {"TRACEMALLOC_DIR": str(options.tracemalloc_dir)}
        server = Server("idle", log_dir, None, project=options.project, config=config,
                        WORKER_CONNECTIONS=str(options.clients * 21 // 20 + 100), **traced)
        print(f"  service 127.0.0.1:{server.port} (worker {server.worker})", flush=True)
        figures = asyncio.run(measure(server, options))
        print(json.dumps({"figures": figures}))
        ok = True
    except (BenchError, OSError, Closed, Refused, TimeoutError) as e:
        print(f"    failed: {e}", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
        fl.finish(log_dir, ok, options.keep_logs)
    print(f"{fl.load_average()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
