"""Session rules: who may create and join, who is told what, what the store holds.

This module decides and the edges do the I/O: it talks to the store through
the `Store` interface and to clients through the `Peer` protocol (queue a
frame, close), and imports neither Flask, gevent nor Firestore, so every rule
here can be unit-tested without sockets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from . import protocol
from .protocol import Frame, ProtocolError
from .store import (
    BATCHES,
    PROJECTS,
    SESSION_LOCKS,
    SESSIONS,
    USERS,
    AlreadyExists,
    Data,
    NotFound,
    Store,
    StoreError,
    Transaction,
    auto_id,
)
from .watches import ImageWatches, SharedListeners

log = logging.getLogger(__name__)

OWNER = "owner"
MEMBER = "member"


class Refusal(Exception):
    """A request the service turns down, with the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Peer(Protocol):
    """What the session logic needs of a connected client."""

    def safe_enqueue(self, frame: Frame) -> bool: ...

    def close(self, code: int, reason: str) -> None: ...


@dataclass(frozen=True)
class Admission:
    """A create or join the store has accepted, before the socket is upgraded."""

    session_id: str
    batch_id: str
    user_id: str
    role: str
    owner_id: str
    members: tuple[str, ...] = ()


@dataclass(eq=False)
class Participant:
    """A connected client in a session (owner or member)."""

    admission: Admission
    peer: Peer
    watches: ImageWatches

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
    owner: Participant
    members: dict[str, Participant] = field(default_factory=dict)

    def everyone_but(self, user_id: str) -> list[Participant]:
        others = [p for uid, p in self.members.items() if uid != user_id]
        return others if self.owner.user_id == user_id else [self.owner, *others]


def _now() -> datetime:
    return datetime.now(UTC)


