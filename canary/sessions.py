"""Session rules: who may create and join, who is told what, across processes.

This module decides and the edges do the I/O: it talks to the store through
`SessionRecords` and the `Store` interface and to clients through the `Peer`
protocol (queue a frame, close), and imports neither Flask, gevent nor
Firestore, so every rule here can be unit-tested without sockets.

The owner and members of one session may be connected to different processes.
Each process that holds clients of a session follows the session document
(one listener per session per process) and derives `member_joined`,
`member_left`, `owner_left` and `owner_joined` from its changes, and the end of
the session from its deletion. Events caused by this process's own clients are
delivered at once and remembered (`known`, `owner_away`), so the same change
arriving through the listener is not delivered twice; snapshots older than what
this process already wrote or saw (`version`, from `lastUpdated`) are ignored.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from . import protocol
from .errors import Refusal
from .protocol import Frame, ProtocolError
from .records import MEMBER, OWNER, SessionRecords, SessionState
from .store import BATCHES, PROJECTS, SESSIONS, USERS, AlreadyExists, Data, Store, StoreError, Watch, auto_id
from .watches import ImageWatches, SharedListeners

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["MEMBER", "OWNER", "Admission", "Participant", "Peer", "Refusal", "SessionManager"]


class Peer(Protocol):
    """What the session logic needs of a connected client."""

    def safe_enqueue(self, frame: Frame) -> bool: ...

    def close(self, code: int, reason: str) -> None: ...

    def alive(self) -> bool:
        """False once the connection is closed or closing (the peer may not have been read yet)."""
        ...


@dataclass(frozen=True)
class Admission:
    """A create or join the store has accepted, before the socket is upgraded."""

    user_id: str
    role: str
    state: SessionState

    @property
    def session_id(self) -> str:
        return self.state.session_id

    @property
    def batch_id(self) -> str:
        return self.state.batch_id

    @property
    def owner_id(self) -> str:
        return self.state.owner_id

    @property
    def members(self) -> tuple[str, ...]:
        return self.state.member_ids

    @property
    def connection(self) -> str:
        """The connection this admission recorded in the user's presence."""
        return self.state.connection


@dataclass(eq=False)
class Participant:
    """A connected client in a session (owner or member)."""

    admission: Admission
    peer: Peer
    watches: ImageWatches
    gone: bool = False  # its connection ended: it no longer holds the user's place

    @property
    def user_id(self) -> str:
        return self.admission.user_id

    @property
    def session_id(self) -> str:
        return self.admission.session_id

    @property
    def is_owner(self) -> bool:
        return self.admission.role == OWNER


@dataclass(eq=False)
class _LiveSession:
    """What this process knows of a session it holds clients of."""

    session_id: str
    batch_id: str
    owner_id: str
    known: set[str]  # member IDs whose arrival has been announced here
    version: datetime
    owner_away: bool
    owner: Participant | None = None
    members: dict[str, Participant] = field(default_factory=dict)
    listener: Watch | None = None
    writing: int = 0  # local store writes in flight: snapshots wait for them
    pending: list[Data | None] = field(default_factory=list)

    def local(self) -> list[Participant]:
        return ([self.owner] if self.owner else []) + list(self.members.values())

    def everyone_but(self, user_id: str) -> list[Participant]:
        return [p for p in self.local() if p.user_id != user_id]

    def local_members(self) -> list[Participant]:
        return list(self.members.values())

    def remove(self, participant: Participant) -> bool:
        if self.owner is participant:
            self.owner = None
            return True
        if self.members.get(participant.user_id) is participant:
            del self.members[participant.user_id]
            return True
        return False


def _now() -> datetime:
    return datetime.now(UTC)


def _broadcast(recipients: list[Participant], frame: Frame) -> None:
    for participant in recipients:
        participant.peer.safe_enqueue(frame)


