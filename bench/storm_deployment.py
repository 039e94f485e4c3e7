"""Benchmark: one session over four processes (issue 15): a join storm, a leave storm and churn, as a
deployment of two instances of two workers each serves them.

Run as ``.venv/bin/python bench/storm_deployment.py`` (``make bench-storm-deployment``; ``make bench-storm``
runs it after bench/storm.py; ``--runs 3`` prints each run and the medians; ``--help`` for the options).
Each run starts a fresh Firestore emulator (the tests' choice: Google's where installed, else the npm one;
tests/emulators.py) and two instances of the service, A and B, of two gunicorn gevent workers each
(``WEB_CONCURRENCY=2``: four processes), on the same Firestore project (``GCP_PROJECT_ID``), each reaching
the emulator through a counting gRPC proxy of its own (100 concurrent streams per connection, as Google's
front end; bench/proxy_process.py). ``PROCESS_LEASE_SECONDS`` (15 s) and ``SESSION_WRITE_SECONDS`` (1 s on
Firestore) are left at their defaults. An owner on A creates a session, reads everything it is sent, and
stays connected throughout; then:

* join storm: ``--members`` (1000) TCP connections, alternately to A and B, then all their upgrade requests
  at once: admitted and refused (by status); request → ``session_joined`` p50/p99/max; whether the session
  document, read straight from the emulator, lists exactly the members welcomed (each once), and when;
  ``member_joined`` per member at the owner, counted once a sentinel member that joins after the storm has
  been announced to it (an event caught up late or twice would have come first); the ``Commit`` calls
  through the proxies and the session documents written (``canary_session_writes_total`` of both
  instances' /metrics, before and after) until the document lists everyone; the presence transactions
  (``canary_membership_commits_total``); how the connections spread over the four workers;
* leave storm: every member's close frame at once: the time until the document lists nobody, ``member_left``
  per member at the owner (after a second sentinel), the same counts;
* churn, in a second session: ``--churn-members`` (100) members over both instances, half of them joined
  first; then for ``--churn-seconds`` (60) each joins or leaves 3-8 s (at random) after its previous join or
  leave ended (its first within 8 s), and stops by itself: session documents written per second over that
  window, the most written in any 1 s (from the document's versions, which a listener in this process
  follows straight on the emulator, and from /metrics scraped every 0.25 s), refusals; afterwards whether
  the document lists exactly the members connected, and whether the owner heard each join and leave once.

The service runs from a copy of its sources made at the start (``--no-snapshot``: from the tree itself), so
that every run measures the same code while the tree is being edited; its commit and a digest of its sources
are printed.

Every wait is bounded (``--timeout`` per phase; a watchdog kills what was started if anything hangs); every
process started is stopped at the end, also on Ctrl-C; only 127.0.0.1 is spoken to. The instances' log lines
(LOG_LEVEL=WARNING: warnings and errors, but those every start writes) are counted and the first ones
printed; the logs are kept when a run's checks fail.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import firestore_latency as fl
from fanout import CLK_TCK, BenchError, cpu_seconds
from firestore_latency import ROOT, Emulator, Server, firestore_db, pct, print_table, stop
from proxy_process import ProxyError, ProxyProcess
from storm import Member, admit, poll
from wsclient import Closed, Connection, Refused, close_frame

INSTANCES, WORKERS = 2, 2
WORKER_NAMES = ("A1", "A2", "B1", "B2")  # in the order of Deployment.connections_by_worker
#: Seconds after the document has converged during which late calls and writes are still counted.
SETTLE = 2.0
#: Longest wait for a sentinel's welcome and for its announcement at the owner.
SENTINEL_WAIT = 30.0
#: How often the session document is read while waiting for it, and /metrics scraped during the churn.
POLL, SCRAPE = 0.1, 0.25
WRITES, COMMITS = "canary_session_writes_total", "canary_membership_commits_total"
#: Log lines every start and stop of an instance writes (not counted).
USUAL_LOG_LINES = ("] [INFO] ", "JWT_SECRET is not set", "CANARY_DEV_API is on")
#: Settings the benchmark leaves at their defaults whatever this shell has set (and a shared metrics
#: directory would add one instance's counts to the other's).
CLEARED = ("PROCESS_LEASE_SECONDS", "SESSION_WRITE_SECONDS", "RECONNECT_GRACE_SECONDS", "OWNER_GRACE_SECONDS",
           "WORKER_CONNECTIONS", "MAX_CLIENTS", "MAX_CONNECTIONS_PER_USER", "MAX_CONNECTIONS_PER_ADDRESS",
           "CLIENT_QUEUE_BYTES", "IDLE_TIMEOUT_SECONDS", "KEEPALIVE_SECONDS", "FIRESTORE_TIMEOUT_SECONDS",
           "PROMETHEUS_MULTIPROC_DIR", "WEB_CONCURRENCY", "METRICS_TOKEN", "TRUSTED_PROXIES", "LOG_LEVEL")


# -- the deployment -----------------------------------------------------------------------------
def scrape(server: Server) -> dict[str, float]:
    """/metrics of one instance (all its workers), each metric's samples summed over their labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as r:
        text = r.read().decode()
    values: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            values[name.split("{", 1)[0]] += float(value)
    return values


