"""The multiplexed Listen stream (canary/firestore_listen.py).

Three layers of tests: the sans-I/O `ListenState` fed synthetic ListenResponses;
the I/O loop `ListenMux` on a fake connection (stream failures, target removals,
raising callbacks, close); and `FirestoreStore` on the emulator, directly and
through tests/grpc_proxy.py's 100-streams proxy, crashed and restarted mid-watch.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from conftest import Emulator, FakeClock, firestore_client, unique, wait_for
from google.cloud import firestore
from google.cloud.firestore_v1.types import (
    Document,
    DocumentChange,
    DocumentDelete,
    DocumentRemove,
    ExistenceFilter,
    ListenResponse,
    StructuredQuery,
    Target,
    TargetChange,
)
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc.status_pb2 import Status
from grpc_proxy import Proxy

from canary.firestore_listen import Listener, ListenMux, ListenState
from canary.firestore_store import FirestoreStore
from canary.store import BOUNDING_BOXES, KEYPOINTS, SESSIONS

DATABASE = "projects/p/databases/(default)"
DOCS = f"{DATABASE}/documents"
T = TargetChange.TargetChangeType
WAIT = 10.0


# -- synthetic responses -----------------------------------------------------------------------

def doc(path: str, updated: int = 1, **fields: int) -> Document:
    return Document(name=f"{DOCS}/{path}", update_time=Timestamp(seconds=updated),
                    fields={k: {"integer_value": v} for k, v in fields.items()})


def changed(document: Document, *ids: int, removed: tuple[int, ...] = ()) -> ListenResponse:
    return ListenResponse(document_change=DocumentChange(document=document, target_ids=ids,
                                                         removed_target_ids=removed))


def target_change(kind: T, *ids: int, token: bytes = b"", read_time: bool = False,
                  cause: tuple[int, str] | None = None) -> ListenResponse:
    change = TargetChange(target_change_type=kind, target_ids=ids, resume_token=token)
    if read_time:
        change.read_time = Timestamp(seconds=100)
    if cause is not None:
        change.cause = Status(code=cause[0], message=cause[1])
    return ListenResponse(target_change=change)


def snapshot(token: bytes = b"") -> ListenResponse:
    """The consistent snapshot point: a global NO_CHANGE with a read_time."""
    return target_change(T.NO_CHANGE, token=token, read_time=True)


def query_spec(image: str) -> Target:
    """keypoints where imageID == image"""
    where = StructuredQuery.Filter(field_filter=StructuredQuery.FieldFilter(
        field=StructuredQuery.FieldReference(field_path="imageID"), op=StructuredQuery.FieldFilter.Operator.EQUAL,
        value={"string_value": image}))
    query = StructuredQuery(from_=[StructuredQuery.CollectionSelector(collection_id="keypoints")], where=where)
    return Target(query=Target.QueryTarget(parent=DOCS, structured_query=query))


def documents_spec(path: str) -> Target:
    return Target(documents=Target.DocumentsTarget(documents=[f"{DOCS}/{path}"]))


class Machine:
    """A ListenState on a fake clock, with helpers to read what it asks to send."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.state = ListenState(DATABASE, clock=self.clock, rng=random.Random(1))

    def requests(self) -> list[tuple[str, int, bytes]]:
        """("add", ID, resume token) / ("remove", ID, b"") for each request taken."""
        out = []
        for request in self.state.take_requests():
            assert request.database == DATABASE
            if request.HasField("add_target"):
                out.append(("add", request.add_target.target_id, request.add_target.resume_token))
            else:
                out.append(("remove", request.remove_target, b""))
        return out

    def feed(self, *responses: ListenResponse) -> dict[str, list[str]]:
        """Feed responses; returns {owner: document paths} of what is delivered."""
        delivered: dict[str, list[str]] = {}
        for response in responses:
            for delivery in self.state.on_response(response):
                assert delivery.owner not in delivered, "one delivery per owner and snapshot point"
                delivered[delivery.owner] = [d.name.removeprefix(DOCS + "/") for d in delivery.documents]
        return delivered


@pytest.fixture
def machine() -> Machine:
    return Machine()


def open_with(machine: Machine, **specs: Target) -> dict[str, int]:
    """Add `specs` (owner name -> Target) and open the stream: {owner: handle}; check the add requests."""
    handles = {owner: machine.state.add(spec, owner) for owner, spec in specs.items()}
    assert machine.requests() == [], "nothing is sent before the stream is open"
    machine.state.stream_opened()
    adds = machine.requests()
    assert [kind for kind, _, _ in adds] == ["add"] * len(specs)
    assert len({target_id for _, target_id, _ in adds}) == len(specs)
    return handles


def ids(machine: Machine, handles: dict[str, int]) -> dict[str, int]:
    return {owner: machine.state.target_id(handle) for owner, handle in handles.items()}


def current(machine: Machine, *target_ids: int, documents: dict[int, list[Document]] | None = None) -> None:
    """ADD, the documents, CURRENT for each target, without the snapshot point."""
    for target_id in target_ids:
        machine.feed(target_change(T.ADD, target_id))
        for document in (documents or {}).get(target_id, []):
            machine.feed(changed(document, target_id))
        machine.feed(target_change(T.CURRENT, target_id))


# -- the state machine -------------------------------------------------------------------------