class SessionManager:
    """The sessions of this process and their rules.

    `defer` runs a callable later, outside the caller's stack: store listeners
    call back from any thread, in the middle of a commit for the memory store,
    and the edge hands those calls to its event loop. By default they queue up
    and run at the end of the current public call (enough for tests).
    """

    def __init__(self, store: Store, *, clock: Callable[[], datetime] = _now,
                 defer: Callable[[Callable[[], None]], Any] | None = None, process_id: str | None = None,
                 owner_grace: float = 0.0, reconnect_grace: float = 30.0, lease_seconds: float = 15.0) -> None:
        self._store = store
        self._clock = clock
        self._records = SessionRecords(store, process_id or auto_id(), clock, holds=self._holds)
        self._live: dict[str, _LiveSession] = {}
        self._admitting: set[str] = set()  # connections admitted, not yet connected nor abandoned
        self._connections: dict[str, Participant] = {}
        self._listeners = SharedListeners(store)
        self._owner_grace = owner_grace
        self._reconnect_grace = reconnect_grace
        self._lease_seconds = lease_seconds
        self._stopping = False
        self._deferred: deque[Callable[[], None]] = deque()
        self._defer = defer or self._deferred.append

    @property
    def process_id(self) -> str:
        return self._records.process_id

    def run_pending(self) -> None:
        """Handle the store notifications queued by the default `defer` (the edge defers to its loop)."""
        while self._deferred:
            self._deferred.popleft()()

    # -- admission (before the upgrade) ------------------------------------
    def _check_running(self) -> None:
        if self._stopping:
            raise Refusal(503, "the service is restarting; connect again")

    def open_session(self, batch_id: str, user_id: str) -> Admission:
        """Create a session on `batch_id` owned by `user_id` (or resume it), or raise `Refusal`."""
        self._check_running()
        batch = self._store.get(BATCHES, batch_id)
        if batch is None:
            raise Refusal(404, f"batch {batch_id!r} not found")
        project_id = batch.get("projectID")
        project = self._store.get(PROJECTS, project_id) if isinstance(project_id, str) and project_id else None
        if project is None:
            raise Refusal(404, f"project of batch {batch_id!r} not found")
        if project.get("userID") != user_id:
            raise Refusal(403, "only the project's owner can create a session")
        email = self._email(user_id)
        try:
            return self._admitted(user_id, OWNER, self._records.create(batch_id, project_id, user_id, email))
        except AlreadyExists:
            pass
        resumed = self._records.resume_owner(batch_id, user_id)
        if resumed is not None:
            return self._admitted(user_id, OWNER, resumed)
        if self._records.clear_stale_lock(batch_id):
            try:
                return self._admitted(user_id, OWNER,
                                      self._records.create(batch_id, project_id, user_id, email))
            except AlreadyExists:
                pass
        raise Refusal(409, f"a session is already live for batch {batch_id!r}")

    def join_session(self, session_id: str, user_id: str) -> Admission:
        """Add `user_id` to the session's members (or give its place back), or raise `Refusal`."""
        self._check_running()
        return self._admitted(user_id, MEMBER, self._records.join(session_id, user_id, self._email(user_id)))

    def _admitted(self, user_id: str, role: str, state: SessionState) -> Admission:
        self._admitting.add(state.connection)
        return Admission(user_id, role, state)

    def abandon(self, admission: Admission) -> None:
        """Undo an admission whose upgrade failed: as if the client left at once."""
        sid, uid = admission.session_id, admission.user_id
        self._admitting.discard(admission.connection)
        try:
            if admission.role == MEMBER:
                self._records.leave(sid, uid, admission.connection)
            else:
                self._records.owner_left(sid, uid, admission.connection, self._owner_grace)
        except StoreError as e:
            log.error("could not undo the admission of %r to %s: %s", uid, sid, e)

    def _holds(self, connection: str) -> bool:
        """Whether this process is admitting, or holds live, the connection `connection`."""
        if connection in self._admitting:
            return True
        participant = self._connections.get(connection)
        return participant is not None and not participant.gone and participant.peer.alive()

    # -- connected clients ---------------------------------------------------
    def connect(self, admission: Admission, peer: Peer) -> Participant:
        """Register an upgraded client: welcome it and tell the others."""
        state, sid, uid = admission.state, admission.session_id, admission.user_id
        # A participant keeps its admission, not the member list of the moment (O(members) each).
        kept = Admission(uid, admission.role, replace(state, members=()))
        participant = Participant(kept, peer, ImageWatches(self._listeners, sid, peer.safe_enqueue))
        self._admitting.discard(state.connection)
        self._connections[state.connection] = participant
        live = self._live_session(state)
        live.version = max(live.version, state.version)
        if admission.role == OWNER:
            live.owner = participant
            peer.safe_enqueue(protocol.SESSION_CREATED(sessionID=sid, batchID=state.batch_id, role=OWNER))
            if live.owner_away:
                live.owner_away = False
                _broadcast(live.local_members(), protocol.OWNER_JOINED(sessionID=sid, ownerID=uid))
        else:
            live.members[uid] = participant
            peer.safe_enqueue(protocol.SESSION_JOINED(sessionID=sid, role=MEMBER, ownerID=state.owner_id,
                                                      members=list(state.member_ids)))
            if uid not in live.known:
                live.known.add(uid)
                _broadcast(live.everyone_but(uid), protocol.MEMBER_JOINED(sessionID=sid, memberID=uid))
        self.run_pending()
        return participant

    def receive(self, participant: Participant, data: str | bytes) -> None:
        """Handle one client frame; a bad one is answered with an `error` message."""
        try:
            request = protocol.parse_client_frame(data)
        except ProtocolError as e:
            participant.peer.safe_enqueue(e.frame())
            return
        if request.type == protocol.PING.type:
            participant.peer.safe_enqueue(protocol.PONG())
        elif request.type == protocol.SET_IMAGE_ID.type:
            try:
                participant.watches.switch(request.payload["imageID"])
            except StoreError as e:
                log.warning("watch on image %r failed: %s", request.payload["imageID"], e)
                participant.peer.safe_enqueue(protocol.ERROR(
                    code="watch_failed", message="could not watch this image; try again"))
        self.run_pending()

    def disconnect(self, participant: Participant) -> None:
        """A client is gone: stop its watches, update the store, tell the others.

        While the process is stopping (a restart) nothing is written: the
        clients are expected back, and other processes clean up after those
        who are not.
        """
        participant.gone = True
        participant.watches.stop()
        connection = participant.admission.connection
        if self._connections.get(connection) is participant:
            del self._connections[connection]
        live = self._live.get(participant.session_id)
        if live is None or not live.remove(participant):
            return  # the session ended first (its end removed everything), or a newer connection took over
        sid, uid = participant.session_id, participant.user_id
        try:
            if self._stopping:
                return
            if not participant.is_owner:
                if self._write(live, lambda: self._records.leave(sid, uid, connection)) is not None:
                    live.known.discard(uid)
                    _broadcast(live.everyone_but(uid), protocol.MEMBER_LEFT(sessionID=sid, memberID=uid))
                return
            left = self._write(live, lambda: self._records.owner_left(sid, uid, connection, self._owner_grace))
            if left.ended:
                if self._live.get(sid) is live:
                    self._end_here(live)
            elif left.version is not None:
                live.owner_away = True
                _broadcast(live.local_members(), protocol.OWNER_LEFT(sessionID=sid, ownerID=uid))
        except StoreError as e:
            log.error("could not record that %r left session %s: %s", uid, sid, e)
        finally:
            self._forget_if_empty(live)
            self.run_pending()

    # -- the process ------------------------------------------------------------
    def start(self) -> None:
        """Announce this process (its lease); raises `StoreError`."""
        self._records.renew_lease(self._lease_seconds)

    def maintain(self) -> None:
        """Renew this process's lease and clean up after processes that died (call every lease/3)."""
        try:
            if not self._stopping:
                self._records.renew_lease(self._lease_seconds)
            self._records.reap(self._owner_grace, self._reconnect_grace)
        except StoreError as e:
            log.error("maintenance pass failed: %s", e)
        self.run_pending()

    def shutdown(self) -> None:
        """The process is restarting: close every client with 1012 without ending anything."""
        self._stopping = True
        try:
            self._records.expire_lease()
        except StoreError as e:
            log.error("could not expire this process's lease: %s", e)
        for live in list(self._live.values()):
            for participant in live.local():
                participant.peer.close(protocol.CLOSE_SERVICE_RESTART, "service restart")

    def stats(self) -> dict[str, int]:
        """Counts of what this process holds, for monitoring and tests."""
        local = [p for s in self._live.values() for p in s.local()]
        return {
            "sessions": len(self._live),
            "participants": len(local),
            "image_watches": sum(p.watches.active for p in local),
            "image_listeners": self._listeners.count(),
            "session_listeners": sum(1 for s in self._live.values() if s.listener is not None),
        }

    # -- following a session -------------------------------------------------------
    def _live_session(self, state: SessionState) -> _LiveSession:
        live = self._live.get(state.session_id)
        if live is not None:
            return live
        live = _LiveSession(state.session_id, state.batch_id, state.owner_id, set(state.member_ids),
                            state.version, state.owner_away)
        self._live[state.session_id] = live
        try:
            live.listener = self._store.watch_document(
                SESSIONS, state.session_id, lambda doc: self._defer(lambda: self._on_snapshot(live, doc)))
        except StoreError as e:
            log.error("cannot follow session %s: events from other processes will be missed: %s",
                      state.session_id, e)
        return live

    def _write(self, live: _LiveSession, write: Callable[[], T]) -> T:
        """Run a store write for `live` (its result: a new version, or holding one); snapshots arriving
        meanwhile wait for it."""
        live.writing += 1
        try:
            result = write()
            version = getattr(result, "version", result)
            if isinstance(version, datetime):
                live.version = max(live.version, version)
            return result
        finally:
            live.writing -= 1
            if not live.writing:
                pending, live.pending = live.pending, []
                for doc in pending:
                    self._apply(live, doc)

    def _on_snapshot(self, live: _LiveSession, doc: Data | None) -> None:
        if self._live.get(live.session_id) is not live:
            return  # no longer followed
        if live.writing:
            live.pending.append(doc)
        else:
            self._apply(live, doc)

    def _apply(self, live: _LiveSession, doc: Data | None) -> None:
        if self._live.get(live.session_id) is not live:
            return
        sid = live.session_id
        if doc is None:
            self._end_here(live)
            return
        version = doc.get("lastUpdated")
        if isinstance(version, datetime):
            if version < live.version:
                return  # older than what this process wrote or saw
            live.version = version
        members = {m["id"]: None for m in doc.get("members", [])}  # ordered, constant-time lookups
        for uid in members:
            if uid not in live.known:
                live.known.add(uid)
                _broadcast(live.everyone_but(uid), protocol.MEMBER_JOINED(sessionID=sid, memberID=uid))
        for uid in [u for u in live.known if u not in members]:
            live.known.discard(uid)
            _broadcast(live.everyone_but(uid), protocol.MEMBER_LEFT(sessionID=sid, memberID=uid))
        away = doc.get("ownerLeftAt") is not None and live.owner is None
        if away != live.owner_away:
            live.owner_away = away
            message = protocol.OWNER_LEFT if away else protocol.OWNER_JOINED
            _broadcast(live.local_members(), message(sessionID=sid, ownerID=live.owner_id))

    def _end_here(self, live: _LiveSession) -> None:
        """The session document is gone (ended by another process)."""
        self._unfollow(live)
        self._close_everyone(live)

    @staticmethod
    def _close_everyone(live: _LiveSession) -> None:
        frame = protocol.SESSION_CLOSED(sessionID=live.session_id)
        for participant in live.local():
            participant.watches.stop()
            participant.peer.safe_enqueue(frame)
            participant.peer.close(protocol.CLOSE_SESSION_CLOSED, "session closed")

    def _unfollow(self, live: _LiveSession) -> None:
        if self._live.get(live.session_id) is live:
            del self._live[live.session_id]
        listener, live.listener = live.listener, None
        if listener is not None:
            listener.stop()

    def _forget_if_empty(self, live: _LiveSession) -> None:
        if not live.local():
            self._unfollow(live)

    def _email(self, user_id: str) -> str:
        user = self._store.get(USERS, user_id)
        email = user.get("email") if user else None
        return email if isinstance(email, str) else ""
