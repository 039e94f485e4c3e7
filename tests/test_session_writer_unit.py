"""The session's one writer, sans I/O: the fold of presences into the session document, its pacing, the
role and its hand-over, on the memory store with a clock the tests move."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from canary.memory_store import MemoryStore
from canary.records import SessionRecords
from canary.session_writer import BURST, fold, presence_id
from canary.store import PROCESSES, SESSION_PRESENCE, SESSION_WRITERS, SESSIONS, StoreError, Transaction

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
LEASE = 15.0
SEED = {"users": {u: {"email": f"{u}@example.com"} for u in ("owner", "ann", "bob", "cid")}}


def presence(user: str, *, listed: bool = True, joined: int = 0, away: bool = False, role: str = "member",
             since: datetime | None = None) -> dict[str, Any]:
    return {"userID": user, "role": role, "listed": listed, "email": f"{user}@x", "away": away,
            "joinedAt": T0 + timedelta(seconds=joined), "awaySince": since}


DOC = {"owner": {"id": "owner", "email": "o@x"}, "members": [{"id": "ann", "email": "ann@x"}], "lastUpdated": T0}


# -- the fold ------------------------------------------------------------------------------------

def test_new_members_are_appended_in_the_order_they_joined() -> None:
    updates = fold(DOC, {"cid": presence("cid", joined=2), "bob": presence("bob", joined=1)})
    assert [m["id"] for m in updates["members"]] == ["ann", "bob", "cid"]


def test_a_member_without_a_listed_presence_is_removed_and_the_others_keep_their_order() -> None:
    doc = {**DOC, "members": [{"id": u, "email": ""} for u in ("ann", "bob", "cid")]}
    assert fold(doc, {"bob": None})["members"] == [{"id": "ann", "email": ""}, {"id": "cid", "email": ""}]
    assert fold(doc, {"cid": presence("cid", listed=False)})["members"] == doc["members"][:2]


def test_nothing_changed_writes_nothing() -> None:
    assert fold(DOC, {"ann": presence("ann"), "zed": None}) == {}
    assert fold(DOC, {"owner": presence("owner", role="owner", listed=False)}) == {}  # not away, not left


def test_the_owners_presence_sets_and_clears_owner_left_at() -> None:
    gone = fold(DOC, {"owner": presence("owner", role="owner", away=True, since=T0)})
    assert gone == {"ownerLeftAt": T0}
    assert fold({**DOC, "ownerLeftAt": T0}, {"owner": presence("owner", role="owner")}) == {"ownerLeftAt": None}
    assert fold({**DOC, "ownerLeftAt": T0}, {"owner": None}) == {}  # nobody connected yet: unchanged
    assert fold({**DOC, "ownerLeftAt": T0}, {"owner": presence("owner", role="owner", away=True, since=T0)}) == {}


def test_an_owner_that_came_and_went_between_two_folds_moves_owner_left_at() -> None:
    # Its process told its clients `owner_joined` when it came: the document must change for `owner_left`.
    later = T0 + timedelta(seconds=5)
    went_again = fold({**DOC, "ownerLeftAt": T0}, {"owner": presence("owner", role="owner", away=True, since=later)})
    assert went_again == {"ownerLeftAt": later}


def test_the_owner_is_never_listed_as_a_member() -> None:
    assert fold(DOC, {"owner": presence("owner")}) == {}


# -- the writer ------------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = T0
        self.mono = 1000.0
        self.slept: list[float] = []
        self.meanwhile = lambda: None  # what happens while the writer waits

    def __call__(self) -> datetime:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.mono += seconds
        self.meanwhile()


def records(store: MemoryStore, clock: Clock, name: str = "A", interval: float = 1.0) -> SessionRecords:
    made = SessionRecords(store, name, clock, commit_interval=interval, lease_seconds=LEASE,
                          monotonic=clock.monotonic, sleep=clock.sleep)
    made.renew_lease(LEASE)
    return made


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore(SEED)


def members(store: MemoryStore, sid: str) -> list[str]:
    return [m["id"] for m in (store.get(SESSIONS, sid) or {"members": []})["members"]]


def test_commits_go_at_once_up_to_the_burst_then_one_per_interval(store: MemoryStore, clock: Clock) -> None:
    a = records(store, clock)
    sid = a.create("b1", "p1", "owner", "o@x").session_id
    for i in range(BURST):
        a.join(sid, f"u{i}", "")
    assert clock.slept == []
    a.join(sid, "late", "")
    assert clock.slept == [pytest.approx(1.0)]  # the bucket was empty: the next commit waited an interval
    assert members(store, sid) == [*(f"u{i}" for i in range(BURST)), "late"]
    clock.mono += 10 * BURST  # a quiet while refills the bucket, up to the burst
    for i in range(BURST):
        a.join(sid, f"v{i}", "")
    assert len(clock.slept) == 1
    assert a.session_commits == 2 * BURST + 1


def test_changes_that_arrive_during_the_wait_share_one_commit(store: MemoryStore, clock: Clock) -> None:
    a = records(store, clock)
    sid = a.create("b1", "p1", "owner", "o@x").session_id
    writer = a.writer_of(sid)
    assert writer is not None
    writer._tokens = 0.0  # the bucket is empty: the next commit waits an interval

    def meanwhile() -> None:  # another process's member arrives during the wait
        clock.meanwhile = lambda: None
        store.set(SESSION_PRESENCE, presence_id(sid, "bob"), {**presence("bob", joined=1), "sessionID": sid})

    clock.meanwhile = meanwhile
    before = a.session_commits
    store.set(SESSION_PRESENCE, presence_id(sid, "ann"), {**presence("ann"), "sessionID": sid})
    assert clock.slept == [pytest.approx(1.0)]
    assert a.session_commits == before + 1
    assert members(store, sid) == ["ann", "bob"]


def test_a_writer_whose_role_was_taken_over_writes_nothing_and_steps_down(store: MemoryStore,
                                                                          clock: Clock) -> None:
    a = records(store, clock)
    sid = a.create("b1", "p1", "owner", "o@x").session_id
    writer = a.writer_of(sid)
    assert writer is not None
    store.set(SESSION_WRITERS, sid, {"process": "B", "sessionID": sid})  # B took over while A stalled
    store.set(SESSION_PRESENCE, presence_id(sid, "ann"), {**presence("ann"), "sessionID": sid})
    writer.touch(["ann"])
    writer.flush()
    assert members(store, sid) == []  # A did not write over its successor
    assert a.writers() == []
    assert writer.stopped


def test_presences_written_after_the_end_are_removed_by_the_writer(store: MemoryStore, clock: Clock) -> None:
    a = records(store, clock)
    sid = a.create("b1", "p1", "owner", "o@x").session_id
    writer = a.writer_of(sid)
    assert writer is not None
    store.delete(SESSIONS, sid)  # the session ended; a join raced it and wrote its presence after
    store.set(SESSION_PRESENCE, presence_id(sid, "ann"), {**presence("ann"), "sessionID": sid})
    writer.touch(["ann"])
    writer.flush()
    assert store.get(SESSION_PRESENCE, presence_id(sid, "ann")) is None
    assert store.get(SESSION_WRITERS, sid) is None
    assert a.writers() == []


class FailingOnce(MemoryStore):
    """Fails the next transaction that writes the session document."""

    def __init__(self, seed: dict[str, Any]) -> None:
        super().__init__(seed)
        self.fail = False

    def transaction(self, fn: Any) -> Any:
        if self.fail:
            def probe(t: Transaction) -> Any:
                result = fn(t)
                if any(key == (SESSIONS, key[1]) for _, key, _ in t.writes):  # type: ignore[attr-defined]
                    self.fail = False
                    raise StoreError("unavailable")
                return result
            return super().transaction(probe)
        return super().transaction(fn)


def test_a_failed_fold_is_retried_until_it_is_written() -> None:
    clock = Clock()
    store = FailingOnce(SEED)
    a = records(store, clock)
    sid = a.create("b1", "p1", "owner", "o@x").session_id
    a.join(sid, "ann", "")
    store.fail = True
    assert a.leave(sid, "ann", store.get(SESSION_PRESENCE, presence_id(sid, "ann"))["connection"]) is True
    assert not store.fail, "the fold failed once"
    assert members(store, sid) == []  # and was retried (after a backoff) until it was written
    assert clock.slept, "with a backoff"


# -- the role across processes --------------------------------------------------------------------------

def test_a_dead_writers_sessions_get_one_new_writer(store: MemoryStore, clock: Clock) -> None:
    a, b, c = (records(store, clock, name) for name in "ABC")
    sid = a.create("b1", "p1", "owner", "o@x").session_id
    b.join(sid, "ann", "")
    c.join(sid, "bob", "")
    assert store.get(SESSION_WRITERS, sid)["process"] == "A"
    clock.now += timedelta(seconds=LEASE + 1)  # A is killed: its lease runs out
    b.renew_lease(LEASE)
    c.renew_lease(LEASE)
    b.reap(0, 30)
    c.reap(0, 30)
    writers = [r.process_id for r in (b, c) if r.writers() == [sid]]
    assert len(writers) == 1, "one process took the role, not both"
    assert store.get(SESSION_WRITERS, sid)["process"] == writers[0]
    assert b._chosen("A", ["B", "C"]) != c._chosen("A", ["B", "C"])  # they agree on who it is


def test_a_client_of_a_stalled_process_is_marked_away_only_after_a_lease_of_margin(store: MemoryStore,
                                                                                    clock: Clock) -> None:
    a, b = records(store, clock, "A"), records(store, clock, "B")
    sid = b.create("b1", "p1", "owner", "o@x").session_id
    a.join(sid, "ann", "")
    clock.now += timedelta(seconds=LEASE + 1)  # A's lease ran out a second ago
    b.renew_lease(LEASE)
    b.reap(0, 30)
    assert store.get(SESSION_PRESENCE, presence_id(sid, "ann"))["away"] is False
    clock.now += timedelta(seconds=LEASE)
    b.renew_lease(LEASE)
    b.reap(0, 30)
    ann = store.get(SESSION_PRESENCE, presence_id(sid, "ann"))
    assert ann["away"] is True
    assert ann["graceUntil"] == ann["awaySince"] + timedelta(seconds=30)
    # A comes back before the grace is over: its client is not removed, and A takes it back.
    assert a.renew_lease(LEASE) is True  # A notices its lease had lapsed
    clock.now += timedelta(seconds=31)
    a.renew_lease(LEASE)
    b.renew_lease(LEASE)
    b.reap(0, 30)
    assert members(store, sid) == ["ann"]
    a.reassert([(sid, "ann", "member", ann["connection"])])
    assert store.get(SESSION_PRESENCE, presence_id(sid, "ann"))["away"] is False


def test_a_stopped_process_s_clients_get_their_grace_from_the_stop(store: MemoryStore, clock: Clock) -> None:
    a, b = records(store, clock, "A"), records(store, clock, "B")
    sid = b.create("b1", "p1", "owner", "o@x").session_id
    a.join(sid, "ann", "")
    a.expire_lease()
    stopped = clock.now
    b.reap(0, 30)
    assert store.get(SESSION_PRESENCE, presence_id(sid, "ann"))["graceUntil"] == stopped + timedelta(seconds=30)
    clock.now += timedelta(seconds=30)
    b.renew_lease(LEASE)
    b.tick(0, 30)
    assert members(store, sid) == []
    assert store.get(PROCESSES, "A") is not None  # forgotten at the next pass, once nothing names it
    b.reap(0, 30)
    assert store.get(PROCESSES, "A") is None
