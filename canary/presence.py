"""Changes to the presences of one session, and their group commit in one process.

A presence (`sessionPresence/{sessionID}_{userID}`) is the truth of a user's
membership and connection: whether it is listed, which process and connection
hold it, or since when it is away and until when it may come back. Each change
here (a join, a leave, a kick, the owner's presence, the clean-up of absent
clients, the end) is a pure function of what its commit read (`Batch`), so a
retried transaction re-applies them all. Every change of a session made in this
process goes through that session's `Group`, which applies the changes queued
while its previous transactions ran in the next one (group commit, a few side by
side): a storm of N joins costs a handful of commits, not N. Presences are one document per user,
so processes do not contend on them; the session document itself is written by
its writer alone (`session_writer.py`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import Refusal
from .session_writer import MEMBER, listed, presence_id
from .store import PROCESSES, SESSION_LOCKS, SESSION_PRESENCE, SESSION_WRITERS, SESSIONS, Data, StoreError, Transaction

if TYPE_CHECKING:
    from .records import SessionRecords

log = logging.getLogger(__name__)

OWNER = "owner"

#: At most this many changes in one commit (Firestore allows 500 writes; a change writes at most one
#: presence document).
MAX_CHANGES_PER_COMMIT = 200

#: Commits of one session's presences that one process runs side by side.
COMMITS_IN_FLIGHT = 4


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
                   _members(doc.get("members", [])), doc["lastUpdated"], doc.get("ownerLeftAt") is not None,
                   resumed, connection, bool(doc.get("persistent")), doc.get("projectID", ""))


_last_members: tuple[list[Data], tuple[Member, ...]] = ([], ())


def _members(members: list[Data]) -> tuple[Member, ...]:
    """The members of a session document's `members` list; the last list's are kept, since a storm's
    callers are all answered from the same document (that list is never changed in place)."""
    global _last_members
    last, converted = _last_members
    if last is not members:
        converted = tuple(Member(m["id"], m.get("email", "")) for m in members)
        _last_members = (members, converted)
    return converted


#: Whether this process holds a live connection with that ID (or is admitting it right now).
HoldsConnection = Callable[[str], bool]


class Batch:
    """One commit's view of a session's presences: read once, changed by each change in turn, written once.
    `doc` is the session document as read just before (it only ever changes through the presences, but
    for an end, which reads it in the commit)."""

    def __init__(self, records: SessionRecords, session_id: str, doc: Data | None,
                 presence: dict[str, Data | None], leases: dict[str, Any], lock: Data | None) -> None:
        self.records = records
        self.session_id = session_id
        self.doc = doc
        self.presence = presence
        self._leases = leases
        #: The batch's lock, deleted with the session if it is this session's.
        self._lock = (doc["batchID"], lock) if doc is not None and lock is not None else None
        self.changed: set[str] = set()
        self.ended = False

    # reads
    def listed(self, user_id: str) -> bool:
        """Whether the user is a member (its presence says so; the session document follows)."""
        return listed(self.presence.get(user_id))

    def connected(self, user_id: str) -> bool:
        """Whether a live connection (of a live process, this one included) holds that user."""
        return is_live(self.records, self.presence.get(user_id), self._leases.get)

    def alive(self, process_id: Any) -> bool:
        """Whether the process `process_id` has a lease that runs."""
        lease = self._leases.get(process_id) if isinstance(process_id, str) else None
        return isinstance(lease, datetime) and lease > self.records.now()

    # changes
    def set_presence(self, user_id: str, data: Data | None) -> None:
        self.presence[user_id] = data
        self.changed.add(user_id)

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
            writes.append((SESSION_WRITERS, sid, None))
            for doc_id in {*presence_ids, *(presence_id(sid, u) for u in self.presence)}:
                writes.append((SESSION_PRESENCE, doc_id, None))
        else:
            for user_id in self.changed:
                writes.append((SESSION_PRESENCE, presence_id(sid, user_id), self.presence[user_id]))
        for collection, doc_id, data in writes:
            if data is None:
                t.delete(collection, doc_id)
            else:
                t.set(collection, doc_id, data)
        return len(writes)


@dataclass
class Change:
    """One change to a session's presences: the users whose presence it reads, and what it does to a
    `Batch`."""

    def users(self) -> tuple[str, ...]:
        return ()

    #: Whether it may end the session (its presence documents are then looked up first).
    may_end = False

    def apply(self, batch: Batch) -> Any:
        raise NotImplementedError


@dataclass
class Join(Change):
    """Returns whether the member was listed already (a resume)."""

    user_id: str
    email: str | None  # None: read by the commit
    connection: str  # "" with `pending`
    pending: timedelta | None = None

    def users(self) -> tuple[str, ...]:
        return (self.user_id,)

    def apply(self, batch: Batch) -> bool:
        sid, uid = batch.session_id, self.user_id
        if batch.doc is None:
            raise Refusal(404, "Session not found" if self.pending else f"session {sid!r} not found")
        if batch.doc["owner"]["id"] == uid:
            raise Refusal(409, f"{uid!r} owns this session")
        presence = batch.presence.get(uid) or {}
        was_listed = batch.listed(uid)
        if was_listed and batch.connected(uid):
            raise Refusal(409, "User is already in session" if self.pending else f"{uid!r} is already in this session")
        now = batch.records.now()
        member = {"listed": True, "email": presence.get("email", "") if was_listed else self.email or "",
                  "joinedAt": presence.get("joinedAt") if was_listed else now}
        if self.pending:
            batch.set_presence(uid, {**batch.records.here(sid, uid, MEMBER, ""), **member, "process": None,
                                     "away": True, "awaySince": now, "graceUntil": now + self.pending,
                                     "kickedAt": presence.get("kickedAt")})
        else:
            batch.set_presence(uid, {**batch.records.here(sid, uid, MEMBER, self.connection), **member})
        return was_listed


@dataclass
class Attach(Change):
    """A web-app socket: the session, the owner and the member are checked against the store again."""

    user_id: str
    role: str
    connection: str
    issued_at: datetime

    def users(self) -> tuple[str, ...]:
        return (self.user_id,)

    def apply(self, batch: Batch) -> SessionState:
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
        elif isinstance(kicked := presence.get("kickedAt"), datetime) and self.issued_at <= kicked:
            raise Refusal(403, "removed from this session by its owner")
        elif not batch.listed(uid):
            raise Refusal(403, "not a member of this session: join it first")
        if batch.connected(uid):
            raise Refusal(409, "already connected to this session")
        batch.set_presence(uid, {**presence, **batch.records.here(sid, uid, self.role, self.connection)})
        return SessionState.of(sid, batch.doc, resumed=True, connection=self.connection)


@dataclass
class Kick(Change):
    caller: str
    member_id: str

    def users(self) -> tuple[str, ...]:
        return (self.member_id,)

    def apply(self, batch: Batch) -> None:
        if batch.doc is None:
            raise Refusal(404, "Session not found")
        if batch.doc["owner"]["id"] != self.caller:
            raise Refusal(403, "Only the session owner can remove members")
        if self.member_id == self.caller:
            raise Refusal(400, "Owner cannot be removed from session")
        if not batch.listed(self.member_id):
            raise Refusal(404, "Member not found in session")
        now = batch.records.now()
        batch.set_presence(self.member_id, {
            **batch.records.here(batch.session_id, self.member_id, MEMBER, ""), "process": None, "away": True,
            "awaySince": now, "kickedAt": now, "listed": False})


@dataclass
class Stop(Change):
    caller: str
    may_end = True

    def apply(self, batch: Batch) -> None:
        if batch.doc is None:
            raise Refusal(404, "Session not found")
        if batch.doc["owner"]["id"] != self.caller:
            raise Refusal(403, "Only the session owner can stop the session")
        batch.end()


@dataclass
class ResumeOwner(Change):
    owner_id: str
    connection: str

    def users(self) -> tuple[str, ...]:
        return (self.owner_id,)

    def apply(self, batch: Batch) -> SessionState | None:
        if batch.doc is None or batch.doc["owner"]["id"] != self.owner_id or batch.connected(self.owner_id):
            return None
        batch.set_presence(self.owner_id, batch.records.here(batch.session_id, self.owner_id, OWNER,
                                                             self.connection))
        return SessionState.of(batch.session_id, batch.doc, resumed=True, connection=self.connection)


def is_live(records: SessionRecords, presence: Data | None, lease_of: Callable[[str], Any]) -> bool:
    """Whether `presence` names a live connection: one this process still holds, or one of another process
    whose lease (`lease_of` its ID) has not run out."""
    if presence is None or presence.get("away"):
        return False
    if presence.get("process") == records.process_id:
        return records._holds(presence.get("connection", ""))
    lease = lease_of(presence.get("process", ""))
    return isinstance(lease, datetime) and lease > records.now()


def _holds(batch: Batch, user_id: str, connection: str) -> bool:
    """Whether the user's presence still names `connection` (not a newer one)."""
    presence = batch.presence.get(user_id)
    return presence is None or presence.get("connection", connection) == connection


