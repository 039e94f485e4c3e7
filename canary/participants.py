"""Who is connected, as the session rules see them: the `Peer` a client is to them, its `Admission`, the
`Participant` it becomes once connected, and `LiveSession`, what a process knows of a session it holds clients
of. Data and the events they build, no rules (those are sessions.py's); no Flask, gevent or Firestore."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple, Protocol

from .budget import InboundBudget
from .protocol import Event, Frame, Kind, Vocabulary
from .records import OWNER, SessionState
from .store import Data, Watch
from .watches import ImageWatches

__all__ = ["ActiveSession", "Admission", "Grant", "LiveSession", "Participant", "Passwords", "Peer", "broadcast"]


class Peer(Protocol):
    """What the session logic needs of a connected client."""

    def safe_enqueue(self, frame: Frame) -> bool: ...

    def close(self, code: int, reason: str) -> None: ...

    def alive(self) -> bool:
        """False once the connection is closed or closing (the peer may not have been read yet)."""
        ...


class Passwords(Protocol):
    """Session passwords: stored as hashes (bcrypt), checked against them."""

    def hash(self, password: str) -> str: ...

    def verify(self, password: str, hashed: str) -> bool: ...


@dataclass(frozen=True)
class Admission:
    """A client the store has accepted, before its socket is upgraded."""

    user_id: str
    role: str
    state: SessionState
    #: The client address its connection counts against (`max_per_address`); None: not capped.
    address: str | None = None

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


class Grant(NamedTuple):
    """A web-app join: the role the session token is for, and the session as it then stood."""

    role: str
    state: SessionState


class ActiveSession(NamedTuple):
    """A live session as `GET /sessions/active` lists it."""

    session_id: str
    doc: Data
    owner_connected: bool
    #: User ID → the image each connected participant looks at (those that look at none are left out).
    images: dict[str, str] = {}  # noqa: RUF012 - a NamedTuple's default, never changed in place


@dataclass(eq=False)
class Participant:
    """A connected client in a session (owner or member)."""

    admission: Admission
    peer: Peer
    vocabulary: Vocabulary
    budget: InboundBudget
    watches: ImageWatches = field(init=False)
    gone: bool = False  # its connection ended: it no longer holds the user's place
    connected_at: datetime | None = None

    @property
    def user_id(self) -> str:
        return self.admission.user_id

    @property
    def session_id(self) -> str:
        return self.admission.session_id

    @property
    def is_owner(self) -> bool:
        return self.admission.role == OWNER

    def tell(self, event: Event) -> None:
        """Queue `event` in this client's vocabulary (if it has a message for it)."""
        frame = event.frame(self.vocabulary)
        if frame is not None:
            self.peer.safe_enqueue(frame)


@dataclass(eq=False)
class LiveSession:
    """What this process knows of a session it holds clients of."""

    session_id: str
    batch_id: str
    owner_id: str
    owner_email: str
    known: dict[str, str]  # member ID -> e-mail, for the members whose arrival has been announced here
    version: datetime
    owner_away: bool
    owner: Participant | None = None
    members: dict[str, Participant] = field(default_factory=dict)
    listener: Watch | None = None
    #: User ID → the image this process last told its clients that participant looks at (member_images.py).
    images: dict[str, str] = field(default_factory=dict)
    images_listener: Watch | None = None

    def local(self) -> list[Participant]:
        return ([self.owner] if self.owner else []) + list(self.members.values())

    def everyone_but(self, user_id: str) -> list[Participant]:
        others = [p for uid, p in self.members.items() if uid != user_id]
        if self.owner is not None and self.owner_id != user_id:
            others.insert(0, self.owner)
        return others

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

    def member_event(self, kind: Kind, user_id: str) -> Event:
        return Event(kind, sessionID=self.session_id, memberID=user_id, memberEmail=self.known.get(user_id, ""))

    def owner_event(self, kind: Kind) -> Event:
        return Event(kind, sessionID=self.session_id, ownerID=self.owner_id, ownerEmail=self.owner_email)

    def image_event(self, user_id: str, image_id: str | None) -> Event:
        email = self.owner_email if user_id == self.owner_id else self.known.get(user_id, "")
        return Event(Kind.MEMBER_IMAGE, sessionID=self.session_id, memberID=user_id, memberEmail=email,
                     imageID=image_id)

    def images_for(self, user_id: str) -> dict[str, str]:
        """The welcome's `images`: the other participants' (the owner and the members listed) that look at one."""
        return {u: image for u, image in self.images.items()
                if u != user_id and (u == self.owner_id or u in self.known)}


def broadcast(recipients: list[Participant], event: Event) -> None:
    for participant in recipients:
        participant.tell(event)
