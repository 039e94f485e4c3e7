"""canary.records' group commit, sans I/O: a MemoryStore whose transactions can be held at a gate,
and real OS threads as the concurrent callers (the service's are greenlets)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from conftest import wait_for

from canary import presence as presence_module
from canary.errors import Refusal
from canary.memory_store import MemoryStore
from canary.records import SessionRecords, _Followed, presence_id
from canary.store import SESSION_PRESENCE, SESSION_WRITERS, SESSIONS, StoreError, T, Transaction

WAIT = 10.0


class GatedStore(MemoryStore):
    """A MemoryStore whose transactions wait at `gate` while it is closed, and can be made to fail."""

    def __init__(self) -> None:
        super().__init__({"users": {}})
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Event()  # a transaction is held at the closed gate
        self.at_gate = 0  # transactions held there now
        self.transactions = 0
        self.fail_next = False

    def transaction(self, fn: Callable[[Transaction], T]) -> T:
        self.transactions += 1
        if not self.gate.is_set():
            self.at_gate += 1
            self.waiting.set()
            try:
                assert self.gate.wait(WAIT), "the gate was never opened"
            finally:
                self.at_gate -= 1
        if self.fail_next:
            self.fail_next = False
            raise StoreError("the store is down")
        return super().transaction(fn)


@pytest.fixture
def store() -> GatedStore:
    return GatedStore()


@pytest.fixture
def records(store: GatedStore) -> SessionRecords:
    """One commit of a session's presences at a time (the service runs `COMMITS_IN_FLIGHT`; see the tests of
    commits side by side at the end)."""
    return SessionRecords(store, "A", lambda: datetime.now(UTC), commits_in_flight=1)


@pytest.fixture
def session(records: SessionRecords) -> str:
    return records.create("b1", "p1", "owner", "owner@example.com").session_id


def member_ids(store: MemoryStore, sid: str) -> list[str]:
    return [m["id"] for m in store.get(SESSIONS, sid)["members"]]


class Callers:
    """Calls made from threads at once; `results` in call order (a value or the exception raised)."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.results: dict[int, Any] = {}

    def start(self, fn: Callable[[], Any]) -> None:
        index = len(self.threads)

        def run() -> None:
            try:
                self.results[index] = fn()
            except Exception as e:  # the outcome under test
                self.results[index] = e

        thread = threading.Thread(target=run, daemon=True)
        self.threads.append(thread)
        thread.start()

    def join(self) -> list[Any]:
        for thread in self.threads:
            thread.join(WAIT)
            assert not thread.is_alive(), "a caller never returned"
        return [self.results[i] for i in range(len(self.threads))]


def queued(records: SessionRecords, sid: str) -> int:
    group = records._groups.get(sid)
    return len(group._queue) if group else 0


@pytest.fixture
def held(store: GatedStore, session: str) -> Iterator[GatedStore]:
    """The store, with `session` in it, and its gate closed (opened again at the end whatever happens)."""
    store.gate.clear()
    yield store
    store.gate.set()


def test_changes_queued_during_a_commit_go_in_the_next_one(records: SessionRecords, held: GatedStore,
                                                           session: str) -> None:
    before = records.commits
    callers = Callers()
    callers.start(lambda: records.join(session, "first", ""))
    assert held.waiting.wait(WAIT)  # the first join's commit is held at the gate
    for i in range(49):
        callers.start(lambda i=i: records.join(session, f"m{i}", ""))
    wait_for(lambda: queued(records, session) == 49, what="49 joins queued behind the first")
    held.gate.set()
    results = callers.join()
    assert all(not isinstance(r, BaseException) for r in results), results
    assert records.commits - before == 2, "one commit for the first join, one for the 49 queued meanwhile"
    assert records.changes >= 50
    assert sorted(member_ids(held, session)) == sorted(["first", *(f"m{i}" for i in range(49))])
    for i in range(49):
        assert held.get(SESSION_PRESENCE, presence_id(session, f"m{i}"))["process"] == "A"
    assert records._groups == {}, "an idle writer is dropped"


def test_a_failure_after_a_commit_leaves_no_caller_waiting(records: SessionRecords, held: GatedStore,
                                                           session: str) -> None:
    def fail(_changes: int, _writes: int) -> None:
        raise RuntimeError("the metrics are broken")

    records.on_commit = fail
    callers = Callers()
    callers.start(lambda: records.join(session, "first", ""))
    assert held.waiting.wait(WAIT)
    callers.start(lambda: records.join(session, "second", ""))
    wait_for(lambda: queued(records, session) == 1, what="the second queued behind the first")
    callers.start(lambda: records.join(session, "third", ""))
    wait_for(lambda: queued(records, session) == 2, what="the third queued behind the second")
    held.gate.set()
    results = callers.join()  # every caller returns (the third was a waiter in the second's commit)
    assert all(not isinstance(r, BaseException) for r in results), results
    assert member_ids(held, session) == ["first", "second", "third"]


