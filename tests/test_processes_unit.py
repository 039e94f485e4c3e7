"""Sessions spanning processes, sans I/O: two SessionManagers ("processes" A and B)
share one store and a clock the tests move; no sockets, no sleeps."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from canary.errors import Refusal
from canary.memory_store import MemoryStore
from canary.presence import MarkAway
from canary.protocol import Frame
from canary.records import presence_id
from canary.sessions import Participant, SessionManager
from canary.store import PROCESSES, SESSION_LOCKS, SESSION_PRESENCE, SESSION_WRITERS, SESSIONS

SEED = {
    "users": {u: {"email": f"{u}@example.com"} for u in ("owner", "m1", "m2", "m3")},
    "projects": {"p1": {"userID": "owner", "projectName": "P"}},
    "batches": {"b1": {"projectID": "p1", "batchName": "B"}},
}
LEASE, OWNER_GRACE, RECONNECT_GRACE = 15.0, 20.0, 30.0


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Peer:
    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.closes: list[int] = []

    def safe_enqueue(self, frame: Frame) -> bool:
        self.frames.append(json.loads(frame.text))
        return True

    def close(self, code: int, reason: str) -> None:
        self.closes.append(code)

    def alive(self) -> bool:
        return not self.closes

    def take(self) -> list[tuple[str, str | None]]:
        """(type, subject) of the frames received since the last take."""
        taken = [(f["type"], f.get("memberID") or f.get("ownerID")) for f in self.frames]
        self.frames.clear()
        return taken


class World:
    def __init__(self, owner_grace: float = 0.0) -> None:
        self.store = MemoryStore(SEED)
        self.clock = Clock()
        self.a = self.process("A", owner_grace)
        self.b = self.process("B", owner_grace)

    def process(self, name: str, owner_grace: float = 0.0) -> SessionManager:
        manager = SessionManager(self.store, clock=self.clock, process_id=name, owner_grace=owner_grace,
                                 reconnect_grace=RECONNECT_GRACE, lease_seconds=LEASE)
        manager.start()
        return manager

    def settle(self) -> None:
        """Every process handles the store notifications it has received."""
        self.a.run_pending()
        self.b.run_pending()

    def create(self, manager: SessionManager) -> tuple[Participant, Peer]:
        return self.connect(manager, manager.open_session("b1", "owner"))

    def join(self, manager: SessionManager, sid: str, user: str) -> tuple[Participant, Peer]:
        return self.connect(manager, manager.join_session(sid, user))

    def connect(self, manager: SessionManager, admission: Any) -> tuple[Participant, Peer]:
        peer = Peer()
        participant = manager.connect(admission, peer)
        self.settle()
        return participant, peer

    def members(self, sid: str) -> list[str]:
        doc = self.store.get(SESSIONS, sid)
        return [m["id"] for m in doc["members"]] if doc else []


@pytest.fixture
def world() -> World:
    return World()


def test_membership_events_cross_processes_exactly_once(world: World) -> None:
    owner, owner_peer = world.create(world.a)
    sid = owner.session_id
    m1, m1_peer = world.join(world.a, sid, "m1")
    _m2, m2_peer = world.join(world.b, sid, "m2")
    m3, m3_peer = world.join(world.b, sid, "m3")
    assert owner_peer.take() == [("session_created", None), ("member_joined", "m1"), ("member_joined", "m2"),
                                 ("member_joined", "m3")]
    assert m1_peer.take() == [("session_joined", "owner"), ("member_joined", "m2"), ("member_joined", "m3")]
    assert m2_peer.take() == [("session_joined", "owner"), ("member_joined", "m3")]
    assert m3_peer.take() == [("session_joined", "owner")]

    world.a.disconnect(m1)
    world.settle()
    world.b.disconnect(m3)
    world.settle()
    assert owner_peer.take() == [("member_left", "m1"), ("member_left", "m3")]
    assert m2_peer.take() == [("member_left", "m1"), ("member_left", "m3")]
    assert world.members(sid) == ["m2"]
    assert world.b.stats()["session_listeners"] == 1  # one per session per process, shared


def test_the_owner_leaving_on_one_process_closes_members_on_the_other(world: World) -> None:
    owner, _ = world.create(world.a)
    sid = owner.session_id
    m2, m2_peer = world.join(world.b, sid, "m2")
    m2_peer.take()
    world.a.disconnect(owner)
    world.settle()
    assert m2_peer.take() == [("session_closed", None)]
    assert m2_peer.closes == [4000]
    assert world.store.get(SESSIONS, sid) is None
    assert world.store.documents(SESSION_PRESENCE) == []
    world.b.disconnect(m2)  # the route does this next: nothing left to do
    assert world.a.stats()["sessions"] == world.b.stats()["sessions"] == 0
    assert world.store.watch_count() == 0


def test_owner_grace_resume_on_another_process() -> None:
    world = World(owner_grace=OWNER_GRACE)
    owner, _ = world.create(world.a)
    sid = owner.session_id
    _, m1_peer = world.join(world.a, sid, "m1")
    _, m2_peer = world.join(world.b, sid, "m2")
    m1_peer.take()
    m2_peer.take()

    world.a.disconnect(owner)
    world.settle()
    assert m1_peer.take() == m2_peer.take() == [("owner_left", "owner")]
    assert world.store.get(SESSIONS, sid)["ownerLeftAt"] is not None

    world.clock.advance(OWNER_GRACE - 1)
    world.b.maintain()
    world.a.maintain()
    assert world.store.get(SESSIONS, sid) is not None  # still within the grace

    back, back_peer = world.create(world.b)
    assert back.session_id == sid
    assert back_peer.take() == [("session_created", None)]
    assert m1_peer.take() == m2_peer.take() == [("owner_joined", "owner")]
    assert world.store.get(SESSIONS, sid)["ownerLeftAt"] is None
    world.clock.advance(OWNER_GRACE * 2)
    world.a.maintain()
    assert world.store.get(SESSIONS, sid) is not None  # resumed: no expiry any more


def test_owner_grace_expiry_ends_the_session_once() -> None:
    world = World(owner_grace=OWNER_GRACE)
    owner, _ = world.create(world.a)
    sid = owner.session_id
    _, m2_peer = world.join(world.b, sid, "m2")
    world.a.disconnect(owner)
    world.settle()
    m2_peer.take()
    world.clock.advance(OWNER_GRACE + 1)
    world.a.maintain()
    world.b.maintain()
    world.settle()
    assert m2_peer.take() == [("session_closed", None)]
    assert m2_peer.closes == [4000]
    assert world.store.get(SESSIONS, sid) is None
    assert world.store.get(SESSION_LOCKS, "b1") is None
    assert world.store.documents(SESSION_PRESENCE) == []


def test_a_second_owner_connection_is_refused_while_the_first_is_live(world: World) -> None:
    world.create(world.a)
    with pytest.raises(Refusal) as caught:
        world.b.open_session("b1", "owner")
    assert caught.value.status == 409


def test_a_restart_is_not_a_leave(world: World) -> None:
    owner, owner_peer = world.create(world.b)
    sid = owner.session_id
    m1, m1_peer = world.join(world.a, sid, "m1")
    m2, m2_peer = world.join(world.a, sid, "m2")
    owner_peer.take()

    world.a.shutdown()  # SIGTERM on A
    assert m1_peer.closes == m2_peer.closes == [1012]
    world.a.disconnect(m1)
    world.a.disconnect(m2)
    world.settle()
    assert world.members(sid) == ["m1", "m2"]
    assert owner_peer.take() == []
    assert world.store.get(PROCESSES, "A")["leaseUntil"] <= world.clock()
    with pytest.raises(Refusal) as caught:  # a stopping process takes no new clients
        world.a.join_session(sid, "m3")
    assert caught.value.status == 503

    # m1 comes back, through B: it continues, nobody is told it joined.
    _back, back_peer = world.join(world.b, sid, "m1")
    assert back_peer.take()[0] == ("session_joined", "owner")
    assert owner_peer.take() == []
    assert world.members(sid) == ["m1", "m2"]
    assert world.store.get(SESSION_PRESENCE, presence_id(sid, "m1"))["process"] == "B"

    # m2 never does: removed once the grace is over, by the process that is alive.
    world.clock.advance(1)
    world.b.maintain()
    assert world.members(sid) == ["m1", "m2"]
    world.clock.advance(RECONNECT_GRACE)
    world.b.maintain()
    assert world.members(sid) == ["m1"]
    assert owner_peer.take() == [("member_left", "m2")]
    assert back_peer.take() == [("member_left", "m2")]
    assert world.store.get(PROCESSES, "A") is None


def test_a_member_cannot_take_the_place_of_one_still_connected(world: World) -> None:
    owner, _ = world.create(world.a)
    world.join(world.a, owner.session_id, "m1")
    with pytest.raises(Refusal) as caught:
        world.b.join_session(owner.session_id, "m1")
    assert caught.value.status == 409


def test_a_killed_process_is_cleaned_up_after_its_lease_and_the_grace() -> None:
    world = World(owner_grace=OWNER_GRACE)
    owner, _ = world.create(world.a)  # A will be killed: no shutdown, no more lease renewals
    sid = owner.session_id
    _, m2_peer = world.join(world.b, sid, "m2")
    m2_peer.take()

    world.clock.advance(LEASE - 1)
    world.b.maintain()
    assert m2_peer.take() == []  # A's lease still runs

    world.clock.advance(2)
    world.b.maintain()
    world.b.run_pending()
    assert m2_peer.take() == []  # A's lease ran out, but a stall is not a death: one more lease of margin
    assert world.store.get(SESSION_WRITERS, sid)["process"] == "B"  # B writes A's session now

    world.clock.advance(LEASE)
    world.b.maintain()
    world.b.run_pending()
    assert m2_peer.take() == [("owner_left", "owner")]  # the owner's process is gone
    world.clock.advance(max(OWNER_GRACE, RECONNECT_GRACE))
    world.b.maintain()
    world.b.run_pending()
    assert m2_peer.take() == [("session_closed", None)]
    assert m2_peer.closes == [4000]
    assert world.store.get(SESSIONS, sid) is None


def test_stale_snapshots_do_not_replay_events(world: World) -> None:
    owner, owner_peer = world.create(world.a)
    sid = owner.session_id
    m1, _ = world.join(world.b, sid, "m1")
    stale = world.store.get(SESSIONS, sid)  # m1 is in it
    world.b.disconnect(m1)
    world.settle()
    owner_peer.take()
    # A snapshot older than what A has seen arrives late: nothing is announced again.
    live = world.a._live[sid]
    world.a._on_snapshot(live, stale)
    assert owner_peer.take() == []


def test_a_process_whose_lease_ran_out_while_it_stalled_keeps_its_clients() -> None:
    world = World(owner_grace=OWNER_GRACE)
    owner, _ = world.create(world.a)
    sid = owner.session_id
    world.join(world.a, sid, "m1")
    _, m2_peer = world.join(world.b, sid, "m2")
    m2_peer.take()

    world.clock.advance(2 * LEASE + 1)  # A stalls for its lease and the margin: B takes A's clients for gone
    world.b.maintain()
    world.settle()
    assert m2_peer.take() == [("owner_left", "owner")]
    assert world.store.get(SESSION_PRESENCE, presence_id(sid, "m1"))["away"] is True

    world.a.maintain()  # A wakes up: its lease had run out, it says again that it holds them
    world.settle()
    assert m2_peer.take() == [("owner_joined", "owner")]
    assert world.store.get(SESSION_PRESENCE, presence_id(sid, "m1"))["away"] is False
    world.clock.advance(max(OWNER_GRACE, RECONNECT_GRACE) + 1)
    world.a.maintain()
    world.b.maintain()
    world.settle()
    assert world.members(sid) == ["m1", "m2"]
    assert world.store.get(SESSIONS, sid) is not None
    assert m2_peer.take() == []


def test_a_stalled_process_that_renews_before_its_clients_are_marked_keeps_them(world: World) -> None:
    """B saw A's lease run out and listed A's clients; A renews before B marks them: nothing is marked."""
    owner, _ = world.create(world.a)
    sid = owner.session_id
    world.join(world.a, sid, "m1")
    world.clock.advance(LEASE + 1)  # A stalls
    listed = world.store.query(SESSION_PRESENCE, "process", "A")
    world.a.maintain()  # A renews its lease before B's marking commits
    lease = world.store.get(PROCESSES, "A")["leaseUntil"]
    for presence in listed:
        world.b._records._submit(sid, MarkAway(presence.data["userID"], "A", lease, lease))
    assert world.store.get(SESSION_PRESENCE, presence_id(sid, "m1"))["away"] is False
    assert world.store.get(SESSION_PRESENCE, presence_id(sid, "owner"))["away"] is False
    world.b.maintain()
    assert world.store.get(PROCESSES, "A") is not None  # B does not forget a process that renewed
