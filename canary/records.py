"""What the service keeps in the store, and every change to it.

* `sessions/{id}`: the document other Canary services read (`owner`, `batchID`,
  `projectID`, `members`, `lastUpdated`), plus `ownerLeftAt` while the owner is
  away. `lastUpdated` only grows (one microsecond past the previous value even
  when a writer's clock lags), so processes following the document can tell a
  stale snapshot from a new one.
* `sessionLocks/{batchID}`: makes "one live session per batch" atomic.
* `sessionPresence/{sessionID}_{userID}`: which process holds each client (and
  which of its connections), or since when it is away and until when it may
  come back.
* `collabProcesses/{id}`: each process's lease. A process that stops renewing
  it (killed) or expires it (restarting) has lost its clients: any live process
  then marks them away, and removes them once their grace is over.

Uniqueness is decided by existence preconditions written first in each commit
(atomic on Firestore and on the bundled emulator). Every membership change of
a session (a join, a leave, the owner's presence, the clean-up of absent
clients, the end) goes through that session's `_Writer`, which applies all the
changes queued while its previous transaction ran in the next one (group
commit): a storm of N joins costs a handful of commits, not N, and no two
transactions of this process contend for the session document.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple
from urllib.parse import quote

from .errors import Refusal
from .store import (
    PROCESSES,
    SESSION_LOCKS,
    SESSION_PRESENCE,
    SESSIONS,
    USERS,
    Data,
    Store,
    StoreError,
    Transaction,
    auto_id,
)

log = logging.getLogger(__name__)

OWNER = "owner"
MEMBER = "member"

#: At most this many changes in one commit (Firestore allows 500 writes; a change writes at most one
#: presence document, and the session document is written once per commit).
MAX_CHANGES_PER_COMMIT = 200


def presence_id(session_id: str, user_id: str) -> str:
    """The presence document of a user in a session (user IDs may hold any character)."""
    return f"{session_id}_{quote(user_id, safe='')}"


class Member(NamedTuple):
    id: str
    email: str


@dataclass(frozen=True)
class SessionState:
    """A session as a create, join or resume left it."""

    session_id: str
    batch_id: str
    owner: Member
    members: tuple[Member, ...]
    version: datetime
    owner_away: bool = False
    resumed: bool = False
    #: The connection this admission recorded in the user's presence ("" when it recorded none).
    connection: str = ""
    #: Created through the web app's REST API: it lives until its owner stops it.
    persistent: bool = False
    project_id: str = ""

    @property
    def owner_id(self) -> str:
        return self.owner.id

    @property
    def member_ids(self) -> tuple[str, ...]:
        return tuple(m.id for m in self.members)

    @classmethod
    def of(cls, session_id: str, doc: Data, *, resumed: bool = False, connection: str = "") -> SessionState:
        return cls(session_id, doc["batchID"], Member(doc["owner"]["id"], doc["owner"].get("email", "")),
                   tuple(Member(m["id"], m.get("email", "")) for m in doc.get("members", [])),
                   doc["lastUpdated"], doc.get("ownerLeftAt") is not None, resumed, connection,
                   bool(doc.get("persistent")), doc.get("projectID", ""))


#: Whether this process holds a live connection with that ID (or is admitting it right now).
HoldsConnection = Callable[[str], bool]


class SessionRecords:
    """The store side of sessions, for the process `process_id`.

    `holds` tells whether a connection recorded as this process's is still
    live here: a client whose previous connection is closed or closing is not
    refused as "already connected".
    """

    def __init__(self, store: Store, process_id: str, clock: Callable[[], datetime],
                 holds: HoldsConnection = lambda _connection: True,
                 on_commit: Callable[[int, int], None] = lambda _changes, _writes: None) -> None:
        self._store = store
        self.on_commit = on_commit  # called with the changes and the documents written of each commit
        self.process_id = process_id
        self._clock = clock
        self._holds = holds
        self._writers: dict[str, _Writer] = {}
        self._writers_lock = threading.Lock()
        self._leased = False  # this process has renewed its lease at least once
        self.commits = 0  # membership transactions committed by this process
        self.changes = 0  # the changes they carried

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

    def _submit(self, session_id: str, change: _Change) -> Any:
        """Apply `change` to the session through its writer; its result (or raise what it raised)."""
        return self._submit_all(session_id, [change])[0].outcome()

    def _submit_all(self, session_id: str, changes: list[_Change]) -> list[_Ticket]:
        with self._writers_lock:
            writer = self._writers.get(session_id)
            if writer is None:
                writer = self._writers[session_id] = _Writer(self, session_id)
            writer.users += 1
        try:
            return writer.submit(changes)
        finally:
            with self._writers_lock:
                writer.users -= 1
                if not writer.users:
                    del self._writers[session_id]

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
            if connected:
                t.set(SESSION_PRESENCE, presence_id(session_id, owner_id),
                      self.here(session_id, owner_id, OWNER, connection))

        self._store.transaction(create)
        return SessionState.of(session_id, doc, connection=connection)

    def resume_owner(self, batch_id: str, owner_id: str, connection: str | None = None) -> SessionState | None:
        """Give the batch's live session back to its owner, on `connection` (a new one if None), if the owner's
        socket is gone."""
        lock = self._store.get(SESSION_LOCKS, batch_id)
        if lock is None:
            return None
        return self._submit(lock["sessionID"], _ResumeOwner(owner_id, connection or auto_id()))

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
        its place back.

        Without `email`, the user's is read (for every join of a commit at once).
        With `pending` (a web-app join, before any socket), the member is listed
        but not connected: it is removed if no socket of its attaches within
        `pending`.
        """
        return self._submit(session_id, _Join(user_id, email, "" if pending else connection or auto_id(), pending))

    def attach(self, session_id: str, user_id: str, role: str, issued_at: datetime,
               connection: str | None = None) -> SessionState:
        """A web-app socket of a listed user on `connection` (a new one if None), with a session token issued
        at `issued_at`."""
        return self._submit(session_id, _Attach(user_id, role, connection or auto_id(), issued_at))

    def kick(self, session_id: str, caller: str, member_id: str) -> datetime:
        """The owner `caller` removes `member_id`; tokens issued before now no longer attach it."""
        return self._submit(session_id, _Kick(caller, member_id))

    def stop(self, session_id: str, caller: str) -> None:
        """The owner `caller` ends the session."""
        self._submit(session_id, _Stop(caller))

    def connected(self, session_id: str, user_id: str) -> bool:
        """Whether a live process holds a socket of that user in that session (read now, no lock)."""
        presence = self._store.get(SESSION_PRESENCE, presence_id(session_id, user_id))
        return _live(self, presence, lambda process: (self._store.get(PROCESSES, process) or {}).get("leaseUntil"))

    def leave(self, session_id: str, user_id: str, connection: str) -> datetime | None:
        """Remove a member whose `connection` ended; the new version, or None if nothing changed.

        A member whose presence names another connection came back meanwhile
        (on this process or another) and is left alone.
        """
        return self._submit(session_id, _Leave(user_id, connection))

    def owner_left(self, session_id: str, owner_id: str, connection: str, grace_seconds: float) -> OwnerLeft:
        """The owner's `connection` ended: keep the session for `grace_seconds`, or end it if 0."""
        return self._submit(session_id, _OwnerLeaves(owner_id, connection, grace_seconds))

    def end(self, session_id: str) -> None:
        """Delete the session, its lock and its presence documents."""
        self._submit(session_id, _End())

    # -- process leases and clean-up -------------------------------------------------
    def renew_lease(self, seconds: float) -> bool:
        """Say this process is alive for `seconds` more; True if its lease had run out meanwhile (a stall:
        other processes may have taken its clients for gone, see `reassert`)."""
        now = self._clock()

        def renew(t: Transaction) -> bool:
            lease = (t.get(PROCESSES, self.process_id) or {}).get("leaseUntil")
            t.set(PROCESSES, self.process_id, {"leaseUntil": now + timedelta(seconds=seconds), "renewedAt": now})
            lapsed = self._leased and not (isinstance(lease, datetime) and lease > now)
            return lapsed

        lapsed = self._store.transaction(renew)
        self._leased = True
        return lapsed

    def _forget_process(self, process_id: str, now: datetime) -> None:
        """Delete a dead process's lease, unless it renewed it meanwhile (it had only stalled)."""
        def forget(t: Transaction) -> None:
            lease = (t.get(PROCESSES, process_id) or {}).get("leaseUntil")
            if isinstance(lease, datetime) and lease <= now:
                t.delete(PROCESSES, process_id)

        self._store.transaction(forget)

    def reassert(self, session_id: str, user_id: str, role: str, connection: str) -> None:
        """This process still holds that client: undo its being taken for away while this process's lease
        had run out (unless it came back elsewhere, or was removed meanwhile)."""
        self._submit(session_id, _Reassert(user_id, role, connection))

    def expire_lease(self) -> None:
        """This process is stopping: its clients are away from now on."""
        now = self._clock()
        self._store.set(PROCESSES, self.process_id, {"leaseUntil": now, "renewedAt": now, "stopping": True})

    def reap(self, owner_grace: float, reconnect_grace: float) -> None:
        """One clean-up pass, safe to run in every process at once.

        Clients of processes whose lease ran out become away (an owner gets the
        longer of the two graces); away clients whose grace is over are removed,
        and an owner's removal ends its session. Each step re-reads the presence
        in its commit, so a client that came back meanwhile is left alone.
        """
        now = self._clock()
        for process in self._store.documents(PROCESSES):
            lease = process.data.get("leaseUntil")
            if process.id == self.process_id or not isinstance(lease, datetime) or lease > now:
                continue
            marks: dict[str, list[_Change]] = {}
            for presence in self._store.query(SESSION_PRESENCE, "process", process.id):
                data = presence.data
                if not data.get("away"):
                    grace = max(owner_grace, reconnect_grace) if data["role"] == OWNER else reconnect_grace
                    marks.setdefault(data["sessionID"], []).append(
                        _MarkAway(data["userID"], process.id, lease, lease + timedelta(seconds=grace)))
            self._apply_all(marks)
            self._forget_process(process.id, now)
        expiries: dict[str, list[_Change]] = {}
        for presence in self._store.query(SESSION_PRESENCE, "away", True):
            data = presence.data
            until = data.get("graceUntil")
            if isinstance(until, datetime) and until <= now:
                if data["role"] == OWNER:
                    log.info("the owner of session %s did not come back: ending it", data["sessionID"])
                else:
                    log.info("member %r of session %s did not come back: removing it", data["userID"],
                             data["sessionID"])
                expiries.setdefault(data["sessionID"], []).append(_Expire(data["userID"], until, data["role"] == OWNER))
        self._apply_all(expiries)

    def _apply_all(self, changes: dict[str, list[_Change]]) -> None:
        """Apply each session's changes together (a commit per session, not per change); a session whose
        commit fails does not stop the others (the next pass retries them)."""
        failed = None
        for session_id, of_session in changes.items():
            for ticket in self._submit_all(session_id, of_session):
                if ticket.error is not None:
                    failed = ticket.error
        if failed is not None:
            raise failed  # before the caller goes on as if these were done (e.g. forgets a dead process)