@dataclass
class Leave(Change):
    """Returns whether the member was listed."""

    user_id: str
    connection: str

    def users(self) -> tuple[str, ...]:
        return (self.user_id,)

    def apply(self, batch: Batch) -> bool:
        if not _holds(batch, self.user_id, self.connection):
            return False  # it came back on another connection
        was_listed = batch.listed(self.user_id)
        if batch.presence.get(self.user_id) is not None:
            batch.set_presence(self.user_id, None)
        return was_listed


@dataclass
class OwnerLeaves(Change):
    """Returns whether the session ended."""

    owner_id: str
    connection: str
    grace_seconds: float

    @property
    def may_end(self) -> bool:
        return self.grace_seconds <= 0  # with a grace, the session waits for its owner

    def users(self) -> tuple[str, ...]:
        return (self.owner_id,)

    def apply(self, batch: Batch) -> bool:
        if not _holds(batch, self.owner_id, self.connection):
            return False  # it came back on another connection
        if batch.doc is None:
            return True  # the session is gone already: it is over here too
        persistent = bool(batch.doc.get("persistent"))
        if self.grace_seconds <= 0 and not persistent:
            batch.end()
            return True
        now = batch.records.now()
        # A persistent session waits for its owner until it is stopped: no grace runs out.
        until = None if persistent else now + timedelta(seconds=self.grace_seconds)
        # No process holds it any more: its grace runs out whatever becomes of this process.
        batch.set_presence(self.owner_id, {
            **batch.records.here(batch.session_id, self.owner_id, OWNER, self.connection), "process": None,
            "away": True, "awaySince": now, "graceUntil": until})
        return False


