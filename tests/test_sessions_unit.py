"""canary.sessions.SessionManager without I/O: a MemoryStore and fake peers that record what they are sent."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from canary.memory_store import MemoryStore
from canary.protocol import Frame
from canary.sessions import Admission, Participant, Refusal, SessionManager
from canary.store import BOUNDING_BOXES, KEYPOINTS, SESSION_LOCKS, SESSIONS, StoreError, Watch

SEED = {
    "users": {u: {"email": f"{u}@example.com"} for u in ("owner", "alice", "bob")},
    "projects": {"p1": {"userID": "owner"}},
    "batches": {"b1": {"projectID": "p1"}, "b2": {"projectID": "p1"},
                "orphan": {"projectID": "no-such-project"}, "no-project": {}},
}


class FakePeer:
    """A connected client: records the frames queued to it and the close, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def safe_enqueue(self, frame: Frame) -> bool:
        self.events.append(("frame", frame))
        return True

    def close(self, code: int, reason: str) -> None:
        self.events.append(("close", (code, reason)))

    def alive(self) -> bool:
        return not self.closes

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(f.text) for kind, f in self.events if kind == "frame"]

    @property
    def types(self) -> list[str]:
        return [m["type"] for m in self.messages]

    @property
    def closes(self) -> list[int]:
        return [value[0] for kind, value in self.events if kind == "close"]

    def clear(self) -> None:
        self.events.clear()


class BoundingBoxesWatchFails(MemoryStore):
    """A store whose `boundingBoxes` watches cannot be opened."""

    def watch_query(self, collection: str, field: str, value: Any, callback: Any) -> Watch:
        if collection == BOUNDING_BOXES:
            raise StoreError("boundingBoxes is unavailable")
        return super().watch_query(collection, field, value, callback)


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore(SEED)


@pytest.fixture
def manager(store: MemoryStore) -> SessionManager:
    return SessionManager(store)


def connect(manager: SessionManager, admission: Admission) -> tuple[Participant, FakePeer]:
    peer = FakePeer()
    return manager.connect(admission, peer), peer


@pytest.fixture
def live(manager: SessionManager) -> dict[str, tuple[Participant, FakePeer]]:
    """A session on b1: the owner and alice connected (their welcome frames cleared)."""
    owner = connect(manager, manager.open_session("b1", "owner"))
    alice = connect(manager, manager.join_session(owner[0].session_id, "alice"))
    for _, peer in (owner, alice):
        peer.clear()
    return {"owner": owner, "alice": alice}


def member_ids(store: MemoryStore, session_id: str) -> list[str]:
    return [m["id"] for m in store.get(SESSIONS, session_id)["members"]]


# -- admission ----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("batch", "user", "status"),
    [("missing", "owner", 404), ("orphan", "owner", 404), ("no-project", "owner", 404), ("b1", "alice", 403)],
    ids=["no-batch", "no-project-doc", "no-projectID", "not-owner"],
)
def test_open_session_refusals(manager: SessionManager, store: MemoryStore, batch: str, user: str,
                               status: int) -> None:
    with pytest.raises(Refusal) as caught:
        manager.open_session(batch, user)
    assert caught.value.status == status
    assert store.query(SESSIONS, "batchID", batch) == []
    assert store.get(SESSION_LOCKS, batch) is None


def test_open_session_writes_the_session_and_the_lock(manager: SessionManager, store: MemoryStore) -> None:
    admission = manager.open_session("b1", "owner")
    assert (admission.batch_id, admission.user_id, admission.role, admission.owner_id) == \
        ("b1", "owner", "owner", "owner")
    doc = store.get(SESSIONS, admission.session_id)
    assert doc["owner"] == {"id": "owner", "email": "owner@example.com"}
    assert (doc["batchID"], doc["projectID"], doc["members"]) == ("b1", "p1", [])
    assert store.get(SESSION_LOCKS, "b1")["sessionID"] == admission.session_id


def test_a_second_live_session_on_a_batch_is_refused(manager: SessionManager, store: MemoryStore) -> None:
    first = manager.open_session("b1", "owner")
    with pytest.raises(Refusal) as caught:
        manager.open_session("b1", "owner")
    assert caught.value.status == 409
    assert [d.id for d in store.query(SESSIONS, "batchID", "b1")] == [first.session_id]
    assert manager.open_session("b2", "owner").batch_id == "b2", "another batch is not blocked"


def test_a_stale_lock_does_not_block_a_new_session(manager: SessionManager, store: MemoryStore) -> None:
    store.set(SESSION_LOCKS, "b1", {"sessionID": "deleted-session"})
    admission = manager.open_session("b1", "owner")
    assert store.get(SESSION_LOCKS, "b1")["sessionID"] == admission.session_id
    assert store.get(SESSIONS, admission.session_id) is not None


