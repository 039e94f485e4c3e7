"""Benchmark: latencies that go through Firestore, on two service instances.

Run as ``.venv/bin/python bench/firestore_latency.py`` (``--keep-logs`` keeps the
emulator's and the instances' logs, otherwise removed after a successful run).
It starts the Firestore emulator the tests start (tests/emulators.py: Google's
Cloud Firestore emulator where it is installed, else the npm one, ``node
tests/emulator/start.js <port>``; ``CANARY_TEST_EMULATOR=npm`` forces that
one) and two instances of the service on it (gunicorn's gevent worker,
``WEB_CONCURRENCY=1`` each, dev API on), A and B, bound to 127.0.0.1, and
measures:

(a) a keypoints write → ``labels_snapshot`` at a client of A, against a bare
    ``on_snapshot`` listener on the same query in this process (same writes,
    same emulator: each write is timed by both);
(b) the store listeners of A (``/dev/stats``) with 1, 10, 50 and 100 clients of
    one session watching 3 images in rotation;
(c) ``member_joined`` at the owner (on A) for a member joining on B, and on A;
(d) for 1, 100 and 1,000 distinct images (``--images``) watched by one instance
    (each by one client; clients in sessions of ``--session-size``), each size
    on a FRESH emulator (both re-run every listener's query on each write, so
    a shared one slows down): ``--writes`` keypoints writes, one at a
    time, half on the image of a bare ``on_snapshot`` listener in this process
    (timed by both), half spread over the other images: write → ``labels_snapshot``
    p50/p99 through the service against the bare listener; the worker's CPU over
    the writes, its OS threads and RSS, and /dev/stats?watch=1 (the store's
    Listen streams and targets; "n/a" where a tree does not report them). With
    ``--proxy`` the instance reaches the emulator through the tests' gRPC proxy
    (100 concurrent streams per connection, bench/proxy_process.py) and the
    table says how many notifications arrived of those expected.

``--project DIR`` starts another tree's service (its gunicorn.conf.py and
wsgi.py, with this Python), ``--launcher PATH`` an npm emulator launcher such
as another tree's start.js (one beside no node_modules uses this
repository's); ``--images-only`` runs (d) only, ``--images 0`` skips it;
``--help`` lists the sizes and budgets.

Membership changes of a session are made one at a time: the npm emulator does
not isolate transactions (see the README). Every wait is bounded; (a) to
(c) take about a minute, (d) a few minutes at the default sizes; the run stops
by itself (a watchdog kills what it started if anything hangs) and only speaks
to 127.0.0.1. (The npm emulator itself listens on every interface:
@firestore-emulator/server binds 0.0.0.0; Google's is started on 127.0.0.1.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import queue
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import websocket
from fanout import (
    BenchError,
    children,
    cpu_seconds,
    free_port,
    proc_status,
    put_document,
    raise_nofile,
    settled_rss,
    wait_until,
)
from fanout import machine as machine_facts
from proxy_process import ProxyError, ProxyProcess

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import emulators  # noqa: E402 (tests/emulators.py: which Firestore emulator to start, and how)

EMULATOR_DIR = emulators.EMULATOR_DIR
PROJECT = "demo-canary-bench"

#: No new measurement starts after this many seconds; the watchdog ends everything at HARD_LIMIT_SECONDS.
BUDGET_SECONDS = 180.0
HARD_LIMIT_SECONDS = 235.0
#: (a): writes timed (after WARMUP_WRITES not counted), and the keypoints documents they rotate over.
WRITES, WARMUP_WRITES, KEYPOINT_DOCS = 400, 10, 5
#: (b): clients connected at each step, and the images they watch in rotation.
CLIENT_STEPS = (1, 10, 50, 100)
IMAGES = 3
#: (c): join/leave rounds for each place the member joins (after WARMUP_ROUNDS not counted).
ROUNDS, WARMUP_ROUNDS = 100, 3
#: Longest wait for one expected message.
WAIT = 10.0
#: Quiet time after each sample during which an unexpected extra message would be caught.
SETTLE = 0.05

_started: list[subprocess.Popen[Any]] = []  # what the watchdog kills (process groups we created)


# -- the machine --------------------------------------------------------------------
def machine() -> list[str]:
    return [f"{name}: {value}" for name, value in machine_facts().items()] + [load_average()]


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine shows in the latencies."""
    try:
        return "load average: " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "load average: unknown"