class OwnerLeft(NamedTuple):
    """What the owner's departure did: `ended` the session, or left it waiting (`version`)."""

    ended: bool
    version: datetime | None


# -- group commit ------------------------------------------------------------------------------

class _Batch:
    """One commit's view of a session: read once, changed by each change in turn, written once."""

    def __init__(self, records: SessionRecords, session_id: str, doc: Data | None,
                 presence: dict[str, Data | None], leases: dict[str, Any], lock: Data | None) -> None:
        self.records = records
        self.session_id = session_id
        self.doc = doc
        self.presence = presence
        self._leases = leases
        #: The batch's lock, deleted with the session if it is this session's.
        self._lock = (doc["batchID"], lock) if doc is not None and lock is not None else None
        self._fields: set[str] = set()
        self._presence_changed: set[str] = set()
        self.ended = False

    # reads
    def members(self) -> list[Data]:
        assert self.doc is not None
        return self.doc.get("members", [])

    def is_member(self, user_id: str) -> bool:
        return any(m["id"] == user_id for m in self.members())

    def connected(self, user_id: str) -> bool:
        """Whether a live connection (of a live process, this one included) holds that user."""
        return _live(self.records, self.presence.get(user_id), self._leases.get)

    # changes
    def update(self, **fields: Any) -> datetime:
        """Change fields of the session document and bump `lastUpdated`; the new version."""
        assert self.doc is not None
        self.doc.update(fields)
        self.doc["lastUpdated"] = self.records.bump(self.doc["lastUpdated"])
        self._fields.update(fields, ("lastUpdated",))
        return self.doc["lastUpdated"]

    def remove_member(self, user_id: str) -> datetime:
        """Take `user_id` out of `members`; the new version."""
        return self.update(members=[m for m in self.members() if m["id"] != user_id])

    def set_presence(self, user_id: str, data: Data | None) -> None:
        self.presence[user_id] = data
        self._presence_changed.add(user_id)

    def end(self) -> None:
        self.doc = None
        self.ended = True

    def write(self, t: Transaction, presence_ids: Iterable[str]) -> int:
        """Write what the changes did; how many documents that writes."""
        sid = self.session_id
        writes: list[tuple[str, str, Data | None]] = []  # (collection, document, data; None: delete)
        if self.ended:
            writes.append((SESSIONS, sid, None))
            if self._lock is not None and self._lock[1].get("sessionID") == sid:
                writes.append((SESSION_LOCKS, self._lock[0], None))
            for doc_id in {*presence_ids, *(presence_id(sid, u) for u in self.presence)}:
                writes.append((SESSION_PRESENCE, doc_id, None))
        else:
            if self._fields and self.doc is not None:  # first: on the bundled emulator a commit is not atomic
                t.update(SESSIONS, sid, {name: self.doc[name] for name in self._fields})
            for user_id in self._presence_changed:
                writes.append((SESSION_PRESENCE, presence_id(sid, user_id), self.presence[user_id]))
        for collection, doc_id, data in writes:
            if data is None:
                t.delete(collection, doc_id)
            else:
                t.set(collection, doc_id, data)
        return len(writes) + (1 if self._fields and not self.ended else 0)


