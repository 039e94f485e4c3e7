"""Contract tests of the `canary.store.Store` interface, run against every implementation.

One module, parametrised over both implementations: the in-memory store and
the Firestore store on the emulator (tests/conftest.py's `emulator`). The
tests do not rely on watch callbacks running in the writing thread: they wait
(bounded) for deliveries, and check the absence of a delivery by making a
later, matching change and looking at what arrived.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import EMULATOR_GAP

from canary.firestore_store import FirestoreStore
from canary.memory_store import MemoryStore
from canary.store import AlreadyExists, Document, NotFound, Store, StoreError, Transaction

WAIT = 5.0


@pytest.fixture(params=["memory", "firestore"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    """A store of each implementation (test data lives in a collection of its own)."""
    if request.param == "memory":
        impl: Store = MemoryStore()
    else:
        impl = FirestoreStore(request.getfixturevalue("emulator").client())
    yield impl
    impl.close()


@pytest.fixture
def atomic(request: pytest.FixtureRequest) -> None:
    """Skip on the npm fallback emulator, whose commits are neither atomic nor isolated."""
    if "firestore" in request.node.callspec.id and request.getfixturevalue("emulator").bundled:
        pytest.skip(EMULATOR_GAP + "; nor does it apply a commit all-or-nothing")


@pytest.fixture
def coll() -> str:
    """A collection name no other test uses (stores may be shared)."""
    return f"items-{uuid.uuid4().hex[:8]}"


class Recorder:
    """A watch callback that records each delivery and lets a test wait for them."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self._cond = threading.Condition()

    def __call__(self, value: Any) -> None:
        with self._cond:
            self.calls.append(value)
            self._cond.notify_all()

    def wait(self, count: int) -> Any:
        """Wait for the `count`-th delivery and return it."""
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.calls) >= count, WAIT), \
                f"expected {count} deliveries, got {self.calls}"
            return self.calls[count - 1]


def ids(documents: list[Document]) -> set[str]:
    return {d.id for d in documents}


# -- documents ---------------------------------------------------------------------

def test_get_set_delete(store: Store, coll: str) -> None:
    assert store.get(coll, "a") is None
    store.set(coll, "a", {"n": 1, "tags": ["x"]})
    assert store.get(coll, "a") == {"n": 1, "tags": ["x"]}
    store.delete(coll, "a")
    assert store.get(coll, "a") is None
    store.delete(coll, "a")  # deleting a missing document is not an error
    store.delete(coll, "never-there")
    assert store.get(coll, "a") is None


def test_set_replaces_the_whole_document(store: Store, coll: str, request: pytest.FixtureRequest) -> None:
    if "firestore" in request.node.callspec.id and request.getfixturevalue("emulator").bundled:
        pytest.skip("@firestore-emulator/server merges set() into the existing document instead of replacing it "
                    "(the service itself never overwrites a document with set)")
    store.set(coll, "a", {"n": 1, "tags": ["x"]})
    store.set(coll, "a", {"m": 2})
    assert store.get(coll, "a") == {"m": 2}


def test_data_is_copied_in_and_out(store: Store, coll: str) -> None:
    data = {"tags": ["x"], "nested": {"k": 1}}
    store.set(coll, "a", data)
    data["tags"].append("changed-after-set")
    got = store.get(coll, "a")
    got["tags"].append("y")
    got["nested"]["k"] = 2
    store.query(coll, "nested", {"k": 1})[0].data["tags"].append("z")
    assert store.get(coll, "a") == {"tags": ["x"], "nested": {"k": 1}}


def test_query_by_field(store: Store, coll: str) -> None:
    store.set(coll, "a", {"imageID": "i1", "v": 1})
    store.set(coll, "b", {"imageID": "i2", "v": 2})
    store.set(coll, "c", {"imageID": "i1", "v": 3})
    store.set(coll, "d", {"v": 4})
    found = store.query(coll, "imageID", "i1")
    assert {d.id: d.data for d in found} == {"a": {"imageID": "i1", "v": 1}, "c": {"imageID": "i1", "v": 3}}
    assert store.query(coll, "imageID", "nope") == []
    assert store.query(f"{coll}-empty", "imageID", "i1") == []