# -- processes ------------------------------------------------------------------------
def spawn(args: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a child in its own process group (so that its own children can be killed with it)."""
    with log.open("wb") as out:
        process = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    _started.append(process)
    return process


def stop(process: subprocess.Popen[Any], grace: float) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # anything of its group left behind (a gunicorn worker)


def watchdog(limit: float = HARD_LIMIT_SECONDS) -> None:
    """Kill everything started here and exit if the run overstays `limit` seconds."""
    time.sleep(limit)
    print(f"\nwatchdog: still running after {limit:g} s; killing what was started", flush=True)
    for process in _started:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    os._exit(3)


class Emulator:
    """The Firestore emulator the tests start (tests/emulators.py: Google's where installed, else `node
    tests/emulator/start.js <port>`), or `node <launcher> <port>` for a given npm launcher. A launcher beside no
    node_modules of its own (another tree's, e.g. an older checkout's) loads this repository's packages."""

    def __init__(self, log_dir: Path, launcher: Path | None = None, name: str = "emulator") -> None:
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.log = log_dir / f"{name}.log"
        self.kind = emulators.kind() if launcher is None else "npm"
        env = None
        if self.kind == "google":
            args, cwd = emulators.command("google", self.port), log_dir
        else:
            launcher = launcher or EMULATOR_DIR / "start.js"
            args, cwd = ["node", str(launcher), str(self.port)], launcher.parent
            if not (launcher.parent / "node_modules").is_dir():
                env = {**os.environ, "NODE_PATH": str(EMULATOR_DIR / "node_modules")}
        # Its own process group (spawn): stop() and the watchdog reach the JVM or node itself.
        self.process = spawn(args, cwd, self.log, env)

        def ready() -> bool:
            if self.process.poll() is not None:
                raise BenchError(f"the emulator exited with {self.process.returncode}: {self.log.read_text()[-500:]}")
            if self.kind == "google":
                return emulators.answers_ok(self.host)
            return f"ready {self.port}" in self.log.read_text()

        try:
            wait_until(ready, 60, f"the {self.kind} Firestore emulator")
        except BaseException:
            stop(self.process, 10)
            raise


class Server:
    """One instance: ``gunicorn -c gunicorn.conf.py wsgi:app``, bound to 127.0.0.1."""

    def __init__(self, name: str, log_dir: Path, emulator: Emulator | None, *, project: Path = ROOT,
                 firestore_host: str | None = None, config: str = "gunicorn.conf.py", workers: int = 1,
                 **extra_env: str) -> None:
        """On `emulator` (reached at `firestore_host` if given: a proxy), or on the memory store (None), from
        the tree `project` (its wsgi.py and, unless `config` names another, its gunicorn.conf.py, run with this
        Python), with `workers` gunicorn workers (WEB_CONCURRENCY; `worker` is the first, `workers` all)."""
        self.name = name
        self.port = free_port()
        self.log = log_dir / f"server-{name}.log"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("CANARY_", "JWT_", "CORS_", "FIRESTORE_", "GCP_", "GOOGLE_", "GUNICORN_"))}
        env.update(PORT=str(self.port), CANARY_DEV_API="1", WEB_CONCURRENCY=str(workers), LOG_LEVEL="WARNING")
        if emulator is None:
            env.update(CANARY_STORE="memory")
        else:
            env.update(CANARY_STORE="firestore", FIRESTORE_EMULATOR_HOST=firestore_host or emulator.host,
                       GCP_PROJECT_ID=PROJECT)
        env.update(extra_env)
        # The command line's bind wins over gunicorn.conf.py's 0.0.0.0.
        self.process = spawn([sys.executable, "-m", "gunicorn", "-c", config,
                              "-b", f"127.0.0.1:{self.port}", "wsgi:app"], project, self.log, env)
        try:
            wait_until(self._healthy, 30, f"instance {name} to answer /health")
            found = wait_until(lambda: (lambda pids: pids if len(pids) >= workers else None)(
                children(self.process.pid)), 10, f"the gunicorn workers of {name}")
            if len(found) != workers:
                raise BenchError(f"expected {workers} gunicorn worker(s) for {name}, found {found}")
            self.workers = sorted(found)
            self.worker = self.workers[0]
        except BaseException:
            self.stop()
            raise

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def _healthy(self) -> bool:
        if self.process.poll() is not None:
            raise BenchError(f"instance {self.name} exited with {self.process.returncode}: "
                             f"{self.log.read_text()[-1500:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def put(self, collection: str, doc_id: str, data: dict[str, Any]) -> None:
        put_document(self.port, collection, doc_id, data)

    def stats(self, watch: bool = False) -> dict[str, int]:
        """/dev/stats; with `watch`, the store's streams and targets too (older trees ignore it)."""
        url = f"http://127.0.0.1:{self.port}/dev/stats" + ("?watch=1" if watch else "")
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())

    def batch(self, tag: str) -> tuple[str, str]:
        """A user owning a project with a batch in it, as tests/conftest.py's Server.batch(): (batch, owner)."""
        owner, project, batch = f"owner-{tag}", f"project-{tag}", f"batch-{tag}"
        self.put("users", owner, {"email": f"{owner}@example.com"})
        self.put("projects", project, {"userID": owner, "projectName": "P", "lastUpdated": "2026-01-01"})
        self.put("batches", batch, {"projectID": project, "batchName": "B"})
        return batch, owner

    def stop(self) -> None:
        stop(self.process, 30)


# -- WebSocket clients ----------------------------------------------------------------
class Ws:
    """A websocket-client connection whose frames are read by a thread, each stamped on receipt."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ws = websocket.create_connection(url, timeout=WAIT, suppress_origin=True, enable_multithread=True)
        self.inbox: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()
        self.close_code: int | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        self.ws.settimeout(None)
        while True:
            try:
                frame = self.ws.recv_frame()
            except Exception:
                self.close_code = self.close_code or 1006
                break
            now = time.perf_counter()
            if frame.opcode == websocket.ABNF.OPCODE_TEXT:
                self.inbox.put((now, json.loads(frame.data)))
            elif frame.opcode == websocket.ABNF.OPCODE_PING:
                with contextlib.suppress(Exception):
                    self.ws.pong(frame.data)
            elif frame.opcode == websocket.ABNF.OPCODE_CLOSE:
                self.close_code = struct.unpack("!H", frame.data[:2])[0] if len(frame.data) >= 2 else 1005
                with contextlib.suppress(Exception):
                    self.ws.send_close(1000)
                break
        self.inbox.put((time.perf_counter(), {"type": "_closed", "code": self.close_code}))

    def send(self, message: dict[str, Any]) -> None:
        self.ws.send(json.dumps(message))

    def expect(self, kind: str, timeout: float = WAIT, skipped: list[dict[str, Any]] | None = None,
               **fields: Any) -> tuple[float, dict[str, Any]]:
        """The next message of type `kind` (with `fields`) and its receipt time; others go to `skipped`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                at, message = self.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError(f"no {kind} {fields or ''} within {timeout:g} s on {self.url}") from None
            if message["type"] == kind and all(message.get(k) == v for k, v in fields.items()):
                return at, message
            if message["type"] == "_closed":
                raise BenchError(f"{self.url} closed with {message['code']} while waiting for {kind}")
            if skipped is not None and message["type"] != "keepalive":
                skipped.append(message)

    def drain(self, quiet: float = 0.0) -> list[dict[str, Any]]:
        """Whatever arrives until nothing has for `quiet` seconds (keepalives left out)."""
        found = []
        while True:
            try:
                _at, message = self.inbox.get(timeout=quiet) if quiet else self.inbox.get_nowait()
            except queue.Empty:
                return found
            if message["type"] != "keepalive":
                found.append(message)

    def close(self) -> None:
        """Close handshake (the service sees a normal close), then the socket."""
        with contextlib.suppress(Exception):
            self.ws.send_close(1000)
        self.thread.join(5)
        with contextlib.suppress(Exception):
            self.ws.shutdown()
        self.thread.join(1)


def owner_url(server: Server, batch: str, user: str) -> str:
    return f"{server.ws}/sessions/{batch}?userID={user}"


def join_url(server: Server, session: str, user: str) -> str:
    return f"{server.ws}/sessions/{session}/join?userID={user}"


# -- figures ------------------------------------------------------------------------------
def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summary(values_s: list[float]) -> str:
    if not values_s:
        return "no samples"
    ms = [v * 1000 for v in values_s]
    return (f"p50 {pct(ms, 50):6.1f} ms, p99 {pct(ms, 99):6.1f} ms "
            f"(min {min(ms):.1f}, mean {statistics.fmean(ms):.1f}, max {max(ms):.1f}; n={len(ms)})")


def ms(values_s: list[float], p: float | str) -> str:
    """A percentile (or "max") of `values_s` in milliseconds, for a table cell; "-" without samples."""
    if not values_s:
        return "-"
    value = max(values_s) if p == "max" else pct(values_s, float(p))
    return f"{value * 1000:.1f}"


def print_table(title: str, headers: list[str], rows: list[list[Any]], notes: Sequence[str] = ()) -> None:
    """A Markdown table (pasteable into docs/benchmarks.md): columns of figures right-aligned, others left."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    figures = [all(_figure(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join(("-" * (w + 1) + ":") if right else (":" + "-" * (w + 1))
                         for w, right in zip(widths, figures, strict=True)) + "|")
    for row in cells:
        print("| " + " | ".join(c.rjust(w) if right else c.ljust(w)
                                for c, w, right in zip(row, widths, figures, strict=True)) + " |")
    for note in notes:
        print(note)
    sys.stdout.flush()


def _figure(cell: str) -> bool:
    """Whether a table cell is a figure ("12.5", "3/4", "1.02x", "7%", "-", "n/a")."""
    return cell in ("-", "n/a") or all(part.strip().rstrip("x%").replace(".", "", 1).isdigit()
                                       for part in cell.replace(" / ", "/").split("/"))


def firestore_db(host: str) -> Any:
    """A google-cloud-firestore client on `host` (FIRESTORE_EMULATOR_HOST is read by the constructor only)."""
    from google.cloud import firestore

    before = os.environ.get("FIRESTORE_EMULATOR_HOST")
    os.environ["FIRESTORE_EMULATOR_HOST"] = host
    try:
        return firestore.Client(project=PROJECT)
    finally:
        if before is None:
            del os.environ["FIRESTORE_EMULATOR_HOST"]
        else:
            os.environ["FIRESTORE_EMULATOR_HOST"] = before


def failure(e: BaseException) -> str:
    """A short kind for a client that could not join or watch (no IDs: these are counted)."""
    if isinstance(e, websocket.WebSocketBadStatusException):
        return f"HTTP {e.status_code}"
    if isinstance(e, BenchError):
        return "closed before its welcome" if " closed with " in str(e) else f"no welcome within {WAIT:g} s"
    if isinstance(e, TimeoutError | websocket.WebSocketTimeoutException):
        return f"handshake not answered within {WAIT:g} s"
    return type(e).__name__


# -- (a) a Firestore write → labels_snapshot, service vs bare listener ------------------------
def write_to_notification(a: Server, db: Any, deadline: float) -> None:
    from google.cloud.firestore_v1.base_query import FieldFilter

    print("\n(a) keypoints write (google-cloud-firestore, this process) → notification", flush=True)
    batch, owner = a.batch("latency")
    image = "image-latency"
    client = Ws(owner_url(a, batch, owner))
    client.expect("session_created")
    client.send({"type": "setImageID", "payload": {"imageID": image}})
    client.expect("labels_snapshot")  # the first snapshot: the watch is ready
    client.expect("bounding_boxes_snapshot")

    bare: queue.Queue[tuple[float, int]] = queue.Queue()

    def on_snapshot(docs: list[Any], _changes: Any, _read_time: Any) -> None:
        bare.put((time.perf_counter(), len(docs)))

    watch = db.collection("keypoints").where(filter=FieldFilter("imageID", "==", image)).on_snapshot(on_snapshot)
    service, direct, commit = [], [], []
    extra_service: list[dict[str, Any]] = []
    extra_bare, missed = 0, 0
    try:
        bare.get(timeout=WAIT)  # its first snapshot
        client.drain(quiet=0.2)
        for i in range(WARMUP_WRITES + WRITES):
            if time.monotonic() > deadline:
                print(f"    stopped after {i} writes (time budget spent)")
                break
            ref = db.collection("keypoints").document(f"kp-{image}-{i % KEYPOINT_DOCS}")
            data = {"imageID": image, "keypoints": [{"x": i, "y": i * 2, "label": "nose"}], "n": i}
            started = time.perf_counter()
            ref.set(data)
            committed = time.perf_counter()
            try:
                got_service, _ = client.expect("labels_snapshot", skipped=extra_service)
                got_bare, _count = bare.get(timeout=WAIT)
            except (BenchError, queue.Empty):
                missed += 1
                time.sleep(SETTLE)  # a late notification must not count for the next write
                client.drain()
                while not bare.empty():
                    bare.get_nowait()
                continue
            # Anything else arriving for this write (a duplicate, a bounding-boxes snapshot) is counted.
            time.sleep(SETTLE)
            extra_service.extend(client.drain())
            while not bare.empty():
                bare.get_nowait()
                extra_bare += 1
            if i >= WARMUP_WRITES:
                service.append(got_service - started)
                direct.append(got_bare - started)
                commit.append(committed - started)
    finally:
        watch.unsubscribe()
        client.close()

    print(f"    service (client of A, labels_snapshot):  {summary(service)}")
    print(f"    bare on_snapshot listener (this process): {summary(direct)}")
    print(f"    the write call itself (set() returning):  {summary(commit)}")
    if service and direct:
        diff = [s - d for s, d in zip(service, direct, strict=True)]
        print(f"    ratio service/bare: p50 {pct(service, 50) / pct(direct, 50):.2f}x, "
              f"p99 {pct(service, 99) / pct(direct, 99):.2f}x; per write, service − bare: {summary(diff)}")
    kinds = sorted({m["type"] for m in extra_service})
    print(f"    unexpected extra messages: service {len(extra_service)} {kinds or ''}, bare {extra_bare}; "
          f"writes not notified within {WAIT:g} s: {missed}", flush=True)


# -- (b) listeners vs clients -------------------------------------------------------------------
def listeners_vs_clients(a: Server) -> None:
    print(f"\n(b) store listeners of A vs clients of one session on A, watching {IMAGES} images in rotation",
          flush=True)
    keys = ("participants", "image_watches", "image_listeners", "session_listeners", "store_watches")
    with contextlib.suppress(BenchError):  # (a)'s client may still be leaving: its close is asynchronous
        wait_until(lambda: not any(a.stats().values()), WAIT, "A to hold nothing")
    before = a.stats()
    print(f"    {'clients':>24} | " + " | ".join(keys))
    print(f"    {'0 (before)':>24} | " + " | ".join(f"{before[k]:>{len(k)}}" for k in keys), flush=True)
    batch, owner = a.batch("listeners")
    images = [f"image-rot-{n}" for n in range(IMAGES)]
    clients: list[Ws] = []
    previous = 0
    sid = ""

    def watch(client: Ws, image: str) -> None:
        client.send({"type": "setImageID", "payload": {"imageID": image}})

    try:
        for n in CLIENT_STEPS:
            started = time.monotonic()
            while len(clients) < n:  # one at a time: membership changes are serialised (emulator)
                i = len(clients)
                if i == 0:
                    client = Ws(owner_url(a, batch, owner))
                    sid = client.expect("session_created")[1]["sessionID"]
                else:
                    client = Ws(join_url(a, sid, f"member-{i:03}"))
                    client.expect("session_joined")
                clients.append(client)
                watch(client, images[i % IMAGES])
            for client in clients[previous:]:  # their watches are ready: their first snapshots arrived
                client.expect("labels_snapshot")
                client.expect("bounding_boxes_snapshot")
            previous = n
            wait_until(lambda n=n: a.stats()["image_watches"] == 2 * n, WAIT, f"{2 * n} image watches")
            stats = a.stats()
            print(f"    {n:>24} | " + " | ".join(f"{stats[k]:>{len(k)}}" for k in keys)
                  + f"   ({time.monotonic() - started:.1f} s to connect and watch)", flush=True)
        # Every client moves on to the next image: the same listeners, still one per (collection, image).
        for i, client in enumerate(clients):
            watch(client, images[(i + 1) % IMAGES])
        for client in clients:
            client.expect("labels_snapshot")
            client.expect("bounding_boxes_snapshot")
        stats = a.stats()
        print(f"    {f'{len(clients)} (all switched image)':>24} | "
              + " | ".join(f"{stats[k]:>{len(k)}}" for k in keys), flush=True)
    finally:
        if clients:
            clients[0].close()  # the owner leaves: the session ends, every member is closed with 4000
            codes = []
            for client in clients[1:]:
                client.thread.join(WAIT)
                codes.append(client.close_code)
                client.close()
            if any(code != 4000 for code in codes):
                print(f"    members' close codes after the owner left: {sorted(set(map(str, codes)))}")
    with contextlib.suppress(BenchError):
        wait_until(lambda: a.stats()["store_watches"] == before["store_watches"], WAIT, "the listeners to stop")
    after = a.stats()
    print(f"    {'0 (all closed)':>24} | " + " | ".join(f"{after[k]:>{len(k)}}" for k in keys), flush=True)


# -- (c) member_joined across processes ----------------------------------------------------------
def member_joined_latency(a: Server, b: Server, db: Any, deadline: float) -> None:
    from google.cloud.firestore_v1.base_query import FieldFilter

    print("\n(c) member joins → member_joined at the owner (owner on A); from before create_connection",
          flush=True)
    batch, owner_id = a.batch("joins")
    owner = Ws(owner_url(a, batch, owner_id))
    sid = owner.expect("session_created")[1]["sessionID"]
    results: dict[str, dict[str, list[float]]] = {
        place: {"joined": [], "welcome": [], "left": []} for place in ("B (other process)", "A (same process)")}
    extra: list[dict[str, Any]] = []
    done = 0
    try:
        for r in range(WARMUP_ROUNDS + ROUNDS):
            if time.monotonic() > deadline:
                print(f"    stopped after {r} rounds (time budget spent)")
                break
            for place, server in zip(results, (b, a), strict=True):  # interleaved: same conditions for both
                member_id = f"m-{server.name}-{r:03}"
                started = time.perf_counter()
                member = Ws(join_url(server, sid, member_id))
                welcomed, _ = member.expect("session_joined")
                joined, _ = owner.expect("member_joined", skipped=extra, memberID=member_id)
                closing = time.perf_counter()
                member.close()
                left, _ = owner.expect("member_left", skipped=extra, memberID=member_id)
                time.sleep(SETTLE)
                extra.extend(owner.drain())
                if r >= WARMUP_ROUNDS:
                    results[place]["joined"].append(joined - started)
                    results[place]["welcome"].append(welcomed - started)
                    results[place]["left"].append(left - closing)
            done = r + 1 - WARMUP_ROUNDS
    finally:
        owner.close()
    # The owner left: the session ends; nothing of it may stay in the store or in either process.
    with contextlib.suppress(BenchError):
        wait_until(lambda: not db.collection("sessions").document(sid).get().exists, WAIT, "the session to end")
    with contextlib.suppress(BenchError):
        wait_until(lambda: a.stats()["store_watches"] == 0 and b.stats()["store_watches"] == 0, WAIT,
                   "both instances to stop their listeners")
    presence = db.collection("sessionPresence").where(filter=FieldFilter("sessionID", "==", sid)).get()
    lock = db.collection("sessionLocks").document(batch).get()
    left_behind = {"session": db.collection("sessions").document(sid).get().exists, "lock": lock.exists,
                   "presence docs": len(presence)}
    print(f"    {max(done, 0)} join/leave rounds per place (after {WARMUP_ROUNDS} not counted), "
          "alternating B and A, one change at a time")
    for place, figures in results.items():
        print(f"    member on {place}:")
        print(f"      owner's member_joined:          {summary(figures['joined'])}")
        print(f"      member's own session_joined:    {summary(figures['welcome'])}")
        print(f"      owner's member_left (from close): {summary(figures['left'])}")
    remote, local = results["B (other process)"]["joined"], results["A (same process)"]["joined"]
    if remote and local:
        print(f"    ratio B/A for member_joined: p50 {pct(remote, 50) / pct(local, 50):.2f}x, "
              f"p99 {pct(remote, 99) / pct(local, 99):.2f}x")
    print(f"    unexpected extra messages at the owner: {len(extra)} "
          f"{sorted({(m['type'], m.get('memberID')) for m in extra})[:6] or ''}", flush=True)
    print(f"    after the owner left: in the store {left_behind}; /dev/stats A {a.stats()}, B {b.stats()}",
          flush=True)


# -- (d) 1, 100, 1000 images watched by one process ---------------------------------------------
SNAPSHOTS = ("labels_snapshot", "bounding_boxes_snapshot")


class Watcher(NamedTuple):
    """A client of the service watching `image` (each image is watched by exactly one client)."""

    image: str
    client: Ws


def join(server: Server, lane: int, indices: list[int], deadline: float) -> tuple[list[Watcher], Counter[str]]:
    """Session `lane`: its owner, then its members one at a time (the npm emulator does not isolate
    transactions), each to watch its own image; stops at `deadline` or after 3 failures in a row.
    The clients that joined, and why the others did not."""
    watchers: list[Watcher] = []
    failures: Counter[str] = Counter()
    try:
        batch, owner = server.batch(f"scale-{lane}")
    except (BenchError, OSError) as e:
        failures[f"batch not created ({type(e).__name__})"] += len(indices)
        return watchers, failures
    sid, strikes = "", 0
    for n, k in enumerate(indices):
        if time.monotonic() > deadline or strikes >= 3 or (n > 0 and not sid):
            failures["not tried (setup budget spent or its session failing)"] += len(indices) - n
            break
        client = None
        try:
            if n == 0:
                client = Ws(owner_url(server, batch, owner))
                sid = client.expect("session_created")[1]["sessionID"]
            else:
                client = Ws(join_url(server, sid, f"member-{k:04}"))
                client.expect("session_joined")
        except (BenchError, OSError, websocket.WebSocketException) as e:
            failures[failure(e)] += 1
            strikes += 1
            if client is not None:
                with contextlib.suppress(Exception):
                    client.ws.shutdown()
            continue
        strikes = 0
        watchers.append(Watcher(f"image-{k:04}", client))
    return watchers, failures


def first_snapshots(client: Ws, deadline: float) -> bool:
    """Whether both first snapshots of the client's image (its watch is ready) arrive by `deadline`."""
    wanted = set(SNAPSHOTS)
    while wanted:
        kind = min(wanted)
        skipped: list[dict[str, Any]] = []
        try:
            client.expect(kind, timeout=max(0.0, deadline - time.monotonic()), skipped=skipped)
        except BenchError:
            return False
        wanted -= {kind, *(m["type"] for m in skipped)}
    return True


def spread(k: int, items: int, picks: int) -> int:
    """The `k`-th of `picks` picks among `items`: evenly spaced over them all when there are more items than
    picks (so that the last clients' images are written to as well as the first ones'), else in turn."""
    return k * items // picks if items > picks else k % items


def scale_run(images: int, options: Any, log_dir: Path) -> dict[str, Any]:
    """One size: a fresh emulator (and proxy), one instance, `images` clients each watching its own image,
    then timed writes spread over those images, half of them on the image of a bare listener."""
    from google.cloud.firestore_v1.base_query import FieldFilter

    result: dict[str, Any] = {"images": images, "failures": Counter(), "stopped": ""}
    emulator = proxy = server = db = watch = None
    watchers: list[Watcher] = []
    try:
        emulator = Emulator(log_dir, options.launcher, name=f"emulator-{images}")
        if options.proxy:
            proxy = ProxyProcess(emulator.host, log_dir)
            _started.append(proxy.process)
        server = Server(f"S{images}", log_dir, emulator, project=options.project,
                        firestore_host=proxy.host if proxy else None)
        print(f"  {images} image(s): {emulator.kind} emulator 127.0.0.1:{emulator.port}"
              + (f", proxy 127.0.0.1:{proxy.port} (100 streams per connection)" if proxy else "")
              + f", service 127.0.0.1:{server.port} (worker {server.worker})", flush=True)

        # Clients: sessions of `session_size`, a few sessions joining in parallel, members one at a time.
        started = time.monotonic()
        setup_deadline = started + options.setup_budget
        lanes = [list(range(first, min(images, first + options.session_size)))
                 for first in range(0, images, options.session_size)]
        pool = ThreadPoolExecutor(max_workers=max(1, min(options.setup_parallel, len(lanes))))
        try:
            futures = [pool.submit(join, server, lane, indices, setup_deadline)
                       for lane, indices in enumerate(lanes)]
            for future in futures:
                lane_watchers, lane_failures = future.result()
                watchers.extend(lane_watchers)
                result["failures"].update(lane_failures)
        finally:  # on Ctrl-C, not waiting for the lanes: they stop at their next client once the service is gone
            pool.shutdown(wait=False, cancel_futures=True)
        watchers.sort(key=lambda w: w.image)
        joined = time.monotonic()
        # Then every client watches its image: the emulator re-runs every query target on each write, so
        # joining before any target exists keeps the joins' writes cheap.
        for w in watchers:
            w.client.send({"type": "setImageID", "payload": {"imageID": w.image}})
        ready_deadline = max(setup_deadline, joined + 10)
        ready = [w for w in watchers if first_snapshots(w.client, ready_deadline)]
        result.update(admitted=len(watchers), ready=len(ready),
                      setup_s=time.monotonic() - started)
        print(f"    {len(watchers)}/{images} clients admitted in {joined - started:.1f} s "
              f"({len(lanes)} sessions), {len(ready)} watches ready after {time.monotonic() - started:.1f} s"
              + (f"; not admitted: {dict(result['failures'])}" if result["failures"] else ""), flush=True)
        if not watchers:
            raise BenchError("no client could join")

        result["rss_kib"] = settled_rss(server.worker)
        result["threads"] = proc_status(server.worker, "Threads")
        result["stats"] = server.stats(watch=True)
        if proxy is not None:
            result["proxy_listen_peak"] = proxy.peak("Listen")

        # The bare listener, on the first image's keypoints query, straight to the emulator.
        db = firestore_db(emulator.host)
        bare: queue.Queue[float] = queue.Queue()
        bare_image = watchers[0].image
        watch = (db.collection("keypoints").where(filter=FieldFilter("imageID", "==", bare_image))
                 .on_snapshot(lambda *_: bare.put(time.perf_counter())))
        bare.get(timeout=WAIT)  # its first snapshot
        for w in watchers:  # the session messages of the joins (member_joined, ...)
            w.client.drain()

        # Writes: the even ones on the bare listener's image (timed by both), the odd ones spread over the rest.
        others = watchers[1:] or watchers[:1]
        service: list[float] = []
        service_same: list[float] = []
        direct: list[float] = []
        expected = delivered = bare_expected = bare_delivered = extra = 0
        total = options.warmup_writes + options.writes
        write_deadline = time.monotonic() + options.write_budget
        cpu_before = emulator_before = 0.0
        for i in range(total):
            if i == options.warmup_writes:
                cpu_before, emulator_before = cpu_seconds(server.worker), cpu_seconds(emulator.process.pid)
            if time.monotonic() > write_deadline:
                result["stopped"] = f"stopped after {i} of {total} writes: the write budget " \
                                    f"({options.write_budget:g} s) was spent"
                break
            target = watchers[0] if i % 2 == 0 else others[spread(i // 2, len(others), max(1, total // 2))]
            on_bare = target.image == bare_image
            # Late or duplicate notifications of earlier writes (not the session's own messages).
            extra += sum(m["type"] in SNAPSHOTS for m in target.client.drain())
            while not bare.empty():
                bare.get_nowait()
                extra += 1
            ref = db.collection("keypoints").document(f"kp-{target.image}-{i % KEYPOINT_DOCS}")
            began = time.perf_counter()
            ref.set({"imageID": target.image, "keypoints": [{"x": i, "y": i * 2, "label": "nose"}], "n": i})
            limit = time.monotonic() + options.notify_timeout
            got_service = got_bare = None
            with contextlib.suppress(BenchError):
                got_service = target.client.expect("labels_snapshot", timeout=options.notify_timeout)[0]
            if on_bare:
                with contextlib.suppress(queue.Empty):
                    got_bare = bare.get(timeout=max(0.0, limit - time.monotonic()))
            if i < options.warmup_writes:
                continue
            expected += 1
            delivered += got_service is not None
            bare_expected += on_bare
            bare_delivered += got_bare is not None
            if got_service is not None:
                service.append(got_service - began)
                if on_bare and got_bare is not None:
                    service_same.append(got_service - began)
                    direct.append(got_bare - began)
        if expected:
            result["cpu_s"] = cpu_seconds(server.worker) - cpu_before
            result["emulator_cpu_s"] = cpu_seconds(emulator.process.pid) - emulator_before
        result.update(expected=expected, delivered=delivered, bare_expected=bare_expected,
                      bare_delivered=bare_delivered, extra=extra, service=service, service_same=service_same,
                      direct=direct)
        print(f"    {expected} writes timed: service {summary(service)}", flush=True)
        print(f"      on the bare listener's image: service {summary(service_same)}; bare {summary(direct)}",
              flush=True)
        if delivered < expected or bare_delivered < bare_expected:
            print(f"      notifications not delivered within {options.notify_timeout:g} s: service "
                  f"{expected - delivered} of {expected}, bare {bare_expected - bare_delivered} of {bare_expected}",
                  flush=True)
        if result["stopped"]:
            print(f"      {result['stopped']}", flush=True)
        if proxy is not None:
            result["proxy_listen_peak"] = proxy.peak("Listen")  # the peak since the proxy started
            result["proxy_calls"] = proxy.by_method()
    except (BenchError, OSError, queue.Empty, ProxyError) as e:
        result["error"] = str(e) or type(e).__name__
        print(f"    failed: {result['error']}", flush=True)
    finally:
        if watch is not None:
            with contextlib.suppress(Exception):
                watch.unsubscribe()
        if db is not None:
            with contextlib.suppress(Exception):
                db.close()
        if server is not None:
            server.stop()  # SIGTERM: the service closes its clients (1012) itself
        for w in watchers:
            with contextlib.suppress(Exception):
                w.client.ws.shutdown()
        if proxy is not None:
            proxy.stop()
        if emulator is not None:
            stop(emulator.process, 10)
    return result


def images_at_scale(options: Any, log_dir: Path, results: list[dict[str, Any]]) -> None:
    """(d) at each size of `options.images`, each size's figures appended to `results` as it ends."""
    print(f"\n(d) images watched by one process: {', '.join(map(str, options.images))}; one client per image, "
          f"sessions of {options.session_size}; {options.writes} writes each (+{options.warmup_writes} not "
          f"counted), a fresh emulator per size" + ("; the service behind the 100-stream proxy" if options.proxy
                                                   else ""), flush=True)
    print(f"    service tree {options.project}, emulator {emulator_in_use(options)}", flush=True)
    for n in options.images:
        results.append(scale_run(n, options, log_dir))


def print_scale(results: list[dict[str, Any]], options: Any) -> None:
    def stat(r: dict[str, Any], key: str) -> str:
        value = r.get("stats", {}).get(key)
        return "n/a" if value is None else str(value)

    rows = []
    for r in results:
        service, same, direct = r.get("service", []), r.get("service_same", []), r.get("direct", [])
        ratio = (f"{pct(same, 50) / pct(direct, 50):.2f}x" if same and direct else "-")
        rows.append([r["images"], f"{r.get('ready', 0)}/{r.get('admitted', 0)}/{r['images']}",
                     f"{r.get('delivered', 0)}/{r.get('expected', 0)}", ms(service, 50), ms(service, 99),
                     ms(service, "max"), ms(same, 50), ms(same, 99), ms(direct, 50), ms(direct, 99),
                     f"{r.get('bare_delivered', 0)}/{r.get('bare_expected', 0)}", ratio])
    notes = [f"  {r['images']} image(s): {r['stopped']}" for r in results if r.get("stopped")]
    notes += [f"  {r['images']} image(s) failed: {r['error']}" for r in results if r.get("error")]
    notes += [f"  {r['images']} image(s), clients not admitted: {dict(r['failures'])}"
              for r in results if r.get("failures")]
    notes += [f"  {r['images']} image(s): {r['extra']} late or duplicate notifications (drained before a write)"
              for r in results if r.get("extra")]
    print_table(
        "(d) keypoints write → labels_snapshot, by distinct images watched by one service process "
        f"(ms; {'through the 100-stream proxy' if options.proxy else 'service straight to the emulator'}; "
        "bare = on_snapshot in this script, straight to the emulator, on the first image's query)",
        ["images", "ready/admitted/clients", "delivered/expected", "service p50", "p99", "max",
         "service, bare's image p50", "p99", "bare p50", "bare p99", "bare delivered", "service/bare p50"],
        rows, notes)
    rows = []
    for r in results:
        cpu, expected = r.get("cpu_s"), r.get("expected", 0)
        rows.append([r["images"], f"{r['setup_s']:.1f}" if "setup_s" in r else "-",
                     f"{cpu:.2f}" if cpu is not None else "-",
                     f"{cpu / expected * 1000:.2f}" if cpu is not None and expected else "-",
                     r.get("threads", "-"), f"{r['rss_kib'] / 1024:.1f}" if "rss_kib" in r else "-",
                     stat(r, "store_watches"), stat(r, "streams"), stat(r, "query_targets"),
                     stat(r, "document_targets"),
                     f"{r['emulator_cpu_s']:.2f}" if "emulator_cpu_s" in r else "-",
                     r.get("proxy_listen_peak", "-")])
    print_table(
        "(d) the service's worker at each size (CPU over the timed writes; threads, RSS and /dev/stats?watch=1 "
        "once every client watches; n/a: this tree reports no such figure)",
        ["images", "setup s", "worker CPU s", "CPU ms/write", "OS threads", "RSS MiB", "store_watches",
         "Listen streams", "query targets", "document targets", "emulator CPU s", "proxy peak Listen"],
        rows)
    calls = [f"  {r['images']} image(s): {r['proxy_calls']}" for r in results if r.get("proxy_calls")]
    if calls:
        print("calls through the proxy, by method, from the start of each size:")
        print("\n".join(calls))


# -- main ---------------------------------------------------------------------------------------
def interrupted(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: stop what was started on the way out


def sizes(text: str) -> list[int]:
    if text.strip().lower() in ("", "0", "none"):
        return []
    values = [int(v) for v in text.split(",")]
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("sizes are positive whole numbers")
    return values


def parse_options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep-logs", action="store_true", help="keep the emulators' and instances' logs")
    parser.add_argument("--project", type=Path, default=ROOT,
                        help="the tree whose gunicorn.conf.py/wsgi.py is started, with this Python "
                             "(default: this repository)")
    parser.add_argument("--launcher", type=Path, default=None,
                        help="an npm emulator launcher, e.g. another tree's start.js (default: the tests' emulator, "
                             "Google's where installed, else this repository's tests/emulator/start.js)")
    parser.add_argument("--images-only", action="store_true", help="only (d): skip (a), (b) and (c)")
    parser.add_argument("--images", type=sizes, default=[1, 100, 1000],
                        help="(d): distinct images watched by one process, one client each (default 1,100,1000; "
                             "0 skips (d))")
    parser.add_argument("--session-size", type=int, default=50, help="(d): clients per session (default 50)")
    parser.add_argument("--writes", type=int, default=300, help="(d): timed writes per size (default 300)")
    parser.add_argument("--warmup-writes", type=int, default=10, help="(d): writes not counted first (default 10)")
    parser.add_argument("--write-budget", type=float, default=120.0,
                        help="(d): seconds of writes per size at most; fewer writes past it (default 120)")
    parser.add_argument("--setup-budget", type=float, default=240.0,
                        help="(d): seconds to connect the clients per size at most (default 240)")
    parser.add_argument("--setup-parallel", type=int, default=4,
                        help="(d): sessions filled at the same time, each one join at a time (default 4)")
    parser.add_argument("--notify-timeout", type=float, default=5.0,
                        help="(d): longest wait for one write's notification (default 5 s)")
    parser.add_argument("--proxy", action="store_true",
                        help="(d): the service reaches the emulator through the tests' 100-stream gRPC proxy")
    options = parser.parse_args(argv)
    options.project = options.project.resolve()
    if options.launcher is not None:
        options.launcher = options.launcher.resolve()
    if not (options.project / "wsgi.py").is_file() or not (options.project / "gunicorn.conf.py").is_file():
        parser.error(f"--project {options.project}: no wsgi.py and gunicorn.conf.py there")
    if options.launcher is not None and not options.launcher.is_file():
        parser.error(f"--launcher {options.launcher}: no such file")
    return options


def begin(title: str, limit: float, prefix: str) -> Path:
    """A driver's start: the watchdog (after `limit` seconds), SIGTERM handled, the machine and the open-files
    limit printed under `title`; a new log directory (named `prefix`...)."""
    threading.Thread(target=watchdog, args=(limit,), daemon=True).start()
    signal.signal(signal.SIGTERM, interrupted)
    print(title)
    for line in machine():
        print(f"  {line}")
    print(f"  open files limit {raise_nofile()}; the watchdog stops everything after {limit:g} s")
    return Path(tempfile.mkdtemp(prefix=prefix))


def finish(log_dir: Path, ok: bool, keep_logs: bool) -> None:
    """A driver's end: its logs removed after a good run (unless kept), else where they are is said."""
    if ok and not keep_logs:
        shutil.rmtree(log_dir, ignore_errors=True)
    else:
        print(f"logs kept in {log_dir}", file=sys.stderr)


def latencies(options: argparse.Namespace, log_dir: Path, began: float, deadline: float) -> None:
    """(a), (b) and (c): an emulator and two instances of their own, stopped at the end whatever happens."""
    emulator = Emulator(log_dir, options.launcher)
    servers: list[Server] = []
    db = None
    try:
        servers.append(Server("A", log_dir, emulator, project=options.project))
        servers.append(Server("B", log_dir, emulator, project=options.project))
        a, b = servers
        print(f"{emulator.kind} emulator 127.0.0.1:{emulator.port}; instances A 127.0.0.1:{a.port}, "
              f"B 127.0.0.1:{b.port} (one gevent worker each); started in {time.monotonic() - began:.1f} s", flush=True)
        db = firestore_db(emulator.host)
        write_to_notification(a, db, began + BUDGET_SECONDS * 0.3)
        listeners_vs_clients(a)
        member_joined_latency(a, b, db, deadline)
    finally:
        if db is not None:
            with contextlib.suppress(Exception):
                db.close()
        for server in servers:
            server.stop()
        stop(emulator.process, 10)


def emulator_in_use(options: argparse.Namespace) -> str:
    """What `Emulator(log_dir, options.launcher)` starts, in words."""
    if options.launcher is not None:
        return f"npm: launcher {options.launcher}"
    return emulators.describe(emulators.kind())


def npm_emulator_missing(options: argparse.Namespace) -> str | None:
    """Why the emulator cannot be started (the npm one needs Node.js and tests/emulator/node_modules), or None."""
    try:
        if options.launcher is None and emulators.kind() == "google":
            return None
    except emulators.ChoiceError as e:
        return str(e)
    if shutil.which("node") is None:
        return "node is not installed (the npm Firestore emulator needs Node.js)"
    if not (EMULATOR_DIR / "node_modules").is_dir():
        return "the npm emulator is not installed: run `make test` once (npm ci in tests/emulator)"
    return None


def main() -> int:
    options = parse_options()
    if missing := npm_emulator_missing(options):
        print(missing, file=sys.stderr)
        return 2
    classic = not options.images_only
    limit = (HARD_LIMIT_SECONDS if classic else 0.0) + sum(
        options.setup_budget + options.write_budget + 180 for _ in options.images)
    began = time.monotonic()
    deadline = began + BUDGET_SECONDS
    log_dir = begin("machine:", limit, "canary-firestore-latency-")
    ok = False
    scale: list[dict[str, Any]] = []
    try:
        if classic:
            latencies(options, log_dir, began, deadline)
        if options.images:
            images_at_scale(options, log_dir, scale)
        ok = all("error" not in r for r in scale)
    except BenchError as e:
        print(f"\nbench failed: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
    finally:
        finish(log_dir, ok, options.keep_logs)
    if scale:
        print_scale(scale, options)
    print(f"\ntotal {time.monotonic() - began:.1f} s; {load_average()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