@dataclass
class _Change:
    """One membership change: the users whose presence it reads (given the session document), and what it
    does to a `_Batch`."""

    def users(self, doc: Data | None) -> tuple[str, ...]:
        return ()

    #: Whether it may end the session (its presence documents are then looked up first).
    may_end = False

    def apply(self, batch: _Batch) -> Any:
        raise NotImplementedError


@dataclass
class _Join(_Change):
    user_id: str
    email: str | None  # None: read by the commit
    connection: str  # "" with `pending`
    pending: timedelta | None = None

    def users(self, doc: Data | None) -> tuple[str, ...]:
        # Only a member's presence matters (is it connected elsewhere?): a new member's is not read,
        # except by a web-app join, which keeps the record of an earlier removal.
        listed = doc is not None and any(m["id"] == self.user_id for m in doc.get("members", []))
        return (self.user_id,) if listed or self.pending else ()

    def apply(self, batch: _Batch) -> SessionState:
        sid, uid = batch.session_id, self.user_id
        if batch.doc is None:
            raise Refusal(404, "Session not found" if self.pending else f"session {sid!r} not found")
        if batch.doc["owner"]["id"] == uid:
            raise Refusal(409, f"{uid!r} owns this session")
        listed = batch.is_member(uid)
        if listed and batch.connected(uid):
            raise Refusal(409, "User is already in session" if self.pending else f"{uid!r} is already in this session")
        if self.pending:
            now = batch.records.now()
            kicked = (batch.presence.get(uid) or {}).get("kickedAt")
            batch.set_presence(uid, {**batch.records.here(sid, uid, MEMBER, ""), "process": None, "away": True,
                                     "awaySince": now, "graceUntil": now + self.pending, "kickedAt": kicked})
        else:
            batch.set_presence(uid, batch.records.here(sid, uid, MEMBER, self.connection))
        if listed:
            return SessionState.of(sid, batch.doc, resumed=True, connection=self.connection)
        batch.update(members=[*batch.members(), {"id": uid, "email": self.email or ""}])
        return SessionState.of(sid, batch.doc, connection=self.connection)