def test_join_adds_the_member(manager: SessionManager, store: MemoryStore) -> None:
    sid = manager.open_session("b1", "owner").session_id
    manager.join_session(sid, "alice")
    bob = manager.join_session(sid, "bob")
    assert (bob.role, bob.owner_id, bob.batch_id, bob.members) == ("member", "owner", "b1", ("alice", "bob"))
    assert store.get(SESSIONS, sid)["members"] == [
        {"id": "alice", "email": "alice@example.com"}, {"id": "bob", "email": "bob@example.com"}]


@pytest.mark.parametrize(("session", "user", "status"),
                         [("missing", "alice", 404), (None, "alice", 409), (None, "owner", 409)],
                         ids=["no-session", "member-twice", "owner-joins-own"])
def test_join_refusals(manager: SessionManager, store: MemoryStore, session: str | None, user: str,
                       status: int) -> None:
    sid = manager.open_session("b1", "owner").session_id
    manager.join_session(sid, "alice")
    with pytest.raises(Refusal) as caught:
        manager.join_session(session or sid, user)
    assert caught.value.status == status
    assert member_ids(store, sid) == ["alice"]


# -- connected clients ---------------------------------------------------------------

def test_connect_welcomes_and_announces(manager: SessionManager) -> None:
    owner, owner_peer = connect(manager, manager.open_session("b1", "owner"))
    sid = owner.session_id
    assert owner_peer.messages == [{"type": "session_created", "sessionID": sid, "batchID": "b1",
                                    "role": "owner", "images": {}, "time": owner_peer.messages[0]["time"]}]
    _, alice_peer = connect(manager, manager.join_session(sid, "alice"))
    welcome = alice_peer.messages[0]
    assert {k: welcome[k] for k in ("type", "sessionID", "role", "ownerID", "members")} == \
        {"type": "session_joined", "sessionID": sid, "role": "member", "ownerID": "owner", "members": ["alice"]}
    assert owner_peer.types[-1] == "member_joined"
    assert owner_peer.messages[-1]["memberID"] == "alice"

    _, bob_peer = connect(manager, manager.join_session(sid, "bob"))
    assert bob_peer.types == ["session_joined"], "a member is not told about itself"
    assert bob_peer.messages[0]["members"] == ["alice", "bob"]
    for peer in (owner_peer, alice_peer):
        assert peer.types[-1] == "member_joined"
        assert peer.messages[-1]["memberID"] == "bob"
    assert alice_peer.types == ["session_joined", "member_joined"]
    assert manager.stats()["participants"] == 3


def test_member_disconnect_removes_it_by_id_and_tells_the_others(manager: SessionManager, store: MemoryStore,
                                                                  live: dict) -> None:
    (owner, owner_peer), (alice, alice_peer) = live["owner"], live["alice"]
    _, bob_peer = connect(manager, manager.join_session(owner.session_id, "bob"))
    owner_peer.clear()
    alice_peer.clear()
    # The stored e-mail no longer matches what the manager would look up.
    store.transaction(lambda t: t.update(SESSIONS, owner.session_id, {"members": [
        {"id": "alice", "email": "changed@example.com"}, {"id": "bob", "email": "bob@example.com"}]}))
    manager.disconnect(alice)
    assert member_ids(store, owner.session_id) == ["bob"]
    for peer in (owner_peer, bob_peer):
        assert peer.messages[-1]["type"] == "member_left"
        assert peer.messages[-1]["memberID"] == "alice"
    assert alice_peer.events == []
    assert manager.stats()["participants"] == 2


def test_owner_disconnect_closes_the_session(manager: SessionManager, store: MemoryStore, live: dict) -> None:
    (owner, owner_peer), (_, alice_peer) = live["owner"], live["alice"]
    _, bob_peer = connect(manager, manager.join_session(owner.session_id, "bob"))
    alice_peer.clear()
    bob_peer.clear()
    manager.disconnect(owner)
    for peer in (alice_peer, bob_peer):
        assert [kind for kind, _ in peer.events] == ["frame", "close"]
        assert peer.messages == [{"type": "session_closed", "sessionID": owner.session_id,
                                  "time": peer.messages[0]["time"]}]
        assert peer.closes == [4000]
    assert store.get(SESSIONS, owner.session_id) is None
    assert store.get(SESSION_LOCKS, "b1") is None
    assert manager.stats() == {"sessions": 0, "participants": 0, "image_watches": 0, "image_listeners": 0,
                               "session_listeners": 0, "member_image_listeners": 0, "session_writers": 0}
    assert store.watch_count() == 0
    assert "session_closed" not in owner_peer.types