class SessionManager:
    """The sessions of this process and their rules."""

    def __init__(self, store: Store, clock: Callable[[], datetime] = _now) -> None:
        self._store = store
        self._clock = clock
        self._live: dict[str, _LiveSession] = {}
        self._listeners = SharedListeners(store)

    # -- admission (before the upgrade) ------------------------------------
    def open_session(self, batch_id: str, user_id: str) -> Admission:
        """Create a session on `batch_id` owned by `user_id`, or raise `Refusal`."""
        batch = self._store.get(BATCHES, batch_id)
        if batch is None:
            raise Refusal(404, f"batch {batch_id!r} not found")
        project_id = batch.get("projectID")
        project = self._store.get(PROJECTS, project_id) if isinstance(project_id, str) and project_id else None
        if project is None:
            raise Refusal(404, f"project of batch {batch_id!r} not found")
        if project.get("userID") != user_id:
            raise Refusal(403, "only the project's owner can create a session")
        session_id = auto_id()
        now = self._clock()
        session = {
            "owner": {"id": user_id, "email": self._email(user_id)},
            "batchID": batch_id,
            "projectID": project_id,
            "members": [],
            "lastUpdated": now,
        }

        def create(t: Transaction) -> None:
            # The lock's existence precondition decides the race between creates: atomic on
            # Firestore and on the bundled emulator alike (a query could not decide it). It is
            # the commit's first write because that emulator applies a commit's writes one by
            # one and stops at the failing one, instead of all-or-nothing.
            t.create(SESSION_LOCKS, batch_id, {"sessionID": session_id, "createdAt": now})
            t.create(SESSIONS, session_id, session)

        try:
            self._store.transaction(create)
        except AlreadyExists:
            if not self._clear_stale_lock(batch_id):
                raise Refusal(409, f"a session is already live for batch {batch_id!r}") from None
            try:
                self._store.transaction(create)
            except AlreadyExists:
                raise Refusal(409, f"a session is already live for batch {batch_id!r}") from None
        return Admission(session_id, batch_id, user_id, OWNER, owner_id=user_id)

    def join_session(self, session_id: str, user_id: str) -> Admission:
        """Add `user_id` to the session's members, or raise `Refusal`."""
        member = {"id": user_id, "email": self._email(user_id)}

        def join(t: Transaction) -> Data:
            session = t.get(SESSIONS, session_id)
            if session is None:
                raise Refusal(404, f"session {session_id!r} not found")
            if session["owner"]["id"] == user_id or any(m["id"] == user_id for m in session["members"]):
                raise Refusal(409, f"{user_id!r} is already in this session")
            session["members"] = [*session["members"], member]
            t.update(SESSIONS, session_id, {"members": session["members"], "lastUpdated": self._clock()})
            return session

        try:
            session = self._store.transaction(join)
        except NotFound:
            raise Refusal(404, f"session {session_id!r} not found") from None
        return Admission(session_id, session["batchID"], user_id, MEMBER,
                         owner_id=session["owner"]["id"],
                         members=tuple(m["id"] for m in session["members"]))

    def abandon(self, admission: Admission) -> None:
        """Undo an admission whose upgrade failed."""
        if admission.role == OWNER:
            self._delete_session(admission.session_id, admission.batch_id)
        else:
            self._remove_member(admission.session_id, admission.user_id)

    # -- connected clients ---------------------------------------------------
    def connect(self, admission: Admission, peer: Peer) -> Participant:
        """Register an upgraded client: welcome it and tell the others."""
        participant = Participant(admission, peer, ImageWatches(self._listeners, admission.session_id,
                                                                peer.safe_enqueue))
        sid = admission.session_id
        if admission.role == OWNER:
            self._live[sid] = _LiveSession(participant)
            peer.safe_enqueue(protocol.SESSION_CREATED(sessionID=sid, batchID=admission.batch_id, role=OWNER))
            return participant
        live = self._live.get(sid)
        if live is None:  # the owner left while this member was upgrading
            self._remove_member(sid, admission.user_id)
            self._close_member(participant)
            return participant
        live.members[admission.user_id] = participant
        peer.safe_enqueue(protocol.SESSION_JOINED(
            sessionID=sid, role=MEMBER, ownerID=admission.owner_id, members=list(admission.members)))
        self._broadcast(live.everyone_but(admission.user_id),
                        protocol.MEMBER_JOINED(sessionID=sid, memberID=admission.user_id))
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

    def disconnect(self, participant: Participant) -> None:
        """A client is gone: stop its watches, update the store, tell the others."""
        participant.watches.stop()
        sid = participant.session_id
        live = self._live.get(sid)
        # The store is written before anyone is told, so a client that reacts to a
        # message (re-fetching members, say) reads the new state.
        if participant.is_owner:
            owned = live is not None and live.owner is participant
            if owned:
                del self._live[sid]
            self._delete_session(sid, participant.admission.batch_id)
            if owned:
                for member in list(live.members.values()):
                    self._close_member(member)
            return
        if live is None or live.members.get(participant.user_id) is not participant:
            return  # the session ended first; its teardown removed everything
        del live.members[participant.user_id]
        self._remove_member(sid, participant.user_id)
        self._broadcast(live.everyone_but(participant.user_id),
                        protocol.MEMBER_LEFT(sessionID=sid, memberID=participant.user_id))

    def stats(self) -> dict[str, int]:
        """Counts of what this process holds, for monitoring and tests."""
        return {
            "sessions": len(self._live),
            "participants": sum(1 + len(s.members) for s in self._live.values()),
            "image_watches": sum(p.watches.active for s in self._live.values()
                                 for p in (s.owner, *s.members.values())),
            "image_listeners": self._listeners.count(),
        }

    # -- helpers -----------------------------------------------------------------
    @staticmethod
    def _broadcast(recipients: list[Participant], frame: Frame) -> None:
        for participant in recipients:
            participant.peer.safe_enqueue(frame)

    @staticmethod
    def _close_member(member: Participant) -> None:
        member.watches.stop()
        member.peer.safe_enqueue(protocol.SESSION_CLOSED(sessionID=member.session_id))
        member.peer.close(protocol.CLOSE_SESSION_CLOSED, "session closed")

    def _email(self, user_id: str) -> str:
        user = self._store.get(USERS, user_id)
        email = user.get("email") if user else None
        return email if isinstance(email, str) else ""

    def _remove_member(self, session_id: str, user_id: str) -> None:
        def remove(t: Transaction) -> None:
            session = t.get(SESSIONS, session_id)
            if session is None:
                return
            # By ID: the e-mail stored with the member may differ or be unknown.
            members = [m for m in session["members"] if m["id"] != user_id]
            if len(members) != len(session["members"]):
                t.update(SESSIONS, session_id, {"members": members, "lastUpdated": self._clock()})

        try:
            self._store.transaction(remove)
        except NotFound:
            pass  # the session was deleted meanwhile
        except StoreError as e:
            log.error("could not remove %r from session %s: %s", user_id, session_id, e)

    def _delete_session(self, session_id: str, batch_id: str) -> None:
        def delete(t: Transaction) -> None:
            lock = t.get(SESSION_LOCKS, batch_id)
            t.delete(SESSIONS, session_id)
            if lock is not None and lock.get("sessionID") == session_id:
                t.delete(SESSION_LOCKS, batch_id)

        try:
            self._store.transaction(delete)
        except StoreError as e:
            log.error("could not delete session %s: %s", session_id, e)

    def _clear_stale_lock(self, batch_id: str) -> bool:
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
