"""One writer per session for the whole deployment: it folds presences into the session document.

The session document (`sessions/{id}`, what other Canary services read) is
derived: `members` and `ownerLeftAt` follow from the presence documents
(`sessionPresence/{sessionID}_{userID}`), which are the truth and which every
process writes without contending (one per user). One process at a time, named
by `sessionWriters/{sessionID}` and alive while its lease is, writes the
session document: it follows the session's presences, and folds the users
whose presence changed into the document (`fold`), at most once per
`interval` however many changed meanwhile. A commit re-reads the writer
document in its transaction, so a process that lost the role (it stalled and
another took over) cannot write over its successor.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from .store import SESSION_PRESENCE, SESSION_WRITERS, SESSIONS, Data, Document, StoreError, Transaction, Watch

if TYPE_CHECKING:
    from .records import SessionRecords

log = logging.getLogger(__name__)

MEMBER = "member"


def presence_id(session_id: str, user_id: str) -> str:
    """The presence document of a user in a session (user IDs may hold any character)."""
    return f"{session_id}_{quote(user_id, safe='')}"


def listed(presence: Data | None) -> bool:
    """Whether a presence puts its user in the session's `members`."""
    return presence is not None and presence.get("role") == MEMBER and presence.get("listed") is True


def fold(doc: Data, presences: Mapping[str, Data | None]) -> Data:
    """The fields of the session document `doc` that the presences of some users (`presences`: user ID →
    presence, None where there is none) change; {} when they change nothing.

    Members keep their order; new ones are appended in the order they joined. The owner's presence sets
    `ownerLeftAt` (when it last went away) or clears it; an owner without a presence changes nothing (a web-app
    session nobody has connected to yet).
    """
    owner = doc["owner"]["id"]
    members: list[Data] = doc.get("members", [])
    present = {m["id"] for m in members}
    kept = [m for m in members if m["id"] not in presences or listed(presences[m["id"]])]
    new = sorted((p for uid, p in presences.items() if uid != owner and uid not in present and listed(p)),
                 key=lambda p: (str(p.get("joinedAt") or ""), p["userID"]))
    updates: Data = {}
    if new or len(kept) != len(members):
        updates["members"] = kept + [{"id": p["userID"], "email": p.get("email") or ""} for p in new]
    owner_presence = presences.get(owner)
    if owner_presence is not None:
        away = bool(owner_presence.get("away"))
        since = owner_presence.get("awaySince")
        if away and (doc.get("ownerLeftAt") is None or (since is not None and doc.get("ownerLeftAt") != since)):
            # Also when the document says the owner is away already, since an earlier time: the owner came
            # and went again before a fold saw it back (its process told its clients `owner_joined`), and
            # only a change of the document tells them `owner_left`.
            updates["ownerLeftAt"] = since
        elif not away and doc.get("ownerLeftAt") is not None:
            updates["ownerLeftAt"] = None
    return updates


#: Commits of one session document that may follow each other at once; past them, one per `interval`.
BURST = 5