@dataclass
class _Attach(_Change):
    """A web-app socket: the session, the owner and the member are checked against the store again."""

    user_id: str
    role: str
    connection: str
    issued_at: datetime

    def users(self, doc: Data | None) -> tuple[str, ...]:
        return (self.user_id,)

    def apply(self, batch: _Batch) -> SessionState:
        sid, uid = batch.session_id, self.user_id
        if batch.doc is None:
            raise Refusal(404, "session not found")
        owner = batch.doc["owner"]["id"]
        presence = batch.presence.get(uid) or {}
        if self.role == OWNER:
            if owner != uid:
                raise Refusal(403, "only the session's owner can open /ws/create")
        elif owner == uid:
            raise Refusal(403, "this is the owner's session: open /ws/create")
        elif not batch.is_member(uid):
            raise Refusal(403, "not a member of this session: join it first")
        elif isinstance(kicked := presence.get("kickedAt"), datetime) and self.issued_at <= kicked:
            raise Refusal(403, "removed from this session by its owner")
        if batch.connected(uid):
            raise Refusal(409, "already connected to this session")
        batch.set_presence(uid, {**batch.records.here(sid, uid, self.role, self.connection),
                                 "kickedAt": presence.get("kickedAt")})
        if self.role == OWNER and batch.doc.get("ownerLeftAt") is not None:
            batch.update(ownerLeftAt=None)
        return SessionState.of(sid, batch.doc, resumed=True, connection=self.connection)


