"""Which image each participant of a session looks at, told to everyone else (`member_image`), across processes.

A participant's image is not a field of the session document (the hot one: its membership is written by one
writer per session, see docs/design.md) but a small document of its own, `memberImages/{sessionID}_{userID}`
(composed like the presence key), which only the process holding that user's socket writes: processes do not
contend on it. Every process holding clients of a session follows the session's image documents (one query
target per session per process, `SessionManager`), and tells its clients when one changes.

A person flicking through images must not cost a write (nor a message to everyone) per image, so each
participant's writes are paced (`MemberImages`): the first switch is written at once, the switches that
follow within `interval` (IMAGE_WRITE_SECONDS, 1 s) are held, and when it is over the last of them is
written; the last image always wins. The process holding the participant tells its own other clients when it
writes (the local fast path, paced alike); other processes tell theirs from the documents' snapshots. A
socket that closes writes "no image" (its document is deleted). A write that fails is retried at the next
`retry` (the session manager's one-second tick) until it is recorded.

The writes due at the same moment share one commit (group commit: a crowd opening its first images at once
costs a few commits), a lone switch is one plain write (one round trip, no transaction: a participant's
document is written by one socket at a time). The rare late write of a socket that is gone, landing after
the user's new socket (on another process) wrote its own, is repaired by the new socket's process, which
follows the same documents (`overwritten`); a delete re-reads the document in its transaction and never
removes a newer socket's.

Like sessions.py, this module imports neither Flask, gevent nor Firestore: it is unit-tested without sockets.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .session_writer import presence_id
from .store import MEMBER_IMAGES, Data, Document, Store, StoreError, Transaction

log = logging.getLogger(__name__)

#: At most this many documents in one commit (Firestore allows 500 writes).
MAX_WRITES_PER_COMMIT = 200

#: How long a member-image document is kept once written, for the TTL policy on `expireAt`; readers ignore it
#: (a participant's document is rewritten at each switch and deleted when its socket closes: what a TTL policy
#: deletes is what a dead process left behind).
IMAGE_TTL = timedelta(days=7)


def image_key(session_id: str, user_id: str) -> str:
    """The member-image document of a user in a session: the presence's key (ids.py bounds its length)."""
    return presence_id(session_id, user_id)


def next_write_at(last: float, now: float, interval: float) -> float:
    """When a participant's next write may go (monotonic seconds): now if none went within `interval`, else
    `interval` after the last one. Whatever is switched to meanwhile waits for it, and only the latest goes."""
    return max(now, last + interval)


def image_in(doc: Data, process_id: str, holds: Callable[[str], bool], lapsed: Callable[[str], bool]) -> str | None:
    """The image a member-image document says its user looks at, or None: none, or the connection that wrote it
    is gone (one of this process, `process_id`, that it no longer `holds`; or one of a process whose lease
    `lapsed`: it died or restarted, and wrote nothing on the way out)."""
    image = doc.get("imageID")
    if not isinstance(image, str) or not image:
        return None
    process = doc.get("process")
    if not isinstance(process, str):
        return None
    if process == process_id:
        return image if holds(str(doc.get("connection", ""))) else None
    return None if lapsed(process) else image


def images_of(docs: Iterable[Document], process_id: str, holds: Callable[[str], bool],
              lapsed: Callable[[str], bool]) -> dict[str, str | None]:
    """User ID → image (None: none) of a session's member-image documents (`image_in`)."""
    images: dict[str, str | None] = {}
    for doc in docs:
        user_id = doc.data.get("userID")
        if isinstance(user_id, str):
            images[user_id] = image_in(doc.data, process_id, holds, lapsed)
    return images


@dataclass(eq=False)
class _Participant:
    """One user of one session whose socket this process holds (or held): what it looks at, what was written."""

    session_id: str
    user_id: str
    connection: str
    connected_at: datetime
    wanted: str | None = None  # what it looks at now (None: nothing yet, or its socket closed)
    written: str | None = None  # what was last written for it (None: nothing, or its document deleted)
    last: float = float("-inf")  # when its last write went (monotonic)
    draining: bool = False  # it waits to be written, or is being written (one at a time)
    closed: bool = False


