"""Benchmark: latencies that go through Firestore, on two service instances.

Run as ``.venv/bin/python bench/firestore_latency.py`` (``--keep-logs`` keeps the
emulator's and the instances' logs, otherwise removed after a successful run).
It starts the bundled Firestore emulator (``node tests/emulator/start.js
<port>``) and two instances of the service on it (gunicorn's gevent worker,
``WEB_CONCURRENCY=1`` each, dev API on), A and B, bound to 127.0.0.1, and
measures:

(a) a keypoints write → ``labels_snapshot`` at a client of A, against a bare
    ``on_snapshot`` listener on the same query in this process (same writes,
    same emulator: each write is timed by both);
(b) the store listeners of A (``/dev/stats``) with 1, 10, 50 and 100 clients of
    one session watching 3 images in rotation;
(c) ``member_joined`` at the owner (on A) for a member joining on B, and on A.

Membership changes are made one at a time: the bundled emulator does not
isolate transactions (see the README). Every wait is bounded; the whole run
takes about a minute, stops by itself (a watchdog kills what it started if
anything hangs) and only speaks to 127.0.0.1. (The emulator itself listens on
every interface: @firestore-emulator/server binds 0.0.0.0.)
"""

from __future__ import annotations

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
from pathlib import Path
from typing import Any

import websocket
from fanout import BenchError, free_port, put_document, wait_until
from fanout import machine as machine_facts

ROOT = Path(__file__).resolve().parent.parent
EMULATOR_DIR = ROOT / "tests" / "emulator"
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


def watchdog() -> None:
    """Kill everything started here and exit if the run overstays HARD_LIMIT_SECONDS."""
    time.sleep(HARD_LIMIT_SECONDS)
    print(f"\nwatchdog: still running after {HARD_LIMIT_SECONDS:g} s; killing what was started", flush=True)
    for process in _started:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    os._exit(3)


class Emulator:
    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.log = log_dir / "emulator.log"
        self.process = spawn(["node", str(EMULATOR_DIR / "start.js"), str(self.port)], EMULATOR_DIR, self.log)

        def ready() -> bool:
            if self.process.poll() is not None:
                raise BenchError(f"the emulator exited with {self.process.returncode}: {self.log.read_text()[-500:]}")
            return f"ready {self.port}" in self.log.read_text()

        wait_until(ready, 30, "the Firestore emulator")


class Server:
    """One instance: ``gunicorn -c gunicorn.conf.py wsgi:app``, bound to 127.0.0.1."""

    def __init__(self, name: str, log_dir: Path, emulator: Emulator) -> None:
        self.name = name
        self.port = free_port()
        self.log = log_dir / f"server-{name}.log"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("CANARY_", "JWT_", "CORS_", "FIRESTORE_", "GCP_", "GOOGLE_", "GUNICORN_"))}
        env.update(PORT=str(self.port), CANARY_STORE="firestore", CANARY_DEV_API="1", WEB_CONCURRENCY="1",
                   FIRESTORE_EMULATOR_HOST=emulator.host, GCP_PROJECT_ID=PROJECT, LOG_LEVEL="WARNING")
        # The command line's bind wins over gunicorn.conf.py's 0.0.0.0.
        self.process = spawn([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
                              "-b", f"127.0.0.1:{self.port}", "wsgi:app"], ROOT, self.log, env)
        wait_until(self._healthy, 30, f"instance {name} to answer /health")

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

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/dev/stats", timeout=10) as r:
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


# -- main ---------------------------------------------------------------------------------------
def interrupted(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: stop what was started on the way out
def main() -> int:
    if shutil.which("node") is None:
        print("node is not installed (the bundled Firestore emulator needs Node.js)", file=sys.stderr)
        return 2
    if not (EMULATOR_DIR / "node_modules").is_dir():
        print("the emulator is not installed: run `make test` once (npm ci in tests/emulator)", file=sys.stderr)
        return 2
    keep_logs = "--keep-logs" in sys.argv[1:]
    threading.Thread(target=watchdog, daemon=True).start()
    signal.signal(signal.SIGTERM, interrupted)
    began = time.monotonic()
    deadline = began + BUDGET_SECONDS
    print("machine:")
    for line in machine():
        print(f"  {line}")
    log_dir = Path(tempfile.mkdtemp(prefix="canary-firestore-latency-"))
    emulator: Emulator | None = None
    servers: list[Server] = []
    db = None
    ok = False
    try:
        emulator = Emulator(log_dir)
        servers = [Server("A", log_dir, emulator)]
        servers.append(Server("B", log_dir, emulator))
        a, b = servers
        print(f"emulator 127.0.0.1:{emulator.port}; instances A 127.0.0.1:{a.port}, B 127.0.0.1:{b.port} "
              f"(one gevent worker each); started in {time.monotonic() - began:.1f} s", flush=True)
        os.environ["FIRESTORE_EMULATOR_HOST"] = emulator.host
        from google.cloud import firestore

        db = firestore.Client(project=PROJECT)
        write_to_notification(a, db, began + BUDGET_SECONDS * 0.3)
        listeners_vs_clients(a)
        member_joined_latency(a, b, db, deadline)
        ok = True
    except BenchError as e:
        print(f"\nbench failed: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
    finally:
        if db is not None:
            with contextlib.suppress(Exception):
                db.close()
        for server in servers:
            server.stop()
        if emulator is not None:
            stop(emulator.process, 10)
        if ok and not keep_logs:
            shutil.rmtree(log_dir, ignore_errors=True)
        else:
            print(f"logs kept in {log_dir}", file=sys.stderr)
    print(f"\ntotal {time.monotonic() - began:.1f} s; {load_average()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
