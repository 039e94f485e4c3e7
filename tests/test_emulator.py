"""The npm fallback emulator's multiplexing Listen (tests/emulator/start.js), driven through the raw RPC.

The package serves one target per stream; start.js lets one stream carry many
(add_target, remove_target, ending the stream), as the Firestore Web SDK uses it.
These tests speak google.firestore.v1 Listen directly: requests are fed from a
queue, responses collected by a thread, documents written with a normal client.

These tests test the launcher, so they run on npm emulators of their own,
whichever emulator the other tests run on (Google's where it is installed): the
fallback stays tested. Where a test counts the emulator's change listeners
(start.js prints them on SIGUSR2) it runs on another emulator of its own, so no
other test's listeners count.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import EMULATOR_DIR, FIRESTORE_PROJECT, Emulator, firestore_client, unique, wait_for
from google.cloud.firestore_v1 import types
from google.cloud.firestore_v1.services.firestore.transports.grpc import FirestoreGrpcTransport

DATABASE = f"projects/{FIRESTORE_PROJECT}/databases/(default)"
DOCUMENTS = f"{DATABASE}/documents"
WAIT = 5.0
TYPES = types.TargetChange.TargetChangeType
Query = types.StructuredQuery
IDLE = {"streams": 0, "targets": 0, "create-document": 0, "update-document": 0, "delete-document": 0}


# -- the raw stream ------------------------------------------------------------------

def summary(response: Any) -> tuple[Any, ...]:
    """A response as a comparable tuple: (type, target IDs) or ("DOC", target IDs, path under documents/)."""
    pb = types.ListenResponse.pb(response)
    kind = pb.WhichOneof("response_type")
    if kind == "target_change":
        return TYPES(pb.target_change.target_change_type).name, tuple(pb.target_change.target_ids)
    if kind == "document_change":
        name = pb.document_change.document.name.removeprefix(DOCUMENTS + "/")
        return "DOC", tuple(pb.document_change.target_ids), name
    return kind, ()


class Listen:
    """One Listen stream on `host`: `add`/`remove` send requests, a thread collects the responses."""

    def __init__(self, host: str) -> None:
        self._channel = grpc.insecure_channel(host)
        self._requests: queue.Queue[types.ListenRequest | None] = queue.Queue()
        self._call = FirestoreGrpcTransport(channel=self._channel).listen(iter(self._requests.get, None))
        self._lock = threading.Lock()
        self._responses: list[Any] = []
        self.status: grpc.StatusCode | None = None  # how the response stream ended, once it has
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for response in self._call:
                with self._lock:
                    self._responses.append(response)
            self.status = grpc.StatusCode.OK
        except grpc.RpcError as e:
            self.status = e.code()

    def responses(self) -> list[Any]:
        with self._lock:
            return list(self._responses)

    def summaries(self) -> list[tuple[Any, ...]]:
        return [summary(r) for r in self.responses()]

    def add(self, target: types.Target) -> None:
        self._requests.put(types.ListenRequest(database=DATABASE, add_target=target))

    def remove(self, target_id: int) -> None:
        self._requests.put(types.ListenRequest(database=DATABASE, remove_target=target_id))

    def wait(self, condition: Callable[[list[tuple[Any, ...]]], Any], what: str) -> Any:
        return wait_for(lambda: condition(self.summaries()), timeout=WAIT, what=what, detail=self.summaries)

    def wait_for_response(self, expected: tuple[Any, ...], after: int = 0) -> int:
        """The index of the first response summarised as `expected` at or after `after`, once it arrived."""
        def found() -> int | None:
            summaries = self.summaries()
            return next((i for i in range(after, len(summaries)) if summaries[i] == expected), None)
        return wait_for(lambda: (found(),) if found() is not None else None, timeout=WAIT,
                        what=f"{expected}", detail=self.summaries)[0]

    def half_close(self) -> None:
        self._requests.put(None)

    def cancel(self) -> None:
        self._call.cancel()

    def wait_ended(self) -> grpc.StatusCode:
        self._reader.join(WAIT)
        assert not self._reader.is_alive(), f"the response stream did not end: {self.summaries()}"
        assert self.status is not None
        return self.status

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()
        self._reader.join(WAIT)
        self._channel.close()


@pytest.fixture
def listen(emulator: Emulator) -> Iterator[Callable[..., Listen]]:
    """Open Listen streams on an emulator (the shared one unless given); all are closed at the end."""
    opened: list[Listen] = []

    def open_(on: Emulator = emulator) -> Listen:
        stream = Listen(on.host)
        opened.append(stream)
        return stream

    yield open_
    for stream in opened:
        stream.close()


def _npm_emulator(tmp_path_factory: pytest.TempPathFactory, name: str) -> Emulator:
    if shutil.which("node") is None or not (EMULATOR_DIR / "node_modules").is_dir():
        pytest.skip("tests the npm fallback emulator's launcher (tests/emulator/start.js): needs Node.js and "
                    "`npm ci --prefix tests/emulator` (`make test` runs it)")
    return Emulator.start(tmp_path_factory.mktemp(name), kind="npm")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """This module's own npm emulator (in place of the session's, which may be Google's)."""
    started = _npm_emulator(tmp_path_factory, "npm-emulator")
    yield started
    started.stop()


