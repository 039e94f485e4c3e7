"""canary.changes, without sockets: snapshot diffs, their merge under coalescing, the cap, the JSON; and the shared
image listeners (canary.watches) that compute one diff per store snapshot for every subscriber."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from functools import reduce
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from canary.changes import NO_CHANGES, Changes, Delta, apply, diff, encode, everything, merge
from canary.memory_store import MemoryStore
from canary.protocol import SEED, WEBAPP, Event, Kind, coalesce
from canary.store import BOUNDING_BOXES, KEYPOINTS
from canary.watches import ImageWatches, SharedListeners

# -- diff, merge, apply ----------------------------------------------------------------------------------

states = st.dictionaries(st.sampled_from("abcdef"), st.fixed_dictionaries({"n": st.integers(0, 3)}), max_size=6)


@settings(max_examples=300, deadline=None)
@given(st.lists(states, min_size=1, max_size=8))
def test_applying_merged_changes_equals_applying_them_one_after_the_other(sequence: list[dict[str, Any]]) -> None:
    start, *later = sequence
    steps = [diff(before, after) for before, after in zip(sequence, later, strict=False)]
    one_by_one = reduce(apply, steps, start)
    assert one_by_one == sequence[-1]
    merged = reduce(merge, steps, NO_CHANGES)
    assert apply(start, merged) == sequence[-1]
    # Merged in any grouping (a slow client's queue merges pairwise as frames come).
    if len(steps) >= 3:
        assert apply(start, merge(steps[0], merge(steps[1], reduce(merge, steps[2:])))) == sequence[-1]
    ids = [*merged.added, *merged.modified, *merged.removed]
    assert len(ids) == len(set(ids)), "an ID appears at most once"
    assert set(merged.added).isdisjoint(start), "only a document the client did not have is added"
    assert set(merged.modified) | set(merged.removed) <= set(start)


@settings(max_examples=200, deadline=None)
@given(states, states)
def test_diff_is_exact(before: dict[str, Any], after: dict[str, Any]) -> None:
    changes = diff(before, after)
    assert apply(before, changes) == after
    assert set(changes.added) == after.keys() - before.keys()
    assert set(changes.removed) == before.keys() - after.keys()
    assert set(changes.modified) == {k for k in after.keys() & before.keys() if after[k] != before[k]}


def test_the_merge_rules() -> None:
    one, two = {"n": 1}, {"n": 2}
    cases = [
        (Changes({"x": one}, {}, ()), Changes({}, {}, ("x",)), NO_CHANGES),  # added, removed: never there
        (Changes({"x": one}, {}, ()), Changes({}, {"x": two}, ()), Changes({"x": two}, {}, ())),
        (Changes({}, {"x": one}, ()), Changes({}, {}, ("x",)), Changes({}, {}, ("x",))),
        (Changes({}, {}, ("x",)), Changes({"x": two}, {}, ()), Changes({}, {"x": two}, ())),
        (Changes({}, {"x": one}, ()), Changes({}, {"x": two}, ()), Changes({}, {"x": two}, ())),
        (Changes({"x": one}, {}, ()), Changes({"y": two}, {}, ()), Changes({"x": one, "y": two}, {}, ())),
    ]
    for first, then, expected in cases:
        merged = merge(first, then)
        assert (dict(merged.added), dict(merged.modified), merged.removed) == \
            (dict(expected.added), dict(expected.modified), expected.removed), (first, then)


def test_unchanged_documents_are_found_by_identity_first() -> None:
    class NeverEqual(dict):
        def __eq__(self, other: object) -> bool:
            raise AssertionError("compared: the same object needs no comparison")

        __hash__ = None  # type: ignore[assignment]

    same = NeverEqual(n=1)
    assert not diff({"a": same}, {"a": same})
    assert diff({"a": {"n": 1}}, {"a": {"n": 1}}) == NO_CHANGES


# -- Delta: the JSON, the cap, merging -------------------------------------------------------------------

def test_the_json_of_changes() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    delta = Delta(Changes({"k1": {"at": when, "raw": b"\x00\x01", "position": {"x": 1}}}, {"k2": {"n": 2}}, ("k3",)),
                  10_000, reset=False)
    assert json.loads(delta.json) == {
        "reset": False,
        "added": [{"id": "k1", "data": {"at": "2026-01-02T03:04:05.678901Z", "raw": "AAE=", "position": {"x": 1}}}],
        "modified": [{"id": "k2", "data": {"n": 2}}],
        "removed": ["k3"],
    }
    assert Delta(everything({"a": {"n": 1}}), 100, reset=True).json == \
        '{"reset":true,"added":[{"id":"a","data":{"n":1}}],"modified":[],"removed":[]}'
    assert encode(Changes({"a": {"n": math.nan}}, {}, ())) is None, "NaN is not JSON: the client re-fetches"
    assert Delta(Changes({"a": {"n": math.nan}}, {}, ()), 10_000).json == "null"


def test_past_the_cap_changes_are_null_and_merging_with_null_is_null() -> None:
    small = Changes({"a": {"n": 1}}, {}, ())
    exact = len(Delta(small, 10_000).json)
    assert Delta(small, exact).changes == small, "the cap is inclusive"
    capped = Delta(small, exact - 1)
    assert (capped.changes, capped.json) == (None, "null")
    assert Delta(small, 0).json == "null", "0: always null"
    later = Delta(Changes({"b": {"n": 1}}, {}, ()), 10_000)
    assert capped.then(later).json == "null"
    assert later.then(capped).json == "null"
    # Each part fits, together they do not.
    one, two = Delta(small, exact + 25), Delta(Changes({"b": {"n": 1}}, {}, ()), exact + 25)
    assert one.then(two).json == "null"
    assert Delta(small, 10_000).then(later).changes == Changes({"a": {"n": 1}, "b": {"n": 1}}, {}, ())


def test_a_reset_replaces_what_is_pending_and_stays_a_reset_when_merged() -> None:
    old = Delta(Changes({"old": {"n": 1}}, {}, ()), 10_000)
    reset = Delta(everything({"new": {"n": 1}}), 10_000, reset=True)
    assert old.then(reset) is reset
    merged = reset.then(Delta(Changes({"other": {"n": 2}}, {}, ("new",)), 10_000))
    assert merged.reset
    assert json.loads(merged.json) == {"reset": True, "added": [{"id": "other", "data": {"n": 2}}], "modified": [],
                                       "removed": []}


def test_a_coalesced_frame_is_the_newer_one_with_the_merged_changes() -> None:
    first = Event(Kind.KEY_POINTS, sessionID="s", changes=Delta(Changes({"a": {"n": 1}}, {}, ()), 10_000))
    second = Event(Kind.KEY_POINTS, sessionID="s", changes=Delta(Changes({}, {"a": {"n": 2}}, ()), 10_000))
    for vocabulary in (SEED, WEBAPP):
        merged = coalesce(first.frame(vocabulary), second.frame(vocabulary))
        body = json.loads(merged.data)
        assert body == {"type": second.frame(vocabulary).type, "sessionID": "s", "time": second.values["time"],
                        "changes": {"reset": False, "added": [{"id": "a", "data": {"n": 2}}], "modified": [],
                                    "removed": []}}
        assert merged.text == merged.data.decode()
        assert merged.born == second.frame(vocabulary).born


# -- shared listeners: one diff per store snapshot, for every subscriber -------------------------------

def changes_of(events: list[Event]) -> list[dict[str, Any] | None]:
    return [json.loads(e.frame(SEED).changes.json) for e in events]  # type: ignore[union-attr]


def test_each_snapshot_says_what_changed_once_for_every_subscriber() -> None:
    store = MemoryStore({KEYPOINTS: {"k0": {"imageID": "img", "n": 0}}})
    listeners = SharedListeners(store)
    got: dict[str, list[Event]] = {}

    def watcher(name: str, session: str) -> ImageWatches:
        watches = ImageWatches(listeners, session, lambda e: got.setdefault(name, []).append(e)
                               if e.kind == Kind.KEY_POINTS else None)
        watches.switch("img")
        return watches

    a1, a2, b1 = watcher("a1", "s1"), watcher("a2", "s1"), watcher("b1", "s2")
    first = {"reset": True, "added": [{"id": "k0", "data": {"imageID": "img", "n": 0}}], "modified": [],
             "removed": []}
    assert changes_of(got["a1"]) == changes_of(got["a2"]) == changes_of(got["b1"]) == [first]
    assert got["a1"][0] is not got["a2"][0], "a late subscriber is told on its own"

    store.set(KEYPOINTS, "k1", {"imageID": "img", "n": 1})
    store.set(KEYPOINTS, "k0", {"imageID": "img", "n": 5})
    store.delete(KEYPOINTS, "k1")
    store.set(KEYPOINTS, "elsewhere", {"imageID": "other"})
    expected = [
        {"reset": False, "added": [{"id": "k1", "data": {"imageID": "img", "n": 1}}], "modified": [], "removed": []},
        {"reset": False, "added": [], "modified": [{"id": "k0", "data": {"imageID": "img", "n": 5}}], "removed": []},
        {"reset": False, "added": [], "modified": [], "removed": ["k1"]},
    ]
    for name in ("a1", "a2", "b1"):
        assert changes_of(got[name][1:]) == expected, name
    assert all(x is y for x, y in zip(got["a1"][1:], got["a2"][1:], strict=True)), "one event per session"
    assert got["b1"][1].values["changes"] is got["a1"][1].values["changes"], "one delta per snapshot"

    late: list[Event] = []
    ImageWatches(listeners, "s3", late.append).switch("img")
    assert [json.loads(e.frame(SEED).changes.json) for e in late] == [  # type: ignore[union-attr]
        {"reset": True, "added": [{"id": "k0", "data": {"imageID": "img", "n": 5}}], "modified": [], "removed": []},
        {"reset": True, "added": [], "modified": [], "removed": []},  # the (empty) bounding boxes
    ]
    for watches in (a1, a2, b1):
        watches.stop()


def test_switching_images_starts_again_with_a_reset() -> None:
    store = MemoryStore({BOUNDING_BOXES: {"b1": {"imageID": "one"}, "b2": {"imageID": "two"}}})
    listeners = SharedListeners(store, max_changes_bytes=1000)
    got: list[Event] = []
    watches = ImageWatches(listeners, "s", lambda e: got.append(e) if e.kind == Kind.BOUNDING_BOXES else None)
    watches.switch("one")
    watches.switch("two")
    assert changes_of(got) == [
        {"reset": True, "added": [{"id": "b1", "data": {"imageID": "one"}}], "modified": [], "removed": []},
        {"reset": True, "added": [{"id": "b2", "data": {"imageID": "two"}}], "modified": [], "removed": []},
    ]
    store.set(BOUNDING_BOXES, "b3", {"imageID": "two", "label": "x" * 2000})  # past the cap
    assert got[-1].frame(WEBAPP).changes.json == "null"  # type: ignore[union-attr]
    assert json.loads(got[-1].frame(WEBAPP).text)["changes"] is None
    watches.stop()
    assert listeners.count() == 0