def test_get_many_reads_several_documents_at_once(store: Store, coll: str) -> None:
    store.set(coll, "a", {"n": 1})
    store.set(coll, "b", {"n": 2})
    assert store.get_many(coll, ["a", "missing", "b"]) == {"a": {"n": 1}, "missing": None, "b": {"n": 2}}
    assert store.get_many(coll, []) == {}
    assert store.transaction(lambda t: t.get_many(coll, ["b", "nope"])) == {"b": {"n": 2}, "nope": None}


# -- transactions --------------------------------------------------------------------

def test_transaction_commits_its_writes_and_returns_the_result(store: Store, coll: str) -> None:
    store.set(coll, "old", {"n": 1})
    store.set(coll, "gone", {"n": 0})

    def fn(t: Transaction) -> int:
        n = t.get(coll, "old")["n"]
        t.create(coll, "new", {"n": n + 1})
        t.update(coll, "old", {"m": 5})
        t.delete(coll, "gone")
        return n

    assert store.transaction(fn) == 1
    assert store.get(coll, "new") == {"n": 2}
    assert store.get(coll, "old") == {"n": 1, "m": 5}, "update merges fields"
    assert store.get(coll, "gone") is None


@pytest.mark.parametrize("create_first", [True, False], ids=["create-first", "create-last"])
def test_create_of_an_existing_document_fails_and_applies_nothing(store: Store, coll: str, create_first: bool,
                                                                   request: pytest.FixtureRequest) -> None:
    if not create_first:
        request.getfixturevalue("atomic")
    store.set(coll, "taken", {"owner": "first"})

    def fn(t: Transaction) -> None:
        if create_first:
            t.create(coll, "taken", {"owner": "second"})
        t.set(coll, "other", {"written": True})
        if not create_first:
            t.create(coll, "taken", {"owner": "second"})

    with pytest.raises(AlreadyExists):
        store.transaction(fn)
    assert store.get(coll, "taken") == {"owner": "first"}
    assert store.get(coll, "other") is None


def test_update_of_a_missing_document_fails_and_applies_nothing(store: Store, coll: str, atomic: None) -> None:
    def fn(t: Transaction) -> None:
        t.set(coll, "other", {"written": True})
        t.update(coll, "missing", {"n": 1})

    with pytest.raises(NotFound):
        store.transaction(fn)
    assert store.get(coll, "missing") is None
    assert store.get(coll, "other") is None


def test_an_exception_in_the_transaction_commits_nothing(store: Store, coll: str) -> None:
    store.set(coll, "a", {"n": 1})

    class Boom(Exception):
        pass

    def fn(t: Transaction) -> None:
        t.update(coll, "a", {"n": 2})
        t.set(coll, "b", {"n": 3})
        raise Boom

    with pytest.raises(Boom):
        store.transaction(fn)
    assert store.get(coll, "a") == {"n": 1}
    assert store.get(coll, "b") is None


def test_transactions_are_isolated_across_threads(store: Store, coll: str, atomic: None) -> None:
    store.set(coll, "list", {"items": []})
    # Google's emulator resolves each round of this deadlock by a lock timeout of about 2 s, one commit a
    # round: 6 writers took the whole 10 s deadline, and on a loaded machine none committed in it.
    workers = 20 if isinstance(store, MemoryStore) else 3
    start = threading.Barrier(workers)
    errors: list[BaseException] = []
    committed: list[int] = []

    def append(i: int) -> None:
        def fn(t: Transaction) -> None:
            items = t.get(coll, "list")["items"]
            time.sleep(0)  # not synchronisation: lets other threads run inside the read-modify-write
            t.update(coll, "list", {"items": [*items, i]})
        try:
            start.wait(WAIT)
            store.transaction(fn)
            committed.append(i)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=append, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)  # each gets an answer within the store's deadline and its last attempt
    assert not any(t.is_alive() for t in threads)
    # Isolated: every transaction that committed is there, and nothing else (no update lost). Those still
    # aborted at the deadline fail loudly, never silently.
    assert sorted(store.get(coll, "list")["items"]) == sorted(committed)
    assert all(isinstance(e, StoreError) for e in errors), errors
    assert committed
    if isinstance(store, MemoryStore):
        assert errors == []


