"""Session rules: who may create, join and connect, who is told what, across processes.

This module decides and the edges do the I/O: it talks to the store through
`SessionRecords` and the `Store` interface and to clients through the `Peer`
protocol (queue a frame, close; participants.py holds who is connected), and imports neither Flask, gevent nor
Firestore, so every rule here can be unit-tested without sockets.

Two APIs share these sessions (one core, two vocabularies at the edge): the
seed's, where a socket's upgrade creates or joins a session and the session
ends when its owner leaves, and the web app's, where sessions are created and
joined over REST (a join hands out a session token, and the member is listed
from then on), sockets attach to them with that token, and a session lives
until its owner stops it (`persistent`). Each participant is told everything
in its own vocabulary (`protocol.Event`).

The owner and members of one session may be connected to different processes.
Each process that holds clients of a session follows the session document
(one listener per session per process) and derives `member_joined`,
`member_left`, `owner_left`, `owner_joined`, kicks and the end of the session
from its changes, which the session's one writer folds in from the presences
(`records.py`, `session_writer.py`). A client's own arrival is announced at once
by the process that admits it and remembered (`known`, `owner_away`), so the
same change arriving through the listener is not delivered twice; departures
are announced from the document. Snapshots older than what this process
already saw (`version`, from `lastUpdated`) are ignored.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from . import protocol
from .budget import InboundBudget, InboundLimits, Verdict
from .errors import Refusal
from .member_images import MemberImages, images_of
from .participants import ActiveSession, Admission, Grant, LiveSession, Participant, Passwords, Peer, broadcast
from .protocol import Event, Kind, ProtocolError, Vocabulary
from .records import MEMBER, OWNER, SessionRecords, SessionState
from .store import (
    BATCHES,
    MEMBER_IMAGES,
    PROJECTS,
    SESSIONS,
    AlreadyExists,
    Data,
    Document,
    Store,
    StoreError,
    auto_id,
)
from .throttle import PasswordThrottle
from .watches import ImageWatches, SharedListeners

log = logging.getLogger(__name__)

__all__ = ["MEMBER", "OWNER", "Admission", "Participant", "Passwords", "Peer", "Refusal", "SessionManager"]


def _now() -> datetime:
    return datetime.now(UTC)


class SessionManager:
    """The sessions of this process and their rules.

    `defer` runs a callable later, outside the caller's stack: store listeners
    call back from any thread, in the middle of a commit for the memory store,
    and the edge hands those calls to its event loop. By default they queue up
    and run at the end of the current public call (enough for tests).
    """

    def __init__(self, store: Store, *, clock: Callable[[], datetime] = _now,
                 defer: Callable[[Callable[[], None]], Any] | None = None, process_id: str | None = None,
                 owner_grace: float = 0.0, reconnect_grace: float = 30.0, lease_seconds: float = 15.0,
                 token_seconds: float = 60.0, passwords: Passwords | None = None,
                 inbound: InboundLimits | None = None, monotonic: Callable[[], float] = time.monotonic,
                 max_clients: int | None = None, max_per_user: int | None = None,
                 max_per_address: int | None = None,
                 on_commit: Callable[[int, int], None] | None = None, commit_interval: float = 0.0,
                 settle_seconds: float = 10.0, image_interval: float = 0.0,
                 sleep: Callable[[float], None] | None = None,
                 max_snapshot_changes_bytes: int | None = None) -> None:
        self._store = store
        self.lease_held = False  # the last lease renewal succeeded and the process is not stopping
        self._max_clients = max_clients
        self._max_per_user = max_per_user
        self._max_per_address = max_per_address
        self._per_user: Counter[str] = Counter()  # connections being admitted, admitted or connected, by user
        self._per_address: Counter[str] = Counter()  # the same, by capped client address
        self._clock = clock
        self._monotonic = monotonic
        self._inbound = inbound or InboundLimits()
        self._records = SessionRecords(store, process_id or auto_id(), clock, holds=self._holds,
                                       on_commit=on_commit or (lambda _changes, _writes: None),
                                       spawn=defer or (lambda fn: fn()), commit_interval=commit_interval,
                                       settle_seconds=settle_seconds, lease_seconds=lease_seconds,
                                       monotonic=monotonic)
        self._live: dict[str, LiveSession] = {}
        self._admitting: set[str] = set()  # connections admitted, not yet connected nor abandoned
        self._connections: dict[str, Participant] = {}
        self._listeners = SharedListeners(store, max_snapshot_changes_bytes)
        self._owner_grace = owner_grace
        self._reconnect_grace = reconnect_grace
        self._lease_seconds = lease_seconds
        self._token_seconds = token_seconds
        self._passwords = passwords
        self._stopping = False
        self._deferred: deque[Callable[[], None]] = deque()
        self._defer = defer or self._deferred.append
        self._images = MemberImages(store, self.process_id, interval=image_interval, announce=self._announce_image,
                                    spawn=self._defer, clock=clock, monotonic=monotonic, sleep=sleep)

    @property
    def process_id(self) -> str:
        return self._records.process_id

    @property
    def image_writes(self) -> int:
        """Member-image documents this process wrote (or deleted) so far."""
        return self._images.writes

    @property
    def session_count(self) -> int:
        """Sessions this process holds clients of."""
        return len(self._live)

    @property
    def stopping(self) -> bool:
        """Whether this process is restarting (it takes no new clients)."""
        return self._stopping

    def on_session_write(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever this process writes a session document (for metrics)."""
        self._records.on_session_commit = callback

    def run_pending(self) -> None:
        """Handle the store notifications queued by the default `defer` (the edge defers to its loop)."""
        while self._deferred:
            self._deferred.popleft()()

    # -- admission: the seed's API (a socket's upgrade creates or joins) -------------------------
    def _check_running(self) -> None:
        if self._stopping:
            raise Refusal(503, "the service is restarting; connect again")

    @contextmanager
    def _place(self, user_id: str, address: str | None) -> Iterator[str]:
        """Hold a place for a new connection while it is admitted (the store is asked meanwhile, and other
        admissions run): refused at once, before anything is written, when this process, this user or this
        address has enough; given back if the admission fails. Yields the connection's ID, held by this
        process (`_holds`) from now on: a second admission of the same user meanwhile finds it connected."""
        self._check_running()
        if self._max_clients is not None and len(self._admitting) + len(self._connections) >= self._max_clients:
            raise Refusal(503, "this server is full; try again in a moment", headers={"Retry-After": "5"})
        if self._max_per_user is not None and self._per_user[user_id] >= self._max_per_user:
            raise Refusal(429, "too many connections of this user are open")
        if address is not None and self._max_per_address is not None and \
                self._per_address[address] >= self._max_per_address:
            raise Refusal(429, "too many connections from this address")
        connection = auto_id()
        self._admitting.add(connection)
        self._per_user[user_id] += 1
        if address is not None:
            self._per_address[address] += 1
        try:
            yield connection
        except BaseException:
            self._admitting.discard(connection)
            self._released(user_id, address)
            raise

    def _owned_batch(self, batch_id: str, user_id: str) -> str:
        """The project of `batch_id`, if `user_id` owns it; else raise `Refusal` (404, 403)."""
        batch = self._store.get(BATCHES, batch_id)
        if batch is None:
            raise Refusal(404, f"batch {batch_id!r} not found")
        project_id = batch.get("projectID")
        project = self._store.get(PROJECTS, project_id) if isinstance(project_id, str) and project_id else None
        if project is None:
            raise Refusal(404, f"project of batch {batch_id!r} not found")
        if project.get("userID") != user_id:
            raise Refusal(403, "only the project's owner can create a session")
        return project_id

    def open_session(self, batch_id: str, user_id: str, address: str | None = None) -> Admission:
        """Create a session on `batch_id` owned by `user_id` (or resume it), or raise `Refusal`. `address`: the
        client address the connection counts against (None: not capped)."""
        with self._place(user_id, address) as connection:
            return Admission(user_id, OWNER, self._own(batch_id, user_id, connection), address)

    def _own(self, batch_id: str, user_id: str, connection: str) -> SessionState:
        project_id = self._owned_batch(batch_id, user_id)
        email = self._records.emails([user_id])[user_id]

        def create() -> SessionState:
            return self._records.create(batch_id, project_id, user_id, email, connection=connection)

        try:
            return create()
        except AlreadyExists:
            pass
        resumed = self._records.resume_owner(batch_id, user_id, connection)
        if resumed is not None:
            return resumed
        if self._records.clear_stale_lock(batch_id):
            try:
                return create()
            except AlreadyExists:
                pass
        raise Refusal(409, f"a session is already live for batch {batch_id!r}")

    def join_session(self, session_id: str, user_id: str, address: str | None = None) -> Admission:
        """Add `user_id` to the session's members (or give its place back), or raise `Refusal`."""
        with self._place(user_id, address) as connection:
            return Admission(user_id, MEMBER, self._records.join(session_id, user_id, connection=connection), address)

    # -- admission: the web app's API (REST, then a socket with a session token) ----------------
    def create_session(self, batch_id: str, user_id: str, password: str | None = None,
                       email: str | None = None) -> SessionState:
        """Create a session that lives until its owner stops it; nobody is connected yet."""
        self._check_running()
        project_id = self._owned_batch(batch_id, user_id)
        hashed = self._password_hash(password) if password else None
        if email is None:
            email = self._records.emails([user_id])[user_id]

        def create() -> SessionState:
            return self._records.create(batch_id, project_id, user_id, email, connection="", persistent=True,
                                        password_hash=hashed)

        try:
            return create()
        except AlreadyExists:
            if self._records.clear_stale_lock(batch_id):
                try:
                    return create()
                except AlreadyExists:
                    pass
        raise Refusal(409, "Session already exists for this batch")

    def grant(self, session_id: str, user_id: str, password: str | None = None,
              email: str | None = None, *, throttle: PasswordThrottle | None = None,
              address: str | None = None) -> Grant:
        """A web-app join: the owner gets its role back; a member is checked against the session's password
        and listed from now on (until its token, and then the reconnect grace, run out unused). With a
        `throttle`, a password attempt is first let through by it (per user and per `address`, None: not
        counted by address), or refused 429 without checking the password, and its outcome counted."""
        self._check_running()
        doc = self._store.get(SESSIONS, session_id)
        if doc is None:
            raise Refusal(404, "Session not found")
        if doc["owner"]["id"] == user_id:
            return Grant(OWNER, SessionState.of(session_id, doc))
        hashed = doc.get("password")
        if isinstance(hashed, str) and hashed:
            if not password:
                raise Refusal(400, "Missing password")
            attempt = throttle.attempt(session_id, user_id, address) if throttle is not None else nullcontext()
            with attempt as guess:
                right = self._password_ok(password, hashed)
                if guess is not None and right:
                    guess.succeeded()
                elif guess is not None:
                    guess.failed()
            if not right:
                raise Refusal(403, "Invalid session password")
        pending = timedelta(seconds=self._token_seconds + self._reconnect_grace)
        return Grant(MEMBER, self._records.join(session_id, user_id, email, pending=pending))

    def attach(self, session_id: str, user_id: str, role: str, issued_at: datetime,
               address: str | None = None) -> Admission:
        """A web-app socket with a session token issued at `issued_at`: the store is checked again (the
        session exists, the owner is its owner, a member is listed and was not removed since)."""
        with self._place(user_id, address) as connection:
            return Admission(user_id, role, self._records.attach(session_id, user_id, role, issued_at, connection),
                             address)

    def kick(self, session_id: str, caller: str, member_id: str) -> None:
        """The owner removes a member: it is told (`member_kicked`, then 4001), the others see it leave, and
        its tokens issued before now open no socket."""
        self._records.kick(session_id, caller, member_id)

    def stop(self, session_id: str, caller: str) -> None:
        """The owner ends the session: everyone, on every process, gets `session_closed` (then 4000)."""
        self._records.stop(session_id, caller)

    def active(self, *, project_id: str | None = None, batch_id: str | None = None,
               caller: str | None = None) -> list[ActiveSession]:
        """The live sessions of a batch or a project that `caller` owns or is a member of (all with None)."""
        found = (self._store.query(SESSIONS, "batchID", batch_id) if batch_id is not None
                 else self._store.query(SESSIONS, "projectID", project_id))
        sessions = []
        for doc in found:
            owner = doc.data.get("owner", {}).get("id")
            if caller is not None and caller != owner and all(
                    m.get("id") != caller for m in doc.data.get("members", [])):
                continue
            sessions.append(ActiveSession(doc.id, doc.data, self._records.connected(doc.id, owner),
                                          self._images_now(doc.id)))
        return sessions

    def _images_now(self, session_id: str) -> dict[str, str]:
        """The images the session's connected participants look at: its member-image documents (one query; a
        lease not known to run read once), and what this process told of the participants it holds."""
        alive: dict[str, bool] = {}

        def lapsed(process: str) -> bool:
            if process not in alive:
                alive[process] = self._records.process_alive(process)
            return not alive[process]

        images = images_of(self._store.query(MEMBER_IMAGES, "sessionID", session_id), self.process_id,
                           self._holds, lapsed)
        live = self._live.get(session_id)
        if live is not None:
            images.update({p.user_id: live.images.get(p.user_id) for p in live.local()})
        return {user: image for user, image in images.items() if image is not None}

    def _password_hash(self, password: str) -> str:
        if self._passwords is None:
            raise Refusal(500, "session passwords are not available")
        return self._passwords.hash(password)

    def _password_ok(self, password: str, hashed: str) -> bool:
        return self._passwords is not None and self._passwords.verify(password, hashed)

    def _released(self, user_id: str, address: str | None) -> None:
        """A connection's place is free again (see `_place`)."""
        for counts, key in ((self._per_user, user_id), (self._per_address, address)):
            if key is not None:
                counts[key] -= 1
                if counts[key] <= 0:
                    del counts[key]

    def abandon(self, admission: Admission) -> None:
        """Undo an admission whose upgrade failed: as if the client left at once."""
        sid, uid = admission.session_id, admission.user_id
        self._admitting.discard(admission.connection)
        self._released(uid, admission.address)
        try:
            if admission.role == MEMBER:
                self._records.leave(sid, uid, admission.connection)
            else:
                self._records.owner_left(sid, uid, admission.connection, self._owner_grace)
        except StoreError as e:
            log.error("could not undo the admission of %r to %s yet (retried): %s", uid, sid, e)

    def _holds(self, connection: str) -> bool:
        """Whether this process is admitting, or holds live, the connection `connection`."""
        if connection in self._admitting:
            return True
        participant = self._connections.get(connection)
        return participant is not None and not participant.gone and participant.peer.alive()

    # -- connected clients ---------------------------------------------------
    def connect(self, admission: Admission, peer: Peer, vocabulary: Vocabulary = protocol.SEED) -> Participant:
        """Register an upgraded client: welcome it and tell the others."""
        state, sid, uid = admission.state, admission.session_id, admission.user_id
        # A participant keeps its admission, not the member list of the moment (O(members) each).
        kept = replace(admission, state=replace(state, members=()))
        participant = Participant(kept, peer, vocabulary, InboundBudget(self._inbound, self._monotonic()),
                                  connected_at=self._clock())
        participant.watches = ImageWatches(self._listeners, sid, participant.tell)
        self._admitting.discard(state.connection)
        self._connections[state.connection] = participant
        live = self._live_session(state)
        live.version = max(live.version, state.version)
        if admission.role == OWNER:
            live.owner = participant
            participant.tell(Event(Kind.SESSION_CREATED, sessionID=sid, batchID=state.batch_id, role=OWNER,
                                   images=live.images_for(uid)))
            if live.owner_away:
                live.owner_away = False
                broadcast(live.local_members(), live.owner_event(Kind.OWNER_JOINED))
        else:
            live.members[uid] = participant
            participant.tell(Event(Kind.SESSION_JOINED, sessionID=sid, role=MEMBER, ownerID=state.owner_id,
                                   members=list(state.member_ids), images=live.images_for(uid)))
            if uid not in live.known:
                live.known[uid] = next((m.email for m in state.members if m.id == uid), "")
                broadcast(live.everyone_but(uid), live.member_event(Kind.MEMBER_JOINED, uid))
        self.run_pending()
        return participant

    def receive(self, participant: Participant, data: str | bytes) -> str:
        """Handle one client frame; a bad one is answered with an `error` message, one over the client's
        inbound budget is refused (and a client that keeps exceeding it is closed with 1008). What it was:
        its message type, or why it was refused (an error code)."""
        budget, now = participant.budget, self._monotonic()
        if not self._within(participant, budget.frame(now)):
            return "rate_limited"
        try:
            request = protocol.parse_client_frame(data)
        except ProtocolError as e:
            participant.tell(e.event())
            return e.code
        if request.type == protocol.PING.type:
            participant.tell(protocol.pong())
        elif request.type == protocol.SET_IMAGE_ID.type:
            if not self._within(participant, budget.set_image(now)):
                return "rate_limited"
            try:
                participant.watches.switch(request.payload["imageID"])
            except StoreError as e:
                log.warning("watch on image %r failed: %s", request.payload["imageID"], e)
                participant.tell(Event(Kind.ERROR, code="watch_failed",
                                       message="could not watch this image; try again"))
                self.run_pending()
                return "watch_failed"
            if not participant.gone:  # everyone else is told, at most about once a second (member_images.py)
                self._images.switch(participant.session_id, participant.user_id, participant.admission.connection,
                                    participant.connected_at or self._clock(), request.payload["imageID"])
        self.run_pending()
        return request.type

    def ping_allowed(self, participant: Participant) -> bool:
        """A WebSocket ping from the client: whether to answer it (it counts against the inbound budget)."""
        verdict = participant.budget.frame(self._monotonic())
        if verdict is Verdict.CLOSE:
            self._within(participant, verdict)
        return verdict is Verdict.ACCEPT

    def _within(self, participant: Participant, verdict: Verdict) -> bool:
        if verdict is Verdict.ACCEPT:
            return True
        if verdict is Verdict.REFUSE_AND_TELL:
            participant.tell(Event(Kind.ERROR, code="rate_limited",
                                   message="too many messages: this one and the next ones over the limit are "
                                           "ignored; slow down"))
        elif verdict is Verdict.CLOSE and not participant.gone:
            log.warning("closing %s %r of session %s with 1008: it keeps sending over its limit",
                        participant.admission.role, participant.user_id, participant.session_id)
            participant.gone = True
            participant.peer.close(protocol.CLOSE_POLICY_VIOLATION, "message rate limit exceeded")
        return False

    def disconnect(self, participant: Participant) -> None:
        """A client is gone: stop its watches, update the store, tell the others.

        While the process is stopping (a restart) nothing is written: the
        clients are expected back, and other processes clean up after those
        who are not.
        """
        participant.watches.stop()
        connection = participant.admission.connection
        if not self._stopping:  # it looks at nothing now (a restart writes nothing: its lease tells)
            self._images.close(participant.session_id, participant.user_id, connection)
        if self._connections.get(connection) is participant:
            del self._connections[connection]
            self._released(participant.user_id, participant.admission.address)
        participant.gone = True
        live = self._live.get(participant.session_id)
        if live is None or not live.remove(participant):
            return  # the session ended first (its end removed everything), or it was removed (kicked)
        sid, uid = participant.session_id, participant.user_id
        try:
            if self._stopping:
                return
            # The others hear of it from the session document, once its writer has folded it in.
            if not participant.is_owner:
                self._records.leave(sid, uid, connection)
                return
            ended = self._records.owner_left(sid, uid, connection, self._owner_grace)
            if ended and self._live.get(sid) is live:
                self._end_here(live)
        except StoreError as e:
            log.error("could not record yet that %r left session %s (retried): %s", uid, sid, e)
        finally:
            self._forget_if_empty(live)
            self.run_pending()

    # -- the process ------------------------------------------------------------
    def start(self) -> None:
        """Announce this process (its lease); raises `StoreError`."""
        self._records.renew_lease(self._lease_seconds)
        self.lease_held = True

    def maintain(self) -> None:
        """Renew this process's lease and clean up after processes that died (call every lease/3).

        A process that is stopping does neither: its clients are expected elsewhere. One whose lease ran
        out while it stalled tells the store again that it holds its clients.
        """
        if self._stopping:
            return
        try:
            lapsed = self._records.renew_lease(self._lease_seconds)
        except StoreError as e:
            log.error("could not renew this process's lease: %s", e)
            self.lease_held = False
            return
        self.lease_held = True
        try:
            if lapsed:
                log.warning("this process's lease ran out (a stall): re-asserting the clients it holds")
                self._records.reassert((live.session_id, p.user_id, p.admission.role, p.admission.connection)
                                       for live in list(self._live.values()) for p in live.local())
            self._records.retry_unrecorded()
            self._records.reap(self._owner_grace, self._reconnect_grace)
        except StoreError as e:
            log.error("maintenance pass failed: %s", e)
        self.run_pending()

    def tick(self) -> None:
        """Clean up the sessions this process writes (call every second: graces end on time)."""
        if self._stopping:
            return
        try:
            self._records.tick(self._owner_grace, self._reconnect_grace)
        except StoreError as e:
            log.error("clean-up of the sessions this process writes failed: %s", e)
        self._images.retry()
        self.run_pending()

    def shutdown(self) -> None:
        """The process is restarting: close every client with 1012 without ending anything."""
        self._stopping = True
        self.lease_held = False
        try:
            self._records.expire_lease()
        except StoreError as e:
            log.error("could not expire this process's lease: %s", e)
        for live in list(self._live.values()):
            for participant in live.local():
                participant.peer.close(protocol.CLOSE_SERVICE_RESTART, "service restart")

    def client_counts(self) -> dict[tuple[str, str], int]:
        """Connected clients by (role, API vocabulary), every combination included."""
        counts = {(role, vocabulary.name): 0 for role in (OWNER, MEMBER) for vocabulary in protocol.VOCABULARIES}
        for live in self._live.values():
            for participant in live.local():
                counts[participant.admission.role, participant.vocabulary.name] += 1
        return counts

    def stats(self) -> dict[str, int]:
        """Counts of what this process holds, for monitoring and tests."""
        local = [p for s in self._live.values() for p in s.local()]
        return {
            "sessions": len(self._live),
            "participants": len(local),
            "image_watches": sum(p.watches.active for p in local),
            "image_listeners": self._listeners.count(),
            "session_listeners": sum(1 for s in self._live.values() if s.listener is not None),
            "member_image_listeners": sum(1 for s in self._live.values() if s.images_listener is not None),
            "session_writers": len(self._records.writers()),  # each follows its session's presences
        }

    # -- following a session -------------------------------------------------------
    def _live_session(self, state: SessionState) -> LiveSession:
        live = self._live.get(state.session_id)
        if live is not None:
            return live
        live = LiveSession(state.session_id, state.batch_id, state.owner_id, state.owner.email,
                            {m.id: m.email for m in state.members}, state.version, state.owner_away)
        self._live[state.session_id] = live
        try:
            live.listener = self._store.watch_document(
                SESSIONS, state.session_id, lambda doc: self._defer(lambda: self._on_snapshot(live, doc)))
        except StoreError as e:
            log.error("cannot follow session %s: events from other processes will be missed: %s",
                      state.session_id, e)
        self._follow_images(live)
        return live

    # -- the images the participants look at (member_images.py) ----------------------------------
    def _follow_images(self, live: LiveSession) -> None:
        """Follow the session's member-image documents: read once now (what welcomes tell), then their changes."""
        sid = live.session_id
        try:
            self._on_images(live, self._store.query(MEMBER_IMAGES, "sessionID", sid), announce=False)
            live.images_listener = self._store.watch_query(
                MEMBER_IMAGES, "sessionID", sid, lambda docs: self._defer(lambda: self._on_images(live, docs)))
        except StoreError as e:
            log.error("cannot follow the images of session %s: other processes' members' images will be missed: "
                      "%s", sid, e)
        if self._live.get(sid) is not live:  # it ended meanwhile
            self._unfollow(live)

    def _on_images(self, live: LiveSession, docs: list[Document], announce: bool = True) -> None:
        """A snapshot of the session's member-image documents: each participant whose image differs from what
        this process told is announced to its clients. Those this process holds are told by it when it writes
        them (`_announce_image`), never from the store (a late snapshot of its own write is not news)."""
        if self._live.get(live.session_id) is not live:
            return
        seen = images_of(docs, self.process_id, self._holds,
                         lambda process: not self._records.process_alive(process, read=False))
        local = {p.user_id for p in live.local()}
        for doc in docs:  # a late write of an older socket of a user held here is repaired
            if doc.data.get("userID") in local and doc.data.get("process") != self.process_id:
                self._images.overwritten(live.session_id, doc.data["userID"], doc.data)
        for uid in [u for u in seen.keys() | live.images.keys() if u not in local]:
            image = seen.get(uid)
            if live.images.get(uid) != image:
                self._told(live, uid, image, announce)

    def _announce_image(self, session_id: str, user_id: str, image_id: str | None) -> None:
        """A participant held here looks at `image_id` now (its write goes): the others here are told."""
        live = self._live.get(session_id)
        if live is not None and live.images.get(user_id) != image_id:
            self._told(live, user_id, image_id, True)

    def _told(self, live: LiveSession, user_id: str, image_id: str | None, announce: bool) -> None:
        if image_id is None:
            live.images.pop(user_id, None)
        else:
            live.images[user_id] = image_id
        if announce:
            broadcast(live.everyone_but(user_id), live.image_event(user_id, image_id))

    def _on_snapshot(self, live: LiveSession, doc: Data | None) -> None:
        if self._live.get(live.session_id) is not live:
            return  # no longer followed
        self._apply(live, doc)

    def _apply(self, live: LiveSession, doc: Data | None) -> None:
        if self._live.get(live.session_id) is not live:
            return
        if doc is None:
            self._end_here(live)
            return
        version = doc.get("lastUpdated")
        if isinstance(version, datetime):
            if version < live.version:
                return  # older than what this process wrote or saw
            live.version = version
        members = {m["id"]: m.get("email", "") for m in doc.get("members", [])}  # ordered, constant-time
        for uid, email in members.items():
            if uid not in live.known:
                live.known[uid] = email
                broadcast(live.everyone_but(uid), live.member_event(Kind.MEMBER_JOINED, uid))
        for uid in [u for u in live.known if u not in members]:
            kicked = live.members.get(uid)
            if kicked is not None:  # connected here and no longer listed: the owner removed it
                self._kick_here(live, kicked)
            broadcast(live.everyone_but(uid), live.member_event(Kind.MEMBER_LEFT, uid))
            del live.known[uid]
        away = doc.get("ownerLeftAt") is not None and live.owner is None
        if away != live.owner_away:
            live.owner_away = away
            broadcast(live.local_members(), live.owner_event(Kind.OWNER_LEFT if away else Kind.OWNER_JOINED))

    def _kick_here(self, live: LiveSession, participant: Participant) -> None:
        live.remove(participant)
        participant.watches.stop()
        participant.tell(Event(Kind.MEMBER_KICKED, sessionID=live.session_id))
        participant.peer.close(protocol.CLOSE_MEMBER_KICKED, "member removed")

    def _end_here(self, live: LiveSession) -> None:
        """The session document is gone (the session ended, here or on another process)."""
        self._unfollow(live)
        self._records.session_gone(live.session_id)
        event = Event(Kind.SESSION_CLOSED, sessionID=live.session_id)
        for participant in live.local():
            participant.watches.stop()
            participant.tell(event)
            participant.peer.close(protocol.CLOSE_SESSION_CLOSED, "session closed")

    def _unfollow(self, live: LiveSession) -> None:
        if self._live.get(live.session_id) is live:
            del self._live[live.session_id]
        for listener in (live.listener, live.images_listener):
            if listener is not None:
                listener.stop()
        live.listener = live.images_listener = None

    def _forget_if_empty(self, live: LiveSession) -> None:
        if not live.local():
            self._unfollow(live)