def test_requests_carry_the_spec_and_a_fresh_id_per_add(machine: Machine) -> None:
    handles = open_with(machine, a=query_spec("i1"), b=documents_spec("sessions/s1"))
    first = ids(machine, handles)
    sent = machine.state.add(documents_spec("sessions/s2"), "c")
    [(kind, new_id, token)] = machine.requests()
    assert kind == "add"
    assert new_id not in first.values()
    assert token == b""
    machine.state.remove(sent)
    assert machine.requests() == [("remove", new_id, b"")]
    machine.state.remove(sent)  # idempotent
    assert machine.requests() == []
    machine.state.stream_closed()
    machine.state.stream_opened()
    again = machine.requests()
    assert {target_id for _, target_id, _ in again}.isdisjoint({*first.values(), new_id}), "IDs are never reused"
    assert machine.state.counts() == {"query_targets": 1, "document_targets": 1}


def test_initial_delivery_happens_at_the_consistent_point_once_current(machine: Machine) -> None:
    handles = open_with(machine, a=query_spec("i1"), b=query_spec("i2"))
    a, b = ids(machine, handles).values()
    machine.feed(target_change(T.ADD, a), changed(doc("kp/1"), a), changed(doc("kp/2"), a))
    assert machine.feed(snapshot()) == {}, "not current yet: nothing is delivered"
    assert machine.feed(target_change(T.CURRENT, a)) == {}, "current, but not yet at a snapshot point"
    assert machine.feed(target_change(T.NO_CHANGE, a, read_time=True)) == {}, "a targeted NO_CHANGE is no snapshot"
    assert machine.feed(snapshot()) == {"a": ["kp/1", "kp/2"]}
    current(machine, b)  # an empty result is delivered too, once
    assert machine.feed(snapshot()) == {"b": []}
    assert machine.feed(snapshot()) == {}, "nothing changed"


def test_a_change_of_one_target_notifies_only_that_target(machine: Machine) -> None:
    handles = open_with(machine, a=query_spec("i1"), b=query_spec("i2"), d=documents_spec("sessions/s"))
    a, b, d = ids(machine, handles).values()
    current(machine, a, b, d, documents={a: [doc("kp/1")], d: [doc("sessions/s")]})
    assert machine.feed(snapshot()) == {"a": ["kp/1"], "b": [], "d": ["sessions/s"]}
    assert machine.feed(changed(doc("kp/2"), b), snapshot()) == {"b": ["kp/2"]}
    assert machine.feed(changed(doc("sessions/s", updated=2), d), snapshot()) == {"d": ["sessions/s"]}
    # One document leaving one target and entering another.
    assert machine.feed(changed(doc("kp/1", updated=3), b, removed=(a,)), snapshot()) == {
        "a": [], "b": ["kp/1", "kp/2"]}


def test_reset_followed_by_the_same_documents_notifies_nobody(machine: Machine) -> None:
    """What the emulator does to every query target on any write anywhere."""
    handles = open_with(machine, a=query_spec("i1"), b=query_spec("i2"))
    a, b = ids(machine, handles).values()
    current(machine, a, b, documents={a: [doc("kp/1"), doc("kp/2")], b: [doc("kp/3")]})
    machine.feed(snapshot())
    resend = [target_change(T.RESET, a), changed(doc("kp/2"), a), changed(doc("kp/1"), a),
              target_change(T.CURRENT, a), snapshot()]
    assert machine.feed(*resend) == {}
    # The same with a changed update_time notifies; so does a document missing from the re-sent set.
    assert machine.feed(target_change(T.RESET, a), changed(doc("kp/1"), a), changed(doc("kp/2", updated=2), a),
                        target_change(T.CURRENT, a), snapshot()) == {"a": ["kp/1", "kp/2"]}
    assert machine.feed(target_change(T.RESET, a), changed(doc("kp/1"), a), target_change(T.CURRENT, a),
                        snapshot()) == {"a": ["kp/1"]}


def test_a_reset_target_is_not_delivered_until_current_again(machine: Machine) -> None:
    handles = open_with(machine, a=query_spec("i1"))
    (a,) = ids(machine, handles).values()
    current(machine, a, documents={a: [doc("kp/1")]})
    machine.feed(snapshot())
    assert machine.feed(target_change(T.RESET, a), changed(doc("kp/9"), a), snapshot()) == {}
    assert machine.feed(target_change(T.CURRENT, a), snapshot()) == {"a": ["kp/9"]}


def test_document_delete_and_remove_take_documents_out(machine: Machine) -> None:
    handles = open_with(machine, a=query_spec("i1"), b=query_spec("i2"), d=documents_spec("sessions/s"))
    a, b, d = ids(machine, handles).values()
    current(machine, a, b, d, documents={a: [doc("kp/1"), doc("kp/2"), doc("kp/3")], b: [doc("kp/1")],
                                         d: [doc("sessions/s")]})
    machine.feed(snapshot())
    gone = DocumentDelete(document=f"{DOCS}/kp/1", removed_target_ids=[a])
    assert machine.feed(ListenResponse(document_delete=gone), snapshot()) == {"a": ["kp/2", "kp/3"]}
    left = DocumentRemove(document=f"{DOCS}/kp/2", removed_target_ids=[a])
    assert machine.feed(ListenResponse(document_remove=left), snapshot()) == {"a": ["kp/3"]}
    # A delete naming no target applies to every target holding the document.
    anywhere = DocumentDelete(document=f"{DOCS}/kp/1")
    assert machine.feed(ListenResponse(document_delete=anywhere), snapshot()) == {"b": []}
    session = DocumentDelete(document=f"{DOCS}/sessions/s", removed_target_ids=[d])
    assert machine.feed(ListenResponse(document_delete=session), snapshot()) == {"d": []}
    # A document that comes and goes between two snapshot points changes nothing.
    assert machine.feed(changed(doc("kp/7"), b), changed(doc("kp/7"), removed=(b,)), snapshot()) == {}


