"""One multiplexed Firestore Listen stream per process, carrying every watch target.

google-cloud-firestore's `on_snapshot` opens a Listen stream (and two threads)
per listener; Google's front end allows 100 concurrent streams per connection
and silently queues the rest, unary calls included. Like the Firestore Web SDK,
this module puts every target on ONE stream, in two layers:

* `ListenState`, a sans-I/O state machine of the google.firestore.v1 Listen
  contract: fed `ListenResponse`s, it keeps each target's documents and resume
  token and says what to deliver at each consistent snapshot point and which
  requests to send. No gRPC, no threads, no clock of its own.
* `ListenMux`, the I/O loop and watch supervisor: it opens the stream when the
  first target is added, sends add/remove requests from a queue, reads
  responses on a consumer thread (a greenlet under gevent's patches) that also
  runs the callbacks, reopens the stream with backoff when it fails, re-adds
  targets the server removed, and logs each incident once.

Target IDs are chosen here: a fresh int32 for every (re-)add, so a late
response for a retired ID is simply ignored. Resume tokens are committed only
at consistent snapshot points, together with the documents they describe, so
that a stream resumed from one replays exactly what was not yet committed.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
import traceback
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import grpc
from google.cloud.firestore_v1.types import ListenRequest, Target, TargetChange
from google.protobuf.message import Message

log = logging.getLogger(__name__)

_Type = TargetChange.TargetChangeType
_STATUS_NAMES = {status.value[0]: status.name for status in grpc.StatusCode}
_MAX_TARGET_ID = 2**31 - 1

#: A failed target is re-added after TARGET_RETRY_INITIAL s, doubling up to TARGET_RETRY_MAX s (±50 % jitter).
TARGET_RETRY_INITIAL = 1.0
TARGET_RETRY_MAX = 60.0
#: A failed stream is reopened after STREAM_RETRY_INITIAL s, doubling up to STREAM_RETRY_MAX s (±50 % jitter);
#: the delay starts over once the stream delivers a consistent snapshot.
STREAM_RETRY_INITIAL = 0.25
STREAM_RETRY_MAX = 30.0
#: A stream left without targets is closed after this long (the Web SDK's idle timeout).
IDLE_CLOSE_SECONDS = 60.0
#: A stream sent requests and has answered nothing for this long: taken for wedged, and reopened.
UNANSWERED_SECONDS = 15.0
#: How long `close` waits for the threads to end.
CLOSE_TIMEOUT = 5.0


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """The delay before retry number `attempt` (1, 2, …): exponential, capped, ±50 % jitter."""
    nominal = min(maximum, initial * 2.0 ** max(0, attempt - 1))
    return min(maximum, nominal * rng.uniform(0.5, 1.5))


def status_text(code: int, message: str) -> str:
    """A google.rpc.Status as `NAME: message`."""
    name = _STATUS_NAMES.get(code, str(code))
    return f"{name}: {message}" if message else name


class Delivery(NamedTuple):
    """What a target delivers at a snapshot point: its documents (raw protobuf), sorted by name."""

    owner: Any
    documents: list[Message]


class TargetFailure(NamedTuple):
    """A target the server removed; it is re-added after `retry_in` seconds."""

    owner: Any
    attempt: int  # consecutive failures of this target, 1 for a new incident
    status: str
    retry_in: float


@dataclass(eq=False)
class _Target:
    handle: int
    spec: Message  # a google.firestore.v1.Target without target_id / resume_token
    kind: str  # "query" or "documents"
    owner: Any
    wire_id: int | None = None  # its ID on the stream; None while not on one
    committed: dict[str, Message] = field(default_factory=dict)  # as of the last snapshot point
    pending: dict[str, Message | None] = field(default_factory=dict)  # since then; None = gone
    reset: bool = False  # `pending` replaces `committed` rather than patching it
    current: bool = False
    token: bytes = b""  # committed resume token
    pending_token: bytes = b""
    delivered: dict[str, Message] | None = None  # what the owner last got; None before the first delivery
    failures: int = 0
    retry_at: float | None = None  # when a failed target is re-added

    def contains(self, name: str) -> bool:
        if name in self.pending:
            return self.pending[name] is not None
        return not self.reset and name in self.committed

    def count(self) -> int:
        """Documents in the target now, pending changes included (what an existence filter counts)."""
        present = sum(1 for doc in self.pending.values() if doc is not None)
        if self.reset:
            return present
        modified = sum(1 for name, doc in self.pending.items() if doc is not None and name in self.committed)
        removed = sum(1 for name, doc in self.pending.items() if doc is None and name in self.committed)
        return len(self.committed) + present - modified - removed

    def drop_pending(self) -> None:
        self.pending = {}
        self.reset = False
        self.current = False
        self.pending_token = b""

    def drop_all(self) -> None:
        """Forget the documents and the resume token (keeping what was delivered, to compare with)."""
        self.drop_pending()
        self.committed = {}
        self.token = b""


def _same(a: dict[str, Message], b: dict[str, Message]) -> bool:
    # Whole-document equality: update_time decides on Firestore; the bundled emulator's update_time has
    # millisecond resolution, so its fields are compared too (equal documents compare cheaply in C).
    return a.keys() == b.keys() and all(a[name] is doc or a[name] == doc for name, doc in b.items())


class ListenState:
    """The sans-I/O state of one Listen stream and every target it carries.

    The I/O layer calls `add` / `remove` as watches come and go, `stream_opened` /
    `stream_closed` as the stream does, `on_response` for each response and `due`
    when a failed target's retry time comes; after each call it sends
    `take_requests()` in order and logs `take_failures()`.
    """

    def __init__(self, database: str, *, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, retry_initial: float = TARGET_RETRY_INITIAL,
                 retry_max: float = TARGET_RETRY_MAX) -> None:
        self._database = database
        self._clock = clock
        self._rng = rng or random.Random()
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._open = False
        self._targets: dict[int, _Target] = {}  # by handle
        self._by_id: dict[int, _Target] = {}  # live on the stream, by target ID
        self._dirty: dict[_Target, None] = {}  # documents or `current` changed since the last snapshot point
        self._token_dirty: dict[_Target, None] = {}
        self._waiting: dict[_Target, None] = {}  # failed, to be re-added at retry_at
        self._next_handle = 1
        self._next_id = 1
        self._requests: list[Message] = []
        self._failures: list[TargetFailure] = []
        self._recovered: list[Any] = []
        self.snapshots = 0  #: consistent snapshot points seen
        self.target_failures = 0  #: targets the server removed
        self.target_readds = 0  #: re-adds of failed targets
        self.target_resets = 0  #: targets re-listened from scratch after an existence-filter mismatch

    # -- what the I/O layer sends and reports -----------------------------------------
    def take_requests(self) -> list[Message]:
        """The ListenRequests (raw protobuf) to send, in order."""
        requests, self._requests = self._requests, []
        return requests

    def take_failures(self) -> list[TargetFailure]:
        """Targets the server removed since the last call."""
        failures, self._failures = self._failures, []
        return failures

    def take_recovered(self) -> list[Any]:
        """Owners of targets that became current again after failing."""
        recovered, self._recovered = self._recovered, []
        return recovered

    # -- targets ------------------------------------------------------------------------
    def add(self, spec: Message, owner: Any) -> int:
        """Start carrying `spec` (a Target: query or documents) for `owner`; returns its handle."""
        spec_pb = getattr(spec, "_pb", spec)
        kind = spec_pb.WhichOneof("target_type")
        if kind not in ("query", "documents"):
            raise ValueError(f"unsupported target type {kind!r}")
        handle = self._next_handle
        self._next_handle += 1
        target = self._targets[handle] = _Target(handle, spec_pb, kind, owner)
        if self._open:
            self._listen(target)
        return handle

    def remove(self, handle: int) -> None:
        """Stop carrying a target (unknown handles are ignored)."""
        target = self._targets.pop(handle, None)
        if target is None:
            return
        for pending in (self._dirty, self._token_dirty, self._waiting):
            pending.pop(target, None)
        self._retire(target)

    def counts(self) -> dict[str, int]:
        """Targets carried (live, or waiting to be re-added), by kind."""
        queries = sum(1 for t in self._targets.values() if t.kind == "query")
        return {"query_targets": queries, "document_targets": len(self._targets) - queries}

    def has_targets(self) -> bool:
        return bool(self._targets)

    def target_id(self, handle: int) -> int | None:
        """The target's current ID on the stream (None while off it)."""
        target = self._targets.get(handle)
        return target.wire_id if target else None

    def resume_token(self, handle: int) -> bytes:
        """The target's committed resume token (empty if none)."""
        target = self._targets.get(handle)
        return target.token if target else b""

    # -- the stream ---------------------------------------------------------------------
    def stream_opened(self) -> None:
        """A new stream: every target not in retry backoff is added, with its resume token."""
        self._open = True
        now = self._clock()
        for target in self._targets.values():
            if target.retry_at is None:
                self._listen(target)
            elif target.retry_at <= now:
                self._readd(target)

    def stream_closed(self) -> None:
        """The stream is gone: uncommitted changes are dropped; committed state and tokens are kept.

        A target re-added with a resume token gets the changes since; one without (the bundled
        emulator sends none) gets its whole result again, applied over what is held, as
        google-cloud-firestore's own watch and the Web SDK do: a document that stopped matching
        while the stream was down is then only noticed on Firestore, whose tokens cover it.
        """
        self._open = False
        self._by_id.clear()
        self._dirty.clear()
        self._token_dirty.clear()
        self._requests.clear()
        for target in self._targets.values():
            target.wire_id = None
            target.drop_pending()

    def due(self) -> float | None:
        """Re-add failed targets whose time has come; returns when the next one is due (None: none, or closed)."""
        if not self._open:
            return None
        now = self._clock()
        upcoming: float | None = None
        for target in list(self._waiting):
            assert target.retry_at is not None
            if target.retry_at <= now:
                self._readd(target)
            elif upcoming is None or target.retry_at < upcoming:
                upcoming = target.retry_at
        return upcoming

    # -- responses ----------------------------------------------------------------------
    def on_response(self, response: Any) -> list[Delivery]:
        """Apply one ListenResponse (proto-plus or raw); returns what to deliver now (at a snapshot point)."""
        pb = getattr(response, "_pb", response)
        kind = pb.WhichOneof("response_type")
        if kind == "target_change":
            return self._on_target_change(pb.target_change)
        if kind == "document_change":
            change = pb.document_change
            document = change.document
            for target_id in change.target_ids:
                self._put(self._by_id.get(target_id), document.name, document)
            for target_id in change.removed_target_ids:
                self._put(self._by_id.get(target_id), document.name, None)
        elif kind in ("document_delete", "document_remove"):
            gone = getattr(pb, kind)
            self._gone(gone.document, gone.removed_target_ids)
        elif kind == "filter":
            self._on_filter(pb.filter.target_id, pb.filter.count)
        return []

    def _on_target_change(self, change: Message) -> list[Delivery]:
        ids = list(change.target_ids)
        kind = change.target_change_type
        token = change.resume_token
        if not ids and kind in (_Type.NO_CHANGE, _Type.ADD) and not token:
            targets = []  # nothing to apply to every target (the common global NO_CHANGE)
        elif ids:
            targets = [self._by_id[i] for i in ids if i in self._by_id]
        else:
            targets = list(self._by_id.values())
        if kind == _Type.REMOVE:
            for target in targets:
                self._fail(target, change.cause.code, change.cause.message)
        else:
            for target in targets:
                if kind == _Type.CURRENT:
                    target.current = True
                    self._dirty[target] = None
                    if target.failures:
                        target.failures = 0
                        self._recovered.append(target.owner)
                elif kind == _Type.RESET:
                    # The server re-sends whatever still matches before the next snapshot point.
                    target.drop_pending()
                    target.reset = True
                    self._dirty[target] = None
                if token:
                    target.pending_token = token
                    self._token_dirty[target] = None
        if not ids and change.HasField("read_time"):
            return self._snapshot()
        return []

    def _put(self, target: _Target | None, name: str, document: Message | None) -> None:
        if target is not None:
            target.pending[name] = document
            self._dirty[target] = None

    def _gone(self, name: str, removed_ids: Any) -> None:
        if removed_ids:
            for target_id in removed_ids:
                self._put(self._by_id.get(target_id), name, None)
        else:  # no target named: every target holding the document
            for target in self._by_id.values():
                if target.contains(name):
                    self._put(target, name, None)

    def _on_filter(self, target_id: int, count: int) -> None:
        target = self._by_id.get(target_id)
        if target is None:
            return
        have = target.count()
        if have == count:
            return
        if target.kind == "documents" and count == 0:
            for name in target.spec.documents.documents:  # the document does not exist
                self._put(target, name, None)
            return
        log.debug("existence filter mismatch on target %d (%d documents here, %d on the server): re-listening",
                  target_id, have, count)
        self.target_resets += 1
        self._retire(target)
        self._drop_all(target)
        self._listen(target)

    def _snapshot(self) -> list[Delivery]:
        self.snapshots += 1
        for target in self._token_dirty:
            if target.pending_token:
                target.token = target.pending_token
                target.pending_token = b""
        self._token_dirty.clear()
        deliveries: list[Delivery] = []
        for target in self._dirty:
            if target.wire_id is None:
                continue
            if target.reset:
                target.committed = {name: doc for name, doc in target.pending.items() if doc is not None}
            else:
                for name, doc in target.pending.items():
                    if doc is None:
                        target.committed.pop(name, None)
                    else:
                        target.committed[name] = doc
            target.pending = {}
            target.reset = False
            if target.current and (target.delivered is None or not _same(target.delivered, target.committed)):
                target.delivered = dict(target.committed)
                deliveries.append(Delivery(target.owner, [target.committed[n] for n in sorted(target.committed)]))
        self._dirty.clear()
        return deliveries

    # -- requests -----------------------------------------------------------------------
    def _allocate_id(self) -> int:
        while True:
            target_id = self._next_id
            self._next_id = 1 if target_id >= _MAX_TARGET_ID else target_id + 1
            if target_id not in self._by_id:
                return target_id

    def _listen(self, target: _Target) -> None:
        if not self._open:
            return
        target.wire_id = self._allocate_id()
        self._by_id[target.wire_id] = target
        add = Target.pb()()
        add.CopyFrom(target.spec)
        add.target_id = target.wire_id
        if target.token:
            add.resume_token = target.token
        self._requests.append(ListenRequest.pb()(database=self._database, add_target=add))

    def _retire(self, target: _Target) -> None:
        if target.wire_id is None:
            return
        del self._by_id[target.wire_id]
        if self._open:
            self._requests.append(ListenRequest.pb()(database=self._database, remove_target=target.wire_id))
        target.wire_id = None

    def _drop_all(self, target: _Target) -> None:
        """Forget the target's documents and token, and that anything of it awaits the next snapshot point."""
        target.drop_all()
        self._dirty.pop(target, None)
        self._token_dirty.pop(target, None)

    def _fail(self, target: _Target, code: int, message: str) -> None:
        if target.wire_id is None:
            return
        del self._by_id[target.wire_id]  # the server has removed it: nothing to send
        target.wire_id = None
        self._drop_all(target)  # re-added from scratch: its token may be what the server refused
        target.failures += 1
        delay = backoff_delay(target.failures, self._retry_initial, self._retry_max, self._rng)
        target.retry_at = self._clock() + delay
        self._waiting[target] = None
        self.target_failures += 1
        status = status_text(code, message) if code else "removed by the server"
        self._failures.append(TargetFailure(target.owner, target.failures, status, delay))

    def _readd(self, target: _Target) -> None:
        self._waiting.pop(target, None)
        target.retry_at = None
        self.target_readds += 1
        self._listen(target)