# -- watches ---------------------------------------------------------------------------

def test_watch_query_delivers_the_current_state_then_each_matching_change(store: Store, coll: str) -> None:
    store.set(coll, "a", {"imageID": "img", "v": 1})
    store.set(coll, "x", {"imageID": "other", "v": 1})
    rec = Recorder()
    watch = store.watch_query(coll, "imageID", "img", rec)
    try:
        assert ids(rec.wait(1)) == {"a"}

        store.set(coll, "b", {"imageID": "img", "v": 1})  # a new matching doc
        assert ids(rec.wait(2)) == {"a", "b"}

        store.set(coll, "a", {"imageID": "img", "v": 2})  # a matching doc changes
        assert {d.id: d.data["v"] for d in rec.wait(3)} == {"a": 2, "b": 1}

        store.set(coll, "a", {"imageID": "other", "v": 3})  # a doc stops matching
        assert ids(rec.wait(4)) == {"b"}

        store.delete(coll, "b")  # a matching doc is deleted
        assert ids(rec.wait(5)) == set()

        store.set(coll, "x", {"imageID": "other", "v": 2})  # not matching before or after: no delivery
        store.delete(coll, "a")  # no longer matching: no delivery either
        store.set(coll, "c", {"imageID": "img", "v": 1})  # this one is delivered
        assert ids(rec.wait(6)) == {"c"}
        assert len(rec.calls) == 6, rec.calls
    finally:
        watch.stop()


def test_watch_document_delivers_the_document_then_none_after_deletion(store: Store, coll: str) -> None:
    store.set(coll, "d", {"v": 1})
    rec = Recorder()
    watch = store.watch_document(coll, "d", rec)
    try:
        assert rec.wait(1) == {"v": 1}
        store.set(coll, "other", {"v": 1})  # another document: not delivered
        store.set(coll, "d", {"v": 2})
        assert rec.wait(2) == {"v": 2}
        store.delete(coll, "d")
        assert rec.wait(3) is None
        assert len(rec.calls) == 3, rec.calls
    finally:
        watch.stop()


def test_watch_document_of_a_missing_document_starts_with_none(store: Store, coll: str) -> None:
    rec = Recorder()
    watch = store.watch_document(coll, "later", rec)
    try:
        assert rec.wait(1) is None
        store.set(coll, "later", {"v": 1})
        assert rec.wait(2) == {"v": 1}
    finally:
        watch.stop()


@pytest.mark.parametrize("kind", ["query", "document"])
def test_stop_is_idempotent_and_stops_delivery(store: Store, coll: str, kind: str) -> None:
    def open_watch(callback: Recorder) -> Any:
        if kind == "query":
            return store.watch_query(coll, "imageID", "img", callback)
        return store.watch_document(coll, "d", callback)

    stopped, witness = Recorder(), Recorder()
    watch, other = open_watch(stopped), open_watch(witness)
    try:
        stopped.wait(1)
        witness.wait(1)
        watch.stop()
        watch.stop()
        store.set(coll, "d", {"imageID": "img"})
        witness.wait(2)  # the change has been delivered to the watch still open
        assert len(stopped.calls) == 1, stopped.calls
    finally:
        other.stop()


def test_watch_count_counts_open_watches(store: Store, coll: str) -> None:
    base = store.watch_count()
    first = store.watch_query(coll, "imageID", "img", Recorder())
    second = store.watch_document(coll, "d", Recorder())
    assert store.watch_count() == base + 2
    first.stop()
    assert store.watch_count() == base + 1
    first.stop()
    assert store.watch_count() == base + 1, "a second stop must not count twice"
    second.stop()
    assert store.watch_count() == base


def test_a_fresh_store_has_no_watches(store: Store) -> None:
    assert store.watch_count() == 0