def test_remove_with_a_cause_reports_the_target_and_readds_it_after_a_backoff(machine: Machine) -> None:
    handles = open_with(machine, a=query_spec("i1"), b=query_spec("i2"))
    a, b = ids(machine, handles).values()
    current(machine, a, b, documents={a: [doc("kp/1")]})
    machine.feed(snapshot(token=b"t1"))
    machine.feed(target_change(T.REMOVE, a, cause=(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], "too many")))
    [failure] = machine.state.take_failures()
    assert (failure.owner, failure.attempt, failure.status) == ("a", 1, "RESOURCE_EXHAUSTED: too many")
    assert 0.5 <= failure.retry_in <= 1.5
    assert machine.requests() == [], "the server removed it: nothing to send"
    assert machine.state.target_id(handles["a"]) is None
    # Late responses for the retired ID are ignored; the other target is undisturbed.
    assert machine.feed(changed(doc("kp/2"), a, b), snapshot()) == {"b": ["kp/2"]}
    due = machine.state.due()
    assert due == pytest.approx(machine.clock.now + failure.retry_in)
    assert machine.requests() == []
    machine.clock.now = due
    assert machine.state.due() is None
    [(kind, readded, token)] = machine.requests()
    assert kind == "add"
    assert readded not in (a, b)
    assert token == b"", "re-added from scratch: the failed target's token is not trusted"
    assert machine.state.target_readds == 1
    assert machine.state.target_failures == 1
    # Back with the same documents: nothing new to deliver; a second failure backs off longer.
    current(machine, readded, documents={readded: [doc("kp/1")]})
    assert machine.feed(snapshot()) == {}
    assert machine.state.take_recovered() == ["a"]
    machine.feed(target_change(T.REMOVE, readded, cause=(13, "boom")))
    machine.feed(target_change(T.REMOVE, readded, cause=(13, "boom")))  # a duplicate is ignored
    [again] = machine.state.take_failures()
    assert again.attempt == 1, "a target that recovered starts a new incident"


def test_repeated_failures_back_off_exponentially(machine: Machine) -> None:
    handles = open_with(machine, a=query_spec("i1"))
    delays = []
    for _ in range(8):
        target_id = machine.state.target_id(handles["a"])
        machine.feed(target_change(T.REMOVE, target_id, cause=(14, "down")))
        [failure] = machine.state.take_failures()
        delays.append(failure.retry_in)
        machine.clock.now += failure.retry_in
        machine.state.due()
        machine.requests()
    assert 0.5 <= delays[0] <= 1.5
    assert delays[5] > delays[0] * 4
    assert all(d <= 60.0 for d in delays)


def test_remove_acknowledgement_of_a_removed_target_is_ignored(machine: Machine) -> None:
    handles = open_with(machine, a=query_spec("i1"), b=query_spec("i2"))
    a, b = ids(machine, handles).values()
    current(machine, a, b)
    machine.feed(snapshot())
    machine.state.remove(handles["a"])
    assert machine.requests() == [("remove", a, b"")]
    assert machine.feed(target_change(T.REMOVE, a), changed(doc("kp/1"), a), snapshot()) == {}
    assert machine.state.take_failures() == []


def test_an_existence_filter_mismatch_resets_and_relistens_the_target(machine: Machine) -> None:
    handles = open_with(machine, a=query_spec("i1"), b=query_spec("i2"))
    a, b = ids(machine, handles).values()
    current(machine, a, b, documents={a: [doc("kp/1"), doc("kp/2")], b: [doc("kp/3")]})
    machine.feed(target_change(T.NO_CHANGE, a, token=b"ta"), snapshot())
    assert machine.state.resume_token(handles["a"]) == b"ta"
    machine.feed(ListenResponse(filter=ExistenceFilter(target_id=a, count=2)))
    assert machine.requests() == [], "a matching count changes nothing"
    machine.feed(changed(doc("kp/4"), a))  # pending changes count too
    machine.feed(ListenResponse(filter=ExistenceFilter(target_id=a, count=3)))
    assert machine.requests() == []
    machine.feed(ListenResponse(filter=ExistenceFilter(target_id=a, count=1)))
    [(kind, old, _), (kind2, new, token)] = machine.requests()
    assert (kind, old, kind2) == ("remove", a, "add")
    assert new not in (a, b)
    assert token == b"", "re-listened without a resume token"
    assert machine.state.resume_token(handles["a"]) == b"", "the resume token is dropped"
    assert machine.state.target_resets == 1
    assert machine.feed(changed(doc("kp/5"), a), snapshot()) == {}, "the old ID is retired"
    # The re-listened target delivers only if its result differs from what was delivered.
    current(machine, new, documents={new: [doc("kp/1"), doc("kp/2")]})
    assert machine.feed(snapshot()) == {}
    assert machine.feed(target_change(T.RESET, new), changed(doc("kp/1"), new), target_change(T.CURRENT, new),
                        snapshot()) == {"a": ["kp/1"]}


def test_an_existence_filter_of_zero_on_a_document_target_deletes_the_document(machine: Machine) -> None:
    handles = open_with(machine, d=documents_spec("sessions/s"))
    (d,) = ids(machine, handles).values()
    current(machine, d, documents={d: [doc("sessions/s")]})
    machine.feed(snapshot())
    machine.feed(ListenResponse(filter=ExistenceFilter(target_id=d, count=0)))
    assert machine.requests() == []
    assert machine.feed(snapshot()) == {"d": []}