# -- the I/O layer ------------------------------------------------------------------------

class Listener(ABC):
    """What a target delivers to (on the consumer thread)."""

    #: What is watched, for logs (never document contents).
    label: str = "?"

    @abstractmethod
    def deliver(self, documents: list[Message]) -> None:
        """The target's documents (raw google.firestore.v1.Document), sorted by name."""


class ListenCall(Protocol):
    """A started Listen call: iterates responses; `cancel` ends it from any thread."""

    def __iter__(self) -> Iterator[Any]: ...

    def cancel(self) -> Any: ...


#: Starts a Listen call fed by an iterator of ListenRequests.
Connect = Callable[[Iterator[Message]], ListenCall]

_END = object()


def grpc_connect(client: Any) -> Connect:
    """Listen calls on a google-cloud-firestore client's own channel (the raw transport method, no retry)."""

    def connect(requests: Iterator[Message]) -> ListenCall:
        # Looked up per call: the client builds its channel lazily, and it must not be built before a fork.
        return client._firestore_api._transport.listen(requests, metadata=client._rpc_metadata)

    return connect


@dataclass(eq=False)
class _Stream:
    requests: queue.Queue[Any] = field(default_factory=queue.Queue)
    call: ListenCall | None = None
    cancelled: bool = False  # by us: closing, idle, or a response we could not process

    def request_iterator(self) -> Iterator[Message]:
        while True:
            request = self.requests.get()
            if request is _END:
                return
            yield request


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "the server ended it"
    if isinstance(error, grpc.RpcError) and callable(getattr(error, "code", None)):
        code = error.code()
        details = error.details() if callable(getattr(error, "details", None)) else ""
        return f"{code.name if code else 'UNKNOWN'}: {details or ''}".rstrip(": ")
    return type(error).__name__