#: `_Participant.written` of a participant whose document an older socket overwrote: written again.
_OVERWRITTEN = "\x00overwritten"


#: Told when a participant's image is about to be written: (session ID, user ID, image or None).
Announce = Callable[[str, str, str | None], None]


class MemberImages:
    """The images of the participants this process holds, written to the store at most once per `interval` each.

    `spawn` runs a wait, and a commit, in the background (the edge: a greenlet; tests: later or at once); `sleep`
    waits in it until a held switch is due; `announce` is called with each image as its write goes (this
    process's other clients are told then).
    """

    def __init__(self, store: Store, process_id: str, *, interval: float, announce: Announce,
                 spawn: Callable[[Callable[[], None]], Any], clock: Callable[[], datetime],
                 monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] | None = None) -> None:
        self._store = store
        self._process_id = process_id
        self._interval = interval
        self._announce = announce
        self._spawn = spawn
        self._clock = clock
        self._monotonic = monotonic
        # Looked up when called, not when this module was imported: under gevent, the patched sleep.
        self._sleep = sleep or (lambda seconds: time.sleep(seconds))
        self._lock = threading.Lock()
        self._participants: dict[tuple[str, str], _Participant] = {}
        self._ready: dict[tuple[str, str], _Participant] = {}  # due: in the next commit
        self._committing = False
        self.writes = 0  # documents written (or deleted) by this process

    def switch(self, session_id: str, user_id: str, connection: str, connected_at: datetime, image_id: str) -> None:
        """The client `connection` (connected at `connected_at`) of the user looks at `image_id` now."""
        with self._lock:
            key = (session_id, user_id)
            participant = self._participants.get(key)
            if participant is None:
                participant = self._participants[key] = _Participant(session_id, user_id, connection, connected_at)
            elif participant.connection != connection:  # the user came back on a new socket of this process
                participant.connection, participant.connected_at = connection, connected_at
                participant.closed = False
            participant.wanted = image_id
        self._schedule(participant)

    def close(self, session_id: str, user_id: str, connection: str) -> None:
        """The client `connection` of the user is gone: it looks at nothing (written like a switch)."""
        with self._lock:
            participant = self._participants.get((session_id, user_id))
            if participant is None or participant.connection != connection:
                return  # it never looked at an image here, or a newer socket of the user holds its place
            participant.wanted, participant.closed = None, True
        self._schedule(participant)

    def overwritten(self, session_id: str, user_id: str, doc: Data) -> None:
        """The store holds `doc` for a user whose socket this process holds: if an older socket of the user (on
        another process, gone by now) wrote it after this one's last write, this one's image is written again."""
        with self._lock:
            p = self._participants.get((session_id, user_id))
            theirs = doc.get("connectedAt")
            if p is None or p.closed or p.written is None or doc.get("connection") == p.connection or \
                    not isinstance(theirs, datetime) or theirs >= p.connected_at:
                return
            log.info("an older socket of %r overwrote its image in session %s: written again", user_id, session_id)
            p.written = _OVERWRITTEN
        self._schedule(p)

    def retry(self) -> None:
        """Write again what could not be written (call every second)."""
        with self._lock:
            participants = [p for p in self._participants.values() if not p.draining and p.wanted != p.written]
        for participant in participants:
            self._schedule(participant)

    def pending(self) -> int:
        """Participants whose last image is not written yet (held, in flight, or to be retried)."""
        with self._lock:
            return sum(1 for p in self._participants.values() if p.wanted != p.written)

    def _schedule(self, participant: _Participant) -> None:
        """Have the participant's image written when it is due (one wait per participant at a time)."""
        with self._lock:
            start = not participant.draining and participant.wanted != participant.written
            participant.draining = participant.draining or start
        if start:
            self._spawn(lambda: self._when_due(participant))

    def _when_due(self, p: _Participant) -> None:
        """Wait until the participant's next write may go, then queue it for the next commit."""
        while True:
            with self._lock:
                now = self._monotonic()
                wait = next_write_at(p.last, now, self._interval) - now
                if wait <= 0:
                    self._ready[(p.session_id, p.user_id)] = p
                    start = not self._committing
                    self._committing = True
                    break
            self._sleep(wait)  # switches meanwhile change `wanted`: the latest is written
        if start:
            self._spawn(self._commit)  # after the other participants due now have queued themselves

    def _commit(self) -> None:
        """Write every queued participant's image in one commit, again while more are queued (group commit: a
        crowd switching at once costs a few commits, not one each); a failed commit is left to `retry`."""
        while True:
            with self._lock:
                batch = list(self._ready.values())[:MAX_WRITES_PER_COMMIT]
                for p in batch:
                    del self._ready[(p.session_id, p.user_id)]
                if not batch:
                    self._committing = False
                    return
                now = self._monotonic()
                writes = [(p, p.wanted, p.connection, p.connected_at) for p in batch if p.wanted != p.written]
                for p, _, _, _ in writes:
                    p.last = now
            for p, image, _, _ in writes:
                try:
                    self._announce(p.session_id, p.user_id, image)
                except Exception:
                    log.exception("telling the image of %r in session %s failed", p.user_id, p.session_id)
            ok = True
            try:
                if writes:
                    self._write(writes)
            except StoreError as e:
                log.warning("could not record the images of %d participant(s) yet (retried): %s", len(writes), e)
                ok, writes = False, []
            except BaseException:
                with self._lock:
                    self._committing = False
                    for p in batch:
                        p.draining = False
                raise
            again = []
            with self._lock:
                for p, image, _, _ in writes:
                    p.written = image
                self.writes += len(writes)
                for p in batch:
                    p.draining = False
                    key = (p.session_id, p.user_id)
                    if p.wanted != p.written:
                        again.append(p)  # switched meanwhile (or its write failed: `retry` sees to it)
                    elif p.closed and self._participants.get(key) is p:
                        del self._participants[key]  # its socket is gone and so is its document
            for p in again if ok else ():
                self._schedule(p)

    def _write(self, writes: list[tuple[_Participant, str | None, str, datetime]]) -> None:
        """One commit: each participant's document written, or for None deleted, unless a newer socket of the
        user (on another process) wrote it since: a late delete of an older socket must not undo it. A lone
        switch is one plain write (one round trip)."""
        now = self._clock()

        def doc(p: _Participant, image: str, connection: str, connected_at: datetime) -> Data:
            return {"sessionID": p.session_id, "userID": p.user_id, "imageID": image, "process": self._process_id,
                    "connection": connection, "connectedAt": connected_at, "updatedAt": now,
                    "expireAt": now + IMAGE_TTL}

        if len(writes) == 1 and writes[0][1] is not None:
            p, image, connection, connected_at = writes[0]
            self._store.set(MEMBER_IMAGES, image_key(p.session_id, p.user_id), doc(p, image, connection, connected_at))
            return

        def run(t: Transaction) -> None:
            deletes = {image_key(p.session_id, p.user_id): (connection, connected_at)
                       for p, image, connection, connected_at in writes if image is None}
            found = t.get_many(MEMBER_IMAGES, list(deletes)) if deletes else {}
            for p, image, connection, connected_at in writes:
                key = image_key(p.session_id, p.user_id)
                if image is not None:
                    t.set(MEMBER_IMAGES, key, doc(p, image, connection, connected_at))
                    continue
                stored = found.get(key)
                if stored is None:
                    continue
                theirs = stored.get("connectedAt")
                if stored.get("connection") != connection and isinstance(theirs, datetime) and theirs > connected_at:
                    continue
                t.delete(MEMBER_IMAGES, key)

        self._store.transaction(run)