def test_a_refused_change_does_not_fail_the_others_of_its_commit(records: SessionRecords, held: GatedStore,
                                                                 session: str) -> None:
    callers = Callers()
    callers.start(lambda: records.join(session, "first", ""))
    assert held.waiting.wait(WAIT)
    callers.start(lambda: records.join(session, "ann", ""))
    callers.start(lambda: records.join(session, "owner", ""))  # the owner cannot join its own session
    callers.start(lambda: records.join(session, "bob", ""))
    wait_for(lambda: queued(records, session) == 3, what="3 joins queued")
    held.gate.set()
    _first, ann, owner, bob = callers.join()
    assert isinstance(owner, Refusal)
    assert owner.status == 409
    assert "ann" in ann.member_ids
    assert "bob" in bob.member_ids
    assert sorted(member_ids(held, session)) == ["ann", "bob", "first"]


def test_a_failed_commit_fails_each_of_its_changes_and_the_writer_goes_on(records: SessionRecords,
                                                                          store: GatedStore, session: str) -> None:
    store.fail_next = True
    with pytest.raises(StoreError):
        records.join(session, "ann", "")
    assert member_ids(store, session) == []
    assert records.join(session, "ann", "").member_ids == ("ann",)


def test_a_commit_carries_at_most_the_maximum(records: SessionRecords, held: GatedStore, session: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(presence_module, "MAX_CHANGES_PER_COMMIT", 4)
    before = records.commits
    callers = Callers()
    callers.start(lambda: records.join(session, "first", ""))
    assert held.waiting.wait(WAIT)
    for i in range(10):
        callers.start(lambda i=i: records.join(session, f"m{i}", ""))
    wait_for(lambda: queued(records, session) == 10, what="10 joins queued")
    held.gate.set()
    callers.join()
    assert records.commits - before == 1 + 3  # 10 queued changes, 4 at most per commit
    assert len(member_ids(held, session)) == 11


def test_a_leave_of_an_older_connection_leaves_a_member_that_came_back(records: SessionRecords, store: GatedStore,
                                                                       session: str) -> None:
    first = records.join(session, "ann", "")
    # ann's first connection is gone (not held by this process any more); she comes back.
    records._holds = lambda connection: connection != first.connection
    second = records.join(session, "ann", "")
    assert second.resumed
    assert records.leave(session, "ann", first.connection) is False  # the old connection's end
    assert member_ids(store, session) == ["ann"]
    assert store.get(SESSION_PRESENCE, presence_id(session, "ann"))["connection"] == second.connection
    assert records.leave(session, "ann", second.connection) is True
    assert member_ids(store, session) == []
    assert store.get(SESSION_PRESENCE, presence_id(session, "ann")) is None


def test_a_member_whose_connection_is_live_here_is_refused(records: SessionRecords, session: str) -> None:
    records.join(session, "ann", "")
    with pytest.raises(Refusal) as caught:
        records.join(session, "ann", "")
    assert caught.value.status == 409


def test_the_end_and_changes_after_it_in_one_commit(records: SessionRecords, held: GatedStore,
                                                    session: str) -> None:
    owner_connection = held.get(SESSION_PRESENCE, presence_id(session, "owner"))["connection"]
    callers = Callers()
    callers.start(lambda: records.join(session, "first", ""))
    assert held.waiting.wait(WAIT)
    callers.start(lambda: records.owner_left(session, "owner", owner_connection, 0))
    wait_for(lambda: queued(records, session) == 1, what="the end queued")
    callers.start(lambda: records.join(session, "late", ""))
    wait_for(lambda: queued(records, session) == 2, what="a join queued after the end")
    held.gate.set()
    _first, left, late = callers.join()
    assert left is True  # it ended the session
    assert isinstance(late, Refusal)
    assert late.status == 404
    assert held.get(SESSIONS, session) is None
    assert held.query(SESSION_PRESENCE, "sessionID", session) == []


def test_the_same_user_twice_in_one_commit_is_admitted_once(records: SessionRecords, held: GatedStore,
                                                             session: str) -> None:
    callers = Callers()
    callers.start(lambda: records.join(session, "first", ""))
    assert held.waiting.wait(WAIT)
    callers.start(lambda: records.join(session, "twin", ""))
    callers.start(lambda: records.join(session, "twin", ""))
    wait_for(lambda: queued(records, session) == 2, what="2 joins queued")
    held.gate.set()
    _first, *twins = callers.join()
    refused = [r for r in twins if isinstance(r, Refusal)]
    admitted = [r for r in twins if not isinstance(r, Refusal)]
    assert [r.status for r in refused] == [409]
    assert admitted[0].member_ids == ("first", "twin")
    assert member_ids(held, session) == ["first", "twin"]


# -- commits side by side (the service's `COMMITS_IN_FLIGHT`) ------------------------------------------------
@pytest.fixture
def side_by_side(store: GatedStore, records: SessionRecords) -> SessionRecords:
    """The records of `records`' store and session, running up to 3 commits of a session at once."""
    records._commits_in_flight = 3
    return records


def test_commits_of_different_users_run_side_by_side(side_by_side: SessionRecords, held: GatedStore,
                                                     session: str) -> None:
    before = side_by_side.commits
    callers = Callers()
    for name in ("a", "b", "c"):
        callers.start(lambda name=name: side_by_side.join(session, name, ""))
    wait_for(lambda: held.at_gate == 3, what="3 commits held at the gate at once")
    callers.start(lambda: side_by_side.join(session, "d", ""))
    wait_for(lambda: queued(side_by_side, session) == 1, what="a fourth join queued: 3 commits at most")
    assert held.at_gate == 3
    held.gate.set()
    results = callers.join()
    assert all(not isinstance(r, BaseException) for r in results), results
    assert side_by_side.commits - before == 4
    assert sorted(member_ids(held, session)) == ["a", "b", "c", "d"]
    assert side_by_side._groups == {}


def test_a_users_changes_commit_in_the_order_they_were_made(side_by_side: SessionRecords, held: GatedStore,
                                                            session: str) -> None:
    callers = Callers()
    callers.start(lambda: side_by_side.join(session, "ann", "", connection="c1"))
    wait_for(lambda: held.at_gate == 1, what="ann's join held at the gate")
    callers.start(lambda: side_by_side.join(session, "ann", "", connection="c2"))
    wait_for(lambda: queued(side_by_side, session) == 1, what="ann's second join waiting for her first")
    callers.start(lambda: side_by_side.join(session, "bob", ""))
    wait_for(lambda: held.at_gate == 2, what="bob's join going past ann's second")
    assert queued(side_by_side, session) == 1
    held.gate.set()
    first, second, _bob = callers.join()
    assert first.connection == "c1"  # had the second gone first, it would be the one admitted
    assert isinstance(second, Refusal)
    assert second.status == 409
    assert held.get(SESSION_PRESENCE, presence_id(session, "ann"))["connection"] == "c1"
    assert sorted(member_ids(held, session)) == ["ann", "bob"]


def test_a_change_that_may_end_the_session_commits_alone(side_by_side: SessionRecords, held: GatedStore,
                                                        session: str) -> None:
    owner_connection = held.get(SESSION_PRESENCE, presence_id(session, "owner"))["connection"]
    callers = Callers()
    callers.start(lambda: side_by_side.join(session, "first", ""))
    wait_for(lambda: held.at_gate == 1, what="a join held at the gate")
    callers.start(lambda: side_by_side.owner_left(session, "owner", owner_connection, 0))
    wait_for(lambda: queued(side_by_side, session) == 1, what="the end waiting for the join in flight")
    callers.start(lambda: side_by_side.join(session, "late", ""))
    wait_for(lambda: queued(side_by_side, session) == 2, what="a later join waiting behind the end")
    assert held.at_gate == 1
    held.gate.set()
    _first, ended, late = callers.join()
    assert ended is True
    assert isinstance(late, Refusal)
    assert late.status == 404
    assert held.get(SESSIONS, session) is None
    assert held.query(SESSION_PRESENCE, "sessionID", session) == []


# -- a storm's callers share their reads -------------------------------------------------------------------
class SlowReads(GatedStore):
    """Reads of the writer documents and watches of session documents take a moment (and count)."""

    def __init__(self) -> None:
        super().__init__()
        self.writer_reads = 0
        self.document_watches = 0

    def get(self, collection: str, doc_id: str) -> Any:
        if collection == SESSION_WRITERS:
            self.writer_reads += 1
            time.sleep(0.05)  # another caller runs meanwhile: what the lock must cover
        return super().get(collection, doc_id)

    def watch_document(self, collection: str, doc_id: str, callback: Any) -> Any:
        self.document_watches += 1
        time.sleep(0.05)
        return super().watch_document(collection, doc_id, callback)


def test_callers_of_one_session_share_one_writer_lookup_and_one_watch() -> None:
    store = SlowReads()
    a = SessionRecords(store, "A", lambda: datetime.now(UTC))
    sid = a.create("b1", "p1", "owner", "owner@example.com").session_id
    a.renew_lease(60)
    b = SessionRecords(store, "B", lambda: datetime.now(UTC))
    callers = Callers()
    for _ in range(20):
        callers.start(lambda: b.writer_of(sid))
    assert callers.join() == [None] * 20  # A writes it
    assert store.writer_reads == 1

    followed = _Followed()
    watchers = Callers()
    for _ in range(20):
        watchers.start(lambda: followed.follow(store, sid))
    watchers.join()
    assert store.document_watches == 1
    followed.stop()