@dataclass
class _Kick(_Change):
    caller: str
    member_id: str

    def users(self, doc: Data | None) -> tuple[str, ...]:
        return (self.member_id,)

    def apply(self, batch: _Batch) -> datetime:
        if batch.doc is None:
            raise Refusal(404, "Session not found")
        if batch.doc["owner"]["id"] != self.caller:
            raise Refusal(403, "Only the session owner can remove members")
        if self.member_id == self.caller:
            raise Refusal(400, "Owner cannot be removed from session")
        if not batch.is_member(self.member_id):
            raise Refusal(404, "Member not found in session")
        now = batch.records.now()
        batch.set_presence(self.member_id, {
            **batch.records.here(batch.session_id, self.member_id, MEMBER, ""), "process": None, "away": True,
            "awaySince": now, "kickedAt": now})
        return batch.remove_member(self.member_id)


@dataclass
class _Stop(_Change):
    caller: str
    may_end = True

    def apply(self, batch: _Batch) -> None:
        if batch.doc is None:
            raise Refusal(404, "Session not found")
        if batch.doc["owner"]["id"] != self.caller:
            raise Refusal(403, "Only the session owner can stop the session")
        batch.end()


@dataclass
class _ResumeOwner(_Change):
    owner_id: str
    connection: str

    def users(self, doc: Data | None) -> tuple[str, ...]:
        return (self.owner_id,)

    def apply(self, batch: _Batch) -> SessionState | None:
        if batch.doc is None or batch.doc["owner"]["id"] != self.owner_id or batch.connected(self.owner_id):
            return None
        batch.update(ownerLeftAt=None)
        batch.set_presence(self.owner_id, batch.records.here(batch.session_id, self.owner_id, OWNER,
                                                             self.connection))
        return SessionState.of(batch.session_id, batch.doc, resumed=True, connection=self.connection)


def _live(records: SessionRecords, presence: Data | None, lease_of: Callable[[str], Any]) -> bool:
    """Whether `presence` names a live connection: one this process still holds, or one of another process
    whose lease (`lease_of` its ID) has not run out."""
    if presence is None or presence.get("away"):
        return False
    if presence.get("process") == records.process_id:
        return records._holds(presence.get("connection", ""))
    lease = lease_of(presence.get("process", ""))
    return isinstance(lease, datetime) and lease > records.now()


def _holds(batch: _Batch, user_id: str, connection: str) -> bool:
    """Whether the user's presence still names `connection` (not a newer one)."""
    presence = batch.presence.get(user_id)
    return presence is None or presence.get("connection", connection) == connection


@dataclass
class _Leave(_Change):
    user_id: str
    connection: str

    def users(self, doc: Data | None) -> tuple[str, ...]:
        return (self.user_id,)

    def apply(self, batch: _Batch) -> datetime | None:
        if not _holds(batch, self.user_id, self.connection):
            return None  # it came back on another connection
        if batch.presence.get(self.user_id) is not None:
            batch.set_presence(self.user_id, None)
        if batch.doc is None or not batch.is_member(self.user_id):
            return None
        return batch.remove_member(self.user_id)