class Deployment:
    """A fresh emulator; instances A and B (WORKERS workers each, one Firestore project), each behind a
    counting proxy of its own; a google-cloud-firestore client straight on the emulator."""

    def __init__(self, log_dir: Path, options: Any) -> None:
        self.emulator = Emulator(log_dir, options.launcher, name="emulator-deployment")
        self.proxies: list[ProxyProcess] = []
        self.servers: list[Server] = []
        self.db: Any = None
        try:
            for _ in range(INSTANCES):
                proxy = ProxyProcess(self.emulator.host, log_dir)
                fl._started.append(proxy.process)
                self.proxies.append(proxy)
            for name, proxy in zip("AB", self.proxies, strict=True):
                self.servers.append(Server(name, log_dir, self.emulator, project=options.project,
                                           firestore_host=proxy.host, workers=WORKERS))
            self.db = firestore_db(self.emulator.host)
            # Every process announces itself (its lease) once its app is up: all four, before any join.
            fl.wait_until(lambda: len(list(self.db.collection("collabProcesses").list_documents()))
                          >= INSTANCES * WORKERS, 60, "the four processes' leases")
        except BaseException:
            self.stop()
            raise

    def counters(self) -> list[dict[str, float]]:
        return [scrape(s) for s in self.servers]

    def reset_calls(self) -> None:
        for proxy in self.proxies:
            proxy.reset()

    def calls(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for proxy in self.proxies:
            total.update(proxy.by_method())
        return dict(total)

    def member_ids(self, sid: str) -> list[str] | None:
        """The session document's members, in order, read straight from the emulator (None: no document)."""
        snapshot = self.db.collection("sessions").document(sid).get(timeout=10)
        return [m["id"] for m in snapshot.to_dict().get("members", [])] if snapshot.exists else None

    def connections_by_worker(self) -> list[int]:
        """Established connections each worker holds (A's two, then B's), from /proc."""
        ports = {s.port for s in self.servers}
        inodes = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError):
                for line in Path(table).read_text().splitlines()[1:]:
                    fields = line.split()
                    if int(fields[1].rsplit(":", 1)[1], 16) in ports and fields[3] == "01":
                        inodes.add(fields[9])
        counts = []
        for server in self.servers:
            for worker in server.workers:
                n = 0
                with contextlib.suppress(OSError):
                    for fd in Path(f"/proc/{worker}/fd").iterdir():
                        with contextlib.suppress(OSError):
                            link = os.readlink(fd)
                            n += link.startswith("socket:[") and link[8:-1] in inodes
                counts.append(n)
        return counts

    def cpu_by_role(self) -> dict[str, float]:
        """CPU used so far by what this deployment started, by role: the emulator's JVM, the proxies, the
        gunicorn masters and workers, and this benchmark (the load generator)."""
        roles: dict[str, list[int]] = {
            "emulator": [self.emulator.process.pid], "proxies": [p.pid for p in self.proxies],
            "workers": [pid for server in self.servers for pid in server.workers],
            "masters": [server.process.pid for server in self.servers]}
        used = {}
        for role, pids in roles.items():
            used[role] = 0.0
            for pid in pids:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    used[role] += cpu_seconds(pid)
        times = os.times()
        used["load generator"] = times.user + times.system
        return used

    def cpu_seconds(self) -> float:
        """CPU used so far by what this deployment started (emulator, proxies, gunicorn masters and workers)."""
        used = self.cpu_by_role()
        return sum(used.values()) - used["load generator"]

    def log_lines(self) -> dict[str, list[str]]:
        """Each instance's log lines (LOG_LEVEL=WARNING: warnings and errors), but gunicorn's own start-up and
        stop lines and each worker's start-up warnings (no JWT_SECRET, dev API on)."""
        found = {}
        for server in self.servers:
            with contextlib.suppress(OSError):
                found[server.name] = [line for line in server.log.read_text(errors="replace").splitlines()
                                      if line.strip() and not any(usual in line for usual in USUAL_LOG_LINES)]
        return found

    def stop(self) -> None:
        if self.db is not None:
            with contextlib.suppress(Exception):
                self.db.close()
        for server in self.servers:
            server.stop()
        for proxy in self.proxies:
            proxy.stop()
        stop(self.emulator.process, 10)


def delta(after: list[dict[str, float]], before: list[dict[str, float]], name: str) -> list[int]:
    return [round(a.get(name, 0) - b.get(name, 0)) for a, b in zip(after, before, strict=True)]


# -- the owner, reading everything ----------------------------------------------------------------
class Owner:
    """The owner's connection, read to the end by a task: how often each member was announced, by type."""

    def __init__(self, conn: Connection, sid: str) -> None:
        self.conn, self.sid = conn, sid
        self.heard: dict[str, Counter[str]] = defaultdict(Counter)
        self.times: dict[str, list[tuple[float, str]]] = defaultdict(list)  # member → (perf_counter, type)
        self.types: Counter[str] = Counter()
        self.closed: int | None = None
        self._waiting: dict[tuple[str, str], asyncio.Event] = {}
        self.task = asyncio.create_task(self._read())

    @classmethod
    async def create(cls, server: Server, tag: str) -> Owner:
        batch, owner_id = server.batch(tag)
        conn = await Connection.open(server.port, f"/sessions/{batch}?userID={owner_id}", fl.WAIT)
        created = await conn.message(fl.WAIT)
        if created.get("type") != "session_created":
            conn.abort()
            raise BenchError(f"the owner got {created}")
        return cls(conn, created["sessionID"])

    async def _read(self) -> None:
        try:
            while True:
                message = await self.conn.message(None)
                kind = str(message.get("type"))
                self.types[kind] += 1
                member = message.get("memberID")
                if member is not None:
                    self.heard[kind][member] += 1
                    self.times[member].append((time.perf_counter(), kind))
                    if (event := self._waiting.get((kind, member))) is not None:
                        event.set()
        except Closed as e:
            self.closed = e.code
        except (OSError, ValueError) as e:
            self.closed = -1
            print(f"    the owner's connection failed: {type(e).__name__}: {e}", flush=True)
        for event in self._waiting.values():
            event.set()

    async def heard_of(self, kind: str, member: str, timeout: float) -> bool:
        """Whether `member` was the subject of a `kind` message, waiting up to `timeout` s for it."""
        if not self.heard[kind][member] and self.closed is None:
            event = self._waiting.setdefault((kind, member), asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
        return self.heard[kind][member] > 0

    def once(self, kind: str, users: list[str]) -> dict[str, Any]:
        counts = [self.heard[kind][u] for u in users]
        return {"once": counts.count(1), "missing": counts.count(0), "twice_or_more": sum(c > 1 for c in counts)}

    async def close(self) -> None:
        self.conn.send(close_frame(1000))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.task), 5)
        self.task.cancel()
        self.conn.abort()


