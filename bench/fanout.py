"""Benchmark: memory per connection, member_joined fan-out, CPU per ping.

Run as ``.venv/bin/python bench/fanout.py`` (``make bench``). It starts the
service the way the tests do (gunicorn's gevent worker, in-memory store, dev
API on), pinned to core 0, and drives it with bench/load.mjs (npm ``ws``
clients offering permessage-deflate like a browser) pinned to core 1; reads
the gunicorn worker's RSS and CPU time from /proc; runs everything 3 times
and prints the medians and their ratios to docs/performance-baseline's rows.

The baseline table was measured on another machine, so each run is paired
with a run of bench/floor_app.py (the table's "minimal Flask + flask-sock +
gevent, deflate refused" server, rebuilt) on this machine, and the ratios to
that same-machine floor are printed too; ``--no-floor`` skips it.

Every wait is bounded; the whole run stops by itself (about 5 minutes on a
2-core machine) and kills the server and the load generator it started.
Only 127.0.0.1 is spoken to.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import queue
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

RUNS = 3
#: The whole script stops starting new work after this many seconds.
BUDGET_SECONDS = 330.0
#: Members in the session when its RSS is read.
IDLE_MEMBERS = 1000
#: Fan-out sizes and join/leave rounds measured at each (plus WARMUP_ROUNDS not counted).
FANOUT = ((100, 60), (500, 30), (1000, 30))
WARMUP_ROUNDS = 2
#: Pings each connected member sends (one outstanding at a time).
PINGS_PER_MEMBER = 30
#: Handshakes the load generator keeps in flight while members connect.
CONNECT_CONCURRENCY = 50

#: docs/performance-baseline.md (2 cores, server pinned to one, Node `ws` load on the other, N = 1000).
BASELINE = {
    "Go, gorilla/websocket": {"kib": 35, "round_ms": 8.4, "p99_ms": 21, "ping_us": 8.9},
    "Node.js, ws": {"kib": 19, "round_ms": 9.8, "p99_ms": 21, "ping_us": 10.4},
    "Flask + flask-sock + gevent, deflate accepted": {"kib": 255, "round_ms": 95.8, "p99_ms": 71, "ping_us": 90.5},
    "Flask + flask-sock + gevent, deflate refused": {"kib": 53, "round_ms": 29.8, "p99_ms": 22, "ping_us": 52.2},
}
COMPARED = ("Go, gorilla/websocket", "Flask + flask-sock + gevent, deflate refused")

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    pass


# -- the machine --------------------------------------------------------------------
def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    node = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": model,
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "node": node,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE to the hard limit; children (server, Node) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pin(core: int) -> list[str]:
    """The `taskset` prefix that pins a child to `core`, when both exist."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > core:
        return ["taskset", "-c", str(core)]
    return []


def ensure_node_modules() -> None:
    if (BENCH / "node_modules" / "ws" / "package.json").exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise BenchError("npm is not installed (Node.js 18+ and npm are needed for bench/load.mjs)")
    args = [npm, "ci"] if (BENCH / "package-lock.json").exists() else [npm, "install"]
    print(f"installing the load generator's packages: {' '.join(args[1:])} in bench/", flush=True)
    subprocess.run([*args, "--no-audit", "--no-fund"], cwd=BENCH, check=True, timeout=300)


# -- /proc ------------------------------------------------------------------------------
def proc_status(pid: int, key: str) -> int:
    """A number of /proc/<pid>/status (``VmRSS`` in KiB, ``Threads``...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise BenchError(f"no {key} for pid {pid}")


def rss_kib(pid: int) -> int:
    return proc_status(pid, "VmRSS")


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def settled_rss(pid: int, seconds: float = 3.0) -> int:
    """VmRSS once it stops moving (or after `seconds`)."""
    deadline = time.monotonic() + seconds
    last = rss_kib(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = rss_kib(pid)
        if now == last:
            return now
        last = now
    return last


# -- the server ----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def put_document(port: int, collection: str, doc_id: str, data: dict[str, Any]) -> None:
    """Write a store document through the service's dev API."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/dev/documents/{collection}/{doc_id}",
                                 data=json.dumps(data).encode(), method="PUT",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        if r.status != 204:
            raise BenchError(f"PUT {collection}/{doc_id}: {r.status}")