# -- targets and documents -------------------------------------------------------------

def image_query(target_id: int, image: str) -> types.Target:
    """keypoints where imageID == image"""
    where = Query.Filter(field_filter=Query.FieldFilter(
        field=Query.FieldReference(field_path="imageID"), op=Query.FieldFilter.Operator.EQUAL,
        value=types.Value(string_value=image)))
    structured = Query(from_=[Query.CollectionSelector(collection_id="keypoints")], where=where)
    return types.Target(target_id=target_id,
                        query=types.Target.QueryTarget(parent=DOCUMENTS, structured_query=structured))


def document_target(target_id: int, path: str) -> types.Target:
    return types.Target(target_id=target_id, documents=types.Target.DocumentsTarget(documents=[f"{DOCUMENTS}/{path}"]))


def put(client: Any, path: str, data: dict[str, Any]) -> str:
    client.document(path).set(data)
    return path


def keypoint(client: Any, image: str, n: int = 0) -> str:
    return put(client, f"keypoints/{unique('kp')}", {"imageID": image, "n": n})


def first_round(summaries: list[tuple[Any, ...]], target_id: int) -> list[tuple[Any, ...]]:
    """What `target_id` received up to and including its first CURRENT."""
    mine = [s for s in summaries if target_id in s[1]]
    end = mine.index(("CURRENT", (target_id,)))
    return mine[:end + 1]


