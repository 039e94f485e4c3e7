"""canary.member_images without I/O: the pacing of a participant's image writes (the first at once, then at most
one per interval, the last image always wins), what a document says, and two SessionManagers ("processes" A and
B) on one MemoryStore telling each other's clients (`member_image`, welcomes, `GET /sessions/active`'s images)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from test_processes_unit import Peer as ProcessPeer

from canary.member_images import IMAGE_TTL, MemberImages, image_in, image_key, next_write_at
from canary.memory_store import MemoryStore
from canary.sessions import Participant, SessionManager
from canary.store import MEMBER_IMAGES, PROCESSES, StoreError, T, Transaction

SEED = {
    "users": {u: {"email": f"{u}@example.com"} for u in ("owner", "m1", "m2")},
    "projects": {"p1": {"userID": "owner"}},
    "batches": {"b1": {"projectID": "p1"}},
}
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


class Time:
    """A monotonic clock and a sleep that moves it; `during` runs what happens while a drain waits."""

    def __init__(self) -> None:
        self.now = 100.0
        self.during: list[Callable[[], None]] = []
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        while self.during:
            self.during.pop(0)()


class FlakyStore(MemoryStore):
    """Counts the commits that write or delete member images; fails them while `failing`."""

    def __init__(self, seed: Any = None) -> None:
        super().__init__(seed)
        self.failing = False
        self.image_commits = 0

    def transaction(self, fn: Callable[[Transaction], T]) -> T:
        wrote: list[bool] = []

        def spy(t: Transaction) -> T:
            result = fn(t)
            wrote[:] = [any(key[0] == MEMBER_IMAGES for _op, key, _data in t.writes)]  # type: ignore[attr-defined]
            if self.failing and wrote[0]:
                raise StoreError("the store is away")
            return result

        result = super().transaction(spy)
        if wrote and wrote[0]:
            self.image_commits += 1
        return result


@pytest.fixture
def clock() -> Time:
    return Time()


@pytest.fixture
def store() -> FlakyStore:
    return FlakyStore(SEED)


def writer(store: MemoryStore, clock: Time, process: str = "A", interval: float = 1.0,
           announced: list[tuple[str, str, str | None]] | None = None) -> tuple[MemberImages, list[Callable[[], None]]]:
    """A `MemberImages` whose drains are queued (run them with `run`), on the fake clock."""
    queued: list[Callable[[], None]] = []
    told = announced if announced is not None else []
    images = MemberImages(store, process, interval=interval, announce=lambda *a: told.append(a), spawn=queued.append,
                          clock=lambda: T0, monotonic=clock, sleep=clock.sleep)
    return images, queued


def run(queued: list[Callable[[], None]]) -> None:
    while queued:
        queued.pop(0)()


def stored(store: MemoryStore, user: str = "m1", session: str = "s1") -> str | None:
    doc = store.get(MEMBER_IMAGES, image_key(session, user))
    return None if doc is None else doc["imageID"]


# -- the pacing rule ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("last", "now", "expected"), [
    (float("-inf"), 5.0, 5.0),  # the first switch: at once
    (4.0, 5.0, 5.0),  # the last write went a whole interval ago: at once
    (4.5, 5.0, 5.5),  # within the interval: when it is over
    (5.0, 5.0, 6.0),
])
def test_a_write_goes_at_once_or_an_interval_after_the_last(last: float, now: float, expected: float) -> None:
    assert next_write_at(last, now, 1.0) == expected


def test_the_first_switch_is_written_at_once(store: FlakyStore, clock: Time) -> None:
    announced: list[tuple[str, str, str | None]] = []
    images, queued = writer(store, clock, announced=announced)
    images.switch("s1", "m1", "c1", T0, "img-1")
    run(queued)
    assert clock.slept == []
    assert announced == [("s1", "m1", "img-1")]
    doc = store.get(MEMBER_IMAGES, image_key("s1", "m1"))
    assert doc == {"sessionID": "s1", "userID": "m1", "imageID": "img-1", "process": "A", "connection": "c1",
                   "connectedAt": T0, "updatedAt": T0, "expireAt": T0 + IMAGE_TTL}
    assert (images.writes, store.image_commits, images.pending()) == (1, 1, 0)


def test_a_flicking_member_costs_one_write_per_interval_and_the_last_image_wins(store: FlakyStore,
                                                                                 clock: Time) -> None:
    announced: list[tuple[str, str, str | None]] = []
    images, queued = writer(store, clock, announced=announced)
    started = clock.now
    for i in range(30):  # 30 images in 3 seconds
        images.switch("s1", "m1", "c1", T0, f"img-{i}")
        run(queued)
        clock.now += 0.1
    images.switch("s1", "m1", "c1", T0, "img-last")
    run(queued)
    took = clock.now - started
    assert stored(store) == "img-last"
    assert images.writes <= took + 1  # the first at once, then one a second
    assert images.writes == store.image_commits
    assert [a[2] for a in announced][-1] == "img-last"
    assert len(announced) == images.writes, "the others are told what is written, as often"
    assert images.pending() == 0


def test_switches_while_a_write_is_held_go_in_it(store: FlakyStore, clock: Time) -> None:
    announced: list[tuple[str, str, str | None]] = []
    images, queued = writer(store, clock, announced=announced)
    images.switch("s1", "m1", "c1", T0, "img-1")
    run(queued)
    clock.now += 0.2
    images.switch("s1", "m1", "c1", T0, "img-2")  # held: the last write went 0.2 s ago
    clock.during.append(lambda: images.switch("s1", "m1", "c1", T0, "img-3"))  # arrives while it waits
    run(queued)
    assert clock.slept == [pytest.approx(0.8)]
    assert [a[2] for a in announced] == ["img-1", "img-3"]
    assert stored(store) == "img-3"
    assert images.writes == 2


def test_a_closed_socket_deletes_its_image(store: FlakyStore, clock: Time) -> None:
    announced: list[tuple[str, str, str | None]] = []
    images, queued = writer(store, clock, announced=announced)
    images.switch("s1", "m1", "c1", T0, "img-1")
    run(queued)
    clock.now += 0.3
    images.switch("s1", "m1", "c1", T0, "img-2")
    images.close("s1", "m1", "c1")  # before img-2 went: it never will
    run(queued)
    assert [a[2] for a in announced] == ["img-1", None]
    assert store.get(MEMBER_IMAGES, image_key("s1", "m1")) is None
    assert images.pending() == 0
    assert images._participants == {}


def test_a_crowd_switching_at_once_shares_one_commit(store: FlakyStore, clock: Time) -> None:
    images, queued = writer(store, clock)
    for i in range(5):
        images.switch("s1", f"u{i}", f"c{i}", T0, f"img-{i}")
    run(queued)
    assert (images.writes, store.image_commits) == (5, 1)
    assert [stored(store, f"u{i}") for i in range(5)] == [f"img-{i}" for i in range(5)]
    clock.now += 1
    for i in range(5):  # they leave together: one commit deletes them all
        images.close("s1", f"u{i}", f"c{i}")
    run(queued)
    assert (images.writes, store.image_commits) == (10, 2)
    assert [stored(store, f"u{i}") for i in range(5)] == [None] * 5


def test_a_socket_that_never_looked_at_an_image_writes_nothing(store: FlakyStore, clock: Time) -> None:
    images, queued = writer(store, clock)
    images.close("s1", "m1", "c1")
    run(queued)
    assert (images.writes, store.image_commits) == (0, 0)


def test_a_failed_write_is_retried_until_recorded_and_the_last_image_wins(store: FlakyStore, clock: Time) -> None:
    images, queued = writer(store, clock)
    store.failing = True
    images.switch("s1", "m1", "c1", T0, "img-1")
    run(queued)
    assert stored(store) is None
    assert images.pending() == 1
    images.switch("s1", "m1", "c1", T0, "img-2")
    clock.now += 1
    images.retry()
    run(queued)
    assert images.pending() == 1  # still failing
    store.failing = False
    clock.now += 1
    images.retry()
    run(queued)
    assert stored(store) == "img-2"
    assert images.pending() == 0


def test_an_older_socket_does_not_undo_a_newer_ones_image(store: FlakyStore, clock: Time) -> None:
    """The user came back on process B while A still had its old socket's image to write: A's late write is
    repaired by B (which follows the documents), and A's delete leaves B's document alone."""
    a, a_queued = writer(store, clock, "A")
    b, b_queued = writer(store, clock, "B")
    a.switch("s1", "m1", "old", T0, "img-old")
    b.switch("s1", "m1", "new", T0 + timedelta(seconds=5), "img-new")
    run(b_queued)
    run(a_queued)  # late: it overwrote B's
    doc = store.get(MEMBER_IMAGES, image_key("s1", "m1"))
    assert doc is not None
    assert doc["imageID"] == "img-old"
    b.overwritten("s1", "m1", doc)  # B's listener sees it
    run(b_queued)
    assert stored(store) == "img-new"
    b.overwritten("s1", "m1", store.get(MEMBER_IMAGES, image_key("s1", "m1")) or {})  # its own: nothing to do
    assert b_queued == []
    a.close("s1", "m1", "old")
    run(a_queued)
    assert stored(store) == "img-new"


def test_what_a_document_says() -> None:
    doc = {"userID": "m1", "imageID": "img-1", "process": "B", "connection": "c1"}
    alive: Callable[[str], bool] = lambda _process: False  # noqa: E731
    assert image_in(doc, "A", lambda _c: True, alive) == "img-1"
    assert image_in(doc, "A", lambda _c: True, lambda process: process == "B") is None  # B died or restarted
    assert image_in({**doc, "process": "A"}, "A", lambda c: c == "c1", alive) == "img-1"
    assert image_in({**doc, "process": "A"}, "A", lambda _c: False, alive) is None  # a socket A no longer holds
    assert image_in({**doc, "imageID": None}, "A", lambda _c: True, alive) is None


# -- two processes on one store -----------------------------------------------------------------------

class Peer(ProcessPeer):
    def images(self) -> list[tuple[str, str | None]]:
        """(memberID, imageID) of the member_image messages since the last call."""
        taken = [(f["memberID"], f["imageID"]) for f in self.frames if f["type"] == "member_image"]
        self.frames.clear()
        return taken


class World:
    def __init__(self) -> None:
        self.store = MemoryStore(SEED)
        self.time = Time()
        self.wall = T0
        self.a, self.b = self.process("A"), self.process("B")

    def process(self, name: str) -> SessionManager:
        manager = SessionManager(self.store, clock=lambda: self.wall, process_id=name, image_interval=1.0,
                                 monotonic=self.time, sleep=self.time.sleep)
        manager.start()
        return manager

    def settle(self) -> None:
        for _ in range(3):
            self.a.run_pending()
            self.b.run_pending()

    def connect(self, manager: SessionManager, admission: Any) -> tuple[Participant, Peer]:
        peer = Peer()
        participant = manager.connect(admission, peer)
        self.settle()
        return participant, peer

    def look(self, manager: SessionManager, participant: Participant, image: str) -> None:
        manager.receive(participant, json.dumps({"type": "setImageID", "payload": {"imageID": image}}))
        self.settle()


@pytest.fixture
def world() -> World:
    return World()


def test_everyone_else_is_told_on_both_processes_once(world: World) -> None:
    owner, owner_peer = world.connect(world.a, world.a.open_session("b1", "owner"))
    sid = owner.session_id
    m1, m1_peer = world.connect(world.b, world.b.join_session(sid, "m1"))
    m2, m2_peer = world.connect(world.a, world.a.join_session(sid, "m2"))
    for peer in (owner_peer, m1_peer, m2_peer):
        peer.frames.clear()

    world.look(world.b, m1, "img-1")
    assert owner_peer.images() == [("m1", "img-1")]  # through the store (B wrote it)
    assert m2_peer.images() == [("m1", "img-1")]
    assert m1_peer.images() == [], "a member is not told its own image"

    world.look(world.a, m2, "img-2")
    assert m1_peer.images() == [("m2", "img-2")]
    assert owner_peer.images() == [("m2", "img-2")], "told once: by its process, not again from the store"

    world.b.disconnect(m1)
    world.settle()
    assert owner_peer.images() == [("m1", None)]
    assert m2_peer.images() == [("m1", None)]
    assert world.store.get(MEMBER_IMAGES, image_key(sid, "m1")) is None


def test_welcomes_and_the_active_list_carry_the_images(world: World) -> None:
    owner, _ = world.connect(world.a, world.a.open_session("b1", "owner"))
    sid = owner.session_id
    world.look(world.a, owner, "img-o")
    m1, _ = world.connect(world.b, world.b.join_session(sid, "m1"))
    world.look(world.b, m1, "img-1")
    _, m2_peer = world.connect(world.b, world.b.join_session(sid, "m2"))
    welcome = m2_peer.frames[0]
    assert (welcome["type"], welcome["images"]) == ("session_joined", {"owner": "img-o", "m1": "img-1"})
    for manager in (world.a, world.b):
        (active,) = manager.active(batch_id="b1")
        assert active.images == {"owner": "img-o", "m1": "img-1"}


def test_a_dead_processs_images_are_not_told(world: World) -> None:
    owner, _ = world.connect(world.a, world.a.open_session("b1", "owner"))
    sid = owner.session_id
    m1, _ = world.connect(world.b, world.b.join_session(sid, "m1"))
    world.look(world.b, m1, "img-1")
    world.store.set(PROCESSES, "B", {"leaseUntil": T0 - timedelta(seconds=1), "renewedAt": T0})  # B died
    (active,) = world.a.active(batch_id="b1")
    assert active.images == {}


def test_a_late_write_of_an_older_socket_is_repaired_by_the_process_holding_the_new_one(world: World) -> None:
    owner, owner_peer = world.connect(world.a, world.a.open_session("b1", "owner"))
    sid = owner.session_id
    m1, _ = world.connect(world.b, world.b.join_session(sid, "m1"))
    world.look(world.b, m1, "img-new")
    owner_peer.frames.clear()
    world.store.set(MEMBER_IMAGES, image_key(sid, "m1"), {  # m1's socket before this one, on A, lands late
        "sessionID": sid, "userID": "m1", "imageID": "img-old", "process": "A", "connection": "gone",
        "connectedAt": T0 - timedelta(hours=1), "updatedAt": T0, "expireAt": T0 + IMAGE_TTL})
    world.settle()
    assert world.store.get(MEMBER_IMAGES, image_key(sid, "m1"))["imageID"] == "img-new"
    assert ("m1", "img-new") in owner_peer.images()[-1:]
