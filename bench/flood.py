"""Benchmark: what one client flooding the service with frames costs every other client.

Run as ``.venv/bin/python bench/flood.py`` (``make bench`` runs it after bench/fanout.py; ``--help`` for the
options). It starts the service as bench/fanout.py does (in-memory store, one gevent worker, pinned to core 0)
and, on core 1, this process: an owner and ``--clients`` members of one session, each sending a ``ping``
``--rate`` times a second (one outstanding at a time, well within its own inbound budget) and timing the
``pong``, and a probe timing ``GET /health`` every ``--health-interval`` s. Two phases of ``--duration``
seconds each:

* baseline: nothing else;
* flood: a member of another session (a child process, at a lower priority than the clients measured, so
  that it takes core 1 only when they do not need it) writes masked text frames
  (``{"type":"setImageID","payload":{"imageID":"x"}}``) in batches of ``--batch-frames`` as fast as the
  socket takes them, and notes when it gets its ``error`` (``rate_limited``) and its close (1008 expected);
  once closed it joins again as another member and floods again until the phase ends (``--no-reconnect``:
  one connection only).

It prints the round trips and /health latencies (p50/p99/max) of each phase, the worker's CPU in each, and
what the flooder saw. Every wait is bounded; the server and the flooder are stopped at the end (also on
Ctrl-C); only 127.0.0.1 is spoken to.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from fanout import ROOT, BenchError, Server, cpu_seconds, pin, raise_nofile
from fanout import machine as machine_facts
from firestore_latency import ms, pct, print_table
from wsclient import Closed, Connection, Refused, close_frame, text

#: Longest wait for a handshake, a welcome, a pong or a /health answer.
WAIT = 5.0


# -- the flooder (a child process: `flood.py --flooder PORT SESSION SECONDS BATCH RECONNECT`) ----------------
async def flood_once(port: int, path: str, deadline: float, batch: bytes, per_batch: int) -> dict[str, Any]:
    """One connection: join, then write `batch` until the server ends the connection or `deadline`."""
    conn = await Connection.open(port, path, WAIT)
    welcome = await conn.message(WAIT)
    if welcome.get("type") != "session_joined":
        conn.abort()
        raise BenchError(f"the flooder got {welcome}")
    seen: dict[str, Any] = {"error_at": None, "closed_at": None, "code": None, "errors": Counter()}

    async def read() -> None:
        try:
            while True:
                message = await conn.message(None)
                if message.get("type") == "error":
                    seen["errors"][message.get("code")] += 1
                    if seen["error_at"] is None and message.get("code") == "rate_limited":
                        seen["error_at"] = time.perf_counter()
        except Closed as e:
            seen["closed_at"], seen["code"] = time.perf_counter(), e.code

    reader = asyncio.create_task(read())
    started = time.perf_counter()
    written = 0
    with contextlib.suppress(ConnectionError, OSError, TimeoutError):
        while not reader.done() and time.monotonic() < deadline:
            conn.writer.write(batch)
            await asyncio.wait_for(conn.writer.drain(), max(0.01, deadline - time.monotonic()))
            written += per_batch
    stopped = time.perf_counter()
    with contextlib.suppress(TimeoutError):  # the close may still be on its way
        await asyncio.wait_for(asyncio.shield(reader), 1.0)
    reader.cancel()
    conn.abort()

    def after(at: float | None) -> float | None:
        return None if at is None else (at - started) * 1000

    return {"frames_written": written, "error_ms": after(seen["error_at"]), "close_ms": after(seen["closed_at"]),
            "code": seen["code"], "errors": dict(seen["errors"]), "flooded_ms": (stopped - started) * 1000}


async def flooder(port: int, session: str, seconds: float, per_batch: int, reconnect: bool) -> None:
    frame = text({"type": "setImageID", "payload": {"imageID": "x"}}, mask=b"\x17\x2a\x5c\x01")
    batch = frame * per_batch
    deadline = time.monotonic() + seconds
    number = 0
    while time.monotonic() < deadline:
        number += 1
        try:
            result = await flood_once(port, f"/sessions/{session}/join?userID=flooder-{os.getpid()}-{number}",
                                      deadline, batch, per_batch)
        except (BenchError, Closed, Refused, OSError, TimeoutError) as e:
            result = {"failed": f"{type(e).__name__}: {e}" if str(e) else type(e).__name__}
            await asyncio.sleep(0.05)
        print(json.dumps(result), flush=True)
        if not reconnect:
            break


# -- the clients measured ------------------------------------------------------------------------------------
class Phase:
    """Which phase the driver is in: pings and probes count for the phase they were sent in (None: none)."""

    def __init__(self) -> None:
        self.index: int | None = None
        self.running = True


async def pinger(port: int, session: str, user: str, rate: float, phase: Phase,
                 samples: list[list[float]], lost: list[int]) -> None:
    """A member pinging `rate` times a second, one ping outstanding; round trips go to `samples[phase]`."""
    conn = await Connection.open(port, f"/sessions/{session}/join?userID={user}", WAIT)
    try:
        if (await conn.message(WAIT)).get("type") != "session_joined":
            raise BenchError(f"{user} was not welcomed")
        ping = text({"type": "ping"})
        interval = 1.0 / rate
        await asyncio.sleep(interval * (hash(user) % 1000) / 1000)  # spread the clients over the interval
        next_at = time.monotonic()
        while phase.running:
            index = phase.index
            sent = time.perf_counter()
            conn.send(ping)
            try:
                while (await conn.message(WAIT)).get("type") != "pong":
                    pass
                if index is not None:
                    samples[index].append(time.perf_counter() - sent)
            except TimeoutError:
                if index is not None:
                    lost[index] += 1
            except Closed as e:  # the service closed this client: it pings no more (counted as a lost ping)
                if index is not None:
                    lost[index] += 1
                print(f"    {user} was closed ({e.code})", flush=True)
                return
            next_at = max(next_at + interval, time.monotonic())
            await asyncio.sleep(next_at - time.monotonic())
    finally:
        with contextlib.suppress(Exception):
            conn.send(close_frame(1000))
        conn.abort()


async def health_probe(port: int, interval: float, phase: Phase, samples: list[list[float]],
                       failed: list[int]) -> None:
    request = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
    while phase.running:
        index = phase.index
        began = time.perf_counter()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)
            try:
                writer.write(request)
                answer = await asyncio.wait_for(reader.read(), WAIT)
            finally:
                writer.close()
            if not answer.startswith(b"HTTP/1.1 200"):
                raise BenchError(answer[:40].decode("latin-1"))
            if index is not None:
                samples[index].append(time.perf_counter() - began)
        except (BenchError, OSError, TimeoutError):
            if index is not None:
                failed[index] += 1
        await asyncio.sleep(max(0.0, interval - (time.perf_counter() - began)))


def frames_handled(port: int) -> dict[str, float] | None:
    """/metrics' canary_frames_received_total by type (None: no such metric, e.g. an older tree)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as r:
            body = r.read().decode()
    except OSError:
        return None
    counts: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith("canary_frames_received_total{"):
            labels, _, value = line.rpartition(" ")
            kind = labels.split('type="', 1)[1].split('"', 1)[0]
            counts[kind] = counts.get(kind, 0.0) + float(value)
    return counts if counts or "canary_" in body else None