def round_with(summaries: list[tuple[Any, ...]], doc: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """The RESET ... CURRENT round of doc's target that contains `doc` (the emulator re-sends whole results)."""
    target_id = doc[1][0]
    mine = [s for s in summaries if target_id in s[1]]
    at = mine.index(doc)
    start = max(i for i in range(at) if mine[i][0] in ("ADD", "RESET"))
    end = mine.index(("CURRENT", (target_id,)), at)
    return mine[start:end + 1]


def completed(summaries: list[tuple[Any, ...]], doc: tuple[Any, ...]) -> bool:
    """Whether the round that carries `doc` has ended (its target's CURRENT came after it)."""
    if doc not in summaries:
        return False
    return ("CURRENT", doc[1]) in summaries[summaries.index(doc):]


def docs_in(round_: list[tuple[Any, ...]]) -> list[str]:
    return sorted(s[2] for s in round_ if s[0] == "DOC")


# -- an emulator of these tests' own, to count its listeners -----------------------------

class OwnEmulator:
    def __init__(self, emulator: Emulator, log: Path) -> None:
        self.emulator = emulator
        self.log = log
        self.client = firestore_client(emulator.host)

    def stats(self) -> dict[str, int]:
        """What start.js's Listen holds now (asks it with SIGUSR2, reads its answer in the log)."""
        assert self.emulator.process is not None
        reports = re.findall(r"^listen-stats (\d+) (.*)$", self.log.read_text(), re.MULTILINE)
        os.kill(self.emulator.process.pid, signal.SIGUSR2)

        def answered() -> str | None:
            now = re.findall(r"^listen-stats (\d+) (.*)$", self.log.read_text(), re.MULTILINE)
            return now[len(reports)][1] if len(now) > len(reports) else None

        line = wait_for(answered, timeout=WAIT, what="the emulator's listen-stats")
        return {key: int(value) for key, value in (pair.split("=") for pair in line.split())}

    def wait_stats(self, expected: dict[str, int]) -> None:
        last: list[dict[str, int]] = []

        def reached() -> bool:
            last[:] = [self.stats()]
            return last[0] == expected
        wait_for(reached, timeout=WAIT, what=f"listen-stats {expected}", detail=lambda: last)

    def errors(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines()
                if re.search(r"error|warning|failed|exception", line, re.IGNORECASE)]


@pytest.fixture(scope="module")
def own_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnEmulator]:
    emulator = _npm_emulator(tmp_path_factory, "own-emulator")
    assert emulator.log_path is not None
    try:
        yield OwnEmulator(emulator, emulator.log_path)
    finally:
        emulator.stop()


@pytest.fixture
def own(own_emulator: OwnEmulator) -> Iterator[OwnEmulator]:
    """The own emulator, holding no Listen stream before and (checked) after the test."""
    own_emulator.wait_stats(IDLE)
    yield own_emulator
    own_emulator.wait_stats(IDLE)
    assert own_emulator.errors() == []


# -- the tests ---------------------------------------------------------------------------

def test_one_target_gets_add_documents_current_no_change_then_its_changes(emulator: Emulator, listen) -> None:
    client = emulator.client()
    image = unique("image")
    a, b = keypoint(client, image), keypoint(client, image)
    keypoint(client, unique("other-image"))
    stream = listen()
    stream.add(image_query(1, image))

    stream.wait(lambda s: ("NO_CHANGE", ()) in s, "the first NO_CHANGE")
    responses = stream.responses()
    first = [summary(r) for r in responses]
    end = first.index(("NO_CHANGE", ()))
    assert first[0] == ("ADD", (1,))
    assert sorted(first[1:end - 1]) == sorted([("DOC", (1,), a), ("DOC", (1,), b)])
    assert first[end - 1:end + 1] == [("CURRENT", (1,)), ("NO_CHANGE", ())]
    for r in responses[end - 1:end + 1]:  # CURRENT and the global NO_CHANGE carry a read time
        assert types.ListenResponse.pb(r).target_change.HasField("read_time"), r

    c = keypoint(client, image, n=3)
    stream.wait(lambda s: completed(s, ("DOC", (1,), c)), "the round of the new document's change")
    summaries = stream.summaries()
    changed = round_with(summaries, ("DOC", (1,), c))
    assert changed[0] == ("RESET", (1,)), changed
    assert changed[-1] == ("CURRENT", (1,)), changed
    assert docs_in(changed) == sorted([a, b, c])
    assert all(s[1] in ((1,), ()) for s in summaries), summaries  # only this target's ID, or none
    n = [types.ListenResponse.pb(r).document_change.document.fields["n"].integer_value
         for r in stream.responses() if summary(r) == ("DOC", (1,), c)]
    assert n
    assert set(n) == {3}