class Server:
    """The service (`canary`) or the floor of its stack (`floor`, bench/floor_app.py), one gevent worker."""

    def __init__(self, log_dir: Path, kind: str = "canary", project: Path = ROOT) -> None:
        """`project`: the tree whose gunicorn.conf.py and wsgi.py are started (the service only)."""
        self.port = free_port()
        self.log_path = log_dir / f"server-{self.port}.log"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("CANARY_", "JWT_", "CORS_"))},
            "PORT": str(self.port),
            "CANARY_STORE": "memory",
            "CANARY_DEV_API": "1",
            "WEB_CONCURRENCY": "1",
            "WORKER_CONNECTIONS": "5000",
            "LOG_LEVEL": "WARNING",
            "KEEPALIVE_SECONDS": "30",
        }
        if kind == "canary":
            cwd, args = project, ["-c", "gunicorn.conf.py", "-b", f"127.0.0.1:{self.port}", "wsgi:app"]
        else:  # from bench/, so that gunicorn does not read the service's ./gunicorn.conf.py
            cwd, args = BENCH, ["-k", "gevent", "--worker-connections", "5000", "-b", f"127.0.0.1:{self.port}",
                                "--graceful-timeout", "25", "--no-control-socket", "floor_app:app"]
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [*pin(0), sys.executable, "-m", "gunicorn", *args],
            cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        try:
            wait_until(self._healthy, 30, "the server to answer /health")
            workers = wait_until(lambda: children(self.process.pid), 10, "the gunicorn worker")
            if len(workers) != 1:
                raise BenchError(f"expected one gunicorn worker, found {workers}")
            self.worker = workers[0]
        except BaseException:
            self.stop()
            raise

    def _healthy(self) -> bool:
        if self.process.poll() is not None:
            raise BenchError(f"server exited with {self.process.returncode}:\n{self.log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def put(self, collection: str, doc_id: str, data: dict[str, Any]) -> None:
        put_document(self.port, collection, doc_id, data)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()


# -- the load generator --------------------------------------------------------------------
class Load:
    """bench/load.mjs: one JSON command per line in, one JSON reply per line out."""

    def __init__(self, log_dir: Path, max_seconds: float) -> None:
        self._stderr = (log_dir / "load.log").open("a")
        self.process = subprocess.Popen(
            [*pin(1), "node", str(BENCH / "load.mjs"), "--max-seconds", str(int(max_seconds))],
            cwd=BENCH, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def __call__(self, cmd: str, timeout: float, **args: Any) -> dict[str, Any]:
        """Run one command; its own deadline is `timeout`, ours a little longer."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"cmd": cmd, "timeoutMs": int(timeout * 1000), **args}) + "\n")
        self.process.stdin.flush()
        try:
            line = self._lines.get(timeout=timeout + 15)
        except queue.Empty:
            raise BenchError(f"the load generator did not answer {cmd} in {timeout + 15:g} s") from None
        if line is None:
            raise BenchError(f"the load generator exited ({self.process.poll()}) during {cmd}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise BenchError(f"{cmd}: {reply.get('error')}")
        return reply

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                assert self.process.stdin is not None
                self.process.stdin.write('{"cmd":"quit"}\n')
                self.process.stdin.flush()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._stderr.close()


# -- one run -----------------------------------------------------------------------------------
def run_once(number: int, log_dir: Path, deadline: float, kind: str = "canary") -> dict[str, Any]:
    figures: dict[str, Any] = {}
    server = Server(log_dir, kind)
    load = None
    try:
        pid = server.worker
        owner, project, batch = f"owner-{number}", f"project-{number}", f"batch-{number}"
        server.put("users", owner, {"email": f"{owner}@example.com"})
        server.put("projects", project, {"userID": owner, "projectName": "p"})
        server.put("batches", batch, {"projectID": project, "batchName": "b"})
        load = Load(log_dir, max_seconds=max(30.0, deadline - time.monotonic() + 30))

        created = load("owner", 20, base=f"ws://127.0.0.1:{server.port}", batchID=batch, ownerID=owner)
        figures["deflate"] = bool(created.get("extensions"))
        rss_owner = settled_rss(pid)

        def fanout(n: int, rounds: int) -> None:
            if time.monotonic() > deadline:
                print(f"    N={n}: skipped (time budget spent)", flush=True)
                return
            grown = load("members", 120, base=f"ws://127.0.0.1:{server.port}", count=n,
                         concurrency=CONNECT_CONCURRENCY)
            print(f"    {n} members connected in {grown['seconds']:.1f} s", flush=True)
            if n == IDLE_MEMBERS:
                rss_idle = settled_rss(pid, seconds=5.0)
                figures["kib_per_conn"] = (rss_idle - rss_owner) / IDLE_MEMBERS
                print(f"    RSS {rss_owner} KiB with the owner, {rss_idle} KiB with {n} idle members: "
                      f"{figures['kib_per_conn']:.1f} KiB per connection", flush=True)
            load("fanout", 60, rounds=WARMUP_ROUNDS, roundTimeoutMs=10_000)
            before = cpu_seconds(pid)
            r = load("fanout", 90, rounds=rounds, roundTimeoutMs=10_000)
            cpu = cpu_seconds(pid) - before
            figures[f"fanout{n}"] = {"p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "round_ms": cpu / rounds * 1000}
            print(f"    N={n}: {rounds} join+leave rounds, member_joined p50 {r['p50_ms']:.1f} ms, "
                  f"p99 {r['p99_ms']:.1f} ms (max {r['max_ms']:.1f}, {r['samples']} samples, "
                  f"{r['negative']} before open); worker CPU {cpu * 1000 / rounds:.2f} ms per round "
                  f"({r['seconds']:.1f} s wall)", flush=True)

        for n, rounds in FANOUT:
            fanout(n, rounds)

        if "kib_per_conn" in figures and time.monotonic() < deadline:
            before = cpu_seconds(pid)
            r = load("ping", 60, pings=PINGS_PER_MEMBER)
            cpu = cpu_seconds(pid) - before
            figures["ping_us"] = cpu / r["pongs"] * 1e6
            print(f"    ping: {r['pongs']} pongs in {r['seconds']:.1f} s, worker CPU "
                  f"{figures['ping_us']:.1f} µs per round trip", flush=True)
        load("closeAll", 20)
    finally:
        if load is not None:
            load.stop()
        server.stop()
    return figures


# -- the report -------------------------------------------------------------------------------
def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: float | None, unit: str, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f} {unit}"


def ratio(ours: float | None, theirs: float | None) -> str:
    return "n/a" if ours is None or not theirs else f"{ours / theirs:.2f}x"


def summarize(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """The median of each figure over `runs` (None where no run measured it)."""

    def col(*path: str) -> list[float]:
        values = []
        for r in runs:
            v: Any = r
            for key in path:
                v = v.get(key) if isinstance(v, dict) else None
            if v is not None:
                values.append(float(v))
        return values

    figures: dict[str, float | None] = {"kib": median(col("kib_per_conn")), "ping_us": median(col("ping_us"))}
    for n, _rounds in FANOUT:
        for key in ("p50_ms", "p99_ms", "round_ms"):
            figures[f"{key}@{n}"] = median(col(f"fanout{n}", key))
    figures["round_ms"], figures["p99_ms"] = figures["round_ms@1000"], figures["p99_ms@1000"]
    return figures


def print_figures(title: str, runs: list[dict[str, Any]], m: dict[str, float | None]) -> None:
    print(f"{title}: medians of {len(runs)} run(s); permessage-deflate accepted by the server: "
          f"{any(r.get('deflate') for r in runs)}")
    print(f"  (a) memory per idle connection ({IDLE_MEMBERS} members): {fmt(m['kib'], 'KiB')}")
    print("  (b) member_joined fan-out (delay from the joiner's open to each member's receipt):")
    for n, _rounds in FANOUT:
        print(f"      N={n:5}: p50 {fmt(m[f'p50_ms@{n}'], 'ms')}, p99 {fmt(m[f'p99_ms@{n}'], 'ms')}, "
              f"worker CPU per join+leave round {fmt(m[f'round_ms@{n}'], 'ms', 2)}")
    print(f"  (c) worker CPU per ping round trip: {fmt(m['ping_us'], 'µs')}")


def print_ratios(name: str, ours: dict[str, float | None], theirs: dict[str, float | None]) -> None:
    print(f"  vs {name}:")
    print(f"      KiB per connection      {fmt(ours['kib'], 'KiB'):>12} / {fmt(theirs['kib'], 'KiB'):>10}"
          f"  = {ratio(ours['kib'], theirs['kib'])}")
    if ours["round_ms"] is None:
        print("      CPU per fan-out round    not measured at N=1000 (time budget spent)")
    else:
        print(f"      CPU per fan-out round   {fmt(ours['round_ms'], 'ms', 2):>12} / "
              f"{fmt(theirs['round_ms'], 'ms', 2):>10}  = {ratio(ours['round_ms'], theirs['round_ms'])}")
    print(f"      fan-out p99 (N=1000)    {fmt(ours['p99_ms'], 'ms'):>12} / {fmt(theirs['p99_ms'], 'ms'):>10}"
          f"  = {ratio(ours['p99_ms'], theirs['p99_ms'])}")
    print(f"      CPU per ping            {fmt(ours['ping_us'], 'µs'):>12} / {fmt(theirs['ping_us'], 'µs'):>10}"
          f"  = {ratio(ours['ping_us'], theirs['ping_us'])}")


def source_version() -> str:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "canary", "wsgi.py", "gunicorn.conf.py")
    return commit + (" + uncommitted changes to the service" if dirty else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the same-machine runs of bench/floor_app.py")
    options = parser.parse_args()
    started = time.monotonic()
    deadline = started + BUDGET_SECONDS
    info = machine()
    print("Canary Collab fan-out benchmark")
    for key in ("nproc", "cpu", "memory", "kernel", "python", "node", "date"):
        print(f"  {key:7} {info[key]}")
    print(f"  service at {source_version()}")
    nofile = raise_nofile()
    print(f"  open files limit {nofile}; server on core 0{'' if pin(0) else ' (not pinned: no taskset)'}, "
          f"load generator on core 1{'' if pin(1) else ' (not pinned)'}")
    if (os.cpu_count() or 1) < 2:
        print("  warning: fewer than 2 cores, the server and the load generator share one")
    ensure_node_modules()

    kinds = ("canary",) if options.no_floor else ("canary", "floor")
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    #: Seconds a run needs at least: the service's are the longer (its joins cost more).
    needs = {"canary": 75.0, "floor": 50.0}
    with tempfile.TemporaryDirectory(prefix="canary-bench-") as tmp:
        for number in range(1, RUNS + 1):
            for kind in kinds:
                label = "service" if kind == "canary" else "floor (bench/floor_app.py)"
                if deadline - time.monotonic() < needs[kind]:
                    print(f"{label} run {number}: skipped, the time budget is spent", flush=True)
                    continue
                print(f"{label} run {number}/{RUNS}", flush=True)
                try:
                    runs[kind].append(run_once(number, Path(tmp), deadline, kind))
                except BenchError as e:
                    print(f"  run {number} failed: {e}", flush=True)
                    log = sorted(Path(tmp).glob("server-*.log"), key=lambda p: p.stat().st_mtime)
                    if log:
                        print("  server log tail:\n" + log[-1].read_text()[-1500:], flush=True)
    if not runs["canary"]:
        print("no run of the service finished")
        return 1

    ours = summarize(runs["canary"])
    print()
    print_figures("The service", runs["canary"], ours)
    floor = summarize(runs["floor"]) if runs.get("floor") else None
    if floor is not None:
        print_figures("The floor on this machine (bench/floor_app.py)", runs["floor"], floor)
    print()
    print("Ratios, the service / the baseline table (measured on another machine; below 1.00x is better):")
    for name in COMPARED:
        b = BASELINE[name]
        print_ratios(name, ours, {"kib": b["kib"], "round_ms": b["round_ms"], "p99_ms": b["p99_ms"],
                                  "ping_us": b["ping_us"]})
    if floor is not None:
        print("Ratios on this machine, the service / the floor (bench/floor_app.py):")
        print_ratios("floor_app.py, same machine, same load", ours, floor)
        b = BASELINE["Flask + flask-sock + gevent, deflate refused"]
        print("This machine against the baseline's machine, the floor / the table's floor row:")
        print_ratios("the table's floor row", floor, {"kib": b["kib"], "round_ms": b["round_ms"],
                                                      "p99_ms": b["p99_ms"], "ping_us": b["ping_us"]})
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    # On SIGTERM too, unwind through the `finally` blocks that stop the server and the load generator.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