async def owner(port: int, batch: str, user: str) -> tuple[Connection, str, asyncio.Task[int]]:
    conn = await Connection.open(port, f"/sessions/{batch}?userID={user}", WAIT)
    created = await conn.message(WAIT)
    if created.get("type") != "session_created":
        raise BenchError(f"the owner got {created}")
    return conn, created["sessionID"], asyncio.create_task(conn.discard())


def start_flooder(port: int, session: str, options: Any, reconnect: bool, out: Path) -> subprocess.Popen[bytes]:
    """The flooder, at a lower priority (nice 10) than this process on core 1; one JSON line per connection
    into `out`."""
    args = ["nice", "-n", "10", *pin(1), sys.executable, str(Path(__file__).resolve()), "--flooder", str(port),
            session, str(options.duration), str(options.batch_frames), "1" if reconnect else "0"]
    with out.open("wb") as stdout, out.with_suffix(".log").open("ab") as stderr:
        return subprocess.Popen(args, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def end(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for the flooder to exit; stop it if it overstays `timeout`."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


#: The phases: (name, None for no flooder or whether the flooder joins again once closed).
PHASES = (("baseline", None), ("flood, one connection", False), ("flood, flooder rejoining", True))


async def measure(server: Server, options: Any, log_dir: Path) -> dict[str, Any]:
    port = server.port
    for name in ("flood", "calm"):
        server.put("users", f"owner-{name}", {"email": f"owner-{name}@example.com"})
        server.put("projects", f"project-{name}", {"userID": f"owner-{name}", "projectName": "p"})
        server.put("batches", f"batch-{name}", {"projectID": f"project-{name}", "batchName": "b"})
    calm_owner, calm_sid, calm_reader = await owner(port, "batch-calm", "owner-calm")
    flood_owner, flood_sid, flood_reader = await owner(port, "batch-flood", "owner-flood")
    phases = [(name, flood) for name, flood in PHASES if not (flood and options.no_reconnect)]
    rtt: list[list[float]] = [[] for _ in phases]
    lost = [0 for _ in phases]
    health: list[list[float]] = [[] for _ in phases]
    health_failed = [0 for _ in phases]
    flooders: list[list[dict[str, Any]]] = [[] for _ in phases]
    frames: list[dict[str, int] | None] = [None for _ in phases]
    phase = Phase()
    cpu: list[float] = []
    process = None
    tasks: list[asyncio.Task[None]] = []
    try:
        # The pingers join one by one, ping for a second not counted, then through every phase.
        for n in range(options.clients):
            tasks.append(asyncio.create_task(pinger(port, calm_sid, f"pinger-{n:03}", options.rate, phase, rtt,
                                                    lost)))
            await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(health_probe(port, options.health_interval, phase, health,
                                                      health_failed)))
        await asyncio.sleep(1.0)
        failed = [t for t in tasks if t.done() and t.exception()]
        if failed:
            raise BenchError(f"{len(failed)} client(s) failed: {failed[0].exception()}")
        print(f"  {options.clients} clients pinging {options.rate:g}/s, /health every {options.health_interval:g} s; "
              f"{options.duration:g} s per phase", flush=True)
        for index, (name, reconnect) in enumerate(phases):
            print(f"  {name}", flush=True)
            out = log_dir / f"flooder-{index}.out"
            handled = await asyncio.to_thread(frames_handled, port)
            before = cpu_seconds(server.worker)
            phase.index = index
            if reconnect is not None:
                process = start_flooder(port, flood_sid, options, reconnect, out)
            await asyncio.sleep(options.duration)
            cpu.append(cpu_seconds(server.worker) - before)
            phase.index = None
            now = await asyncio.to_thread(frames_handled, port)
            if handled is not None and now is not None:
                frames[index] = {k: int(v - handled.get(k, 0)) for k, v in now.items() if v - handled.get(k, 0)}
            if process is not None:
                await asyncio.to_thread(end, process, 15)
                process = None
                flooders[index] = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
                if not flooders[index]:
                    raise BenchError("the flooder reported nothing: " + out.with_suffix(".log").read_text()[-1500:])
            await asyncio.sleep(0.5)  # what the flood left behind is not the next phase's
    finally:
        phase.running = False  # every loop ends at its next turn
        if process is not None:
            await asyncio.to_thread(end, process, 0.1)
        if tasks:
            await asyncio.wait(tasks, timeout=WAIT * 2)
        for task in tasks:
            task.cancel()
        for conn, reader in ((calm_owner, calm_reader), (flood_owner, flood_reader)):
            reader.cancel()
            conn.abort()
    return {"phases": [name for name, _ in phases], "rtt": rtt, "lost": lost, "health": health,
            "health_failed": health_failed, "cpu": cpu, "flooders": flooders, "frames": frames}


def report(figures: dict[str, Any], options: Any) -> None:
    rows = []
    base = figures["rtt"][0]
    for i, phase in enumerate(figures["phases"]):
        rtt, health = figures["rtt"][i], figures["health"][i]
        cpu = figures["cpu"][i]
        rows.append([phase, len(rtt) + figures["lost"][i], figures["lost"][i],
                     ms(rtt, 50), ms(rtt, 99), ms(rtt, "max"),
                     f"{pct(rtt, 50) / pct(base, 50):.2f}x / {pct(rtt, 99) / pct(base, 99):.2f}x" if rtt and base
                     else "-",
                     len(health), figures["health_failed"][i], ms(health, 50), ms(health, 99), ms(health, "max"),
                     f"{cpu / options.duration * 100:.0f}%"])
    print_table(
        f"Other clients during a flood (service tree {options.project}): ping→pong round trips of {options.clients} "
        f"members pinging {options.rate:g}/s each, GET /health every {options.health_interval:g} s, "
        f"{options.duration:g} s per phase; ms",
        ["phase", "pings", f"lost (no pong in {WAIT:g} s)", "RTT p50", "RTT p99", "RTT max",
         "p50 / p99 vs baseline", "/health", "failed", "/health p50", "p99", "max", "worker CPU"],
        rows, ["  pings and /health: sent in the phase, one outstanding per client (a stalled service shows as "
               "few of them); worker CPU: the gunicorn worker's utime+stime over the phase / its duration"])

    def cell(values: list[float], p: float | str) -> str:
        return ms([v / 1000 for v in values], p)

    rows = []
    notes = []
    for i, phase in enumerate(figures["phases"]):
        connections = figures["flooders"][i]
        if not connections:
            continue
        done = [c for c in connections if "failed" not in c]
        failed = [c for c in connections if "failed" in c]
        first = done[:1]
        errors = [c["error_ms"] for c in done if c["error_ms"] is not None]
        closes = [c["close_ms"] for c in done if c["close_ms"] is not None]
        codes = Counter(str(c["code"]) for c in done)
        handled = figures["frames"][i]
        rows.append([phase, len(done), sum(c["frames_written"] for c in done),
                     "n/a" if handled is None else handled.get("setImageID", 0),
                     "n/a" if handled is None else handled.get("rate_limited", 0),
                     cell([c["error_ms"] for c in first if c["error_ms"] is not None], 50),
                     cell([c["close_ms"] for c in first if c["close_ms"] is not None], 50),
                     f"{len(errors)}/{len(done)}", cell(errors, 50), cell(errors, "max"),
                     f"{len(closes)}/{len(done)}", cell(closes, 50), cell(closes, "max"),
                     ", ".join(f"{k}×{n}" for k, n in sorted(codes.items())) or "-"])
        if failed:
            notes.append(f"  {phase}: {len(failed)} connection(s) failed to join or flood ({failed[0]['failed']})")
        if first and first[0]["close_ms"] is None:
            notes.append(f"  {phase}: the first connection was never closed by the service: it flooded for "
                         f"{first[0]['flooded_ms'] / 1000:.1f} s, until the phase ended")
    print_table(
        f"The flooder: masked setImageID text frames written in batches of {options.batch_frames}; ms from a "
        "connection's first batch to its `error` (rate_limited) and to its close; 'frames written' were taken "
        "by the socket, not necessarily read by the service; 'handled' and 'refused': the service's own count "
        "(/metrics canary_frames_received_total, every client, over the phase; n/a: no such metric)",
        ["phase", "connections", "frames written", "setImageID handled", "refused (rate_limited)", "1st: error",
         "1st: close", "got error", "error p50", "error max", "closed", "close p50", "close max", "close codes"],
        rows, notes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=40, help="members pinging (default 40)")
    parser.add_argument("--rate", type=float, default=10.0, help="pings a second per member (default 10)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per phase (default 15)")
    parser.add_argument("--health-interval", type=float, default=0.1,
                        help="seconds between /health requests (default 0.1)")
    parser.add_argument("--batch-frames", type=int, default=2000,
                        help="frames per write of the flooder (default 2000, about 110 KB)")
    parser.add_argument("--no-reconnect", action="store_true",
                        help="the flooder stops once closed instead of joining again")
    parser.add_argument("--project", type=Path, default=ROOT,
                        help="the tree whose gunicorn.conf.py/wsgi.py is started (default: this repository)")
    options = parser.parse_args()
    options.project = options.project.resolve()
    if options.rate >= 50:
        print("warning: --rate at or over the service's INBOUND_FRAMES_PER_SECOND (50): the pingers would be "
              "refused too", file=sys.stderr)
    began = time.monotonic()
    print("Canary Collab flood benchmark")
    for key, value in machine_facts().items():
        print(f"  {key:7} {value}")
    print(f"  open files limit {raise_nofile()}; server on core 0{'' if pin(0) else ' (not pinned: no taskset)'}, "
          f"clients and flooder on core 1{'' if pin(1) else ' (not pinned)'}")
    figures = None
    with tempfile.TemporaryDirectory(prefix="canary-flood-") as tmp:
        server = None
        try:
            server = Server(Path(tmp), project=options.project)
            if pin(1):
                os.sched_setaffinity(0, {1})
            figures = asyncio.run(asyncio.wait_for(measure(server, options, Path(tmp)),
                                                   len(PHASES) * (options.duration + 20) + 30))
        except (BenchError, OSError, TimeoutError, Refused, Closed) as e:
            print(f"flood benchmark failed: {type(e).__name__}: {e}", flush=True)
            if server is not None:
                print("server log tail:\n" + server.log_path.read_text()[-1500:], flush=True)
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
        finally:
            if server is not None:
                server.stop()
    if figures is None:
        return 1
    report(figures, options)
    print(f"\ntotal {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if sys.argv[1:2] == ["--flooder"]:
        port, session, seconds, per_batch, reconnect = sys.argv[2:7]
        sys.exit(asyncio.run(flooder(int(port), session, float(seconds), int(per_batch), reconnect == "1")))
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