def test_targets_on_one_stream_get_their_own_documents_and_changes(emulator: Emulator, listen) -> None:
    client = emulator.client()
    x, y = unique("image"), unique("image")
    a, b = keypoint(client, x), keypoint(client, y)
    d = put(client, f"images/{unique('img')}", {"n": 1})
    stream = listen()
    stream.add(image_query(1, x))
    stream.add(image_query(2, y))
    stream.add(document_target(3, d))

    stream.wait(lambda s: all(("CURRENT", (t,)) in s for t in (1, 2, 3)), "CURRENT for the three targets")
    summaries = stream.summaries()
    assert first_round(summaries, 1) == [("ADD", (1,)), ("DOC", (1,), a), ("CURRENT", (1,))]
    assert first_round(summaries, 2) == [("ADD", (2,)), ("DOC", (2,), b), ("CURRENT", (2,))]
    assert first_round(summaries, 3) == [("ADD", (3,)), ("DOC", (3,), d), ("CURRENT", (3,))]
    assert summaries.count(("NO_CHANGE", ())) >= 3

    a2 = keypoint(client, x)
    stream.wait(lambda s: ("DOC", (1,), a2) in s, "target 1's new document")
    client.document(d).update({"n": 2})
    stream.wait(lambda s: s.count(("DOC", (3,), d)) == 2, "target 3's changed document")
    b2 = keypoint(client, y)
    stream.wait(lambda s: ("DOC", (2,), b2) in s, "target 2's new document")
    stream.wait(lambda s: all(completed(s, doc) for doc in (("DOC", (1,), a2), ("DOC", (2,), b2))),
                "the rounds of both new documents to end (their CURRENT may come in a later read)")

    summaries = stream.summaries()
    assert docs_in(round_with(summaries, ("DOC", (1,), a2))) == sorted([a, a2])
    assert docs_in(round_with(summaries, ("DOC", (2,), b2))) == sorted([b, b2])
    allowed = {a: (1,), a2: (1,), b: (2,), b2: (2,), d: (3,)}
    for s in summaries:  # no document reached another target, every ID is one of the stream's
        if s[0] == "DOC":
            assert allowed[s[2]] == s[1], s
        else:
            assert s[1] in ((), (1,), (2,), (3,)), s
    # The document target saw only its own document's update (the queries re-send on every write).
    assert [s for s in summaries if 3 in s[1]] == [
        ("ADD", (3,)), ("DOC", (3,), d), ("CURRENT", (3,)), ("RESET", (3,)), ("DOC", (3,), d), ("CURRENT", (3,))]
    updated = [types.ListenResponse.pb(r).document_change.document.fields["n"].integer_value
               for r in stream.responses() if summary(r) == ("DOC", (3,), d)]
    assert updated == [1, 2]


def test_a_removed_target_is_acknowledged_and_gets_nothing_more(own: OwnEmulator, listen) -> None:
    x, y = unique("image"), unique("image")
    a, b = keypoint(own.client, x), keypoint(own.client, y)
    stream = listen(own.emulator)
    stream.add(image_query(1, x))
    stream.add(image_query(2, y))
    stream.wait(lambda s: ("CURRENT", (1,)) in s and ("CURRENT", (2,)) in s, "both targets CURRENT")
    assert own.stats() == {"streams": 1, "targets": 2, "create-document": 2, "update-document": 2,
                           "delete-document": 2}

    stream.remove(1)
    removed_at = stream.wait_for_response(("REMOVE", (1,)))
    ack = types.ListenResponse.pb(stream.responses()[removed_at]).target_change
    assert not ack.HasField("cause"), ack
    assert own.stats() == {"streams": 1, "targets": 1, "create-document": 1, "update-document": 1,
                           "delete-document": 1}  # the removed target's listeners are gone

    a2 = keypoint(own.client, x)  # would reach target 1 before b2 reaches target 2, were it still live
    b2 = keypoint(own.client, y)
    stream.wait(lambda s: completed(s, ("DOC", (2,), b2)), "the round of target 2's new document")
    after = stream.summaries()[removed_at + 1:]
    assert [s for s in after if 1 in s[1]] == [], after
    assert docs_in(round_with(stream.summaries(), ("DOC", (2,), b2))) == sorted([b, b2])

    stream.add(image_query(1, x))  # the ID is free again: a new target, from scratch
    readded = stream.wait_for_response(("CURRENT", (1,)), after=removed_at)
    again = [s for s in stream.summaries()[removed_at + 1:readded + 1] if 1 in s[1]]
    assert again[0] == ("ADD", (1,)), again
    assert docs_in(again) == sorted([a, a2]), again


