"""What the service keeps in the store, and every change to it.

* `sessions/{id}`: the document other Canary services read (`owner`, `batchID`,
  `projectID`, `members`, `lastUpdated`), plus `ownerLeftAt` while the owner is
  away. `lastUpdated` only grows (one microsecond past the previous value even
  when a writer's clock lags), so processes following the document can tell a
  stale snapshot from a new one. Its `members` and `ownerLeftAt` are derived
  from the presences by the session's one writer (`session_writer.py`).
* `sessionLocks/{batchID}`: makes "one live session per batch" atomic.
* `sessionPresence/{sessionID}_{userID}`: the truth of membership: whether the
  user is listed (`listed`, with its `email` and `joinedAt`), which process
  holds its client (and which of its connections), or since when it is away and
  until when it may come back.
* `sessionWriters/{sessionID}`: the process that writes the session document.
* `collabProcesses/{id}`: each process's lease. A process that stops renewing
  it (killed) or expires it (restarting) has lost its clients: the writer of
  each of their sessions marks them away, and removes them once their grace is
  over.

Every change a process makes to the presences of one session goes through
that session's `Group` in this process, which applies the changes queued
while its previous transactions ran in the next one (group commit). Presences
are one document per user, so processes do not contend on them; the session
document is written by its writer alone, at most once per `commit_interval`.
A change that waits for the session document (a join, a kick) is answered
once the writer has folded it in, within `settle_seconds`, or refused with 503.
Uniqueness is decided by existence preconditions and by the presence's own
transaction (one connection per user and session).
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from .errors import Refusal
from .presence import (
    COMMITS_IN_FLIGHT,
    OWNER,
    Attach,
    Change,
    End,
    Expire,
    Group,
    HoldsConnection,
    Join,
    Kick,
    Leave,
    MarkAway,
    OwnerLeaves,
    Reassert,
    ResumeOwner,
    SessionState,
    Stop,
    Ticket,
    is_live,
)
from .session_writer import MEMBER, SessionWriter, presence_id
from .store import (
    PROCESSES,
    SESSION_LOCKS,
    SESSION_PRESENCE,
    SESSION_WRITERS,
    SESSIONS,
    USERS,
    Data,
    Store,
    StoreError,
    Transaction,
    auto_id,
)

log = logging.getLogger(__name__)

__all__ = ["MEMBER", "OWNER", "SessionRecords", "SessionState", "presence_id"]


class SessionRecords:
    """The store side of sessions, for the process `process_id`.

    `holds` tells whether a connection recorded as this process's is still
    live here: a client whose previous connection is closed or closing is not
    refused as "already connected". `spawn` runs a callable in the background
    (the default runs it at once, for tests without an event loop).
    """

    def __init__(self, store: Store, process_id: str, clock: Callable[[], datetime],
                 holds: HoldsConnection = lambda _connection: True,
                 on_commit: Callable[[int, int], None] = lambda _changes, _writes: None, *,
                 spawn: Callable[[Callable[[], None]], Any] = lambda fn: fn(),
                 commit_interval: float = 0.0, settle_seconds: float = 10.0, lease_seconds: float = 15.0,
                 commits_in_flight: int = COMMITS_IN_FLIGHT,
                 monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] | None = None) -> None:
        self._store = store
        self.on_commit = on_commit  # called with the changes and the documents written of each commit
        self.on_session_commit: Callable[[], None] = lambda: None  # each write of a session document
        self.process_id = process_id
        self._clock = clock
        self._holds = holds
        self._spawn = spawn
        self._commit_interval = commit_interval
        self._settle_seconds = settle_seconds
        self._lease_seconds = lease_seconds
        self._commits_in_flight = commits_in_flight
        self._monotonic = monotonic
        # Looked up when called, not when this module was imported: under gevent, the patched sleep.
        self._sleep = sleep or (lambda seconds: time.sleep(seconds))
        self._groups: dict[str, Group] = {}
        self._groups_lock = threading.Lock()
        self._written: dict[str, SessionWriter] = {}  # the sessions this process writes
        self._written_lock = threading.Lock()
        self._claim_lock = threading.Lock()
        self._asking: dict[str, list[Any]] = {}  # per session: the lock of its writer lookups, and their callers
        self._asking_lock = threading.Lock()
        self._elsewhere: dict[str, float] = {}  # sessions another live process writes: when that was seen
        self._followed: dict[str, _Followed] = {}  # session documents awaited by callers here
        self._followed_lock = threading.Lock()
        self._leases: dict[str, Data] = {}  # every process's lease, as last read
        self._renewed: datetime | None = None  # this process's lease runs until then
        self._unrecorded: list[tuple[str, Change]] = []  # changes whose commit failed: retried
        self.commits = 0  # presence transactions committed by this process
        self.changes = 0  # the changes they carried
        self.session_commits = 0  # session documents written by this process

    # -- helpers ---------------------------------------------------------------
    def bump(self, previous: Any) -> datetime:
        """A `lastUpdated` later than `previous`, even if this process's clock lags."""
        now = self._clock()
        if isinstance(previous, datetime) and previous >= now:
            return previous + timedelta(microseconds=1)
        return now

    def here(self, session_id: str, user_id: str, role: str, connection: str) -> Data:
        """The presence of a client this process holds."""
        return {"sessionID": session_id, "userID": user_id, "role": role, "process": self.process_id,
                "connection": connection, "away": False, "awaySince": None, "graceUntil": None}

    def now(self) -> datetime:
        return self._clock()

    def emails(self, user_ids: Iterable[str]) -> dict[str, str]:
        """Each user's e-mail from its `users` document ("" when unknown), in one read."""
        docs = self._store.get_many(USERS, sorted(set(user_ids)))
        return {uid: email if isinstance(email := (doc or {}).get("email"), str) else ""
                for uid, doc in docs.items()}

    def _submit(self, session_id: str, change: Change) -> Any:
        """Apply `change` to the session's presences; its result (or raise what it raised)."""
        return self._submit_all(session_id, [change])[0].outcome()

    def _submit_all(self, session_id: str, changes: list[Change]) -> list[Ticket]:
        with self._groups_lock:
            group = self._groups.get(session_id)
            if group is None:
                group = self._groups[session_id] = Group(self, session_id, self._commits_in_flight)
            group.users += 1
        try:
            tickets = group.submit(changes)
        finally:
            with self._groups_lock:
                group.users -= 1
                if not group.users:
                    del self._groups[session_id]
        self._fold_soon(session_id)
        return tickets

    def _recorded(self, session_id: str, presences: dict[str, Data | None]) -> None:
        """These presences (by user) were committed: the session's writer, if this process, folds them."""
        writer = self._written.get(session_id)
        if writer is not None:
            writer.written(presences)

    def session_gone(self, session_id: str) -> None:
        """The session ended (here, or its document is gone): its writer here, if any, steps down."""
        self._ended(session_id)

    def _ended(self, session_id: str) -> None:
        """This process ended the session: its writer here, if any, steps down."""
        writer = self._written.get(session_id)
        if writer is not None:
            self._resigned(writer, "gone")

    def _fold_soon(self, session_id: str) -> None:
        """After a change: the session's writer folds it soon (this process, taking the role if nobody live
        has it, or the writer's own listener tells it)."""
        writer = self._written.get(session_id)
        if writer is None:
            try:
                writer = self.writer_of(session_id)
            except StoreError as e:  # the writer's listener, or the next clean-up pass, sees to it
                log.warning("could not check who writes session %s: %s", session_id, e)
        if writer is not None:
            writer.drain_soon()

    # -- the session's writer --------------------------------------------------------
    def _alive(self, process_id: str, *, fresh: bool = False) -> bool:
        """Whether `process_id`'s lease runs: a lease read earlier that still runs is taken as it is, any
        other answer is read again (unless it was just read)."""
        if process_id == self.process_id:
            return True

        def runs() -> bool:
            lease = self._leases.get(process_id, {}).get("leaseUntil")
            return isinstance(lease, datetime) and lease > self._clock()

        if fresh or not runs():
            self._leases[process_id] = self._store.get(PROCESSES, process_id) or {}
        return runs()

    def process_alive(self, process_id: str, *, read: bool = True) -> bool:
        """Whether `process_id`'s lease runs (this process's does). With `read`, a lease not known to run is read
        again; without, the leases as last read (`reap`, every lease/3) are trusted and nothing is read: a
        process not read yet is taken for alive."""
        if read:
            return self._alive(process_id)
        lease = self._leases.get(process_id)
        until = lease.get("leaseUntil") if lease is not None else None
        return process_id == self.process_id or not isinstance(until, datetime) or until > self._clock()

    def writer_of(self, session_id: str, *, fresh: bool = False) -> SessionWriter | None:
        """This process's writer of the session if this process writes it, taking the role when no live
        process has it; None when another live process writes it, or the session does not exist."""
        writer = self._written.get(session_id)
        if writer is not None or (not fresh and self._writes_elsewhere(session_id)):
            return writer
        with self._asking_lock:
            asking = self._asking.setdefault(session_id, [threading.Lock(), 0])
            asking[1] += 1
        try:
            with asking[0]:  # one lookup at a time per session: a storm's callers share its answer
                writer = self._written.get(session_id)
                if writer is not None or (not fresh and self._writes_elsewhere(session_id)):
                    return writer
                return self._look_up_writer(session_id, fresh)
        finally:
            with self._asking_lock:
                asking[1] -= 1
                if not asking[1]:
                    del self._asking[session_id]

    def _writes_elsewhere(self, session_id: str) -> bool:
        """Whether a live process was seen writing the session less than a second ago."""
        seen = self._elsewhere.get(session_id)
        return seen is not None and self._monotonic() - seen < 1.0

    def _look_up_writer(self, session_id: str, fresh: bool) -> SessionWriter | None:
        role = self._store.get(SESSION_WRITERS, session_id)
        if role is not None and role.get("process") == self.process_id:  # since its creation here
            return self._start_writer(session_id, self._store.get(SESSIONS, session_id))
        if role is not None and self._alive(role.get("process", ""), fresh=fresh):
            self._elsewhere[session_id] = self._monotonic()
            return None
        with self._claim_lock:  # one claim at a time: this process's callers do not contend for it
            return self._written.get(session_id) or self._claim(session_id)

    def _claim(self, session_id: str) -> SessionWriter | None:

        doc = self._store.get(SESSIONS, session_id)  # not in the transaction: that would lock it
        if doc is None:
            return None

        def claim(t: Transaction) -> bool:
            role = t.get(SESSION_WRITERS, session_id)
            if role is not None and role.get("process") != self.process_id and \
                    self._alive(role.get("process", ""), fresh=True):
                return False
            t.set(SESSION_WRITERS, session_id, {"process": self.process_id, "sessionID": session_id,
                                                "since": self._clock()})
            return True

        return self._start_writer(session_id, doc) if self._store.transaction(claim) else None

    def _start_writer(self, session_id: str, doc: Data | None) -> SessionWriter | None:
        if doc is None:
            return None
        with self._written_lock:
            writer = self._written.get(session_id)
            if writer is not None:
                return writer
            writer = self._written[session_id] = SessionWriter(
                self, session_id, interval=self._commit_interval, spawn=self._spawn, monotonic=self._monotonic,
                sleep=self._sleep)
        log.info("this process now writes session %s", session_id)
        try:
            writer.start(m["id"] for m in doc.get("members", []))
        except StoreError as e:
            log.error("cannot follow the presences of session %s: %s", session_id, e)
        return writer

    def _resigned(self, writer: SessionWriter, why: str) -> None:
        """`writer`'s session ended ("gone"), or another process took the role over ("lost")."""
        with self._written_lock:
            if self._written.get(writer.session_id) is writer:
                del self._written[writer.session_id]
        writer.stop()
        if why == "lost":
            log.warning("another process took over writing session %s (this one stalled or is stopping)",
                        writer.session_id)

    def _settle(self, session_id: str, done: Callable[[Data | None], bool], started: float) -> Data | None:
        """The session document once `done` holds for it (None: the session is gone), after its writer folded
        what this process recorded; raises `Refusal` 503 when that is not so `settle_seconds` after
        `started` (a `monotonic` time: the whole request gets one deadline)."""
        deadline = started + self._settle_seconds
        with self._followed_lock:
            followed = self._followed.get(session_id)
            if followed is None:
                followed = self._followed[session_id] = _Followed()
            followed.users += 1
        try:
            writer = self.writer_of(session_id)
            while True:
                if writer is not None:  # this process writes it: fold now (within the pace); what it wrote
                    try:
                        writer.flush()
                        doc = writer.document
                        if doc is None or writer.stopped:  # nothing folded here yet, or it stepped down
                            doc = self._store.get(SESSIONS, session_id)
                        seen = True
                    except StoreError as e:  # its drain retries it; this caller waits within its deadline
                        log.warning("could not write session %s yet: %s", session_id, e)
                        writer.drain_soon()
                        seen, doc = False, None
                else:  # another process writes it: its snapshots tell (no read per caller)
                    if followed.watch is None:
                        followed.follow(self._store, session_id)
                    seen, doc = followed.latest()
                if seen and done(doc):
                    return doc
                remaining = deadline - self._monotonic()
                if remaining <= 0:
                    raise Refusal(503, "the session is busy; try again in a moment",
                                  headers={"Retry-After": "2"})
                if followed.watch is None:
                    followed.follow(self._store, session_id)
                followed.wait(min(remaining, 1.0))
                if writer is None and followed.check_due(self._monotonic()):  # is its writer still there?
                    writer = self.writer_of(session_id, fresh=True)  # (one caller a second asks)
        finally:
            with self._followed_lock:
                followed.users -= 1
                if not followed.users:
                    del self._followed[session_id]
                    followed.stop()

    # -- sessions ----------------------------------------------------------------
    def create(self, batch_id: str, project_id: str, owner_id: str, email: str, *, connection: str | None = None,
               persistent: bool = False, password_hash: str | None = None) -> SessionState:
        """Write a new session and, unless `connection` is "" (nobody connected), its owner's presence on
        `connection` (a new one if None); raises `AlreadyExists` if the batch has one. A `persistent` session
        lives until it is stopped; one created with nobody connected starts with its owner away."""
        session_id = auto_id()
        connection = auto_id() if connection is None else connection
        connected = bool(connection)
        now = self._clock()
        doc: Data = {"owner": {"id": owner_id, "email": email}, "batchID": batch_id, "projectID": project_id,
                     "members": [], "lastUpdated": now}
        if persistent:
            doc["persistent"] = True
        if password_hash:
            doc["password"] = password_hash
        if not connected:
            doc["ownerLeftAt"] = now

        def create(t: Transaction) -> None:
            # The lock's existence precondition decides the race between creates. It is the
            # commit's first write: the bundled emulator applies a commit's writes one by one
            # and stops at the failing one, instead of all-or-nothing.
            t.create(SESSION_LOCKS, batch_id, {"sessionID": session_id, "createdAt": now})
            t.create(SESSIONS, session_id, doc)
            t.set(SESSION_WRITERS, session_id, {"process": self.process_id, "sessionID": session_id, "since": now})
            if connected:
                t.set(SESSION_PRESENCE, presence_id(session_id, owner_id),
                      self.here(session_id, owner_id, OWNER, connection))

        self._store.transaction(create)
        self._start_writer(session_id, doc)
        return SessionState.of(session_id, doc, connection=connection)

    def resume_owner(self, batch_id: str, owner_id: str, connection: str | None = None) -> SessionState | None:
        """Give the batch's live session back to its owner, on `connection` (a new one if None), if the owner's
        socket is gone."""
        lock = self._store.get(SESSION_LOCKS, batch_id)
        if lock is None:
            return None
        return self._submit(lock["sessionID"], ResumeOwner(owner_id, connection or auto_id()))

    def clear_stale_lock(self, batch_id: str) -> bool:
        """Remove the batch's lock if its session no longer exists; True if the way is free."""
        def clear(t: Transaction) -> bool:
            lock = t.get(SESSION_LOCKS, batch_id)
            if lock is None:
                return True
            if t.get(SESSIONS, lock.get("sessionID", "")) is not None:
                return False
            t.delete(SESSION_LOCKS, batch_id)
            return True

        return self._store.transaction(clear)

    def join(self, session_id: str, user_id: str, email: str | None = None, *, connection: str | None = None,
             pending: timedelta | None = None) -> SessionState:
        """Add a member on `connection` (a new one if None), or give a member whose socket is gone (a restart)
        its place back; answered once the session document lists it.

        Without `email`, the user's is read (for every join of a commit at once).
        With `pending` (a web-app join, before any socket), the member is listed
        but not connected: it is removed if no socket of its attaches within
        `pending`.
        """
        started = self._monotonic()
        connection = "" if pending else connection or auto_id()
        resumed = self._submit(session_id, Join(user_id, email, connection, pending))
        try:
            doc = self._settle(session_id, lambda d: d is None or any(m["id"] == user_id for m in d["members"]),
                               started)
        except (Refusal, StoreError):
            self._undo(session_id, user_id, connection)
            raise
        if doc is None:
            raise Refusal(404, "Session not found" if pending else f"session {session_id!r} not found")
        return SessionState.of(session_id, doc, resumed=resumed, connection=connection)

    def _undo(self, session_id: str, user_id: str, connection: str) -> None:
        """Take back a join that was not answered in time (retried until it is recorded)."""
        try:
            self.leave(session_id, user_id, connection)
        except StoreError as e:
            log.warning("could not take back the join of %r to %s yet (retried): %s", user_id, session_id, e)

    def attach(self, session_id: str, user_id: str, role: str, issued_at: datetime,
               connection: str | None = None) -> SessionState:
        """A web-app socket of a listed user on `connection` (a new one if None), with a session token issued
        at `issued_at`."""
        return self._submit(session_id, Attach(user_id, role, connection or auto_id(), issued_at))

    def kick(self, session_id: str, caller: str, member_id: str) -> None:
        """The owner `caller` removes `member_id` (answered once the session document no longer lists it);
        tokens issued before now no longer attach it."""
        started = self._monotonic()
        self._submit(session_id, Kick(caller, member_id))
        self._settle(session_id, lambda d: d is None or all(m["id"] != member_id for m in d["members"]), started)

    def stop(self, session_id: str, caller: str) -> None:
        """The owner `caller` ends the session."""
        self._submit(session_id, Stop(caller))

    def connected(self, session_id: str, user_id: str) -> bool:
        """Whether a live process holds a socket of that user in that session (read now, no lock)."""
        presence = self._store.get(SESSION_PRESENCE, presence_id(session_id, user_id))
        return is_live(self, presence, lambda process: (self._store.get(PROCESSES, process) or {}).get("leaseUntil"))

    def _record(self, session_id: str, change: Change) -> Any:
        """Apply a change that nobody waits for; one whose commit fails is retried (`retry_unrecorded`)."""
        try:
            return self._submit(session_id, change)
        except StoreError:
            self._unrecorded.append((session_id, change))
            raise

    def retry_unrecorded(self) -> None:
        """Apply again the changes whose commit failed (raises the first that fails again; it is kept)."""
        pending, self._unrecorded = self._unrecorded, []
        for i, (session_id, change) in enumerate(pending):
            try:
                self._submit(session_id, change)
            except StoreError:
                self._unrecorded.extend(pending[i:])
                raise
            log.info("recorded at last a change of session %s: %s", session_id, type(change).__name__)

    def leave(self, session_id: str, user_id: str, connection: str) -> bool:
        """A member's `connection` ended: it is no longer listed (its writer folds that in); whether it was.

        A member whose presence names another connection came back meanwhile
        (on this process or another) and is left alone. A failed commit is
        retried until it is recorded.
        """
        return self._record(session_id, Leave(user_id, connection))

    def owner_left(self, session_id: str, owner_id: str, connection: str, grace_seconds: float) -> bool:
        """The owner's `connection` ended: keep the session for `grace_seconds`, or end it if 0; whether it
        ended."""
        return self._record(session_id, OwnerLeaves(owner_id, connection, grace_seconds))

    def end(self, session_id: str) -> None:
        """Delete the session, its lock, its writer and its presence documents."""
        self._submit(session_id, End())

    # -- process leases and clean-up -------------------------------------------------
    def renew_lease(self, seconds: float) -> bool:
        """Say this process is alive for `seconds` more; True if its lease had run out meanwhile (a stall:
        other processes may have taken its clients for gone, see `reassert`)."""
        now = self._clock()
        until = now + timedelta(seconds=seconds)
        self._store.set(PROCESSES, self.process_id, {"leaseUntil": until, "renewedAt": now})
        lapsed = self._renewed is not None and self._renewed <= now
        self._renewed = until
        return lapsed

    def reassert(self, clients: Iterable[tuple[str, str, str, str]]) -> None:
        """This process still holds these clients (session, user, role, connection): undo their being taken
        for away while this process's lease had run out (unless they came back elsewhere, or were removed
        meanwhile). One commit per session; a failed one is retried (`retry_unrecorded`)."""
        by_session: dict[str, list[Change]] = {}
        for session_id, user_id, role, connection in clients:
            by_session.setdefault(session_id, []).append(Reassert(user_id, role, connection))
        for session_id, changes in by_session.items():
            for ticket in self._submit_all(session_id, changes):
                if isinstance(ticket.error, StoreError):
                    self._unrecorded.append((session_id, ticket.change))

    def expire_lease(self) -> None:
        """This process is stopping: its clients are away from now on."""
        now = self._clock()
        self._store.set(PROCESSES, self.process_id, {"leaseUntil": now, "renewedAt": now, "stopping": True})

    def _chosen(self, key: str, live: list[str]) -> bool:
        """Whether this process, of the `live` ones, is the one to act for `key` (rendezvous hashing: every
        process that sees the same live processes makes the same choice)."""
        return max(live, key=lambda pid: (zlib.crc32(f"{key}/{pid}".encode()), pid)) == self.process_id

    def reap(self, owner_grace: float, reconnect_grace: float) -> None:
        """One clean-up pass, run by every process; each piece of work is done by one of them.

        The sessions written by a process that died or stopped, and those of its
        clients, get a new writer: the one live process that rendezvous hashing
        picks for the dead one. Then each process cleans up the sessions it
        writes (`tick`).
        """
        now = self._clock()
        self._elsewhere = {sid: seen for sid, seen in self._elsewhere.items() if self._monotonic() - seen < 1.0}
        self._leases = {doc.id: doc.data for doc in self._store.documents(PROCESSES)}
        live = sorted({pid for pid in self._leases if self._alive(pid)} | {self.process_id})
        failed: StoreError | None = None
        for pid in sorted(self._leases):
            if pid in live or not self._chosen(pid, live):
                continue
            try:
                sessions = {d.data.get("sessionID", "") for d in self._store.query(SESSION_WRITERS, "process", pid)}
                held = [d for d in self._store.query(SESSION_PRESENCE, "process", pid) if not d.data.get("away")]
                sessions |= {d.data["sessionID"] for d in held}
                for sid in sorted(sessions):
                    self.writer_of(sid, fresh=True)
                if not held and not sessions:
                    self._store.delete(PROCESSES, pid)  # nothing names it any more: forgotten
            except StoreError as e:
                failed = failed or e
        try:
            self.tick(owner_grace, reconnect_grace, now)
        except StoreError as e:
            failed = failed or e
        if failed is not None:
            raise failed

    def tick(self, owner_grace: float, reconnect_grace: float, now: datetime | None = None) -> None:
        """Clean up the sessions this process writes: clients of processes that died are away (a lease
        that ran out counts after a margin of one more lease, so a stall is not a death; a process that
        stopped, at once), and away clients whose grace is over are removed (an owner's removal ends its
        session). Each change re-checks what it read in its commit."""
        now = now or self._clock()
        margin = timedelta(seconds=self._lease_seconds)
        failed: StoreError | None = None
        for writer in list(self._written.values()):
            changes: list[Change] = []
            for p in writer.presences():
                process = p.get("process")
                if p.get("away") and process == self.process_id and self._holds(p.get("connection", "")):
                    changes.append(Reassert(p["userID"], p.get("role", MEMBER), p.get("connection", "")))
                elif not p.get("away"):
                    if not process or process == self.process_id:
                        continue
                    lease = self._leases.get(process)
                    if lease is None:
                        lease = self._leases[process] = self._store.get(PROCESSES, process) or {}
                    until = lease.get("leaseUntil")
                    if not isinstance(until, datetime):
                        since = now
                    elif lease.get("stopping"):
                        since = until
                    else:
                        since = until + margin
                    if since > now:
                        continue
                    grace = max(owner_grace, reconnect_grace) if p.get("role") == OWNER else reconnect_grace
                    changes.append(MarkAway(p["userID"], process, since, since + timedelta(seconds=grace)))
                elif isinstance(until := p.get("graceUntil"), datetime) and until <= now:
                    changes.append(Expire(p["userID"], until, p.get("role") == OWNER))
            if not changes:
                continue
            for ticket in self._submit_all(writer.session_id, changes):
                if isinstance(ticket.error, StoreError):
                    failed = failed or ticket.error
                elif isinstance(change := ticket.change, Expire) and ticket.result:
                    what = "ended it" if change.owner else "removed it"
                    log.info("%s %r of session %s did not come back within its grace: %s",
                             OWNER if change.owner else MEMBER, change.user_id, writer.session_id, what)
        if failed is not None:
            raise failed  # the next pass tries again

    def writers(self) -> list[str]:
        """The sessions this process writes."""
        return sorted(self._written)


class _Followed:
    """A session document awaited by callers of this process: one store watch, shared."""

    def __init__(self) -> None:
        self.users = 0
        self.watch: Any = None
        self._starting = threading.Lock()
        self._cond = threading.Condition()
        self._doc: Data | None = None
        self._seen = False
        self._checked = float("-inf")

    def follow(self, store: Store, session_id: str) -> None:
        """Start the watch, unless a caller did (starting one may yield to another caller)."""
        with self._starting:
            if self.watch is None:
                self.watch = store.watch_document(SESSIONS, session_id, self._deliver)

    def _deliver(self, doc: Data | None) -> None:
        with self._cond:
            self._doc, self._seen = doc, True
            self._cond.notify_all()

    def latest(self) -> tuple[bool, Data | None]:
        """Whether a snapshot has come, and the last one."""
        with self._cond:
            return self._seen, self._doc

    def check_due(self, now: float) -> bool:
        """True for the first caller each second: it checks the session's writer for all of them."""
        with self._cond:
            due = now - self._checked >= 1.0
            if due:
                self._checked = now
            return due

    def wait(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)

    def stop(self) -> None:
        if self.watch is not None:
            self.watch.stop()