def test_owner_disconnect_keeps_a_lock_that_is_not_its_own(manager: SessionManager, store: MemoryStore,
                                                           live: dict) -> None:
    owner, _ = live["owner"]
    store.set(SESSION_LOCKS, "b1", {"sessionID": "someone-else"})
    manager.disconnect(owner)
    assert store.get(SESSIONS, owner.session_id) is None
    assert store.get(SESSION_LOCKS, "b1") == {"sessionID": "someone-else"}


def test_member_connecting_after_the_owner_left_is_closed(manager: SessionManager, store: MemoryStore) -> None:
    owner, _ = connect(manager, manager.open_session("b1", "owner"))
    admission = manager.join_session(owner.session_id, "alice")
    manager.disconnect(owner)
    late, peer = connect(manager, admission)
    # Welcomed, then told at once that the session is over (its document is gone).
    assert peer.types == ["session_joined", "session_closed"]
    assert peer.closes == [4000]
    assert store.get(SESSIONS, owner.session_id) is None
    manager.disconnect(late)  # what the route does next: must not raise nor resurrect anything
    assert manager.stats()["participants"] == 0
    assert store.get(SESSIONS, owner.session_id) is None


def test_member_connecting_while_the_owner_is_on_another_process_stays(manager: SessionManager,
                                                                     store: MemoryStore) -> None:
    """The owner's socket is held by another process: the member is welcomed and kept."""
    owner_admission = manager.open_session("b1", "owner")
    admission = manager.join_session(owner_admission.session_id, "alice")
    manager.join_session(owner_admission.session_id, "bob")  # through another process, after alice's admission
    _, peer = connect(manager, admission)
    assert peer.types == ["session_joined", "member_joined"]  # bob, learnt from the session document
    assert peer.messages[1]["memberID"] == "bob"
    assert peer.closes == []
    assert member_ids(store, owner_admission.session_id) == ["alice", "bob"]


def test_member_disconnect_after_the_session_doc_was_deleted(manager: SessionManager, store: MemoryStore,
                                                             live: dict) -> None:
    (owner, owner_peer), (alice, _) = live["owner"], live["alice"]
    store.delete(SESSIONS, owner.session_id)
    manager.disconnect(alice)
    assert store.get(SESSIONS, owner.session_id) is None
    # The deletion ends the session here too, whoever deleted the document; nobody is told that a
    # member left a session that is over (the member was in no stored session any more).
    assert owner_peer.types == ["session_closed"]
    assert owner_peer.closes == [4000]


# -- frames from clients -------------------------------------------------------------

def test_ping_gets_pong_and_bad_frames_get_errors(manager: SessionManager, live: dict) -> None:
    alice, peer = live["alice"]
    manager.receive(alice, '{"type":"ping"}')
    manager.receive(alice, b"\x00")
    manager.receive(alice, "{")
    manager.receive(alice, '{"type":"dance"}')
    manager.receive(alice, '{"type":"setImageID","payload":{"imageID":" "}}')
    assert peer.types == ["pong", "error", "error", "error", "error"]
    assert [m["code"] for m in peer.messages[1:]] == ["binary_frame", "invalid_json", "unknown_type",
                                                      "invalid_payload"]
    assert peer.closes == []


def set_image(image_id: str) -> str:
    return json.dumps({"type": "setImageID", "payload": {"imageID": image_id}})


def image_listeners(manager: SessionManager) -> int:
    return manager.stats()["image_listeners"]


def test_set_image_id_watches_the_image(manager: SessionManager, store: MemoryStore, live: dict) -> None:
    alice, peer = live["alice"]
    manager.receive(alice, set_image("img-1"))
    assert image_listeners(manager) == 2
    assert sorted(peer.types) == ["bounding_boxes_snapshot", "labels_snapshot"], "the first snapshots say ready"
    assert manager.stats()["image_watches"] == 2

    manager.receive(alice, set_image("img-2"))
    assert image_listeners(manager) == 2
    peer.clear()
    store.set(KEYPOINTS, "k1", {"imageID": "img-1"})  # the old image: nothing
    store.set(BOUNDING_BOXES, "bb1", {"imageID": "img-2"})
    assert peer.types == ["bounding_boxes_snapshot"]
    assert peer.messages[0]["sessionID"] == alice.session_id

    manager.disconnect(alice)
    assert image_listeners(manager) == 0


def test_clients_on_one_image_share_its_two_listeners(manager: SessionManager, store: MemoryStore,
                                                     live: dict) -> None:
    (owner, owner_peer), (alice, alice_peer) = live["owner"], live["alice"]
    manager.receive(owner, set_image("img-1"))
    manager.receive(alice, set_image("img-1"))
    assert image_listeners(manager) == 2
    assert manager.stats()["image_watches"] == 4
    # Both were told the data is ready, though only the first started the listeners.
    assert owner_peer.types.count("labels_snapshot") == alice_peer.types.count("labels_snapshot") == 1
    manager.receive(owner, set_image("img-2"))
    assert image_listeners(manager) == 4
    manager.disconnect(alice)
    assert image_listeners(manager) == 2
    manager.disconnect(owner)
    assert image_listeners(manager) == 0