def test_a_duplicate_target_id_is_refused_with_a_cause_and_the_stream_lives_on(own: OwnEmulator, listen) -> None:
    x, y = unique("image"), unique("image")
    keypoint(own.client, x)
    d = put(own.client, f"images/{unique('img')}", {"n": 1})
    stream = listen(own.emulator)
    stream.add(image_query(7, x))
    stream.add(document_target(8, d))
    stream.wait(lambda s: ("CURRENT", (7,)) in s and ("CURRENT", (8,)) in s, "both targets CURRENT")

    stream.add(image_query(7, y))
    removed_at = stream.wait_for_response(("REMOVE", (7,)))
    cause = types.ListenResponse.pb(stream.responses()[removed_at]).target_change.cause
    assert cause.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], cause
    assert "7" in cause.message
    assert own.stats()["targets"] == 1  # the REMOVE ended target 7: only 8 is left

    keypoint(own.client, x)
    own.client.document(d).update({"n": 2})
    stream.wait(lambda s: s.count(("DOC", (8,), d)) == 2, "target 8's changed document")
    after = stream.summaries()[removed_at + 1:]
    assert [s for s in after if 7 in s[1]] == [], after


@pytest.mark.parametrize("end", ["half-close", "cancel"])
def test_ending_the_stream_ends_its_targets_and_the_emulator_lives_on(own: OwnEmulator, listen, end: str) -> None:
    x = unique("image")
    a = keypoint(own.client, x)
    d = put(own.client, f"images/{unique('img')}", {"n": 1})
    old = listen(own.emulator)
    old.add(image_query(1, x))
    old.add(document_target(2, d))
    old.wait(lambda s: ("CURRENT", (1,)) in s and ("CURRENT", (2,)) in s, "both targets CURRENT")
    assert own.stats() == {"streams": 1, "targets": 2, "create-document": 2, "update-document": 2,
                           "delete-document": 2}

    if end == "half-close":
        old.half_close()
        assert old.wait_ended() == grpc.StatusCode.OK  # nothing can be added any more: the emulator ends it
    else:
        old.cancel()
        assert old.wait_ended() == grpc.StatusCode.CANCELLED
    own.wait_stats(IDLE)  # every target's listeners are gone

    b = keypoint(own.client, x)  # no listener of the old stream writes on its finished call
    own.client.document(d).update({"n": 2})
    new = listen(own.emulator)
    new.add(image_query(1, x))
    new.wait(lambda s: ("CURRENT", (1,)) in s, "the new stream's CURRENT")
    assert first_round(new.summaries(), 1) in (
        [("ADD", (1,)), ("DOC", (1,), a), ("DOC", (1,), b), ("CURRENT", (1,))],
        [("ADD", (1,)), ("DOC", (1,), b), ("DOC", (1,), a), ("CURRENT", (1,))])
    assert own.errors() == []


def test_a_write_that_does_not_change_a_targets_result_sends_it_nothing(listen: Callable[..., Listen],
                                                                         emulator: Emulator) -> None:
    """The package re-sends every query target's result on any write; start.js sends a round only when the
    target's documents changed, as Firestore does."""
    client = firestore_client(emulator.host)
    mine, other = unique("image"), unique("image")
    stream = listen()
    stream.add(image_query(1, mine))
    stream.wait(lambda s: ("CURRENT", (1,)) in s, "the first round")
    keypoint(client, other)  # not this target's: before start.js, a RESET round for target 1 followed
    path = keypoint(client, mine)
    changed = ("DOC", (1,), path)
    at = stream.wait_for_response(changed)
    after_first = stream.summaries()[stream.summaries().index(("CURRENT", (1,))) + 1:at + 1]
    assert [s for s in after_first if s[0] != "NO_CHANGE"] == [("RESET", (1,)), changed], after_first