def test_resume_tokens_are_kept_per_target_and_from_global_changes(machine: Machine) -> None:
    handles = open_with(machine, a=query_spec("i1"), b=query_spec("i2"), c=query_spec("i3"))
    a, b, c = ids(machine, handles).values()
    current(machine, a, b, c)
    machine.feed(target_change(T.CURRENT, a, token=b"a1"))
    assert machine.state.resume_token(handles["a"]) == b"", "committed only at the snapshot point"
    machine.feed(snapshot())
    assert [machine.state.resume_token(h) for h in handles.values()] == [b"a1", b"", b""]
    machine.feed(snapshot(token=b"g1"))  # a global token applies to every target
    assert [machine.state.resume_token(h) for h in handles.values()] == [b"g1", b"g1", b"g1"]
    machine.feed(target_change(T.NO_CHANGE, b, token=b"b2"), snapshot())
    assert [machine.state.resume_token(h) for h in handles.values()] == [b"g1", b"b2", b"g1"]
    machine.feed(target_change(T.NO_CHANGE, c, token=b"c3"))  # not committed: no snapshot point before the end
    machine.state.stream_closed()
    machine.state.stream_opened()
    assert sorted(token for _, _, token in machine.requests()) == [b"b2", b"g1", b"g1"]


def test_a_closed_stream_drops_uncommitted_changes(machine: Machine) -> None:
    handles = open_with(machine, a=query_spec("i1"))
    (a,) = ids(machine, handles).values()
    current(machine, a, documents={a: [doc("kp/1")]})
    machine.feed(snapshot(token=b"t"))
    machine.feed(changed(doc("kp/2"), a), target_change(T.NO_CHANGE, a, token=b"u"))
    machine.state.stream_closed()
    machine.state.stream_opened()
    [(_, new, token)] = machine.requests()
    assert token == b"t"
    # The resumed stream sends what happened after "t"; kp/2 had not been committed.
    assert machine.feed(target_change(T.ADD, new), target_change(T.CURRENT, new), snapshot()) == {}
    assert machine.feed(changed(doc("kp/3"), new), snapshot()) == {"a": ["kp/1", "kp/3"]}


def test_a_target_readded_without_a_resume_token_applies_the_result_over_what_it_held(machine: Machine) -> None:
    """Like the emulator, which sends no resume tokens: the re-sent result is applied as changes (a changed
    document notifies, an unchanged result does not), as google-cloud-firestore's watch does."""
    handles = open_with(machine, a=query_spec("i1"), d=documents_spec("sessions/s"))
    a, d = ids(machine, handles).values()
    current(machine, a, d, documents={a: [doc("kp/1"), doc("kp/2")], d: [doc("sessions/s")]})
    machine.feed(snapshot())
    machine.state.stream_closed()
    machine.state.stream_opened()
    assert [token for _, _, token in machine.requests()] == [b"", b""]
    a, d = ids(machine, handles).values()
    current(machine, a, d, documents={a: [doc("kp/1"), doc("kp/2")], d: [doc("sessions/s")]})
    assert machine.feed(snapshot()) == {}
    machine.state.stream_closed()
    machine.state.stream_opened()
    a, d = ids(machine, handles).values()
    machine.requests()
    current(machine, a, d, documents={a: [doc("kp/1", updated=5), doc("kp/3")], d: [doc("sessions/s")]})
    assert machine.feed(snapshot()) == {"a": ["kp/1", "kp/2", "kp/3"]}


# -- the I/O loop on a fake connection ---------------------------------------------------------

class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


_END = object()


class FakeCall:
    """A Listen call: records the requests it is sent; responses (or errors) are pushed by the test."""

    def __init__(self, requests: Iterator[Any]) -> None:
        self.requests: list[Any] = []
        self._cond = threading.Condition()
        self._responses: queue.Queue[Any] = queue.Queue()
        self.cancelled = False
        threading.Thread(target=self._take, args=(requests,), daemon=True).start()

    def _take(self, requests: Iterator[Any]) -> None:
        for request in requests:
            with self._cond:
                self.requests.append(request)
                self._cond.notify_all()

    def adds(self, count: int) -> list[int]:
        """Wait for `count` add_target requests; their target IDs."""
        def added() -> list[int]:
            with self._cond:
                return [r.add_target.target_id for r in self.requests if r.HasField("add_target")]
        return wait_for(lambda: len(added()) >= count and added(), timeout=WAIT, what=f"{count} adds")

    def push(self, *responses: Any) -> None:
        for response in responses:
            self._responses.put(response)

    def __iter__(self) -> FakeCall:
        return self

    def __next__(self) -> Any:
        item = self._responses.get(timeout=30)
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._responses.put(FakeRpcError(grpc.StatusCode.CANCELLED, "cancelled by the client"))


class FakeServer:
    def __init__(self) -> None:
        self.calls: list[FakeCall] = []
        self.refuse = 0  # fail this many connects

    def connect(self, requests: Iterator[Any]) -> FakeCall:
        if self.refuse:
            self.refuse -= 1
            raise FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused")
        call = FakeCall(requests)
        self.calls.append(call)
        return call

    def call(self, index: int) -> FakeCall:
        return wait_for(lambda: len(self.calls) > index and self.calls[index], timeout=WAIT,
                        what=f"call {index}")