class SessionWriter:
    """This process writes one session's document: the users whose presence changed are `touch`ed, and
    `flush` folds them in one commit. Commits are paced by a token bucket: `BURST` at once, then one per
    `interval`, so a storm costs a commit a second, not one per change, and a lone change goes at once."""

    def __init__(self, records: SessionRecords, session_id: str, *, interval: float,
                 spawn: Callable[[Callable[[], None]], Any], monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._records = records
        self.session_id = session_id
        self._interval = interval
        self._spawn = spawn
        self._monotonic = monotonic
        self._sleep = sleep
        self._fold_lock = threading.Lock()  # one commit at a time
        self._lock = threading.Lock()  # guards `_dirty`, `view`, `_draining`
        self._dirty: set[str] = set()
        self.view: dict[str, Data] = {}  # the session's presences as last delivered, by user ID
        self._folded: dict[str, Data | None] = {}  # each user's presence as the last fold read it
        self._tokens = float(BURST)  # commits that may go at once (a token bucket: one more per `interval`)
        self._filled = monotonic()
        self._draining = False
        self._watch: Watch | None = None
        self.stopped = False
        self.commits = 0
        self.document: Data | None = None  # the session document as this writer's last commit read or wrote it

    def start(self, users: Iterable[str]) -> None:
        """Follow the session's presences; `users` (the members listed now) are checked at the next fold."""
        self.touch(users)
        self._watch = self._records._store.watch_query(SESSION_PRESENCE, "sessionID", self.session_id,
                                                       self._on_presences)

    def stop(self) -> None:
        self.stopped = True
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.stop()

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    def touch(self, users: Iterable[str]) -> None:
        """Fold these users at the next commit."""
        with self._lock:
            self._dirty.update(users)

    def written(self, presences: Mapping[str, Data | None]) -> None:
        """This process wrote these presences: fold those the last fold did not already read."""
        with self._lock:
            self._dirty.update(u for u, data in presences.items() if self._folded.get(u, ()) != data)

    def _on_presences(self, documents: list[Document]) -> None:
        """The listener's snapshot: the users whose presence changed are folded soon (from any thread)."""
        current = {d.data.get("userID", ""): d.data for d in documents}
        with self._lock:
            # What this process folded already (it read it fresh, or wrote it itself) is not folded again. Both
            # stores deliver an unchanged presence as the same object: `is` settles most of a large session.
            view, folded = self.view, self._folded
            changed = {u for u, data in current.items()
                       if data is not view.get(u) and data != view.get(u) and data != folded.get(u, ())}
            changed.update(u for u in view.keys() - current.keys() if folded.get(u, ()) is not None)
            self.view = current
            self._dirty.update(changed)
        self.drain_soon()

    def drain_soon(self) -> None:
        """Fold what is touched in the background (one drain at a time)."""
        with self._lock:
            start = bool(self._dirty) and not self._draining and not self.stopped
            self._draining = self._draining or start
        if start:
            self._spawn(self._drain)

    def _drain(self) -> None:
        """Fold until nothing is left; a failed commit is retried with backoff, never dropped."""
        delay = 0.25
        while True:
            with self._lock:
                if not self._dirty or self.stopped:
                    self._draining = False
                    return
            try:
                self.flush()
                delay = 0.25
            except StoreError as e:
                log.warning("could not write session %s (retrying in %.1f s): %s", self.session_id, delay, e)
                self._sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, 10.0)
            except Exception:
                log.exception("writing session %s failed", self.session_id)
                with self._lock:
                    self._draining = False
                return

    def flush(self) -> None:
        """Fold every user touched before this call into the session document (raises `StoreError`)."""
        with self._fold_lock:
            if self.stopped or not self._dirty:
                return
            self._refill()
            if self._tokens < 1:
                self._sleep((1 - self._tokens) * self._interval)  # what arrives meanwhile goes in this commit
                self._refill()
            with self._lock:
                users, self._dirty = self._dirty, set()
            try:
                if self._commit(sorted(users)):
                    self._tokens -= 1  # only a write of the document counts against the pace
            except BaseException:
                self.touch(users)
                raise

    def _refill(self) -> None:
        now = self._monotonic()
        if self._interval > 0:
            self._tokens = min(float(BURST), self._tokens + (now - self._filled) / self._interval)
        else:
            self._tokens = float(BURST)
        self._filled = now

    def _commit(self, users: list[str]) -> bool:
        """Fold `users` into the session document; whether that wrote it."""
        records, sid = self._records, self.session_id
        ids = {presence_id(sid, u): u for u in users}
        read = records._store.get_many(SESSION_PRESENCE, list(ids))
        presences = {ids[doc_id]: data for doc_id, data in read.items()}

        seen: list[Data] = []

        def run(t: Transaction) -> str:
            seen.clear()
            doc = t.get(SESSIONS, sid)
            writer = t.get(SESSION_WRITERS, sid)
            if doc is None:
                if writer is not None:
                    t.delete(SESSION_WRITERS, sid)
                return "gone"
            if (writer or {}).get("process") != records.process_id:
                return "lost"
            updates = fold(doc, presences)
            if updates:
                updates["lastUpdated"] = records.bump(doc.get("lastUpdated"))
                t.update(SESSIONS, sid, updates)
            seen.append({**doc, **updates})
            return "written" if updates else ""

        outcome = records._store.transaction(run)
        with self._lock:
            self._folded.update(presences)
            if seen:
                self.document = seen[0]
        if outcome == "written":
            self.commits += 1
            records.session_commits += 1
            records.on_session_commit()
        elif outcome:
            records._resigned(self, outcome)
            if outcome == "gone":  # written after the end had removed the session's presences
                for doc_id, data in read.items():
                    if data is not None:
                        records._store.delete(SESSION_PRESENCE, doc_id)
        return outcome == "written"

    def presences(self) -> list[Data]:
        """The session's presences as last delivered."""
        with self._lock:
            return list(self.view.values())