@dataclass
class Reassert(Change):
    user_id: str
    role: str
    connection: str

    def users(self) -> tuple[str, ...]:
        return (self.user_id,)

    def apply(self, batch: Batch) -> None:
        presence = batch.presence.get(self.user_id)
        if batch.doc is None or not _holds(batch, self.user_id, self.connection):
            return
        if self.role == MEMBER and not batch.listed(self.user_id):
            return  # removed meanwhile: the session's snapshot tells this process
        if presence is None or presence.get("away"):
            batch.set_presence(self.user_id, {**(presence or {}), **batch.records.here(
                batch.session_id, self.user_id, self.role, self.connection)})


@dataclass
class End(Change):
    may_end = True

    def apply(self, batch: Batch) -> None:
        if batch.doc is not None:
            batch.end()


@dataclass
class MarkAway(Change):
    """A client of a process that died or stopped: away since `since`, back by `until` or removed."""

    user_id: str
    process_id: str
    since: datetime
    until: datetime

    def users(self) -> tuple[str, ...]:
        return (self.user_id,)

    def apply(self, batch: Batch) -> None:
        presence = batch.presence.get(self.user_id)
        if presence is None or presence.get("away") or presence.get("process") != self.process_id:
            return  # reconnected meanwhile
        if batch.connected(self.user_id):
            return  # its process renewed its lease meanwhile (it had only stalled): it still holds the client
        owner = presence["role"] == OWNER
        persistent = batch.doc is not None and bool(batch.doc.get("persistent"))
        batch.set_presence(self.user_id, {**presence, "away": True, "awaySince": self.since,
                                          "graceUntil": None if owner and persistent else self.until})


@dataclass
class Expire(Change):
    """An away client whose grace (`until`) is over: removed (an owner ends its session), unless the process
    that held it renewed its lease meanwhile (it had stalled, and says so again: `reassert`)."""

    user_id: str
    until: datetime
    owner: bool

    @property
    def may_end(self) -> bool:
        return self.owner

    def users(self) -> tuple[str, ...]:
        return (self.user_id,)

    def apply(self, batch: Batch) -> bool:
        """Whether it removed the client."""
        presence = batch.presence.get(self.user_id)
        if presence is None or presence.get("graceUntil") != self.until:
            return False  # came back, or another process removed it first
        process = presence.get("process")
        if process == batch.records.process_id:
            if batch.records._holds(presence.get("connection", "")):
                return False  # marked away while this process stalled: it still holds it (`tick` re-asserts)
        elif batch.alive(process):
            return False  # marked away while its process stalled; that process is back and re-asserts it
        if self.owner and batch.doc is not None:
            batch.end()
        else:
            batch.set_presence(self.user_id, None)
        return True


@dataclass(eq=False)  # compared by identity: field by field, it compared the changes too
class Ticket:
    change: Change
    finished: bool = False
    result: Any = None
    error: BaseException | None = None

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