class Recorder(Listener):
    def __init__(self, label: str, fail: bool = False) -> None:
        self.label = label
        self.fail = fail
        self.calls: list[list[str]] = []
        self._cond = threading.Condition()

    def deliver(self, documents: list[Any]) -> None:
        with self._cond:
            self.calls.append([d.name.removeprefix(DOCS + "/") for d in documents])
            self._cond.notify_all()
        if self.fail:
            raise ValueError(f"cannot handle {documents}")

    def wait(self, count: int) -> list[str]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.calls) >= count, WAIT), self.calls
            return self.calls[count - 1]


@pytest.fixture
def fake() -> Iterator[tuple[FakeServer, ListenMux]]:
    server = FakeServer()
    mux = ListenMux(DATABASE, server.connect, stream_retry_initial=0.02, stream_retry_max=0.1,
                    target_retry_initial=0.02, target_retry_max=0.1)
    yield server, mux
    mux.close()


def serve(call: FakeCall, documents: dict[int, list[Document]], token: bytes = b"") -> None:
    for target_id, docs in documents.items():
        call.push(target_change(T.ADD, target_id), *[changed(d, target_id) for d in docs],
                  target_change(T.CURRENT, target_id))
    call.push(snapshot(token))


def test_mux_opens_one_stream_on_first_add_and_reopens_it_with_every_target(
        fake: tuple[FakeServer, ListenMux], caplog: pytest.LogCaptureFixture) -> None:
    server, mux = fake
    assert mux.stats()["streams"] == 0
    assert server.calls == []
    a, b = Recorder("a"), Recorder("b")
    mux.listen(query_spec("i1"), a)
    mux.listen(documents_spec("sessions/s"), b)
    first = server.call(0)
    ia, ib = first.adds(2)
    serve(first, {ia: [doc("kp/1")], ib: []}, token=b"tok")
    assert a.wait(1) == ["kp/1"]
    assert b.wait(1) == []
    assert mux.stats() == {"streams": 1, "query_targets": 1, "document_targets": 1, "stream_reopens": 0,
                           "target_readds": 0, "target_failures": 0, "target_resets": 0, "callback_errors": 0}
    server.refuse = 2  # the next two attempts fail too
    with caplog.at_level(logging.DEBUG, logger="canary.firestore_listen"):
        first.push(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "socket closed"))
        second = server.call(1)
        new_ids = second.adds(2)
        adds = [r.add_target for r in second.requests if r.HasField("add_target")]
        assert {x.resume_token for x in adds} == {b"tok"}, "re-added with their resume tokens"
        assert set(new_ids).isdisjoint({ia, ib})
        serve(second, {new_ids[0]: [doc("kp/1"), doc("kp/2")], new_ids[1]: []})
        assert a.wait(2) == ["kp/1", "kp/2"]
        assert mux.stats()["stream_reopens"] == 3, "every attempt counts"
        # A barrier: snapshots are delivered in order by one thread, so once `a` has the next one, any
        # delivery to `b` from the snapshot above has happened.
        second.push(changed(doc("kp/3"), new_ids[0]), snapshot())
        assert a.wait(3) == ["kp/1", "kp/2", "kp/3"]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "UNAVAILABLE: socket closed" in warnings[0].getMessage()
    assert any("restored" in r.getMessage() for r in caplog.records)
    assert len(b.calls) == 1, "an unchanged target is not notified after the reopen"


def test_mux_reopens_a_stream_the_server_ends(fake: tuple[FakeServer, ListenMux]) -> None:
    server, mux = fake
    a = Recorder("a")
    mux.listen(query_spec("i1"), a)
    first = server.call(0)
    serve(first, {first.adds(1)[0]: []})
    a.wait(1)
    first.push(_END)
    second = server.call(1)
    serve(second, {second.adds(1)[0]: [doc("kp/1")]})
    assert a.wait(2) == ["kp/1"]


def test_mux_readds_a_target_the_server_removed(fake: tuple[FakeServer, ListenMux],
                                               caplog: pytest.LogCaptureFixture) -> None:
    server, mux = fake
    a, b = Recorder("keypoints of i1"), Recorder("b")
    mux.listen(query_spec("i1"), a)
    mux.listen(query_spec("i2"), b)
    call = server.call(0)
    ia, ib = call.adds(2)
    serve(call, {ia: [], ib: []})
    a.wait(1)
    with caplog.at_level(logging.WARNING, logger="canary.firestore_listen"):
        call.push(target_change(T.REMOVE, ia, cause=(7, "missing permission")))
        readded = call.adds(3)[2]
    assert readded not in (ia, ib)
    [record] = caplog.records
    assert "keypoints of i1" in record.getMessage()
    assert "PERMISSION_DENIED" in record.getMessage()
    serve(call, {readded: [doc("kp/1")]})
    assert a.wait(2) == ["kp/1"]
    assert len(server.calls) == 1, "one target's failure does not reopen the stream"
    stats = mux.stats()
    assert (stats["target_failures"], stats["target_readds"], stats["streams"]) == (1, 1, 1)