@dataclass
class _OwnerLeaves(_Change):
    owner_id: str
    connection: str
    grace_seconds: float

    @property
    def may_end(self) -> bool:
        return self.grace_seconds <= 0  # with a grace, the session waits for its owner

    def users(self, doc: Data | None) -> tuple[str, ...]:
        return (self.owner_id,)

    def apply(self, batch: _Batch) -> OwnerLeft:
        if not _holds(batch, self.owner_id, self.connection):
            return OwnerLeft(False, None)  # it came back on another connection
        if batch.doc is None:
            return OwnerLeft(True, None)  # the session is gone already: it is over here too
        persistent = bool(batch.doc.get("persistent"))
        if self.grace_seconds <= 0 and not persistent:
            batch.end()
            return OwnerLeft(True, None)
        now = batch.records.now()
        # A persistent session waits for its owner until it is stopped: no grace runs out.
        until = None if persistent else now + timedelta(seconds=self.grace_seconds)
        batch.set_presence(self.owner_id, {
            **batch.records.here(batch.session_id, self.owner_id, OWNER, self.connection),
            "away": True, "awaySince": now, "graceUntil": until})
        return OwnerLeft(False, batch.update(ownerLeftAt=now))


@dataclass
class _Reassert(_Change):
    user_id: str
    role: str
    connection: str

    def users(self, doc: Data | None) -> tuple[str, ...]:
        return (self.user_id,)

    def apply(self, batch: _Batch) -> None:
        presence = batch.presence.get(self.user_id)
        if batch.doc is None or not _holds(batch, self.user_id, self.connection):
            return
        if self.role == MEMBER and not batch.is_member(self.user_id):
            return  # removed meanwhile: the session's snapshot tells this process
        if presence is None or presence.get("away"):
            batch.set_presence(self.user_id, batch.records.here(batch.session_id, self.user_id, self.role,
                                                                self.connection))
        if self.role == OWNER and batch.doc.get("ownerLeftAt") is not None:
            batch.update(ownerLeftAt=None)


@dataclass
class _End(_Change):
    may_end = True

    def apply(self, batch: _Batch) -> None:
        if batch.doc is not None:
            batch.end()


@dataclass
class _MarkAway(_Change):
    """A client of a process that died or stopped: away since `since`, back by `until` or removed."""

    user_id: str
    process_id: str
    since: datetime
    until: datetime

    def users(self, doc: Data | None) -> tuple[str, ...]:
        return (self.user_id,)

    def apply(self, batch: _Batch) -> None:
        presence = batch.presence.get(self.user_id)
        if presence is None or presence.get("away") or presence.get("process") != self.process_id:
            return  # reconnected meanwhile
        if batch.connected(self.user_id):
            return  # its process renewed its lease meanwhile (it had only stalled): it still holds the client
        owner = presence["role"] == OWNER
        persistent = batch.doc is not None and bool(batch.doc.get("persistent"))
        batch.set_presence(self.user_id, {**presence, "away": True, "awaySince": self.since,
                                          "graceUntil": None if owner and persistent else self.until})
        if owner and batch.doc is not None:
            batch.update(ownerLeftAt=self.since)


@dataclass
class _Expire(_Change):
    """An away client whose grace (`until`) is over: removed (an owner ends its session)."""

    user_id: str
    until: datetime
    owner: bool

    @property
    def may_end(self) -> bool:
        return self.owner

    def users(self, doc: Data | None) -> tuple[str, ...]:
        return (self.user_id,)

    def apply(self, batch: _Batch) -> None:
        presence = batch.presence.get(self.user_id)
        if presence is None or presence.get("graceUntil") != self.until:
            return  # came back, or another process removed it first
        if self.owner:
            if batch.doc is not None:
                batch.end()
            else:
                batch.set_presence(self.user_id, None)
            return
        batch.set_presence(self.user_id, None)
        if batch.doc is not None and batch.is_member(self.user_id):
            batch.remove_member(self.user_id)


@dataclass(eq=False)  # compared by identity: field by field, it compared the changes too
class _Ticket:
    change: _Change
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False  # this ticket's caller commits the next batch
    finished: bool = False
    result: Any = None
    error: BaseException | None = None

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