def test_owner_disconnect_stops_every_watch(manager: SessionManager, store: MemoryStore, live: dict) -> None:
    (owner, _), (alice, _) = live["owner"], live["alice"]
    manager.receive(owner, set_image("img-1"))
    manager.receive(alice, set_image("img-2"))
    assert image_listeners(manager) == 4
    manager.disconnect(owner)
    assert image_listeners(manager) == 0


def test_a_failing_watch_leaves_nothing_open() -> None:
    store = BoundingBoxesWatchFails(SEED)
    manager = SessionManager(store)
    owner, peer = connect(manager, manager.open_session("b1", "owner"))
    peer.clear()
    manager.receive(owner, set_image("img-1"))
    errors = [m for m in peer.messages if m["type"] == "error"]
    assert [e["code"] for e in errors] == ["watch_failed"]
    assert image_listeners(manager) == 0
    # The session document's listener, its member images', and its presences' (it writes it).
    assert store.watch_count() == 3
    assert manager.stats()["image_watches"] == 0
    assert peer.closes == []


# -- abandoned admissions ---------------------------------------------------------------

def test_abandon_an_owner_admission(manager: SessionManager, store: MemoryStore) -> None:
    admission = manager.open_session("b1", "owner")
    manager.abandon(admission)
    assert store.get(SESSIONS, admission.session_id) is None
    assert store.get(SESSION_LOCKS, "b1") is None
    assert manager.open_session("b1", "owner").session_id != admission.session_id


def test_abandon_a_member_admission(manager: SessionManager, store: MemoryStore) -> None:
    sid = manager.open_session("b1", "owner").session_id
    manager.join_session(sid, "bob")
    admission = manager.join_session(sid, "alice")
    manager.abandon(admission)
    assert member_ids(store, sid) == ["bob"]
    assert manager.join_session(sid, "alice").members == ("bob", "alice")


class AdmitsMeanwhile(MemoryStore):
    """A store during whose next transaction `meanwhile` runs: another admission while one asks the store
    (under gevent, any store call lets other requests run)."""

    meanwhile: Any = None

    def transaction(self, fn: Any) -> Any:
        meanwhile, self.meanwhile = self.meanwhile, None
        if meanwhile is not None:
            meanwhile()
        return super().transaction(fn)


def test_caps_count_an_admission_from_its_start_and_give_a_refused_ones_place_back() -> None:
    store = AdmitsMeanwhile(SEED)
    manager = SessionManager(store, max_per_address=1, max_per_user=1)
    sid = manager.open_session("b1", "owner").session_id
    refused: list[int] = []

    def bob_from_the_same_address() -> None:
        try:
            manager.join_session(sid, "bob", "10.0.0.1")
        except Refusal as e:
            refused.append(e.status)

    store.meanwhile = bob_from_the_same_address
    alice = manager.join_session(sid, "alice", "10.0.0.1")
    assert refused == [429], "alice's admission held the address's only place while it asked the store"
    with pytest.raises(Refusal) as caught:
        manager.join_session("no-such-session", "carol", "10.0.0.2")
    assert caught.value.status == 404
    manager.join_session(sid, "carol", "10.0.0.2")  # the refused admission gave its place back
    with pytest.raises(Refusal) as caught:
        manager.join_session(sid, "dave", "10.0.0.1")
    assert caught.value.status == 429
    manager.abandon(alice)
    manager.join_session(sid, "dave", "10.0.0.1")
    manager.join_session(sid, "erin")  # no address: not capped by address



def test_a_second_connection_of_a_user_admitted_meanwhile_is_refused(manager: SessionManager) -> None:
    sid = manager.open_session("b1", "owner").session_id
    records, join = manager._records, manager._records.join
    outcomes: list[Any] = []

    def join_then_another(*args: Any, **kwargs: Any) -> Any:
        """alice's join is committed; before her admission goes on, a second one of hers (another greenlet or
        thread of this process) is admitted, in another thread, to the end."""
        state = join(*args, **kwargs)
        records.join = join

        def again() -> None:
            try:
                outcomes.append(manager.join_session(sid, "alice"))
            except Refusal as e:
                outcomes.append(e.status)

        thread = threading.Thread(target=again)
        thread.start()
        thread.join(10)
        return state

    records.join = join_then_another
    manager.join_session(sid, "alice")
    assert outcomes == [409], "the first connection was this process's from the start of its admission"