async def join_one(port: int, sid: str, user: str, timeout: float) -> tuple[Member, Connection | None]:
    """One member's connection and join (a `Member` whose `outcome` says how it went)."""
    member = Member(0)
    member.user = user
    try:
        member.conn = await Connection.connect(port, timeout)
    except (TimeoutError, OSError) as e:
        member.outcome = f"TCP connect failed ({type(e).__name__})"
        return member, None
    member.conn.request_upgrade(f"/sessions/{sid}/join?userID={user}")
    await admit(member, time.monotonic() + timeout)
    return member, member.conn if member.welcomed_at is not None else None


async def sentinel(deployment: Deployment, owner: Owner, name: str) -> tuple[Member, bool]:
    """A member joining B after a storm, and whether the owner heard of it (every announcement queued
    before it, a late or duplicate one included, has then been read)."""
    member, conn = await join_one(deployment.servers[1].port, owner.sid, name, SENTINEL_WAIT)
    if conn is None:
        print(f"    sentinel {name}: {member.outcome}", flush=True)
        return member, False
    heard = await owner.heard_of("member_joined", name, SENTINEL_WAIT)
    if not heard:
        print(f"    sentinel {name}: not announced to the owner within {SENTINEL_WAIT:g} s", flush=True)
    return member, heard


async def leave(member: Member, timeout: float) -> bool:
    """`member` closes (1000) and waits for the end of its connection; whether it ended in time."""
    assert member.conn is not None
    member.conn.send(close_frame(1000))
    ended = True
    if member.reader is not None:
        done, _ = await asyncio.wait([member.reader], timeout=timeout)
        ended = bool(done)
    member.conn.abort()
    return ended


def ms(values: list[float], p: float | str) -> float | None:
    if not values:
        return None
    return round((max(values) if p == "max" else pct(values, float(p))) * 1000, 1)


def s_since(at: float | None, since: float) -> float | None:
    return None if at is None else round(at - since, 2)