def test_a_raising_callback_disturbs_nobody_and_is_logged_once(fake: tuple[FakeServer, ListenMux],
                                                              caplog: pytest.LogCaptureFixture) -> None:
    server, mux = fake
    bad, good = Recorder("bad", fail=True), Recorder("good")
    mux.listen(query_spec("i1"), bad)
    mux.listen(query_spec("i2"), good)
    call = server.call(0)
    ib, ig = call.adds(2)
    with caplog.at_level(logging.DEBUG, logger="canary.firestore_listen"):
        serve(call, {ib: [doc("kp/1", secretfield=7)], ig: [doc("kp/2")]})
        assert bad.wait(1) == ["kp/1"]
        assert good.wait(1) == ["kp/2"]
        call.push(changed(doc("kp/3"), ib, ig), snapshot())
        assert bad.wait(2) == ["kp/1", "kp/3"]
        assert good.wait(2) == ["kp/2", "kp/3"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "bad" in errors[0].getMessage()
    assert "ValueError" in errors[0].getMessage()
    assert "secretfield" not in caplog.text, "exception texts (which may quote documents) are not logged"
    assert mux.stats()["callback_errors"] == 2
    assert len(server.calls) == 1


def test_an_unprocessable_response_reopens_the_stream(fake: tuple[FakeServer, ListenMux]) -> None:
    server, mux = fake
    a = Recorder("a")
    mux.listen(query_spec("i1"), a)
    first = server.call(0)
    serve(first, {first.adds(1)[0]: []})
    a.wait(1)
    first.push(object())  # not a ListenResponse
    second = server.call(1)
    serve(second, {second.adds(1)[0]: [doc("kp/1")]})
    assert a.wait(2) == ["kp/1"]
    assert first.cancelled


def test_unlisten_sends_remove_and_close_ends_everything(fake: tuple[FakeServer, ListenMux]) -> None:
    server, mux = fake
    a = Recorder("a")
    handle = mux.listen(query_spec("i1"), a)
    call = server.call(0)
    [ia] = call.adds(1)
    mux.unlisten(handle)
    mux.unlisten(handle)
    wait_for(lambda: any(r.remove_target == ia for r in call.requests), what="the remove_target")
    assert mux.stats()["query_targets"] == 0
    serve(call, {ia: [doc("kp/1")]})
    b = Recorder("b")
    mux.listen(query_spec("i2"), b)
    [_, ib] = call.adds(2)
    serve(call, {ib: [doc("kp/2")]})
    assert b.wait(1) == ["kp/2"]  # a barrier: what was served for `ia` before has been handled
    assert a.calls == []
    threads = {t.name for t in threading.enumerate()}
    assert {"firestore-listen", "firestore-listen-supervisor"} <= threads
    mux.close()
    assert call.cancelled
    wait_for(lambda: not {"firestore-listen", "firestore-listen-supervisor"} & {t.name for t in threading.enumerate()},
             what="the threads to end")
    assert mux.stats()["streams"] == 0
    with pytest.raises(RuntimeError):
        mux.listen(query_spec("i3"), Recorder("c"))


@pytest.fixture
def idle_soon() -> Iterator[tuple[FakeServer, ListenMux, int]]:
    """A multiplexer that closes a stream left without targets after 50 ms, carrying one target (its handle is
    the third item) on its first call."""
    server = FakeServer()
    mux = ListenMux(DATABASE, server.connect, idle_close=0.05)
    handle = mux.listen(query_spec("i1"), Recorder("a"))
    server.call(0).adds(1)
    yield server, mux, handle
    mux.close()


def test_an_idle_stream_is_closed_and_reopened_on_demand(idle_soon: tuple[FakeServer, ListenMux, int]) -> None:
    server, mux, handle = idle_soon
    first = server.call(0)
    mux.unlisten(handle)
    wait_for(lambda: first.cancelled and mux.stats()["streams"] == 0, what="the idle stream to close")
    b = Recorder("b")
    mux.listen(query_spec("i2"), b)
    second = server.call(1)
    serve(second, {second.adds(1)[0]: []})
    assert b.wait(1) == []


def test_an_idle_stream_is_closed_once_while_its_call_winds_down(idle_soon: tuple[FakeServer, ListenMux, int],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A cancelled call may end much later (a busy process); until then the supervisor must wait, not cancel it
    again and again without yielding (which, under gevent, starved the worker until gunicorn killed it)."""
    caplog.set_level(logging.DEBUG, logger="canary.firestore_listen")
    server, mux, handle = idle_soon
    first = server.call(0)
    cancels: list[int] = []
    first.cancel = lambda: cancels.append(1)  # type: ignore[method-assign]  # the call goes on until ended below
    mux.unlisten(handle)
    wait_for(lambda: cancels, what="the idle stream to be cancelled")
    assert mux.stats()["streams"] == 0, "off duty as soon as it is cancelled"
    b = Recorder("b")
    mux.listen(query_spec("i2"), b)  # while the old call is still winding down
    first.push(FakeRpcError(grpc.StatusCode.CANCELLED, "cancelled by the client"))
    second = server.call(1)
    serve(second, {second.adds(1)[0]: []})
    assert b.wait(1) == []
    assert [r.message for r in caplog.records].count("closing the idle Listen stream") == 1


def test_a_stream_that_answers_nothing_is_reopened_and_its_targets_served(caplog: pytest.LogCaptureFixture) -> None:
    """A stream that takes requests and never answers (seen under gevent on Google's emulator, no error ending
    it) would leave every watch of the process waiting forever: it is reopened, and its targets served."""
    server = FakeServer()
    mux = ListenMux(DATABASE, server.connect, unanswered=0.1)
    try:
        a = Recorder("a")
        mux.listen(query_spec("i1"), a)
        wedged = server.call(0)
        wedged.adds(1)  # the add_target was sent; nothing ever comes back
        wait_for(lambda: wedged.cancelled, what="the silent stream to be given up")
        second = server.call(1)
        serve(second, {second.adds(1)[0]: []})
        assert a.wait(1) == []
        assert any("answered nothing" in r.getMessage() for r in caplog.records)
    finally:
        mux.close()


# -- on the emulator ---------------------------------------------------------------------------

class Watched:
    """Deliveries per key from many watches, with bounded waits."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.calls: dict[str, list[Any]] = defaultdict(list)

    def callback(self, key: str) -> Callable[[Any], None]:
        def record(value: Any) -> None:
            with self._cond:
                self.calls[key].append(value)
                self._cond.notify_all()
        return record

    def wait(self, condition: Callable[[], Any], what: str, timeout: float = 60.0,
             detail: Callable[[], Any] | None = None) -> None:
        def check() -> Any:
            with self._cond:
                return condition()
        wait_for(check, timeout=timeout, what=what, detail=detail)

    def count(self, key: str) -> int:
        with self._cond:
            return len(self.calls[key])


class Fleet:
    """`images` images (a keypoints and a boundingBoxes target each) and `sessions` session documents
    watched on one store; half the images and sessions have a document from the start."""

    def __init__(self, store: FirestoreStore, writer: firestore.Client, images: int, sessions: int) -> None:
        self.store = store
        self.writer = writer
        self.watched = Watched()
        self.images = [unique("fleet-image") for _ in range(images)]
        self.sessions = [unique("fleet-session") for _ in range(sessions)]
        batch = writer.batch()
        for image in self.images[::2]:
            batch.set(writer.collection(KEYPOINTS).document(f"{image}-kp0"), {"imageID": image, "n": 0})
        for session in self.sessions[::2]:
            batch.set(writer.collection(SESSIONS).document(session), {"n": 0})
        batch.commit()
        self.keys: list[str] = []
        self.watches = []
        started = time.monotonic()
        for image in self.images:
            for collection in (KEYPOINTS, BOUNDING_BOXES):
                key = f"{collection}:{image}"
                self.keys.append(key)
                self.watches.append(store.watch_query(collection, "imageID", image, self.watched.callback(key)))
        for session in self.sessions:
            key = f"{SESSIONS}:{session}"
            self.keys.append(key)
            self.watches.append(store.watch_document(SESSIONS, session, self.watched.callback(key)))
        self.watched.wait(lambda: all(self.watched.calls[k] for k in self.keys), "every initial snapshot")
        self.initial_seconds = time.monotonic() - started

    def check_initial(self) -> None:
        calls = self.watched.calls
        for i, image in enumerate(self.images):
            assert [d.id for d in calls[f"{KEYPOINTS}:{image}"][0]] == ([f"{image}-kp0"] if i % 2 == 0 else [])
            assert calls[f"{BOUNDING_BOXES}:{image}"][0] == []
        for i, session in enumerate(self.sessions):
            assert calls[f"{SESSIONS}:{session}"][0] == ({"n": 0} if i % 2 == 0 else None)

    def change(self, writer: firestore.Client, every: int = 10, deletes: bool = True) -> dict[str, Any]:
        """Change every `every`-th image (a new bounding box; an updated keypoint for the next ones) and half
        the sessions (existing ones updated or deleted, missing ones created); what each changed key expects."""
        expected: dict[str, Any] = {}
        for image in self.images[::every]:
            writer.collection(BOUNDING_BOXES).document(f"{image}-bb1").set({"imageID": image, "n": 1})
            expected[f"{BOUNDING_BOXES}:{image}"] = [f"{image}-bb1"]
        for image in self.images[2::every]:
            writer.collection(KEYPOINTS).document(f"{image}-kp0").update({"n": 1})
            expected[f"{KEYPOINTS}:{image}"] = [f"{image}-kp0"]
        for i, session in enumerate(self.sessions):
            ref = writer.collection(SESSIONS).document(session)
            if i % 4 == 0:
                ref.set({"n": 1})
                expected[f"{SESSIONS}:{session}"] = {"n": 1}
            elif i % 4 == 2 and deletes:
                ref.delete()
                expected[f"{SESSIONS}:{session}"] = None
            elif i % 4 == 3:
                ref.set({"n": 3})
                expected[f"{SESSIONS}:{session}"] = {"n": 3}
        return expected

    def check_changes(self, expected: dict[str, Any], before: dict[str, int]) -> None:
        """Each changed key gets its change (last delivery); no other key gets anything."""
        def missing() -> dict[str, Any]:
            """{key: what it got last} for each changed key still without its change."""
            out = {}
            for key, value in expected.items():
                calls = self.watched.calls[key]
                last = calls[-1] if len(calls) > before[key] else "nothing new"
                got = [d.id for d in last] if isinstance(last, list) else last
                if got != value:
                    out[key] = got
            return out
        self.watched.wait(lambda: not missing(), "every change",
                          detail=lambda: f"still missing {missing()}; stats {self.store.watch_stats()}")
        # A sentinel written after every change: once delivered, everything before it has been processed.
        sentinel = self.images[1]
        count = self.watched.count(f"{KEYPOINTS}:{sentinel}")
        self.writer.collection(KEYPOINTS).document(f"{sentinel}-sentinel").set({"imageID": sentinel})
        self.watched.wait(lambda: self.watched.count(f"{KEYPOINTS}:{sentinel}") > count, "the sentinel")
        for key in self.keys:
            if key == f"{KEYPOINTS}:{sentinel}":
                continue
            extra = len(self.watched.calls[key]) - before[key]
            assert extra == (1 if key in expected else 0), (key, self.watched.calls[key][before[key]:])

    def counts(self) -> dict[str, int]:
        return {key: self.watched.count(key) for key in self.keys}

    def stop(self) -> None:
        for watch in self.watches:
            watch.stop()


@pytest.fixture(scope="module")
def quiet_emulator(emulator: Emulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """An emulator of this module's own (or the external one): both emulators answer each write by re-running
    every listener's query (Google's re-sends every query target's result; the npm one re-runs them over the
    whole collection), so on the shared one, full of every other test's documents and listeners, hundreds of
    targets make each write slow."""
    if not emulator.started:
        yield emulator
        return
    quiet = Emulator.start(tmp_path_factory.mktemp("quiet-emulator"))
    yield quiet
    quiet.stop()


@pytest.fixture
def quiet_proxy(quiet_emulator: Emulator) -> Iterator[Proxy]:
    with Proxy(quiet_emulator.host) as proxy:
        yield proxy


@pytest.fixture
def writer(quiet_emulator: Emulator) -> firestore.Client:
    return firestore_client(quiet_emulator.host)


def test_many_targets_share_one_stream_on_the_emulator(quiet_emulator: Emulator, writer: firestore.Client) -> None:
    store = FirestoreStore(firestore_client(quiet_emulator.host))
    try:
        fleet = Fleet(store, writer, images=150, sessions=20)
        print(f"\n320 targets: every initial snapshot in {fleet.initial_seconds:.2f} s")
        fleet.check_initial()
        stats = store.watch_stats()
        assert stats["streams"] == 1
        assert (stats["query_targets"], stats["document_targets"]) == (300, 20)
        assert store.watch_count() == 320
        before = fleet.counts()
        started = time.monotonic()
        expected = fleet.change(writer)
        fleet.check_changes(expected, before)
        print(f"{len(expected)} changes delivered in {time.monotonic() - started:.2f} s")
        assert store.watch_stats()["stream_reopens"] == 0
        fleet.stop()
        assert store.watch_count() == 0
        assert store.watch_stats()["query_targets"] == 0
    finally:
        store.close()
    assert store.watch_stats()["streams"] == 0


def test_many_targets_through_a_100_streams_proxy(writer: firestore.Client, quiet_proxy: Proxy) -> None:
    firestore_proxy = quiet_proxy
    store = FirestoreStore(firestore_client(firestore_proxy.host))
    try:
        fleet = Fleet(store, writer, images=150, sessions=20)
        print(f"\n320 targets through the proxy: every initial snapshot in {fleet.initial_seconds:.2f} s")
        fleet.check_initial()
        assert firestore_proxy.peak_streams("Listen") == 1
        assert store.watch_stats()["streams"] == 1
        before = fleet.counts()
        fleet.check_changes(fleet.change(writer), before)
        store.set(KEYPOINTS, unique("kp"), {"imageID": "unary-after-listen"})  # unary calls are not starved
        assert firestore_proxy.calls("Listen") == 1
        fleet.stop()
    finally:
        store.close()


def test_a_proxy_restart_mid_watch_resumes_every_target(writer: firestore.Client, quiet_proxy: Proxy) -> None:
    firestore_proxy = quiet_proxy
    store = FirestoreStore(firestore_client(firestore_proxy.host))
    try:
        fleet = Fleet(store, writer, images=50, sessions=10)
        fleet.check_initial()
        before = fleet.counts()
        firestore_proxy.stop()
        wait_for(lambda: store.watch_stats()["streams"] == 0 or store.watch_stats()["stream_reopens"] > 0,
                 timeout=WAIT, what="the stream to notice")
        # Written directly to the emulator while the proxy is down. No deletions: the emulator sends no
        # resume tokens, so a re-added target gets its whole result, applied over what it held (see
        # test_a_target_readded_without_a_resume_token_applies_the_result_over_what_it_held).
        expected = fleet.change(writer, deletes=False)
        firestore_proxy.start()
        started = time.monotonic()
        fleet.watched.wait(lambda: all(len(fleet.watched.calls[k]) > before[k] for k in expected),
                           "the changes after the restart", timeout=60, detail=store.watch_stats)
        print(f"\nresumed {len(expected)} changed targets {time.monotonic() - started:.2f} s after the restart")
        fleet.check_changes(expected, before)
        stats = store.watch_stats()
        assert stats["streams"] == 1
        assert stats["stream_reopens"] >= 1
        assert (stats["query_targets"], stats["document_targets"]) == (100, 10)
        fleet.stop()
    finally:
        store.close()


def test_stop_waits_for_a_running_callback_and_a_callback_may_stop_its_own_watch(emulator: Emulator) -> None:
    store = FirestoreStore(emulator.client())
    entered, release = threading.Event(), threading.Event()
    calls: list[Any] = []
    try:
        def slow(documents: Any) -> None:
            calls.append(documents)
            entered.set()
            assert release.wait(WAIT)

        watch = store.watch_query(KEYPOINTS, "imageID", unique("image"), slow)
        assert entered.wait(WAIT)
        stopped = threading.Event()
        stopper = threading.Thread(target=lambda: (watch.stop(), stopped.set()))
        stopper.start()
        assert not stopped.wait(0.2), "stop returned while the callback was running"
        release.set()
        assert stopped.wait(WAIT)
        stopper.join(WAIT)
        assert store.watch_count() == 0

        selves: list[Any] = []
        ready, own = threading.Event(), threading.Event()

        def stop_self(value: Any) -> None:
            assert ready.wait(WAIT)
            selves[0].stop()
            own.set()

        selves.append(store.watch_document(SESSIONS, unique("session"), stop_self))
        ready.set()
        assert own.wait(WAIT)
        wait_for(lambda: store.watch_count() == 0, what="the self-stopped watch to go")
    finally:
        store.close()
    assert len(calls) == 1
