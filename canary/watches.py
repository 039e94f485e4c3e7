"""Image watches: what each client watches, and the store listeners they share.

Firestore bills every listener's reads, so within one process all clients
watching the same image share one `keypoints` and one `boundingBoxes`
listener (`SharedListeners`); listeners grow with distinct images, not with
clients, and stop when their last client leaves or switches.

Each listener keeps its last snapshot's documents, and computes what each new
snapshot changed once (`changes.diff`), for every subscriber: a snapshot
message's `changes` are relative to the previous one the client was sent. A
subscriber joining a listener that has its data already is told every
document as added (`reset`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .changes import Data, Delta, diff, everything
from .config import Config
from .protocol import Event, Kind
from .store import BOUNDING_BOXES, KEYPOINTS, Document, Store, Watch

#: Called with a dict shared by every subscriber of one snapshot, to build each
#: message once per session (and vocabulary) rather than once per client, and
#: what the snapshot changed (shared too: encoded once).
Notify = Callable[[dict[str, Event], Delta], None]
_Key = tuple[str, str]  # (collection, image ID)


@dataclass(eq=False)
class _Listener:
    subscribers: set[Subscription] = field(default_factory=set)
    watch: Watch | None = None
    ready: bool = False  # a snapshot has arrived: new subscribers are told at once
    documents: dict[str, Data] = field(default_factory=dict)  # the last snapshot's, by ID
    everything: Delta | None = None  # `documents` as a reset, for the subscribers joining until the next snapshot


class Subscription:
    """One client's interest in one listener; `cancel` is idempotent."""

    def __init__(self, owner: SharedListeners, key: _Key, notify: Notify) -> None:
        self._owner = owner
        self.key = key
        self.notify = notify

    def cancel(self) -> None:
        self._owner._cancel(self)


class SharedListeners:
    """Store listeners on `<collection> where imageID == X`, shared by subscribers."""

    def __init__(self, store: Store, max_changes_bytes: int | None = None) -> None:
        self._store = store
        #: `changes` larger than this as JSON are sent as null (MAX_SNAPSHOT_CHANGES_BYTES).
        self._max_changes_bytes = Config.max_snapshot_changes_bytes if max_changes_bytes is None \
            else max_changes_bytes
        self._lock = threading.Lock()  # snapshots may arrive on a foreign thread
        self._listeners: dict[_Key, _Listener] = {}

    def subscribe(self, collection: str, image_id: str, notify: Notify) -> Subscription:
        """Call `notify` now if the image's data is loaded, then on every change.

        Raises `StoreError` if a new listener cannot be started.
        """
        key = (collection, image_id)
        subscription = Subscription(self, key, notify)
        with self._lock:
            listener = self._listeners.get(key)
            if listener is not None:
                listener.subscribers.add(subscription)
                if listener.ready:  # told every document now, and what changed from the next snapshot on
                    if listener.everything is None:
                        listener.everything = Delta(everything(listener.documents), self._max_changes_bytes,
                                                    reset=True)
                    notify({}, listener.everything)
                return subscription
            listener = self._listeners[key] = _Listener({subscription})
        try:
            # Outside the lock: the store may deliver the first snapshot synchronously.
            watch = self._store.watch_query(collection, "imageID", image_id,
                                            lambda docs: self._deliver(listener, docs))
        except BaseException:
            with self._lock:
                if self._listeners.get(key) is listener:
                    del self._listeners[key]
            raise
        with self._lock:
            listener.watch = watch
            orphaned = self._listeners.get(key) is not listener  # everyone left meanwhile
        if orphaned:
            watch.stop()
        return subscription

    def _deliver(self, listener: _Listener, docs: list[Document]) -> None:
        documents = {doc.id: doc.data for doc in docs}
        with self._lock:  # the diff, the new state and who is told, together: nobody misses or repeats a change
            changes = diff(listener.documents, documents)
            delta = Delta(changes, self._max_changes_bytes, reset=not listener.ready)
            listener.documents = documents
            listener.everything = None
            listener.ready = True
            subscribers = list(listener.subscribers)
        events: dict[str, Event] = {}
        for subscription in subscribers:
            subscription.notify(events, delta)

    def _cancel(self, subscription: Subscription) -> None:
        with self._lock:
            listener = self._listeners.get(subscription.key)
            if listener is None or subscription not in listener.subscribers:
                return
            listener.subscribers.discard(subscription)
            if listener.subscribers:
                return
            del self._listeners[subscription.key]
            watch = listener.watch
        if watch is not None:
            watch.stop()

    def count(self) -> int:
        """How many listeners are open."""
        with self._lock:
            return len(self._listeners)


class ImageWatches:
    """What one client watches: the keypoints and bounding boxes of one image.

    `switch` replaces both subscriptions (never leaving one behind if the other
    fails); notifications meant for a replaced image are dropped.
    """

    def __init__(self, listeners: SharedListeners, session_id: str, tell: Callable[[Event], object]) -> None:
        self._listeners = listeners
        self._session_id = session_id
        self._tell = tell
        self._subscriptions: tuple[Subscription, ...] = ()
        self._generation = 0

    @property
    def active(self) -> int:
        """How many subscriptions this client holds (0 or 2)."""
        return len(self._subscriptions)

    def switch(self, image_id: str) -> None:
        """Watch `image_id` instead; raises `StoreError` (with nothing left open) on failure."""
        self.stop()
        generation = self._generation
        started: list[Subscription] = []
        try:
            for collection, kind in ((KEYPOINTS, Kind.KEY_POINTS), (BOUNDING_BOXES, Kind.BOUNDING_BOXES)):
                started.append(self._listeners.subscribe(collection, image_id, self._notifier(kind, generation)))
        except BaseException:
            for subscription in started:
                subscription.cancel()
            raise
        self._subscriptions = tuple(started)

    def stop(self) -> None:
        """Drop the current subscriptions (idempotent)."""
        self._generation += 1
        subscriptions, self._subscriptions = self._subscriptions, ()
        for subscription in subscriptions:
            subscription.cancel()

    def _notifier(self, kind: Kind, generation: int) -> Notify:
        def notify(events: dict[str, Event], delta: Delta) -> None:
            if generation == self._generation:
                event = events.get(self._session_id)
                if event is None:  # the first watcher of this session for this snapshot makes it
                    event = events[self._session_id] = Event(kind, sessionID=self._session_id, changes=delta)
                self._tell(event)
        return notify
