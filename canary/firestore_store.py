"""The Firestore store, on google-cloud-firestore.

Under gunicorn's gevent worker, `grpc.experimental.gevent.init_gevent()` must
have run before the client is built (wsgi.py does it). Every watch of a store
rides on its one multiplexed Listen stream (`firestore_listen.ListenMux`), so a
process holds one stream however many images and sessions it watches. Snapshot
callbacks arrive on the multiplexer's consumer thread: a greenlet when
threading is patched, a real OS thread when it is not; the session logic hands
them to clients with the thread-safe `Client.safe_enqueue`.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from google.api_core import exceptions as gexc
from google.api_core import retry as gretry
from google.cloud import firestore
from google.cloud.firestore_v1 import _helpers
from google.cloud.firestore_v1.base_query import FieldFilter
from google.cloud.firestore_v1.types import Target
from google.protobuf.message import Message

from .firestore_listen import Listener, ListenMux
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


#: Failed Firestore calls of this process, by the client library's exception (for metrics).
_failures: collections.Counter[str] = collections.Counter()


def _translate(e: Exception) -> StoreError:
    if isinstance(e, gexc.AlreadyExists | gexc.Conflict):
        return AlreadyExists(str(e))  # a precondition that decided something, not a failure
    if isinstance(e, gexc.NotFound):
        return NotFound(str(e))
    _failures[type(e).__name__] += 1
    return StoreError(f"{type(e).__name__}: {e}")


class _FirestoreWatch(Watch, Listener):
    """One target on the store's Listen stream, delivering to one callback."""

    def __init__(self, store: FirestoreStore, label: str, convert: Callable[[list[Message]], Any],
                 callback: Callable[[Any], None]) -> None:
        self._store = store
        self.label = label
        self._convert = convert
        self._callback = callback
        # Held while a delivery runs, so that once `stop` returns no callback runs; reentrant for
        # a callback that stops its own watch.
        self._lock = threading.RLock()
        self._stopped = False
        self._handle: int | None = None

    def start(self, spec: Message) -> None:
        with self._lock:
            self._store._opened(self)
            try:
                self._handle = self._store._mux.listen(spec, self)
            except RuntimeError as e:  # the store is closed
                self._stopped = True
                self._store._closed(self)
                raise StoreError(str(e)) from e

    def deliver(self, documents: list[Message]) -> None:
        with self._lock:
            if not self._stopped:
                self._callback(self._convert(documents))

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            handle = self._handle
        self._store._closed(self)
        if handle is not None:
            self._store._mux.unlisten(handle)


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

    def get_many(self, collection: str, doc_ids: list[str]) -> dict[str, Data | None]:
        return self._store._get_all(collection, doc_ids, self._txn)

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
        self._timeout = timeout
        self._mux = ListenMux.for_client(client)

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

    def ready(self, timeout: float) -> bool:
        try:
            self._ref("sessions", "-canary-health-").get(retry=None, timeout=timeout)
        except Exception as e:
            _translate(e)
            return False
        return True

    def error_counts(self) -> dict[str, int]:
        return dict(_failures)

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

    def get_many(self, collection: str, doc_ids: list[str]) -> dict[str, Data | None]:
        try:
            return self._get_all(collection, doc_ids)
        except gexc.GoogleAPIError as e:
            raise _translate(e) from e

    def _get_all(self, collection: str, doc_ids: list[str],
                 transaction: firestore.Transaction | None = None) -> dict[str, Data | None]:
        """One BatchGetDocuments call (inside `transaction`, if given) for all of `doc_ids`."""
        found: dict[str, Data | None] = dict.fromkeys(doc_ids)
        if doc_ids:
            refs = [self._ref(collection, doc_id) for doc_id in doc_ids]
            for snapshot in self._client.get_all(refs, transaction=transaction, **self._deadline):
                if snapshot.exists:
                    found[snapshot.id] = snapshot.to_dict()
        return found

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
        """Run `fn` in a transaction. The client library retries an aborted commit 5 times at once (keeping
        its place in the lock queue); past that this retries the whole transaction with jittered exponential
        backoff (50 ms doubling to 1 s) until the call deadline, then raises `StoreError`."""
        @firestore.transactional
        def run(txn: firestore.Transaction) -> T:
            return fn(_FirestoreTransaction(self, txn))

        deadline = time.monotonic() + self._timeout
        delay = 0.05
        while True:
            try:
                return run(self._client.transaction())
            except (gexc.Aborted, ValueError) as e:  # ValueError: the library's "failed to commit in N attempts"
                if time.monotonic() + delay >= deadline:
                    raise (_translate(e) if isinstance(e, gexc.GoogleAPIError) else StoreError(str(e))) from e
            except gexc.GoogleAPIError as e:
                raise _translate(e) from e
            time.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, 1.0)

    def _decode(self, document: Message) -> Document:
        return Document(document.name.rsplit("/", 1)[-1], _helpers.decode_dict(document.fields, self._client))

    def watch_query(self, collection: str, field: str, value: Any, callback: QueryCallback) -> Watch:
        query = self._query(collection, field, value)
        parent, _ = query._parent._parent_info()
        spec = Target(query=Target.QueryTarget(parent=parent, structured_query=query._to_protobuf()))
        watch = _FirestoreWatch(self, f"{collection} where {field} == {value!r}", self._decoder(), callback)
        watch.start(Target.pb(spec))
        return watch

    def _decoder(self) -> Callable[[list[Message]], list[Document]]:
        """Decodes a query target's snapshots; a document delivered again unchanged (the Listen state keeps
        the same message) is not decoded again, so a snapshot costs what changed, not the whole result."""
        decoded: dict[str, tuple[Message, Document]] = {}

        def decode(documents: list[Message]) -> list[Document]:
            now = {}
            for message in documents:
                cached = decoded.get(message.name)
                now[message.name] = cached if cached is not None and cached[0] is message else \
                    (message, self._decode(message))
            decoded.clear()
            decoded.update(now)
            return [document for _message, document in now.values()]

        return decode

    def watch_document(self, collection: str, doc_id: str, callback: DocumentCallback) -> Watch:
        spec = Target(documents=Target.DocumentsTarget(documents=[self._ref(collection, doc_id)._document_path]))
        watch = _FirestoreWatch(self, f"{collection}/{doc_id}",
                                lambda documents: self._decode(documents[0]).data if documents else None, callback)
        watch.start(Target.pb(spec))
        return watch

    def watch_stats(self) -> dict[str, int]:
        """The Listen multiplexer's counters: `streams` (open Listen streams, 0 or 1), `query_targets`,
        `document_targets`, `stream_reopens`, `target_readds`, `target_failures`, `target_resets`,
        `callback_errors`."""
        return self._mux.stats()

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
        self._mux.close()
        self._client.close()