class Group:
    """Applies the presence changes of one session made in this process, many per transaction (group
    commit).

    A caller commits the changes queued so far (its own among them) when fewer
    than `in_flight` commits of the session run in this process, and otherwise
    waits for one to end; so a storm's changes go in a few commits that run
    side by side, each carrying what arrived while the others ran. Presences
    are one document per user, so these commits do not contend. A user's
    changes are committed in the order they were made (a change waits while an
    earlier one of the same user is in flight or waiting), and a change that
    may end the session commits only when no other commit of the session runs
    here, and none starts until it is done.
    """

    def __init__(self, records: SessionRecords, session_id: str, in_flight: int = 1) -> None:
        self._records = records
        self._session_id = session_id
        self._in_flight = in_flight
        self._cond = threading.Condition()
        self._queue: list[Ticket] = []
        self._flying: list[list[Ticket]] = []  # the batches being committed
        self.users = 0  # callers inside `submit` (SessionRecords drops an unused group)

    def submit(self, changes: list[Change]) -> list[Ticket]:
        """Apply `changes` (in this order, possibly with others'), once each is committed; their tickets."""
        mine = [Ticket(change) for change in changes]
        with self._cond:
            self._queue.extend(mine)
        try:
            while True:
                with self._cond:
                    while not (batch := self._take()):
                        if all(ticket.finished for ticket in mine):
                            return mine
                        self._cond.wait()
                try:
                    self._commit(batch)
                finally:
                    with self._cond:
                        for other in batch:
                            if not other.finished:  # the commit was cut short (this caller was killed)
                                other.error, other.finished = StoreError("the membership commit stopped"), True
                        self._flying.remove(batch)
                        self._cond.notify_all()
        finally:
            with self._cond:
                for ticket in mine:
                    if not ticket.finished and ticket in self._queue:
                        self._queue.remove(ticket)  # its caller is gone (killed while waiting)

    def _take(self) -> list[Ticket]:
        """The next batch to commit, taken off the queue and counted as flying ([] when none may start)."""
        if len(self._flying) >= self._in_flight or any(t.change.may_end for b in self._flying for t in b):
            return []
        held = {user for b in self._flying for t in b for user in t.change.users()}  # must wait their turn
        batch: list[Ticket] = []
        for ticket in self._queue:
            if len(batch) >= MAX_CHANGES_PER_COMMIT:
                break
            if ticket.change.may_end and self._flying:
                break  # nothing after it goes before it
            users = ticket.change.users()
            if held.intersection(users):
                held.update(users)
            else:
                batch.append(ticket)
        if batch:
            taken = set(map(id, batch))
            self._queue = [ticket for ticket in self._queue if id(ticket) not in taken]
            self._flying.append(batch)
        return batch

    def _commit(self, tickets: list[Ticket]) -> None:
        records, sid = self._records, self._session_id
        store = records._store
        may_end = any(ticket.change.may_end for ticket in tickets)
        writes = 0
        changed: dict[str, Data | None] = {}
        ended = False
        try:
            unknown = [t.change for t in tickets if isinstance(t.change, Join) and t.change.email is None]
            if unknown:
                emails = records.emails(change.user_id for change in unknown)
                for change in unknown:
                    change.email = emails[change.user_id]
            presence_ids = [d.id for d in store.query(SESSION_PRESENCE, "sessionID", sid)] if may_end else []
            # Read outside the transaction, so that it locks nothing: only its writer writes it, and only
            # from the presences this commit writes (an end reads it inside).
            before = None if may_end else store.get(SESSIONS, sid)

            def run(t: Transaction) -> list[tuple[Any, BaseException | None]]:
                # Every read comes before every write, as Firestore's transactions require.
                doc = t.get(SESSIONS, sid) if may_end else before
                users = sorted({u for ticket in tickets for u in ticket.change.users()})
                read = t.get_many(SESSION_PRESENCE, [presence_id(sid, u) for u in users])
                presence = {u: read[presence_id(sid, u)] for u in users}
                processes = sorted({p["process"] for p in presence.values()
                                    if p and p.get("process") not in (None, records.process_id)})
                # Leases are read outside the transaction too: renewing one must not wait for this commit.
                leases = {pid: (d or {}).get("leaseUntil") for pid, d in store.get_many(PROCESSES, processes).items()}
                lock = t.get(SESSION_LOCKS, doc["batchID"]) if may_end and doc is not None else None
                batch = Batch(records, sid, doc, presence, leases, lock)
                outcomes: list[tuple[Any, BaseException | None]] = []
                for ticket in tickets:
                    try:
                        outcomes.append((ticket.change.apply(batch), None))
                    except Refusal as e:
                        outcomes.append((None, e))
                nonlocal writes
                writes = batch.write(t, presence_ids)
                changed.clear()
                changed.update({u: batch.presence[u] for u in batch.changed})
                nonlocal ended
                ended = batch.ended
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
            if ended:
                records._ended(sid)
            else:
                records._recorded(sid, changed)
        for ticket, (result, error) in zip(tickets, outcomes, strict=True):
            ticket.result, ticket.error, ticket.finished = result, error, True
        if committed:
            try:
                records.on_commit(len(tickets), writes)
            except Exception:  # counting it must not undo what was committed
                log.exception("the commit of session %s was not counted", sid)
