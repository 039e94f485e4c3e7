"""Benchmark: a join storm, N members joining one session at once, then leaving at once.

Run as ``.venv/bin/python bench/storm.py`` (``make bench-storm``; ``--help`` for the options). For each store
(Firestore, then the memory store) it starts one instance of the service (gunicorn's gevent worker,
``WEB_CONCURRENCY=1``, dev API on) and, on Firestore, a fresh emulator (the tests' choice: Google's where
installed, else the npm one; tests/emulators.py) with the tests' counting gRPC proxy between them (100
concurrent streams per connection, calls counted by method; bench/proxy_process.py).
An owner creates the session; then:

* join storm: N TCP connections are opened, then all N upgrade requests
  (``/sessions/<id>/join?userID=...``) are written at once, from one asyncio loop: the time from the first
  request to the last 101, refusals (by status), the time until every member has its ``session_joined`` and
  until the session document lists all of them (polled: Firestore straight from the emulator, the memory
  store through the dev API); the Firestore calls the proxy forwarded meanwhile (``Commit`` first), and the
  CPU of the worker (and of the emulator) from the first request until the document lists everyone;
* leave storm: every member sends its close frame at once: the time until the last connection ends and until
  the session document lists nobody, the calls, the CPU.

Every wait is bounded (``--timeout`` per phase; a watchdog kills what was started if anything hangs); every
process started is stopped at the end, also on Ctrl-C; only 127.0.0.1 is spoken to.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import firestore_latency as fl
from fanout import BenchError, cpu_seconds
from firestore_latency import ROOT, Emulator, Server, firestore_db, print_table, stop
from proxy_process import ProxyError, ProxyProcess
from wsclient import Closed, Connection, Refused, close_frame

#: Seconds after the store has converged during which late calls are still counted.
SETTLE = 1.0


class Members:
    """How many members the session document lists, read from the store the service uses."""

    def __init__(self, server: Server, sid: str, db: Any = None) -> None:
        self.server, self.sid, self.db = server, sid, db

    def count(self) -> int | None:
        """Members listed (None: no session document)."""
        if self.db is not None:
            snapshot = self.db.collection("sessions").document(self.sid).get(timeout=10)
            data = snapshot.to_dict() if snapshot.exists else None
        else:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.server.port}/dev/documents/sessions/{self.sid}",
                                            timeout=10) as r:
                    data = json.loads(r.read())
            except urllib.error.HTTPError as e:
                if e.code != 404:
                    raise
                data = None
        return None if data is None else len(data.get("members", []))


async def poll(read: Callable[[], int | None], done: Callable[[int | None], bool], deadline: float,
               interval: float) -> tuple[float | None, int | str | None]:
    """Read `read()` every `interval` s until `done(value)`: (perf_counter when it was or None, the last value
    read: None if the document did not exist, a string if it could not be read)."""
    value: int | str | None = "never read"
    while time.monotonic() < deadline:
        try:
            value = await asyncio.wait_for(asyncio.to_thread(read), max(0.1, deadline - time.monotonic()))
        except Exception as e:  # a slow or failing read is retried until the deadline
            value = f"read failed: {type(e).__name__}"
            await asyncio.sleep(interval)
            continue
        if done(value):
            return time.perf_counter(), value
        await asyncio.sleep(interval)
    return None, value


class Member:
    def __init__(self, number: int) -> None:
        self.user = f"storm-{number:05}"
        self.conn: Connection | None = None
        self.outcome = "not connected"
        self.refusal = b""  # the body of a refusal (its first 200 bytes)
        self.refused_at: float | None = None  # perf_counter when it was read
        self.welcomed_at: float | None = None
        self.ended_at: float | None = None
        self.reader: asyncio.Task[int] | None = None


async def admit(member: Member, deadline: float) -> None:
    """The 101 and the welcome (by `deadline`) of a member whose upgrade request is written; then read on
    until the end of the connection."""
    conn = member.conn
    assert conn is not None
    try:
        await conn.upgraded(max(0.01, deadline - time.monotonic()))
    except Refused as e:
        member.outcome = f"HTTP {e.status}"
        member.refusal = e.body[:200]
        member.refused_at = time.perf_counter()
        conn.abort()
        return
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
        member.outcome = "no answer" if isinstance(e, TimeoutError) else f"handshake failed ({type(e).__name__})"
        conn.abort()
        return
    try:
        welcome = await conn.message(max(0.01, deadline - time.monotonic()))
    except Closed as e:
        member.outcome = f"closed {e.code} before its welcome"
        return
    except TimeoutError:
        member.outcome = "no welcome"
        return
    member.outcome = welcome["type"] if welcome["type"] != "error" else f"error {welcome.get('code')}"
    if welcome["type"] == "session_joined":
        member.welcomed_at = time.perf_counter()

    async def until_end() -> int:
        read = await conn.discard()
        member.ended_at = time.perf_counter()
        return read

    member.reader = asyncio.create_task(until_end())


def seconds(at: float | None, since: float) -> str:
    return "-" if at is None else f"{at - since:.2f}"


async def storm(server: Server, store: str, options: Any, emulator: Emulator | None,
                proxy: ProxyProcess | None, db: Any) -> list[dict[str, Any]]:
    timeout = options.timeout
    batch, owner_id = server.batch(f"storm-{store}")
    owner = await Connection.open(server.port, f"/sessions/{batch}?userID={owner_id}", fl.WAIT)
    created = await owner.message(fl.WAIT)
    if created.get("type") != "session_created":
        raise BenchError(f"the owner got {created}")
    sid = created["sessionID"]
    owner_reader = asyncio.create_task(owner.discard())
    listed = Members(server, sid, db)

    def usage() -> dict[str, float]:
        figures = {"worker": cpu_seconds(server.worker)}
        if emulator is not None:
            figures["emulator"] = cpu_seconds(emulator.process.pid)
        if proxy is not None:
            figures["proxy"] = cpu_seconds(proxy.pid)
        return figures

    def calls() -> dict[str, int]:
        return proxy.by_method() if proxy is not None else {}

    rows: list[dict[str, Any]] = []
    members_n = options.members
    members = [Member(n) for n in range(members_n)]
    try:
        # -- joins: every TCP connection first, then every upgrade request at once -------------------
        async def connect(member: Member) -> None:
            try:
                member.conn = await Connection.connect(server.port, timeout)
            except (TimeoutError, OSError) as e:
                member.outcome = f"TCP connect failed ({type(e).__name__})"

        await asyncio.gather(*(connect(m) for m in members))
        connected = [m for m in members if m.conn is not None]
        if proxy is not None:
            proxy.reset()
        before = usage()
        first = time.perf_counter()
        for m in connected:
            assert m.conn is not None
            m.conn.request_upgrade(f"/sessions/{sid}/join?userID={m.user}")
        deadline = time.monotonic() + timeout
        await asyncio.gather(*(admit(m, deadline) for m in connected))
        admitted = [m for m in connected if m.conn is not None and m.conn.upgraded_at]
        welcomed = [m for m in admitted if m.welcomed_at is not None]
        want = len(welcomed)
        converged, seen = await poll(listed.count, lambda n: n is not None and n >= want, deadline,
                                     options.poll_interval)
        after = usage()
        await asyncio.sleep(SETTLE if proxy is not None else 0)
        joined_calls = calls()
        last_101 = max((m.conn.upgraded_at for m in admitted if m.conn), default=None)
        waits = [m.conn.upgraded_at - m.conn.requested_at for m in admitted if m.conn]
        outcomes = Counter(m.outcome for m in members if m.outcome != "session_joined")
        rows.append({
            "store": store, "phase": "join", "members": members_n, "done": len(welcomed),
            "refused": dict(outcomes), "last": seconds(last_101, first),
            "p50": f"{statistics.median(waits) * 1000:.0f}" if waits else "-",
            "welcomed": seconds(max((m.welcomed_at for m in welcomed), default=None), first),
            "converged": seconds(converged, first), "listed": seen,
            "calls": joined_calls, "cpu": {k: after[k] - before[k] for k in after},
        })
        print(f"    join storm: {len(admitted)} of {members_n} admitted (last 101 after {rows[-1]['last']} s), "
              f"{len(welcomed)} welcomed; the session document "
              + (f"listed them all after {rows[-1]['converged']} s" if converged is not None
                 else f"did not list them all within {timeout:g} s (it listed {seen})")
              + (f"; not admitted: {dict(outcomes)}" if outcomes else ""), flush=True)

        # -- leaves: every member's close frame at once ----------------------------------------------
        if proxy is not None:
            proxy.reset()
        # Only connections still open leave now (a service that closed some meanwhile, e.g. with 1013).
        still_open = [m for m in welcomed if m.ended_at is None]
        gone_before = len(welcomed) - len(still_open)
        before = usage()
        first = time.perf_counter()
        for m in still_open:
            assert m.conn is not None
            m.conn.send(close_frame(1000))
        deadline = time.monotonic() + timeout
        readers = [m.reader for m in still_open if m.reader is not None]
        if readers:
            await asyncio.wait(readers, timeout=max(0.01, deadline - time.monotonic()))
        ended = [m.ended_at for m in still_open if m.ended_at is not None]
        codes = Counter(str(m.conn.close_code) for m in welcomed if m.conn is not None)
        converged, seen = await poll(listed.count, lambda n: n == 0, deadline, options.poll_interval)
        after = usage()
        await asyncio.sleep(SETTLE if proxy is not None else 0)
        rows.append({
            "store": store, "phase": "leave", "members": len(still_open), "done": len(ended),
            "refused": {"ended before the leave": gone_before} if gone_before else {}, "codes": dict(codes),
            "last": seconds(max(ended, default=None), first),
            "p50": f"{(statistics.median(ended) - first) * 1000:.0f}" if ended else "-",
            "welcomed": "-", "converged": seconds(converged, first), "listed": seen,
            "calls": calls(), "cpu": {k: after[k] - before[k] for k in after},
        })
        print(f"    leave storm: {len(ended)} of {len(still_open)} connections ended (last after "
              f"{rows[-1]['last']} s); the session document "
              + (f"listed nobody after {rows[-1]['converged']} s" if converged is not None
                 else f"still listed {seen} member(s) after {timeout:g} s")
              + (f"; {gone_before} had ended before the leave" if gone_before else ""), flush=True)
    finally:
        for m in members:
            if m.reader is not None:
                m.reader.cancel()
            if m.conn is not None:
                m.conn.abort()
        owner.send(close_frame(1000))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(owner_reader, 5)
        owner.abort()
    return rows


def run_store(store: str, options: Any, log_dir: Path) -> list[dict[str, Any]]:
    emulator = proxy = server = db = None
    try:
        if store == "firestore":
            emulator = Emulator(log_dir, options.launcher, name="emulator-storm")
            proxy = ProxyProcess(emulator.host, log_dir)
            fl._started.append(proxy.process)
            db = firestore_db(emulator.host)
        server = Server(f"storm-{store}", log_dir, emulator, project=options.project,
                        firestore_host=proxy.host if proxy else None)
        print(f"  {store}: service 127.0.0.1:{server.port} (worker {server.worker})"
              + (f", {emulator.kind} emulator 127.0.0.1:{emulator.port}" if emulator else "")
              + (f", proxy 127.0.0.1:{proxy.port} (100 streams per connection)" if proxy else ""), flush=True)
        return asyncio.run(storm(server, store, options, emulator, proxy, db))
    except (BenchError, OSError, ProxyError, Closed, Refused, TimeoutError) as e:
        print(f"    failed: {e}", flush=True)
        return [{"store": store, "phase": "join", "members": options.members, "error": str(e) or type(e).__name__}]
    finally:
        if db is not None:
            with contextlib.suppress(Exception):
                db.close()
        if server is not None:
            server.stop()
        if proxy is not None:
            proxy.stop()
        if emulator is not None:
            stop(emulator.process, 10)


def report(rows: list[dict[str, Any]], options: Any) -> None:
    table = []
    notes = []
    for r in rows:
        if "error" in r:
            notes.append(f"  {r['store']}: failed: {r['error']}")
            continue
        calls = r["calls"]
        cpu = r["cpu"]
        table.append([
            r["store"], r["phase"], r["members"], r["done"], sum(r["refused"].values()) if r["refused"] else 0,
            r["last"], r["p50"], r["welcomed"], r["converged"],
            "no document" if r["listed"] is None else r["listed"],
            calls.get("Commit", "-") if calls else "-",
            sum(calls.values()) if calls else "-",
            f"{cpu['worker']:.2f}", f"{cpu['emulator']:.2f}" if "emulator" in cpu else "-",
            f"{cpu['proxy']:.2f}" if "proxy" in cpu else "-",
        ])
        if r["refused"]:
            notes.append(f"  {r['store']} {r['phase']}: "
                         f"{'not admitted' if r['phase'] == 'join' else 'not leaving'}: {r['refused']}")
        if r.get("codes"):
            notes.append(f"  {r['store']} {r['phase']}: the service's close codes: {r['codes']}")
        if r["converged"] == "-":
            notes.append(f"  {r['store']} {r['phase']}: the session document did not converge within --timeout "
                         f"{options.timeout:g} s (it listed {r['listed']}): the CPU and calls cover that whole wait")
        if calls:
            notes.append(f"  {r['store']} {r['phase']}: calls through the proxy: {calls}")
    print_table(
        f"Join and leave storms, {options.members} members at once on one session (service tree "
        f"{options.project}). Times in s from the first request (join) or close frame (leave); 'last' is the "
        "last 101 (join) or the last connection's end (leave), 'p50' the median request→101 / close→end in ms; "
        "'listed' what the session document lists at 'doc'; CPU from the first request until the document "
        "converged",
        ["store", "phase", "members", "done", "refused", "last", "p50 ms", "all welcomed", "doc", "listed",
         "Commit calls", "all calls", "worker CPU s", "emulator CPU s", "proxy CPU s"],
        table, notes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=1000, help="members joining at once (default 1000)")
    parser.add_argument("--stores", default="firestore,memory",
                        help="stores to run on, in order (default firestore,memory)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="longest wait for each phase (join, leave) on each store (default 120 s)")
    parser.add_argument("--poll-interval", type=float, default=0.05,
                        help="how often the session document is read while waiting for it (default 0.05 s)")
    parser.add_argument("--project", type=Path, default=ROOT,
                        help="the tree whose gunicorn.conf.py/wsgi.py is started (default: this repository)")
    parser.add_argument("--launcher", type=Path, default=None,
                        help="an npm emulator launcher, e.g. another tree's start.js (default: the tests' emulator, "
                             "Google's where installed, else this repository's tests/emulator/start.js)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the logs of what was started")
    options = parser.parse_args()
    options.project = options.project.resolve()
    if options.launcher is not None:
        options.launcher = options.launcher.resolve()
    stores = [s.strip() for s in options.stores.split(",") if s.strip()]
    if not stores or any(s not in ("firestore", "memory") for s in stores):
        parser.error("--stores takes firestore and/or memory")
    if "firestore" in stores and (missing := fl.npm_emulator_missing(options)):
        print(missing, file=sys.stderr)
        return 2

    limit = len(stores) * (3 * options.timeout + 120)
    began = time.monotonic()
    log_dir = fl.begin("Canary Collab join storm", limit, "canary-storm-")
    rows: list[dict[str, Any]] = []
    ok = False
    try:
        for store in stores:
            rows += run_store(store, options, log_dir)
        ok = bool(rows) and all("error" not in r for r in rows)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
    finally:
        fl.finish(log_dir, ok, options.keep_logs)
    if rows:
        report(rows, options)
    print(f"\ntotal {time.monotonic() - began:.1f} s; {fl.load_average()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
