"""The Firestore store, on google-cloud-firestore.

Under gunicorn's gevent worker, `grpc.experimental.gevent.init_gevent()` must
have run before the client is built (wsgi.py does it). Snapshot callbacks
arrive on the library's consumer thread: a greenlet when threading is patched,
a real OS thread when it is not; the session logic hands them to clients with
the thread-safe `Client.safe_enqueue`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from google.api_core import exceptions as gexc
from google.api_core import retry as gretry
from google.cloud import firestore
from google.cloud.firestore_v1.base_query import FieldFilter

from .store import (
    AlreadyExists,
    Data,
    Document,
    DocumentCallback,
    NotFound,
    QueryCallback,
    Store,
    StoreError,
    T,
    Transaction,
    Watch,
)

log = logging.getLogger(__name__)

#: Default deadline of each Firestore call, retries included, in seconds: a dead
#: backend is an error, not a hang (the library would retry for up to 60 s).
DEFAULT_TIMEOUT = 10.0


def _translate(e: Exception) -> StoreError:
    if isinstance(e, gexc.AlreadyExists | gexc.Conflict):
        return AlreadyExists(str(e))
    if isinstance(e, gexc.NotFound):
        return NotFound(str(e))
    return StoreError(f"{type(e).__name__}: {e}")


class _FirestoreWatch(Watch):
    def __init__(self, store: FirestoreStore, start: Callable[[], Any]) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._stopped = False
        try:
            self._watch = start()
        except gexc.GoogleAPIError as e:
            raise _translate(e) from e
        store._opened(self)

    @property
    def alive(self) -> bool:
        """False once the listener has ended by itself (an unrecoverable stream error)."""
        closed = getattr(self._watch, "_closed", False)
        return not closed

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._store._closed(self)
        try:
            self._watch.unsubscribe()
        except Exception as e:  # a listener that already died reports its reason here
            log.debug("listener ended with %r", e)


class _FirestoreTransaction(Transaction):
    def __init__(self, store: FirestoreStore, txn: firestore.Transaction) -> None:
        self._store = store
        self._client = store._client
        self._txn = txn

    def _ref(self, collection: str, doc_id: str) -> firestore.DocumentReference:
        return self._client.collection(collection).document(doc_id)

    def get(self, collection: str, doc_id: str) -> Data | None:
        snapshot = self._ref(collection, doc_id).get(transaction=self._txn, **self._store._deadline)
        return snapshot.to_dict() if snapshot.exists else None

    def create(self, collection: str, doc_id: str, data: Data) -> None:
        self._txn.create(self._ref(collection, doc_id), data)

    def set(self, collection: str, doc_id: str, data: Data) -> None:
        self._txn.set(self._ref(collection, doc_id), data)

    def update(self, collection: str, doc_id: str, fields: Data) -> None:
        self._txn.update(self._ref(collection, doc_id), fields)

    def delete(self, collection: str, doc_id: str) -> None:
        self._txn.delete(self._ref(collection, doc_id))


class FirestoreStore(Store):
    """A `Store` on a Firestore database (or an emulator)."""

    def __init__(self, client: firestore.Client, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._watches: set[_FirestoreWatch] = set()
        retry = gretry.Retry(initial=0.1, maximum=1.0, multiplier=2.0, timeout=timeout,
                             predicate=gretry.if_transient_error)
        self._deadline: dict[str, Any] = {"retry": retry, "timeout": timeout}

    @classmethod
    def connect(cls, project: str, database: str = "(default)", timeout: float = DEFAULT_TIMEOUT) -> FirestoreStore:
        """A store on `project`'s `database`; honours FIRESTORE_EMULATOR_HOST."""
        return cls(firestore.Client(project=project, database=database), timeout)

    def check(self) -> None:
        """Raise `StoreError` unless Firestore answers a read within the call deadline."""
        try:
            self._ref("sessions", "-canary-health-").get(**self._deadline)
        except Exception as e:
            raise StoreError(f"Firestore did not answer: {_translate(e)}") from e

    def _ref(self, collection: str, doc_id: str) -> firestore.DocumentReference:
        return self._client.collection(collection).document(doc_id)

    def _query(self, collection: str, field: str, value: Any) -> firestore.Query:
        return self._client.collection(collection).where(filter=FieldFilter(field, "==", value))

    def get(self, collection: str, doc_id: str) -> Data | None:
        try:
            snapshot = self._ref(collection, doc_id).get(**self._deadline)
        except gexc.GoogleAPIError as e:
            raise _translate(e) from e
        return snapshot.to_dict() if snapshot.exists else None

    def query(self, collection: str, field: str, value: Any) -> list[Document]:
        try:
            return [Document(s.id, s.to_dict()) for s in
                    self._query(collection, field, value).stream(**self._deadline)]
        except gexc.GoogleAPIError as e:
            raise _translate(e) from e

    def documents(self, collection: str) -> list[Document]:
        try:
            return [Document(s.id, s.to_dict()) for s in self._client.collection(collection).stream(**self._deadline)]
        except gexc.GoogleAPIError as e:
            raise _translate(e) from e

    def set(self, collection: str, doc_id: str, data: Data) -> None:
        try:
            self._ref(collection, doc_id).set(data, **self._deadline)
        except gexc.GoogleAPIError as e:
            raise _translate(e) from e

    def delete(self, collection: str, doc_id: str) -> None:
        try:
            self._ref(collection, doc_id).delete(**self._deadline)
        except gexc.GoogleAPIError as e:
            raise _translate(e) from e

    def transaction(self, fn: Callable[[Transaction], T]) -> T:
        @firestore.transactional
        def run(txn: firestore.Transaction) -> T:
            return fn(_FirestoreTransaction(self, txn))

        try:
            return run(self._client.transaction())
        except gexc.GoogleAPIError as e:
            raise _translate(e) from e
        except ValueError as e:  # the library's "failed to commit after N attempts"
            raise StoreError(str(e)) from e

    def watch_query(self, collection: str, field: str, value: Any, callback: QueryCallback) -> Watch:
        def on_snapshot(snapshots: list[Any], _changes: Any, _read_time: Any) -> None:
            callback([Document(s.id, s.to_dict()) for s in snapshots])

        return _FirestoreWatch(self, lambda: self._query(collection, field, value).on_snapshot(on_snapshot))

    def watch_document(self, collection: str, doc_id: str, callback: DocumentCallback) -> Watch:
        def on_snapshot(snapshots: list[Any], _changes: Any, _read_time: Any) -> None:
            # A deleted document arrives as an empty list (or a snapshot that does not exist).
            callback(snapshots[0].to_dict() if snapshots and snapshots[0].exists else None)

        return _FirestoreWatch(self, lambda: self._ref(collection, doc_id).on_snapshot(on_snapshot))

    def _opened(self, watch: _FirestoreWatch) -> None:
        with self._lock:
            self._watches.add(watch)

    def _closed(self, watch: _FirestoreWatch) -> None:
        with self._lock:
            self._watches.discard(watch)

    def watch_count(self) -> int:
        with self._lock:
            return len(self._watches)

    def close(self) -> None:
        with self._lock:
            watches = list(self._watches)
        for watch in watches:
            watch.stop()
        self._client.close()
