"""The in-memory store: the embedded default, with Firestore's semantics.

One lock serialises transactions (so they are isolated), documents are copied
in and out (so callers never share mutable state with the store; a query
listener gets the same copy of a document until it changes, as from
Firestore's store), and watch callbacks run after the commit, outside the
lock, in the committing thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from .store import (
    AlreadyExists,
    Data,
    Document,
    DocumentCallback,
    NotFound,
    QueryCallback,
    Store,
    T,
    Transaction,
    Watch,
)

_Key = tuple[str, str]  # (collection, document ID)


def _copy(value: Any) -> Any:
    """A deep copy of JSON-like data (dicts, lists, immutable leaves): several times faster
    than `copy.deepcopy`, which matters for session documents with many members."""
    kind = type(value)
    if kind is dict:  # copied whole in C, then only its nested values again: most values are strings
        copied = value.copy()
        for k, v in copied.items():
            if type(v) in _NESTED:
                copied[k] = _copy(v)  # replacing a value, not adding a key: safe while iterating
        return copied
    if kind is list:
        return [v if type(v) not in _NESTED else _copy(v) for v in value]
    return value


_NESTED = frozenset((dict, list))


class _MemoryWatch(Watch):
    def __init__(self, store: MemoryStore, collection: str, matches: Callable[[str, Data | None], bool],
                 notify: Callable[[], None], kind: str) -> None:
        self._store = store
        self.kind = kind  # "query" or "document"
        self.collection = collection
        self.matches = matches
        self.notify = notify
        self.active = True

    def stop(self) -> None:
        self._store._remove_watch(self)


class _MemoryTransaction(Transaction):
    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self.writes: list[tuple[str, _Key, Data | None]] = []

    def get(self, collection: str, doc_id: str) -> Data | None:
        return self._store._read(collection, doc_id)

    def create(self, collection: str, doc_id: str, data: Data) -> None:
        self.writes.append(("create", (collection, doc_id), _copy(data)))

    def set(self, collection: str, doc_id: str, data: Data) -> None:
        self.writes.append(("set", (collection, doc_id), _copy(data)))

    def update(self, collection: str, doc_id: str, fields: Data) -> None:
        self.writes.append(("update", (collection, doc_id), _copy(fields)))

    def delete(self, collection: str, doc_id: str) -> None:
        self.writes.append(("delete", (collection, doc_id), None))


class MemoryStore(Store):
    """A process-local `Store`; nothing is persisted."""

    def __init__(self, seed: dict[str, dict[str, Data]] | None = None) -> None:
        self._lock = threading.RLock()
        self._docs: dict[str, dict[str, Data]] = {}
        self._watches: dict[str, set[_MemoryWatch]] = {}
        for collection, docs in (seed or {}).items():
            self._docs[collection] = _copy(docs)

    # -- reads --------------------------------------------------------------
    def _read(self, collection: str, doc_id: str) -> Data | None:
        with self._lock:
            doc = self._docs.get(collection, {}).get(doc_id)
            return _copy(doc) if doc is not None else None

    def get(self, collection: str, doc_id: str) -> Data | None:
        return self._read(collection, doc_id)

    def query(self, collection: str, field: str, value: Any) -> list[Document]:
        with self._lock:
            return [Document(doc_id, _copy(data))
                    for doc_id, data in self._docs.get(collection, {}).items()
                    if data.get(field) == value]

    def documents(self, collection: str) -> list[Document]:
        with self._lock:
            return [Document(i, _copy(d)) for i, d in self._docs.get(collection, {}).items()]

    # -- writes -------------------------------------------------------------
    def set(self, collection: str, doc_id: str, data: Data) -> None:
        self.transaction(lambda t: t.set(collection, doc_id, data))

    def delete(self, collection: str, doc_id: str) -> None:
        self.transaction(lambda t: t.delete(collection, doc_id))

    def transaction(self, fn: Callable[[Transaction], T]) -> T:
        txn = _MemoryTransaction(self)
        with self._lock:
            result = fn(txn)
            changed = self._commit(txn.writes)
            to_notify = self._affected(changed)
        for watch in to_notify:
            if watch.active:
                watch.notify()
        return result

    def _commit(self, writes: list[tuple[str, _Key, Data | None]]) -> list[tuple[_Key, Data | None, Data | None]]:
        # Check every precondition before applying anything: all or nothing.
        staged: dict[_Key, Data | None] = {}

        def current(key: _Key) -> Data | None:
            if key in staged:
                return staged[key]
            return self._docs.get(key[0], {}).get(key[1])

        for op, key, data in writes:
            existing = current(key)
            if op == "create":
                if existing is not None:
                    raise AlreadyExists(f"{key[0]}/{key[1]} already exists")
                staged[key] = data
            elif op == "set":
                staged[key] = data
            elif op == "update":
                if existing is None:
                    raise NotFound(f"{key[0]}/{key[1]} not found")
                staged[key] = {**existing, **(data or {})}
            else:
                staged[key] = None
        changed = []
        for (collection, doc_id), new in staged.items():
            docs = self._docs.setdefault(collection, {})
            old = docs.get(doc_id)
            if new is None:
                docs.pop(doc_id, None)
            else:
                docs[doc_id] = new
            if old != new:
                changed.append(((collection, doc_id), old, new))
        return changed

    # -- watches ------------------------------------------------------------
    def _affected(self, changed: Iterable[tuple[_Key, Data | None, Data | None]]) -> list[_MemoryWatch]:
        hit: dict[int, _MemoryWatch] = {}
        for (collection, doc_id), old, new in changed:
            for watch in self._watches.get(collection, ()):
                if watch.matches(doc_id, old) or watch.matches(doc_id, new):
                    hit[id(watch)] = watch
        return list(hit.values())

    def _add_watch(self, watch: _MemoryWatch) -> _MemoryWatch:
        with self._lock:
            self._watches.setdefault(watch.collection, set()).add(watch)
        watch.notify()  # the first snapshot: the current state
        return watch

    def _remove_watch(self, watch: _MemoryWatch) -> None:
        with self._lock:
            watch.active = False
            watches = self._watches.get(watch.collection)
            if watches is not None:
                watches.discard(watch)

    def watch_query(self, collection: str, field: str, value: Any, callback: QueryCallback) -> Watch:
        def matches(_doc_id: str, data: Data | None) -> bool:
            return data is not None and data.get(field) == value

        # A document unchanged since the last snapshot is delivered as the same copy (Firestore's store does
        # likewise with its decoded documents): a snapshot of a large query after one change copies one
        # document, not all of them. Stored documents are replaced on every write, never changed in place.
        delivered: dict[str, tuple[Data, Document]] = {}

        def snapshot() -> None:
            with self._lock:
                documents = []
                for doc_id, data in self._docs.get(collection, {}).items():
                    if data.get(field) != value:
                        continue
                    last = delivered.get(doc_id)
                    if last is None or last[0] is not data:
                        last = delivered[doc_id] = (data, Document(doc_id, _copy(data)))
                    documents.append(last[1])
                if len(delivered) > len(documents):
                    for doc_id in delivered.keys() - {d.id for d in documents}:
                        del delivered[doc_id]
            callback(documents)

        return self._add_watch(_MemoryWatch(self, collection, matches, snapshot, "query"))

    def watch_document(self, collection: str, doc_id: str, callback: DocumentCallback) -> Watch:
        return self._add_watch(_MemoryWatch(
            self, collection, lambda i, _data: i == doc_id, lambda: callback(self.get(collection, doc_id)),
            "document"))

    def watch_count(self) -> int:
        with self._lock:
            return sum(len(w) for w in self._watches.values())

    def watch_stats(self) -> dict[str, int]:
        with self._lock:
            kinds = [w.kind for watches in self._watches.values() for w in watches]
        return {"streams": 0, "query_targets": kinds.count("query"), "document_targets": kinds.count("document")}