def _stack(error: BaseException) -> str:
    # The frames, not the message: an exception's text may quote document contents.
    return "".join(traceback.format_tb(error.__traceback__)).rstrip()


class ListenMux:
    """Every watch target of one Firestore client on one Listen stream, kept alive.

    Threads: a supervisor (opens and reopens the stream, re-adds failed targets,
    closes an idle stream) and one consumer per open stream (reads responses,
    runs callbacks); both are `threading.Thread`s, greenlets under gevent.
    """

    def __init__(self, database: str, connect: Connect, *, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, stream_retry_initial: float = STREAM_RETRY_INITIAL,
                 stream_retry_max: float = STREAM_RETRY_MAX, target_retry_initial: float = TARGET_RETRY_INITIAL,
                 target_retry_max: float = TARGET_RETRY_MAX, idle_close: float = IDLE_CLOSE_SECONDS,
                 unanswered: float = UNANSWERED_SECONDS) -> None:
        self._connect = connect
        self._unanswered = unanswered
        self._clock = clock
        self._rng = rng or random.Random()
        self._stream_retry = (stream_retry_initial, stream_retry_max)
        self._idle_close = idle_close
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._state = ListenState(database, clock=clock, rng=self._rng, retry_initial=target_retry_initial,
                                  retry_max=target_retry_max)
        self._stream: _Stream | None = None
        self._reader: threading.Thread | None = None
        self._supervisor: threading.Thread | None = None
        self._closed = False
        self._open_at = 0.0  # when the stream may be (re)opened
        self._stream_failures = 0  # consecutive, since the last healthy snapshot
        self._incident = False  # a stream failure has been logged and not yet resolved
        self._idle_since: float | None = None
        self._asked_at: float | None = None  # requests were sent since the stream's last response
        self._opened = 0
        self._callback_errors = 0
        self._failing: weakref.WeakSet[Any] = weakref.WeakSet()  # owners whose last delivery raised

    @classmethod
    def for_client(cls, client: Any, **options: Any) -> ListenMux:
        """A multiplexer on `client`'s database and channel."""
        return cls(client._database_string, grpc_connect(client), **options)

    # -- API (any thread) -----------------------------------------------------------------
    def listen(self, spec: Message, owner: Listener) -> int:
        """Carry `spec` (a google.firestore.v1.Target) for `owner`; returns the handle for `unlisten`."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the Listen multiplexer is closed")
            handle = self._state.add(spec, owner)
            self._flush()
            if self._supervisor is None:
                self._supervisor = threading.Thread(target=self._supervise, name="firestore-listen-supervisor",
                                                    daemon=True)
                self._supervisor.start()
            self._wake.notify_all()
        return handle

    def unlisten(self, handle: int) -> None:
        """Stop carrying a target (idempotent)."""
        with self._lock:
            self._state.remove(handle)
            self._flush()
            self._wake.notify_all()

    def stats(self) -> dict[str, int]:
        """streams (0 or 1), query_targets, document_targets, stream_reopens, target_readds, and more counters."""
        with self._lock:
            state = self._state
            return {
                "streams": 1 if self._stream is not None else 0,
                **state.counts(),
                "stream_reopens": max(0, self._opened - 1),
                "target_readds": state.target_readds,
                "target_failures": state.target_failures,
                "target_resets": state.target_resets,
                "callback_errors": self._callback_errors,
            }

    def close(self) -> None:
        """Stop the stream and the threads; no delivery starts afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            stream, self._stream = self._stream, None
            if stream is not None:
                stream.cancelled = True
                stream.requests.put(_END)
            self._wake.notify_all()
            threads = [t for t in (self._supervisor, self._reader) if t is not None]
        if stream is not None and stream.call is not None:
            stream.call.cancel()
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(CLOSE_TIMEOUT)

    # -- internals (under self._lock unless said otherwise) -------------------------------------
    def _flush(self) -> None:
        requests = self._state.take_requests()
        if self._stream is not None:
            for request in requests:
                self._stream.requests.put(request)
            if requests and self._asked_at is None:
                self._asked_at = self._clock()

    def _supervise(self) -> None:
        while True:
            to_open: _Stream | None = None
            to_cancel: _Stream | None = None
            idle = False
            with self._lock:
                while True:
                    if self._closed:
                        return
                    now = self._clock()
                    timeout: float | None = None
                    if self._stream is None and self._reader is None and self._state.has_targets():
                        if now >= self._open_at:
                            to_open = self._begin_stream()
                            break
                        timeout = self._open_at - now
                    if self._stream is not None and not self._state.has_targets():
                        if self._idle_since is None:
                            self._idle_since = now
                        if now - self._idle_since >= self._idle_close:
                            to_cancel, idle = self._detach(), True
                            break
                        timeout = _earliest(timeout, self._idle_since + self._idle_close - now)
                    else:
                        self._idle_since = None
                    if self._stream is not None and self._asked_at is not None:
                        # Seen on Google's emulator under gevent: a stream that takes requests and never answers
                        # again, which no error ends. Every watch of the process would wait forever.
                        if now - self._asked_at >= self._unanswered:
                            log.warning("the Listen stream answered nothing for %.0f s; reopening it",
                                        now - self._asked_at)
                            to_cancel = self._detach()
                            break
                        timeout = _earliest(timeout, self._asked_at + self._unanswered - now)
                    upcoming = self._state.due()
                    self._flush()
                    if upcoming is not None:
                        timeout = _earliest(timeout, max(0.0, upcoming - now))
                    self._wake.wait(timeout)
            if to_open is not None:
                self._start_stream(to_open)
            if to_cancel is not None and to_cancel.call is not None:
                if idle:
                    log.debug("closing the idle Listen stream")
                to_cancel.call.cancel()

    def _begin_stream(self) -> _Stream:
        stream = self._stream = _Stream()
        self._opened += 1
        self._idle_since = None
        self._state.stream_opened()
        self._flush()
        return stream

    def _detach(self) -> _Stream:
        """Take the open stream off duty at once: its reader may take a while to see the cancel, and a new
        stream is opened (when needed) only after that reader has ended."""
        stream = self._stream
        assert stream is not None
        stream.cancelled = True
        self._stream = None
        self._idle_since = None
        self._asked_at = None
        self._state.stream_closed()
        return stream

    def _start_stream(self, stream: _Stream) -> None:
        """Start the call and its consumer (not under the lock)."""
        try:
            call = self._connect(stream.request_iterator())
        except Exception as e:
            self._ended(stream, e)
            return
        with self._lock:
            stream.call = call
            cancelled = stream.cancelled
            self._reader = threading.Thread(target=self._read, args=(stream, call), name="firestore-listen",
                                            daemon=True)
            self._reader.start()
        if cancelled:
            call.cancel()

    def _read(self, stream: _Stream, call: ListenCall) -> None:
        """The consumer: responses in, callbacks out (not under the lock)."""
        error: BaseException | None = None
        try:
            for response in call:
                if not self._on_response(stream, response):
                    break
        except Exception as e:
            error = e
        try:
            call.cancel()
        finally:
            self._ended(stream, error)

    def _on_response(self, stream: _Stream, response: Any) -> bool:
        """Process one response; False once the stream is to be abandoned (not under the lock)."""
        with self._lock:
            if stream.cancelled or self._stream is not stream:
                return False
            self._asked_at = None
            before = self._state.snapshots
            try:
                deliveries = self._state.on_response(response)
            except Exception as e:
                log.error("cannot process a Listen response (%s); reopening the stream\n%s",
                          type(e).__name__, _stack(e))
                stream.cancelled = True
                self._schedule_reopen()
                return False
            self._flush()
            failures = self._state.take_failures()
            recovered = self._state.take_recovered()
            if failures:
                self._wake.notify_all()  # the supervisor times their re-adds
            healthy = self._state.snapshots != before
            restored = healthy and self._incident
            if healthy:
                self._stream_failures = 0
                self._incident = False
        if restored:
            log.info("Firestore Listen stream restored")
        if failures:
            _log_failures(failures)
        for owner in recovered:
            log.info("listen target %s is live again", _label(owner))
        for delivery in deliveries:
            self._deliver(delivery)
        return True

    def _deliver(self, delivery: Delivery) -> None:
        owner = delivery.owner
        try:
            owner.deliver(delivery.documents)
        except Exception as e:
            with self._lock:
                self._callback_errors += 1
            if owner in self._failing:
                log.debug("delivery to %s failed again (%s)", _label(owner), type(e).__name__)
            else:
                self._failing.add(owner)
                log.error("delivery to %s failed (%s); it stays subscribed\n%s", _label(owner),
                          type(e).__name__, _stack(e))
        else:
            if self._failing and owner in self._failing:
                self._failing.discard(owner)
                log.info("delivery to %s works again", _label(owner))

    def _ended(self, stream: _Stream, error: BaseException | None) -> None:
        """A stream's call is over (not under the lock)."""
        with self._lock:
            stream.requests.put(_END)  # ends gRPC's request-sending thread
            if self._reader is threading.current_thread() or stream.call is None:
                self._reader = None
            if self._stream is stream:
                self._stream = None
                self._asked_at = None
                self._state.stream_closed()
            if self._closed:
                return
            if not stream.cancelled:
                delay = self._schedule_reopen()
                targets = sum(self._state.counts().values())
                if not self._incident:
                    self._incident = True
                    log.warning("Firestore Listen stream failed (%s); reopening it in %.1f s with %d targets",
                                _describe(error), delay, targets)
                else:
                    log.debug("Firestore Listen stream failed again (%s); next attempt in %.1f s",
                              _describe(error), delay)
            self._wake.notify_all()

    def _schedule_reopen(self) -> float:
        self._stream_failures += 1
        delay = backoff_delay(self._stream_failures, *self._stream_retry, self._rng)
        self._open_at = self._clock() + delay
        return delay


def _earliest(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)


def _label(owner: Any) -> str:
    return getattr(owner, "label", None) or type(owner).__name__


def _log_failures(failures: list[TargetFailure]) -> None:
    new = [f for f in failures if f.attempt == 1]
    for group, level in ((new, logging.WARNING), ([f for f in failures if f.attempt > 1], logging.DEBUG)):
        if group:
            first = group[0]
            more = f" and {len(group) - 1} more" if len(group) > 1 else ""
            log.log(level, "Firestore removed listen target %s%s (%s); re-adding in %.1f s",
                    _label(first.owner), more, first.status, first.retry_in)
