"""Shared image listeners: one store listener per image, one encoded message per session and snapshot."""

from __future__ import annotations

from canary.memory_store import MemoryStore
from canary.protocol import SEED, WEBAPP, Event, Kind
from canary.store import KEYPOINTS
from canary.watches import ImageWatches, SharedListeners


def test_one_snapshot_is_encoded_once_per_session() -> None:
    store = MemoryStore()
    listeners = SharedListeners(store)
    received: dict[str, list[Event]] = {}

    def watcher(name: str, session: str) -> ImageWatches:
        watches = ImageWatches(listeners, session, received.setdefault(name, []).append)
        watches.switch("img")
        return watches

    everyone = [watcher("a1", "s1"), watcher("a2", "s1"), watcher("b1", "s2")]
    assert store.watch_count() == 2  # keypoints and boundingBoxes of "img", shared
    for frames in received.values():
        frames.clear()

    store.set(KEYPOINTS, "k1", {"imageID": "img"})
    (a1,), (a2,), (b1,) = received["a1"], received["a2"], received["b1"]
    assert a1.kind == a2.kind == b1.kind == Kind.KEY_POINTS
    assert a1 is a2  # same session: the same event, encoded once per vocabulary
    assert a1.frame(SEED) is a2.frame(SEED)
    assert a1.frame(SEED).type == "labels_snapshot"
    assert a1.frame(WEBAPP).type == "key_points_snapshot"
    assert b1 is not a1
    assert '"sessionID":"s2"' in b1.frame(SEED).text

    for watches in everyone:
        watches.stop()
    assert store.watch_count() == 0
    assert listeners.count() == 0


def test_a_late_subscriber_is_told_the_data_is_ready() -> None:
    store = MemoryStore()
    listeners = SharedListeners(store)
    first, second = [], []
    ImageWatches(listeners, "s", first.append).switch("img")
    ImageWatches(listeners, "s", second.append).switch("img")
    assert [e.kind for e in first] == [e.kind for e in second] == [Kind.KEY_POINTS, Kind.BOUNDING_BOXES]
    assert store.watch_count() == 2