# -- the storms ---------------------------------------------------------------------------------
async def storms(deployment: Deployment, options: Any, r: dict[str, Any]) -> None:
    servers, timeout = deployment.servers, options.timeout
    owner = await Owner.create(servers[0], "deployment")
    sid = owner.sid
    members = [Member(n) for n in range(options.members)]
    instance = {m.user: n % INSTANCES for n, m in enumerate(members)}
    try:
        # -- joins: every TCP connection first (alternately A and B), then every upgrade request at once ----
        async def connect(member: Member) -> None:
            try:
                member.conn = await Connection.connect(servers[instance[member.user]].port, timeout)
            except (TimeoutError, OSError) as e:
                member.outcome = f"TCP connect failed ({type(e).__name__})"

        owner_at = deployment.connections_by_worker()  # the owner's connection alone
        await asyncio.gather(*(connect(m) for m in members))
        connected = [m for m in members if m.conn is not None]
        # Every connection accepted by a worker before any upgrade request: which worker holds which.
        spread_before = await asyncio.to_thread(
            lambda: fl.wait_until(lambda: (lambda c: c if sum(c) >= len(connected) + 1 else None)(
                deployment.connections_by_worker()), 30, "the workers to accept every connection"))
        before = deployment.counters()
        deployment.reset_calls()
        cpu_before = deployment.cpu_by_role()
        first = time.perf_counter()
        for m in connected:
            assert m.conn is not None
            m.conn.request_upgrade(f"/sessions/{sid}/join?userID={m.user}")
        deadline = time.monotonic() + timeout
        await asyncio.gather(*(admit(m, deadline) for m in connected))
        admitted = [m for m in connected if m.conn is not None and m.conn.upgraded_at]
        welcomed = [m for m in admitted if m.welcomed_at is not None]
        users = sorted(m.user for m in welcomed)
        exact_at, ids = await poll(lambda: deployment.member_ids(sid),
                                   lambda ids: isinstance(ids, list) and sorted(ids) == users, deadline, POLL)
        await asyncio.sleep(SETTLE)
        calls, after = deployment.calls(), deployment.counters()
        cpu = {role: round(used - cpu_before[role], 1) for role, used in deployment.cpu_by_role().items()}
        waits = [m.welcomed_at - m.conn.requested_at for m in welcomed if m.welcomed_at and m.conn]
        refused = [m for m in members if m.outcome != "session_joined"]
        refused_after = [m.refused_at - m.conn.requested_at for m in refused if m.refused_at and m.conn]
        writes = delta(after, before, WRITES)
        settled_ids = await asyncio.to_thread(deployment.member_ids, sid)
        r.update({
            "join_admitted": len(admitted), "join_welcomed": len(welcomed),
            "join_refused": dict(Counter(m.outcome for m in refused)),
            "join_refusal_bodies": dict(Counter(f"{m.outcome}: {m.refusal.decode(errors='replace')}"
                                                for m in refused)),
            "join_refused_after_s": ([round(pct(refused_after, p), 2) for p in (0, 50, 100)]
                                     if refused_after else None),
            "join_p50_ms": ms(waits, 50), "join_p99_ms": ms(waits, 99), "join_max_ms": ms(waits, "max"),
            "join_last_welcome_s": s_since(max((m.welcomed_at for m in welcomed if m.welcomed_at), default=None),
                                           first),
            "join_doc_exact": exact_at is not None and len(ids) == len(set(ids)),
            "join_doc_still_exact": isinstance(settled_ids, list) and sorted(settled_ids) == users,
            "join_doc_s": s_since(exact_at, first),
            "join_doc_listed": len(ids) if isinstance(ids, list) else ids,
            "join_commit_calls": calls.get("Commit", 0), "join_all_calls": sum(calls.values()),
            "join_calls": calls, "join_session_writes": sum(writes), "join_session_writes_by_instance": writes,
            "join_presence_commits": sum(delta(after, before, COMMITS)),
            "spread": deployment.connections_by_worker(), "spread_before": spread_before,
            "owner_worker": owner_at.index(1) if owner_at.count(1) == 1 and sum(owner_at) == 1 else None,
        })
        r["refused_by_worker"] = [b - a for b, a in zip(spread_before, r["spread"], strict=True)]
        owner_worker = WORKER_NAMES[r["owner_worker"]] if r["owner_worker"] is not None else "?"
        if exact_at is None and isinstance(ids, list):
            r["join_doc_diff"] = {"missing": len(set(users) - set(ids)), "extra": len(set(ids) - set(users)),
                                  "listed twice": len(ids) - len(set(ids))}
        print(f"    join storm: {len(admitted)} of {options.members} admitted, {len(welcomed)} welcomed "
              f"(p50 {r['join_p50_ms']} ms, p99 {r['join_p99_ms']} ms, max {r['join_max_ms']} ms); the document "
              + (f"lists exactly them after {r['join_doc_s']} s" if exact_at is not None
                 else f"did not list exactly them within {timeout:g} s ({r.get('join_doc_diff', ids)})")
              + f"; {r['join_commit_calls']} Commit calls, {r['join_session_writes']} session writes "
              f"(A, B: {writes}), {r['join_presence_commits']} presence commits; connections per worker "
              f"(A1, A2, B1, B2) {spread_before} before, {r['spread']} after (not welcomed: "
              f"{r['refused_by_worker']}; the owner's is {owner_worker})"
              + (f"; not admitted: {r['join_refusal_bodies']}, answered after (min, p50, max) "
                 f"{r['join_refused_after_s']} s" if r["join_refused"] else ""), flush=True)
        r["join_cpu_s"] = cpu
        print(f"    calls through the proxies during the join storm: {calls}; CPU s by role {cpu}", flush=True)

        one, heard = await sentinel(deployment, owner, "sentinel-joins")
        r["join_sentinel_heard"] = heard
        r.update({f"joined_{k}": v for k, v in owner.once("member_joined", users).items()})
        r["joined_others"] = sum(n for u, n in owner.heard["member_joined"].items()
                                 if u not in instance and u != "sentinel-joins")
        print(f"    member_joined at the owner: {r['joined_once']} members once, {r['joined_missing']} never, "
              f"{r['joined_twice_or_more']} more than once; {r['joined_others']} for others", flush=True)
        if one.conn is not None and one.welcomed_at is not None:
            await leave(one, fl.WAIT)
            await owner.heard_of("member_left", one.user, SENTINEL_WAIT)
        back_at, _ = await poll(lambda: deployment.member_ids(sid),
                                lambda ids: isinstance(ids, list) and sorted(ids) == users,
                                time.monotonic() + timeout, POLL)
        if back_at is None:
            print("    the document did not come back to the storm's members after the sentinel left", flush=True)

        # -- leaves: every member's close frame at once --------------------------------------------
        still_open = [m for m in welcomed if m.ended_at is None]
        before = deployment.counters()
        deployment.reset_calls()
        first = time.perf_counter()
        for m in still_open:
            assert m.conn is not None
            m.conn.send(close_frame(1000))
        deadline = time.monotonic() + timeout
        readers = [m.reader for m in still_open if m.reader is not None]
        if readers:
            await asyncio.wait(readers, timeout=max(0.01, deadline - time.monotonic()))
        ended = [m for m in still_open if m.ended_at is not None]
        empty_at, ids = await poll(lambda: deployment.member_ids(sid), lambda ids: ids == [], deadline, POLL)
        await asyncio.sleep(SETTLE)
        calls, after = deployment.calls(), deployment.counters()
        writes = delta(after, before, WRITES)
        r.update({
            "leave_members": len(still_open), "leave_ended": len(ended),
            "leave_ended_before": len(welcomed) - len(still_open),
            "leave_close_codes": dict(Counter(str(m.conn.close_code) for m in still_open if m.conn)),
            "leave_last_end_s": s_since(max((m.ended_at for m in ended if m.ended_at), default=None), first),
            "leave_doc_empty": empty_at is not None, "leave_doc_s": s_since(empty_at, first),
            "leave_doc_listed": len(ids) if isinstance(ids, list) else ids,
            "leave_commit_calls": calls.get("Commit", 0), "leave_all_calls": sum(calls.values()),
            "leave_calls": calls, "leave_session_writes": sum(writes), "leave_session_writes_by_instance": writes,
            "leave_presence_commits": sum(delta(after, before, COMMITS)),
        })
        print(f"    leave storm: {len(ended)} of {len(still_open)} connections ended (last after "
              f"{r['leave_last_end_s']} s, close codes {r['leave_close_codes']}); the document "
              + (f"lists nobody after {r['leave_doc_s']} s" if empty_at is not None
                 else f"still listed {r['leave_doc_listed']} after {timeout:g} s")
              + f"; {r['leave_commit_calls']} Commit calls, {r['leave_session_writes']} session writes "
              f"(A, B: {writes}), {r['leave_presence_commits']} presence commits", flush=True)
        print(f"    calls through the proxies during the leave storm: {calls}", flush=True)

        two, heard = await sentinel(deployment, owner, "sentinel-leaves")
        r["leave_sentinel_heard"] = heard
        left_users = sorted(m.user for m in still_open)
        r.update({f"left_{k}": v for k, v in owner.once("member_left", left_users).items()})
        print(f"    member_left at the owner: {r['left_once']} members once, {r['left_missing']} never, "
              f"{r['left_twice_or_more']} more than once", flush=True)
        if two.conn is not None and two.welcomed_at is not None:
            await leave(two, fl.WAIT)
        r["owner_closed"] = owner.closed
        r["owner_types"] = dict(owner.types)
    finally:
        for m in members:
            if m.reader is not None:
                m.reader.cancel()
            if m.conn is not None:
                m.conn.abort()
        await owner.close()