class _Writer:
    """Applies the membership changes of one session, many per transaction (group commit).

    The caller whose change finds the writer idle commits it and everything
    queued while that commit runs, batch after batch, until its own is done;
    then it hands the writer to the next waiting caller. So one transaction at
    a time per session per process, each carrying every change that arrived
    while the previous one ran.
    """

    def __init__(self, records: SessionRecords, session_id: str) -> None:
        self._records = records
        self._session_id = session_id
        self._lock = threading.Lock()
        self._queue: list[_Ticket] = []
        self._busy = False
        self.users = 0  # callers inside `submit` (SessionRecords drops an unused writer)

    def submit(self, changes: list[_Change]) -> list[_Ticket]:
        """Apply `changes` (in this order, possibly with others'), once each is committed; their tickets."""
        mine = [_Ticket(change) for change in changes]
        with self._lock:
            self._queue.extend(mine)
            lead = not self._busy
            self._busy = True
        try:
            for ticket in mine:
                while not ticket.finished:
                    if lead:
                        with self._lock:
                            batch = self._queue[:MAX_CHANGES_PER_COMMIT]
                            del self._queue[:MAX_CHANGES_PER_COMMIT]
                        try:
                            self._commit(batch)
                        finally:
                            for other in batch:
                                if not other.finished:  # the commit was cut short (this caller was killed)
                                    other.error, other.finished = StoreError("the membership commit stopped"), True
                                other.done.set()
                    else:
                        ticket.done.wait()
                        ticket.done.clear()
                        lead = ticket.lead and not ticket.finished
        finally:
            with self._lock:
                for ticket in mine:
                    if not ticket.finished and ticket in self._queue:
                        self._queue.remove(ticket)  # its caller is gone (killed while waiting)
                if lead or any(ticket.lead for ticket in mine):
                    if self._queue:
                        self._queue[0].lead = True
                        self._queue[0].done.set()
                    else:
                        self._busy = False
        return mine

    def _commit(self, tickets: list[_Ticket]) -> None:
        records, sid = self._records, self._session_id
        store = records._store
        may_end = any(ticket.change.may_end for ticket in tickets)
        writes = 0
        try:
            unknown = [t.change for t in tickets if isinstance(t.change, _Join) and t.change.email is None]
            if unknown:
                emails = records.emails(change.user_id for change in unknown)
                for change in unknown:
                    change.email = emails[change.user_id]
            presence_ids = [d.id for d in store.query(SESSION_PRESENCE, "sessionID", sid)] if may_end else []

            def run(t: Transaction) -> list[tuple[Any, BaseException | None]]:
                # Every read comes before every write, as Firestore's transactions require.
                doc = t.get(SESSIONS, sid)
                users = sorted({u for ticket in tickets for u in ticket.change.users(doc)})
                read = t.get_many(SESSION_PRESENCE, [presence_id(sid, u) for u in users])
                presence = {u: read[presence_id(sid, u)] for u in users}
                others = {p["process"] for p in presence.values()
                          if p and not p.get("away") and p.get("process") not in (None, records.process_id)}
                leases = {pid: (d or {}).get("leaseUntil") for pid, d in t.get_many(PROCESSES, sorted(others)).items()}
                lock = t.get(SESSION_LOCKS, doc["batchID"]) if may_end and doc is not None else None
                batch = _Batch(records, sid, doc, presence, leases, lock)
                outcomes: list[tuple[Any, BaseException | None]] = []
                for ticket in tickets:
                    try:
                        outcomes.append((ticket.change.apply(batch), None))
                    except Refusal as e:
                        outcomes.append((None, e))
                nonlocal writes
                writes = batch.write(t, presence_ids)
                return outcomes

            outcomes = store.transaction(run)
        except Exception as e:  # every change of the commit failed with it
            if not isinstance(e, StoreError):
                log.exception("membership commit of session %s failed", sid)
            outcomes = [(None, e)] * len(tickets)
            committed = False
        else:
            committed = True
            records.commits += 1
            records.changes += len(tickets)
        for ticket, (result, error) in zip(tickets, outcomes, strict=True):
            ticket.result, ticket.error, ticket.finished = result, error, True
        if committed:
            try:
                records.on_commit(len(tickets), writes)
            except Exception:  # counting it must not undo what was committed
                log.exception("the commit of session %s was not counted", sid)
