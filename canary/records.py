"""What the service keeps in the store, and every change to it.

* `sessions/{id}`: the document other Canary services read (`owner`, `batchID`,
  `projectID`, `members`, `lastUpdated`), plus `ownerLeftAt` while the owner is
  away within its grace. `lastUpdated` only grows (one microsecond past the
  previous value even when a writer's clock lags), so processes following the
  document can tell a stale snapshot from a new one.
* `sessionLocks/{batchID}`: makes "one live session per batch" atomic.
* `sessionPresence/{sessionID}_{userID}`: which process holds each client, or
  since when it is away and until when it may come back.
* `collabProcesses/{id}`: each process's lease. A process that stops renewing
  it (killed) or expires it (restarting) has lost its clients: any live process
  then marks them away, and removes them once their grace is over.

Uniqueness is decided by existence preconditions written first in each commit
(atomic on Firestore and on the bundled emulator); read-check-write goes
through transactions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

from .errors import Refusal
from .store import (
    PROCESSES,
    SESSION_LOCKS,
    SESSION_PRESENCE,
    SESSIONS,
    Data,
    Store,
    Transaction,
    auto_id,
)

log = logging.getLogger(__name__)

OWNER = "owner"
MEMBER = "member"


def presence_id(session_id: str, user_id: str) -> str:
    """The presence document of a user in a session (user IDs may hold any character)."""
    return f"{session_id}_{quote(user_id, safe='')}"


@dataclass(frozen=True)
class SessionState:
    """A session as a create, join or resume left it."""

    session_id: str
    batch_id: str
    owner_id: str
    members: tuple[str, ...]
    version: datetime
    owner_away: bool = False
    resumed: bool = False

    @classmethod
    def of(cls, session_id: str, doc: Data, resumed: bool = False) -> SessionState:
        return cls(session_id, doc["batchID"], doc["owner"]["id"], tuple(m["id"] for m in doc["members"]),
                   doc["lastUpdated"], doc.get("ownerLeftAt") is not None, resumed)


class SessionRecords:
    """The store side of sessions, for the process `process_id`."""

    def __init__(self, store: Store, process_id: str, clock: Callable[[], datetime]) -> None:
        self._store = store
        self.process_id = process_id
        self._clock = clock

    # -- helpers ---------------------------------------------------------------
    def _bump(self, previous: Any) -> datetime:
        now = self._clock()
        if isinstance(previous, datetime) and previous >= now:
            return previous + timedelta(microseconds=1)
        return now

    def _here(self, session_id: str, user_id: str, role: str) -> Data:
        return {"sessionID": session_id, "userID": user_id, "role": role, "process": self.process_id,
                "away": False, "awaySince": None, "graceUntil": None}

    def _connected_elsewhere(self, t: Transaction, presence: Data | None) -> bool:
        """Whether a live process (this one included) holds that client's socket."""
        if presence is None or presence.get("away"):
            return False
        if presence.get("process") == self.process_id:
            return True
        process = t.get(PROCESSES, presence.get("process", ""))
        return process is not None and process["leaseUntil"] > self._clock()

    # -- sessions ----------------------------------------------------------------
    def create(self, batch_id: str, project_id: str, owner_id: str, email: str) -> SessionState:
        """Write a new session; raises `AlreadyExists` if the batch has one."""
        session_id = auto_id()
        now = self._clock()
        doc = {"owner": {"id": owner_id, "email": email}, "batchID": batch_id, "projectID": project_id,
               "members": [], "lastUpdated": now}

        def create(t: Transaction) -> None:
            # The lock's existence precondition decides the race between creates. It is the
            # commit's first write: the bundled emulator applies a commit's writes one by one
            # and stops at the failing one, instead of all-or-nothing.
            t.create(SESSION_LOCKS, batch_id, {"sessionID": session_id, "createdAt": now})
            t.create(SESSIONS, session_id, doc)
            t.set(SESSION_PRESENCE, presence_id(session_id, owner_id), self._here(session_id, owner_id, OWNER))

        self._store.transaction(create)
        return SessionState.of(session_id, doc)

    def resume_owner(self, batch_id: str, owner_id: str) -> SessionState | None:
        """Give the batch's live session back to its owner, if the owner's socket is gone."""
        lock = self._store.get(SESSION_LOCKS, batch_id)
        if lock is None:
            return None
        session_id = lock["sessionID"]

        def resume(t: Transaction) -> SessionState | None:
            doc = t.get(SESSIONS, session_id)
            if doc is None or doc["owner"]["id"] != owner_id:
                return None
            if self._connected_elsewhere(t, t.get(SESSION_PRESENCE, presence_id(session_id, owner_id))):
                return None
            doc["ownerLeftAt"] = None
            doc["lastUpdated"] = self._bump(doc["lastUpdated"])
            t.update(SESSIONS, session_id, {"ownerLeftAt": None, "lastUpdated": doc["lastUpdated"]})
            t.set(SESSION_PRESENCE, presence_id(session_id, owner_id), self._here(session_id, owner_id, OWNER))
            return SessionState.of(session_id, doc, resumed=True)

        return self._store.transaction(resume)

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

    def join(self, session_id: str, user_id: str, email: str) -> SessionState:
        """Add a member, or give a member whose socket is gone (a restart) its place back."""
        def join(t: Transaction) -> SessionState:
            doc = t.get(SESSIONS, session_id)
            if doc is None:
                raise Refusal(404, f"session {session_id!r} not found")
            if doc["owner"]["id"] == user_id:
                raise Refusal(409, f"{user_id!r} owns this session")
            if any(m["id"] == user_id for m in doc["members"]):
                if self._connected_elsewhere(t, t.get(SESSION_PRESENCE, presence_id(session_id, user_id))):
                    raise Refusal(409, f"{user_id!r} is already in this session")
                t.set(SESSION_PRESENCE, presence_id(session_id, user_id), self._here(session_id, user_id, MEMBER))
                return SessionState.of(session_id, doc, resumed=True)
            doc["members"] = [*doc["members"], {"id": user_id, "email": email}]
            doc["lastUpdated"] = self._bump(doc["lastUpdated"])
            t.update(SESSIONS, session_id, {"members": doc["members"], "lastUpdated": doc["lastUpdated"]})
            t.set(SESSION_PRESENCE, presence_id(session_id, user_id), self._here(session_id, user_id, MEMBER))
            return SessionState.of(session_id, doc)

        return self._store.transaction(join)

    def leave(self, session_id: str, user_id: str) -> datetime | None:
        """Remove a member (by ID: the stored e-mail may be anything); the new version, if any."""
        def leave(t: Transaction) -> datetime | None:
            doc = t.get(SESSIONS, session_id)
            t.delete(SESSION_PRESENCE, presence_id(session_id, user_id))
            if doc is None:
                return None
            members = [m for m in doc["members"] if m["id"] != user_id]
            if len(members) == len(doc["members"]):
                return None
            version = self._bump(doc["lastUpdated"])
            t.update(SESSIONS, session_id, {"members": members, "lastUpdated": version})
            return version

        return self._store.transaction(leave)

    def owner_away(self, session_id: str, owner_id: str, grace_seconds: float) -> datetime | None:
        """The owner left: keep the session for `grace_seconds`; the new version, if any."""
        def away(t: Transaction) -> datetime | None:
            doc = t.get(SESSIONS, session_id)
            if doc is None:
                return None
            now = self._clock()
            version = self._bump(doc["lastUpdated"])
            t.update(SESSIONS, session_id, {"ownerLeftAt": now, "lastUpdated": version})
            t.set(SESSION_PRESENCE, presence_id(session_id, owner_id),
                  {**self._here(session_id, owner_id, OWNER), "away": True, "awaySince": now,
                   "graceUntil": now + timedelta(seconds=grace_seconds)})
            return version

        return self._store.transaction(away)

    def end(self, session_id: str, batch_id: str) -> None:
        """Delete the session, its lock and its presence documents."""
        presences = [d.id for d in self._store.query(SESSION_PRESENCE, "sessionID", session_id)]

        def end(t: Transaction) -> None:
            lock = t.get(SESSION_LOCKS, batch_id) if batch_id else None
            t.delete(SESSIONS, session_id)
            if lock is not None and lock.get("sessionID") == session_id:
                t.delete(SESSION_LOCKS, batch_id)
            for doc_id in presences:
                t.delete(SESSION_PRESENCE, doc_id)

        self._store.transaction(end)

    # -- process leases and clean-up -------------------------------------------------
    def renew_lease(self, seconds: float) -> None:
        """Say this process is alive for `seconds` more."""
        now = self._clock()
        self._store.set(PROCESSES, self.process_id,
                        {"leaseUntil": now + timedelta(seconds=seconds), "renewedAt": now})

    def expire_lease(self) -> None:
        """This process is stopping: its clients are away from now on."""
        now = self._clock()
        self._store.set(PROCESSES, self.process_id, {"leaseUntil": now, "renewedAt": now, "stopping": True})

    def reap(self, owner_grace: float, reconnect_grace: float) -> None:
        """One clean-up pass, safe to run in every process at once.

        Clients of processes whose lease ran out become away (an owner gets the
        longer of the two graces); away clients whose grace is over are removed,
        and an owner's removal ends its session. Each step re-reads its document
        in a transaction, so a client that came back meanwhile is left alone.
        """
        now = self._clock()
        for process in self._store.documents(PROCESSES):
            lease = process.data.get("leaseUntil")
            if process.id == self.process_id or not isinstance(lease, datetime) or lease > now:
                continue
            for presence in self._store.query(SESSION_PRESENCE, "process", process.id):
                if not presence.data.get("away"):
                    grace = max(owner_grace, reconnect_grace) if presence.data["role"] == OWNER else reconnect_grace
                    self._mark_away(presence.id, process.id, lease, lease + timedelta(seconds=grace))
            self._store.delete(PROCESSES, process.id)
        for presence in self._store.query(SESSION_PRESENCE, "away", True):
            until = presence.data.get("graceUntil")
            if isinstance(until, datetime) and until <= now:
                self._expire(presence.id, presence.data)

    def _mark_away(self, doc_id: str, process_id: str, since: datetime, until: datetime) -> None:
        def mark(t: Transaction) -> None:
            presence = t.get(SESSION_PRESENCE, doc_id)
            if presence is None or presence.get("away") or presence.get("process") != process_id:
                return  # reconnected meanwhile
            doc = t.get(SESSIONS, presence["sessionID"]) if presence["role"] == OWNER else None
            t.update(SESSION_PRESENCE, doc_id, {"away": True, "awaySince": since, "graceUntil": until})
            if doc is not None:
                t.update(SESSIONS, presence["sessionID"],
                         {"ownerLeftAt": since, "lastUpdated": self._bump(doc["lastUpdated"])})

        self._store.transaction(mark)

    def _expire(self, doc_id: str, seen: Data) -> None:
        session_id, user_id = seen["sessionID"], seen["userID"]
        if seen["role"] == OWNER:
            doc = self._store.get(SESSIONS, session_id)
            current = self._store.get(SESSION_PRESENCE, doc_id)
            if current is not None and current.get("graceUntil") == seen["graceUntil"]:
                log.info("the owner of session %s did not come back: ending it", session_id)
                self.end(session_id, doc["batchID"] if doc else "")
            return

        def expire(t: Transaction) -> None:
            current = t.get(SESSION_PRESENCE, doc_id)
            if current is None or current.get("graceUntil") != seen["graceUntil"]:
                return  # came back, or another process removed it first
            doc = t.get(SESSIONS, session_id)
            t.delete(SESSION_PRESENCE, doc_id)
            if doc is not None:
                members = [m for m in doc["members"] if m["id"] != user_id]
                t.update(SESSIONS, session_id, {"members": members, "lastUpdated": self._bump(doc["lastUpdated"])})

        log.info("member %r of session %s did not come back: removing it", user_id, session_id)
        self._store.transaction(expire)