# -- churn ---------------------------------------------------------------------------------------
class Versions:
    """The session document's versions (update times), from a listener in this process on the emulator."""

    def __init__(self, db: Any, sid: str) -> None:
        self.times: set[float] = set()
        self.members: list[str] | None = None
        self._lock = threading.Lock()
        self.watch = db.collection("sessions").document(sid).on_snapshot(self._on_snapshot)

    def _on_snapshot(self, snapshots: list[Any], _changes: Any, _read_time: Any) -> None:
        with self._lock:
            for snapshot in snapshots:
                if snapshot.exists and snapshot.update_time is not None:
                    self.times.add(snapshot.update_time.timestamp())

    def between(self, start: float, end: float) -> list[float]:
        with self._lock:
            return sorted(t for t in self.times if start <= t <= end)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.watch.unsubscribe()


def most_in_a_second(times: list[float]) -> int:
    """The most of `times` (sorted, seconds) within any window of 1 s (half open: two writes exactly 1 s
    apart are not in the same one)."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= 1.0:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


async def churn(deployment: Deployment, options: Any, rng: random.Random, r: dict[str, Any]) -> None:
    servers, timeout = deployment.servers, options.timeout
    owner = await Owner.create(servers[0], "churn")
    sid = owner.sid
    versions = Versions(deployment.db, sid)
    users = [f"churn-{n:03}" for n in range(options.churn_members)]
    port = {u: servers[n % INSTANCES].port for n, u in enumerate(users)}
    live: dict[str, Member] = {}
    outcomes: Counter[str] = Counter()
    waits: list[float] = []
    toggles = {"joins": 0, "leaves": 0, "leaves not ended": 0}
    # Each member's joins and leaves, (perf_counter at the start, what happened), and how many of each the
    # owner should hear of.
    history: dict[str, list[tuple[float, str]]] = defaultdict(list)
    should_hear: dict[str, Counter[str]] = defaultdict(Counter)

    async def join(user: str) -> None:
        began = time.perf_counter()
        member, conn = await join_one(port[user], sid, user, timeout)
        outcomes[member.outcome] += 1
        history[user].append((began, f"join: {member.outcome}"))
        if conn is not None and member.welcomed_at is not None:
            live[user] = member
            toggles["joins"] += 1
            should_hear[user]["member_joined"] += 1
            waits.append(member.welcomed_at - conn.requested_at)
        elif member.conn is not None:
            member.conn.abort()

    async def leave_now(user: str) -> None:
        member = live.pop(user)
        toggles["leaves"] += 1
        should_hear[user]["member_left"] += 1
        began = time.perf_counter()
        gone = member.ended_at is not None
        assert member.conn is not None
        ended = await leave(member, fl.WAIT)
        history[user].append((began, f"leave: {'the service had closed it' if gone else 'ended'} "
                                     f"({member.conn.close_code})" if ended else "leave: not ended"))
        if not ended:
            toggles["leaves not ended"] += 1

    scraping = True
    samples: list[tuple[float, float]] = []

    async def scraper() -> None:
        while scraping:
            with contextlib.suppress(OSError, ValueError):
                counters = await asyncio.to_thread(deployment.counters)
                samples.append((time.time(), sum(c.get(WRITES, 0) for c in counters)))
            await asyncio.sleep(SCRAPE)

    sampler = None
    try:
        # Half of them in first (not measured), so that the window starts with a session in use.
        await asyncio.gather(*(join(u) for u in rng.sample(users, len(users) // 2)))
        await poll(lambda: deployment.member_ids(sid),
                   lambda ids: isinstance(ids, list) and sorted(ids) == sorted(live), time.monotonic() + timeout,
                   POLL)
        warm_joins = toggles["joins"]
        outcomes.clear()
        waits.clear()
        toggles.update(joins=0, leaves=0)
        await asyncio.sleep(SETTLE)

        seconds = options.churn_seconds
        before = deployment.counters()
        deployment.reset_calls()
        window_start, window_perf = time.time(), time.perf_counter()
        end = time.monotonic() + seconds
        sampler = asyncio.create_task(scraper())

        async def toggling(user: str) -> None:
            """Join or leave: the first time within 8 s, then 3-8 s after the previous one ended (a slow join
            does not bring the next leave closer), until the end."""
            pause = rng.uniform(0, 8)
            while time.monotonic() + pause < end:
                await asyncio.sleep(pause)
                await (leave_now(user) if user in live else join(user))
                pause = rng.uniform(3, 8)

        tasks = [asyncio.create_task(toggling(u)) for u in users]
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        window_end = time.time()
        at_end = deployment.counters()
        window_calls = deployment.calls()
        await asyncio.wait(tasks, timeout=timeout)  # the toggles begun before the end finish
        for task in tasks:
            task.cancel()
        scraping = False
        await sampler
        stopped = time.perf_counter()  # every member has stopped toggling
        connected = sorted(live)
        match_at, ids = await poll(lambda: deployment.member_ids(sid),
                                   lambda ids: isinstance(ids, list) and sorted(ids) == connected,
                                   time.monotonic() + timeout, POLL)
        await asyncio.sleep(SETTLE)
        after = deployment.counters()
        window_writes = sum(delta(at_end, before, WRITES))
        elapsed = window_end - window_start
        seen = versions.between(window_start, window_end)
        later = versions.between(window_start + 10, window_end)
        scraped = 0
        for i, (t0, v0) in enumerate(samples):
            for t1, v1 in samples[i + 1:]:
                if t1 - t0 > 1.0 + SCRAPE / 5:
                    break
                scraped = max(scraped, round(v1 - v0))
        r.update({
            "churn_warm_joins": warm_joins, "churn_joins": toggles["joins"], "churn_leaves": toggles["leaves"],
            "churn_leaves_not_ended": toggles["leaves not ended"],
            "churn_refused": {k: v for k, v in outcomes.items() if k != "session_joined"},
            "churn_join_p50_ms": ms(waits, 50), "churn_join_p99_ms": ms(waits, 99),
            "churn_seconds": round(elapsed, 1), "churn_writes": window_writes,
            "churn_writes_by_instance": delta(at_end, before, WRITES),
            "churn_writes_per_s": round(window_writes / elapsed, 2),
            "churn_presence_commits": sum(delta(at_end, before, COMMITS)),
            "churn_commit_calls": window_calls.get("Commit", 0),
            "churn_versions_seen": len(seen), "churn_burst_versions": most_in_a_second(seen),
            "churn_burst_scraped": scraped,
            # Past the first 10 s (the token bucket's burst of 5 goes at the start), from the listener's versions.
            "churn_writes_per_s_after_10s": round(len(later) / max(1.0, elapsed - 10), 2),
            "churn_burst_after_10s": most_in_a_second(later),
            "churn_tail_writes": sum(delta(after, at_end, WRITES)),
            "churn_connected_at_end": len(connected),
            "churn_doc_matches": match_at is not None and len(ids) == len(set(ids)),
            "churn_doc_match_s": s_since(match_at, stopped),
        })
        if match_at is None:
            r["churn_doc_diff"] = ({"missing": len(set(connected) - set(ids)), "extra": len(set(ids) - set(connected))}
                                   if isinstance(ids, list) else ids)
        sentinel_member, heard = await sentinel(deployment, owner, "sentinel-churn")
        r["churn_sentinel_heard"] = heard
        # Every successful join (warm-up included) and every leave, announced once to the owner.
        r["churn_heard_joined"] = sum(owner.heard["member_joined"][u] for u in users)
        r["churn_expected_joined"] = warm_joins + toggles["joins"]
        r["churn_heard_left"] = sum(owner.heard["member_left"][u] for u in users)
        r["churn_expected_left"] = toggles["leaves"]
        unlike = [u for u in users if any(owner.heard[k][u] != should_hear[u][k]
                                          for k in ("member_joined", "member_left"))]
        r["churn_heard_unlike"] = len(unlike)
        for u in unlike[:5]:
            told = ", ".join(f"{t - window_perf:.2f} {kind}" for t, kind in owner.times[u])
            did = ", ".join(f"{t - window_perf:.2f} {what}" for t, what in history[u])
            counts = "; ".join(f"{k} {owner.heard[k][u]} of {should_hear[u][k]}"
                               for k in ("member_joined", "member_left"))
            print(f"    {u} (instance {'AB'[users.index(u) % INSTANCES]}): the owner heard {counts}; did (s from "
                  f"the window's start): {did}; the owner was told: {told}", flush=True)
        if sentinel_member.conn is not None and sentinel_member.welcomed_at is not None:
            await leave(sentinel_member, fl.WAIT)
        print(f"    churn: {r['churn_joins']} joins and {r['churn_leaves']} leaves in {r['churn_seconds']} s "
              f"({sum(r['churn_refused'].values())} refused"
              f"{': ' + str(r['churn_refused']) if r['churn_refused'] else ''}; "
              f"join p50 {r['churn_join_p50_ms']} ms, p99 {r['churn_join_p99_ms']} ms); {window_writes} session "
              f"writes (A, B: {r['churn_writes_by_instance']}) = {r['churn_writes_per_s']}/s, at most "
              f"{r['churn_burst_versions']} in 1 s ({len(seen)} versions seen by the listener; "
              f"{scraped} by the scrapes; after the first 10 s {r['churn_writes_per_s_after_10s']}/s, at most "
              f"{r['churn_burst_after_10s']} in 1 s); {r['churn_commit_calls']} Commit calls; at the end "
              f"{len(connected)} connected and the document "
              + ("lists exactly them" if r["churn_doc_matches"] else f"does not: {r.get('churn_doc_diff')}")
              + f"; the owner heard {r['churn_heard_joined']}/{r['churn_expected_joined']} member_joined, "
              f"{r['churn_heard_left']}/{r['churn_expected_left']} member_left", flush=True)
    finally:
        scraping = False
        if sampler is not None and not sampler.done():
            sampler.cancel()
        versions.stop()
        for member in live.values():
            if member.reader is not None:
                member.reader.cancel()
            if member.conn is not None:
                member.conn.abort()
        await owner.close()


# -- a run, the report -------------------------------------------------------------------------
def checks(r: dict[str, Any], options: Any) -> list[str]:
    """What a run got wrong (empty: nothing)."""
    n = options.members
    wrong = []
    if "error" in r:
        wrong.append(f"failed: {r['error']}")
    if r.get("join_welcomed", n) != n:
        wrong.append(f"join storm: {r.get('join_welcomed')} of {n} welcomed ({r.get('join_refused')})")
    if r.get("join_doc_exact") is False or r.get("join_doc_still_exact") is False:
        wrong.append(f"join storm: the document does not list exactly the members welcomed, each once "
                     f"({r.get('join_doc_listed')} listed: {r.get('join_doc_diff')}; 2 s later "
                     f"{'exact' if r.get('join_doc_still_exact') else 'not exact'})")
    for kind in ("joined", "left"):
        if r.get(f"{kind}_missing") or r.get(f"{kind}_twice_or_more"):
            wrong.append(f"member_{kind} at the owner: {r[f'{kind}_missing']} never, "
                         f"{r[f'{kind}_twice_or_more']} more than once")
    if r.get("leave_doc_empty") is False:
        wrong.append(f"leave storm: the document still lists {r.get('leave_doc_listed')}")
    if r.get("churn_doc_matches") is False:
        wrong.append(f"churn: the document does not match the connected members ({r.get('churn_doc_diff')})")
    if r.get("churn_heard_unlike"):
        wrong.append(f"churn: the owner heard {r['churn_heard_unlike']} member(s)' joins or leaves not once each")
    if r.get("churn_refused"):
        wrong.append(f"churn: refused {r['churn_refused']}")
    for key in ("churn_heard_joined", "churn_heard_left"):
        expected = r.get(key.replace("heard", "expected"))
        if key in r and r[key] != expected:
            wrong.append(f"churn: the owner heard {r[key]} {key.split('_')[-1]} of {expected}")
    if r.get("owner_closed") is not None:
        wrong.append(f"the storm's owner was closed with {r['owner_closed']}")
    return wrong


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores, every process), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def code(project: Path) -> str:
    """The commit checked out in `project` and a digest of the service's sources as they are on disk (other
    work may be changing them between runs)."""
    digest = hashlib.sha256()
    for path in sorted([*project.glob("canary/*.py"), project / "gunicorn.conf.py", project / "wsgi.py"]):
        with contextlib.suppress(OSError):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    head = subprocess.run(["git", "-C", str(project), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, timeout=30, check=False).stdout.strip() or "?"
    return f"commit {head}, sources sha256 {digest.hexdigest()[:12]}"


def snapshot(project: Path, into: Path) -> Path:
    """A copy of the service's sources in `project` (canary/, wsgi.py, gunicorn.conf.py, pyproject.toml), so
    that every run measures the same code while others edit the tree."""
    into.mkdir()
    shutil.copytree(project / "canary", into / "canary", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("wsgi.py", "gunicorn.conf.py", "pyproject.toml"):
        shutil.copy2(project / name, into / name)
    return into


def run(number: int, options: Any, log_dir: Path) -> dict[str, Any]:
    r: dict[str, Any] = {"run": number, "code": code(options.project) if options.no_snapshot else options.code}
    run_dir = log_dir / f"run-{number}"
    run_dir.mkdir()
    seed = options.seed if options.seed is not None else random.randrange(1 << 30)
    r["seed"] = seed
    deployment = None
    began = time.monotonic()
    busy, own = machine_busy(), time.process_time()
    try:
        deployment = Deployment(run_dir, options)
        a, b = deployment.servers
        print(f"\nrun {number}: {deployment.emulator.kind} emulator 127.0.0.1:{deployment.emulator.port}; "
              f"A 127.0.0.1:{a.port} (workers {a.workers}), B 127.0.0.1:{b.port} (workers {b.workers}), each "
              f"through its own proxy (100 streams per connection); churn seed {seed}; started in "
              f"{time.monotonic() - began:.1f} s; {fl.load_average()}; {r['code']}", flush=True)
        asyncio.run(storms(deployment, options, r))
        if options.churn_seconds > 0:
            asyncio.run(churn(deployment, options, random.Random(seed), r))
    except (BenchError, OSError, ProxyError, Closed, Refused, TimeoutError) as e:
        r["error"] = f"{type(e).__name__}: {e}"
        print(f"    failed: {r['error']}", flush=True)
    finally:
        if deployment is not None:
            lines = deployment.log_lines()
            # Whose CPU the run's wall time was: this benchmark's processes, or other work on the machine.
            ours = deployment.cpu_seconds() + time.process_time() - own
            used = machine_busy() - busy
            elapsed = time.monotonic() - began
            r["cpu"] = {"machine": round(used, 1), "ours": round(ours, 1), "others": round(max(0.0, used - ours), 1),
                        "elapsed": round(elapsed, 1)}
            print(f"    CPU over the run's {elapsed:.0f} s: the machine {used:.0f} core-s of "
                  f"{elapsed * (os.cpu_count() or 1):.0f}, this benchmark's processes {ours:.0f}, other work "
                  f"{max(0.0, used - ours):.0f}", flush=True)
            deployment.stop()
            r["log_lines"] = {name: len(found) for name, found in lines.items()}
            for name, found in lines.items():
                if found:
                    print(f"    instance {name}: {len(found)} log line(s); the first ones:", flush=True)
                    for line in found[:options.log_lines]:
                        print(f"      {line[:300]}", flush=True)
    r["problems"] = checks(r, options)
    for problem in r["problems"]:
        print(f"    PROBLEM: {problem}", flush=True)
    print(f"    run {number} took {time.monotonic() - began:.1f} s; {fl.load_average()}", flush=True)
    return r


#: The report's rows: (label, the result's keys shown in it; `cell`).
ROWS: list[tuple[str, str]] = [
    ("join: admitted (101) / welcomed", "join_admitted join_welcomed"),
    ("join: refused", "join_refused#"),
    ("join: request → session_joined p50 ms", "join_p50_ms"),
    ("join: p99 ms", "join_p99_ms"),
    ("join: max ms", "join_max_ms"),
    ("join: last welcome s", "join_last_welcome_s"),
    ("join: document lists exactly the welcomed, once", "join_doc_exact"),
    ("join: ... after s", "join_doc_s"),
    ("join: ... and still 2 s later", "join_doc_still_exact"),
    ("join: member_joined once / never / more", "joined_once joined_missing joined_twice_or_more"),
    ("join: Commit calls (all calls)", "join_commit_calls join_all_calls"),
    ("join: session writes (A+B)", "join_session_writes"),
    ("join: presence commits", "join_presence_commits"),
    ("leave: connections ended", "leave_ended"),
    ("leave: last connection ended s", "leave_last_end_s"),
    ("leave: document lists nobody after s", "leave_doc_s"),
    ("leave: member_left once / never / more", "left_once left_missing left_twice_or_more"),
    ("leave: Commit calls (all calls)", "leave_commit_calls leave_all_calls"),
    ("leave: session writes (A+B)", "leave_session_writes"),
    ("leave: presence commits", "leave_presence_commits"),
    ("churn: joins / leaves in the window", "churn_joins churn_leaves"),
    ("churn: refused", "churn_refused#"),
    ("churn: session writes in the window", "churn_writes"),
    ("churn: session writes per s", "churn_writes_per_s"),
    ("churn: ... per s after the first 10 s (listener)", "churn_writes_per_s_after_10s"),
    ("churn: most in any 1 s (listener)", "churn_burst_versions"),
    ("churn: most in a 1 s of scrapes", "churn_burst_scraped"),
    ("churn: most in any 1 s after the first 10 s", "churn_burst_after_10s"),
    ("churn: presence commits", "churn_presence_commits"),
    ("churn: document = connected at the end", "churn_doc_matches"),
    ("churn: owner heard joins / leaves once", "churn_heard_ok"),
]


def cell(r: dict[str, Any], keys: str) -> Any:
    """A run's value for a row: a number, a bool, or several numbers joined by ' / '."""
    if keys == "churn_heard_ok":
        if "churn_heard_joined" not in r:
            return None
        return (r["churn_heard_joined"] == r["churn_expected_joined"]
                and r["churn_heard_left"] == r["churn_expected_left"])
    if keys.endswith("#"):
        found = r.get(keys[:-1])
        return None if found is None else sum(found.values())
    values = [r.get(k) for k in keys.split()]
    return values[0] if len(values) == 1 else values


def show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, list):
        return " / ".join(show(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def median(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    if not present:
        return None
    if isinstance(present[0], bool):
        return f"{sum(present)}/{len(values)} yes"
    if isinstance(present[0], list):
        return [median([v[i] for v in present if v[i] is not None]) for i in range(len(present[0]))]
    return statistics.median(present)


def report(results: list[dict[str, Any]], options: Any) -> None:
    headers = ["", *(f"run {r['run']}" for r in results)] + (["median"] if len(results) > 1 else [])
    rows = []
    for label, keys in ROWS:
        values = [cell(r, keys) for r in results]
        row = [label, *(show(v) for v in values)]
        if len(results) > 1:
            row.append(show(median(values)))
        rows.append(row)
    notes = []
    for r in results:
        details = [f"join refusals {r['join_refused']}" if r.get("join_refused") else "",
                   f"connections per worker (A1, A2, B1, B2) {r.get('spread_before')} before the join storm, "
                   f"{r.get('spread')} after it (the owner's: {r.get('owner_worker')}, counting from 0)",
                   f"session writes by instance (A, B): join {r.get('join_session_writes_by_instance')}, "
                   f"leave {r.get('leave_session_writes_by_instance')}, churn {r.get('churn_writes_by_instance')}",
                   f"leave close codes {r.get('leave_close_codes')}",
                   f"churn: {r.get('churn_versions_seen')} versions seen, join p50/p99 "
                   f"{r.get('churn_join_p50_ms')}/{r.get('churn_join_p99_ms')} ms, {r.get('churn_connected_at_end')} "
                   f"connected at the end, owner heard {r.get('churn_heard_joined')}/{r.get('churn_expected_joined')} "
                   f"joins and {r.get('churn_heard_left')}/{r.get('churn_expected_left')} leaves",
                   f"instance log lines {r.get('log_lines')}", f"CPU core-s {r.get('cpu')}", f"seed {r.get('seed')}",
                   r["code"]]
        notes.append(f"  run {r['run']}: " + "; ".join(d for d in details if d))
        notes += [f"  run {r['run']}: PROBLEM: {p}" for p in r["problems"]]
    print_table(
        f"One session over four processes: {options.members} joins alternately to 2 instances x {WORKERS} workers "
        f"(Firestore emulator, each instance behind the 100-stream proxy), then all leave; then "
        f"{options.churn_members} members churning for {options.churn_seconds:g} s. Times from the first request "
        f"(join) or close frame (leave); medians of the runs",
        headers, rows, notes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="runs, each on a fresh deployment (default 1)")
    parser.add_argument("--members", type=int, default=1000, help="members of the join storm (default 1000)")
    parser.add_argument("--churn-members", type=int, default=100, help="members churning (default 100)")
    parser.add_argument("--churn-seconds", type=float, default=60.0,
                        help="how long they churn (default 60 s; 0 skips the churn)")
    parser.add_argument("--timeout", type=float, default=120.0, help="longest wait of each phase (default 120 s)")
    parser.add_argument("--seed", type=int, default=None, help="the churn's random seed (default: a new one)")
    parser.add_argument("--log-lines", type=int, default=10, help="log lines printed per instance (default 10)")
    parser.add_argument("--project", type=Path, default=ROOT,
                        help="the tree whose gunicorn.conf.py/wsgi.py is started (default: this repository)")
    parser.add_argument("--launcher", type=Path, default=None,
                        help="an npm emulator launcher (default: the tests' emulator, Google's where installed)")
    parser.add_argument("--no-snapshot", action="store_true",
                        help="run the service from --project itself, not from a copy made at the start")
    parser.add_argument("--keep-logs", action="store_true", help="keep the logs of what was started")
    options = parser.parse_args()
    options.project = options.project.resolve()
    if options.launcher is not None:
        options.launcher = options.launcher.resolve()
    if options.runs < 1 or options.members < 1 or options.churn_members < 2:
        parser.error("--runs and --members take 1 or more, --churn-members 2 or more")
    if missing := fl.npm_emulator_missing(options):
        print(missing, file=sys.stderr)
        return 2
    cleared = [name for name in CLEARED if os.environ.pop(name, None) is not None]

    limit = options.runs * (5 * options.timeout + options.churn_seconds + 4 * SENTINEL_WAIT + 240)
    began = time.monotonic()
    log_dir = fl.begin("Canary Collab: one session over four processes", limit, "canary-storm-deployment-")
    if cleared:
        print(f"  left at their defaults (unset here): {', '.join(cleared)}")
    options.code = code(options.project)
    if not options.no_snapshot:
        source = options.project
        options.project = snapshot(source, log_dir / "service")
        print(f"  the service: {source} ({options.code}), copied to {options.project} for every run")
    else:
        print(f"  the service: {options.project} ({options.code} at the start; it may change between runs)")
    results: list[dict[str, Any]] = []
    ok = False
    try:
        for number in range(1, options.runs + 1):
            results.append(run(number, options, log_dir))
        ok = all(not r["problems"] for r in results)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
    finally:
        fl.finish(log_dir, ok, options.keep_logs)
    if results:
        report(results, options)
    print(f"\ntotal {time.monotonic() - began:.1f} s; {fl.load_average()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
