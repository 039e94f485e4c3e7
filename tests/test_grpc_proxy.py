"""The test proxy in front of the emulator: it forwards everything, counts calls, enforces Google's front-end
limit of 100 concurrent streams per connection, and can be crashed and restarted on the same port."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import (
    FIRESTORE_PROJECT,
    Client,
    firestore_client,
    owner_url,
    unique,
    wait_for,
)
from google.api_core import exceptions
from google.cloud import firestore
from google.cloud.firestore_v1.types import ListenRequest, ListenResponse, Target
from grpc_proxy import Proxy

DATABASE = f"projects/{FIRESTORE_PROJECT}/databases/(default)"
LISTEN = "/google.firestore.v1.Firestore/Listen"
#: How long something that must not happen is given to happen anyway.
NOT_ARRIVED = 2.0


def raw_listen(channel: grpc.Channel, collection: str, doc_id: str, **call_options) -> tuple[Iterator, threading.Event]:
    """A Listen stream on one document, its request side held open as the real client holds it
    (set the returned event to half-close it)."""
    listen = channel.stream_stream(LISTEN, request_serializer=ListenRequest.serialize,
                                   response_deserializer=ListenResponse.deserialize)
    request = ListenRequest(database=DATABASE, add_target=Target(
        target_id=1, documents=Target.DocumentsTarget(documents=[f"{DATABASE}/documents/{collection}/{doc_id}"])))
    done = threading.Event()

    def requests() -> Iterator[ListenRequest]:
        yield request
        done.wait(60)

    responses = listen(requests(), metadata=[("google-cloud-resource-prefix", DATABASE)], **call_options)
    return responses, done


def test_a_firestore_client_works_through_the_proxy_and_its_calls_are_counted(firestore_proxy, emulator) -> None:
    proxy = firestore_proxy
    client, direct = firestore_client(proxy.host), firestore_client(emulator.host)
    collection = unique("proxied")
    ref = client.collection(collection).document("counter")

    ref.set({"n": 1, "kind": "counter"})
    assert proxy.calls("Commit") == 1
    assert ref.get().to_dict() == {"n": 1, "kind": "counter"}
    assert proxy.calls("BatchGetDocuments") == 1
    assert [s.id for s in client.collection(collection).where(filter=firestore.FieldFilter("kind", "==", "counter"))
            .stream()] == ["counter"]
    assert proxy.calls("RunQuery") == 1

    @firestore.transactional
    def increment(transaction: firestore.Transaction) -> None:
        transaction.update(ref, {"n": ref.get(transaction=transaction).get("n") + 1})

    increment(client.transaction())
    assert proxy.calls("BeginTransaction") == 1
    assert proxy.calls("BatchGetDocuments") == 2  # the read in the transaction
    assert proxy.calls("Commit") == 2
    assert proxy.calls("/google.firestore.v1.Firestore/Commit") == 2  # the full name counts the same calls

    # An upstream error reaches the client with its status code.
    with pytest.raises(exceptions.NotFound):
        client.collection(collection).document("missing").update({"n": 1})
    assert proxy.calls("Commit") == 3

    # What went through the proxy is in the emulator; calls straight to the emulator are not counted.
    assert direct.collection(collection).document("counter").get().to_dict()["n"] == 2
    assert proxy.calls() == 7
    assert proxy.calls("Listen") == 0
    wait_for(lambda: proxy.open_streams() == 0, what="every call to be closed", detail=lambda: proxy)


def test_latency_delays_every_request(firestore_proxy) -> None:
    proxy = firestore_proxy
    client = firestore_client(proxy.host)
    ref = client.collection(unique("slow")).document("d")
    ref.set({"n": 0})  # the channel is connected
    proxy.latency = 0.5
    started = time.monotonic()
    ref.set({"n": 1})
    assert time.monotonic() - started >= 0.5
    proxy.latency = 0
    started = time.monotonic()
    ref.set({"n": 2})
    assert time.monotonic() - started < 0.5


def test_the_101st_stream_on_a_connection_queues_until_a_stream_closes(firestore_proxy) -> None:
    proxy = firestore_proxy
    client = firestore_client(proxy.host)  # one client: one channel, one connection
    collection = unique("limit")
    ref = client.collection(collection).document("watched")
    ref.set({"n": 0})
    commits = proxy.calls("Commit")
    first_snapshots = [threading.Event() for _ in range(101)]

    def listener(i: int):
        return lambda *_: first_snapshots[i].set()

    watches = [ref.on_snapshot(listener(i)) for i in range(100)]
    try:
        wait_for(lambda: all(e.is_set() for e in first_snapshots[:100]), timeout=60, what="100 first snapshots",
                 detail=lambda: (sum(e.is_set() for e in first_snapshots), proxy))
        assert proxy.open_streams("Listen") == 100

        watches.append(ref.on_snapshot(listener(100)))  # the 101st stream
        unary = queue.Queue()  # a unary call (Commit) issued after it on the same channel
        threading.Thread(target=lambda: unary.put(client.collection(collection).document("other").set({"n": 1})),
                         daemon=True).start()
        assert not first_snapshots[100].wait(NOT_ARRIVED), "the 101st stream was not queued"
        assert unary.empty(), "the unary call behind the 101st stream was not queued"
        # Queued in the client: the proxy never saw either call.
        assert (proxy.calls("Listen"), proxy.calls("Commit")) == (100, commits)
        assert proxy.peak_streams() == 100

        watches.pop(0).unsubscribe()  # one slot for the 101st stream,
        watches.pop(0).unsubscribe()  # one for the unary call
        assert first_snapshots[100].wait(10), "the 101st stream did not start when two streams closed"
        unary.get(timeout=10)
        assert (proxy.calls("Listen"), proxy.calls("Commit")) == (101, commits + 1)
        assert proxy.peak_streams() == 100
    finally:
        for watch in watches:
            watch.unsubscribe()
    wait_for(lambda: proxy.open_streams() == 0, what="every stream to be closed", detail=lambda: proxy)


def test_stop_cuts_an_open_listen_stream_and_start_serves_again_on_the_same_port(firestore_proxy) -> None:
    proxy = firestore_proxy
    port = proxy.port
    collection = unique("crash")
    firestore_client(proxy.host).collection(collection).document("d").set({"n": 1})
    with grpc.insecure_channel(proxy.host) as channel:
        responses, half_close = raw_listen(channel, collection, "d", timeout=30)
        try:
            assert isinstance(next(responses), ListenResponse)
            wait_for(lambda: proxy.open_streams("Listen") == 1, what="the stream to reach the proxy")

            proxy.stop()
            assert proxy.open_streams() == 0
            with pytest.raises(grpc.RpcError) as cut:
                for _ in responses:  # what was already on its way, then the error
                    pass
            assert cut.value.code() == grpc.StatusCode.UNAVAILABLE, cut.value
        finally:
            half_close.set()

        # While it is down, calls fail fast (connection refused).
        down, down_done = raw_listen(channel, collection, "d", timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            next(down)
        down_done.set()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value

        proxy.start()
        assert proxy.port == port
        again, half_close = raw_listen(channel, collection, "d", timeout=30, wait_for_ready=True)
        try:
            assert isinstance(next(again), ListenResponse)
            assert proxy.calls("Listen") == 2  # the one refused while down never reached it
        finally:
            half_close.set()


def test_a_firestore_watch_through_the_proxy_resumes_after_a_restart(firestore_proxy, emulator) -> None:
    proxy = firestore_proxy
    collection = unique("resume")
    ref = firestore_client(proxy.host).collection(collection).document("d")
    direct = firestore_client(emulator.host).collection(collection).document("d")
    direct.set({"n": 0})
    seen: queue.Queue[int] = queue.Queue()
    watch = ref.on_snapshot(lambda docs, *_: [seen.put(d.get("n")) for d in docs if d.exists])
    try:
        assert seen.get(timeout=10) == 0
        proxy.stop()
        proxy.start()
        direct.set({"n": 1})
        started = time.monotonic()
        while (n := seen.get(timeout=20)) != 1:  # the resumed stream may deliver n == 0 again first
            assert n == 0
        print(f"resumed {time.monotonic() - started:.2f} s after the restart")
        assert proxy.calls("Listen") >= 2
    finally:
        watch.unsubscribe()


def test_a_service_started_behind_the_proxy_goes_through_it(proxied_server_factory, firestore_proxy) -> None:
    proxy = firestore_proxy
    server = proxied_server_factory()
    batch, owner = server.batch()  # the test's own writes go to the emulator directly
    calls = proxy.calls()
    host = Client.connect(owner_url(server, batch, owner))
    assert proxy.calls() > calls
    assert proxy.calls("Commit") >= 1  # the session document
    assert server.doc("sessions", host.welcome["sessionID"]) is not None
    host.close()


class _Echo(grpc.GenericRpcHandler):
    """An upstream that shows what reached it: /t.T/Echo answers the reversed request with the x-* metadata
    echoed in the trailers, /t.T/Fail fails with details and trailers, /t.T/Hang streams until cancelled."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def service(self, details):
        def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
            context.set_trailing_metadata([(f"echo-{k}", v) for k, v in context.invocation_metadata()
                                           if k.startswith("x-")])
            return request[::-1]

        def fail(_request: bytes, context: grpc.ServicerContext) -> bytes:
            context.abort_with_status(_Status(grpc.StatusCode.PERMISSION_DENIED, "nope", (("why", "because"),)))

        def hang(_request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            context.add_callback(self.cancelled.set)
            yield b"first"
            self.cancelled.wait(30)

        if details.method == "/t.T/Hang":
            return grpc.unary_stream_rpc_method_handler(hang)
        return grpc.unary_unary_rpc_method_handler({"/t.T/Echo": echo, "/t.T/Fail": fail}[details.method])


class _Status(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple) -> None:
        self.code, self.details, self.trailing_metadata = code, details, trailing_metadata


def test_metadata_status_and_cancellation_pass_both_ways() -> None:
    echo = _Echo()
    upstream = grpc.server(ThreadPoolExecutor(4))
    upstream.add_generic_rpc_handlers((echo,))
    port = upstream.add_insecure_port("127.0.0.1:0")
    upstream.start()
    try:
        with Proxy(f"127.0.0.1:{port}") as proxy, grpc.insecure_channel(proxy.host) as channel:
            answer, call = channel.unary_unary("/t.T/Echo").with_call(
                b"abc", metadata=[("x-one", "1"), ("x-two-bin", b"\x00\x01")], timeout=10)
            assert answer == b"cba"
            assert dict(call.trailing_metadata()) == {"echo-x-one": "1", "echo-x-two-bin": b"\x00\x01"}

            with pytest.raises(grpc.RpcError) as failed:
                channel.unary_unary("/t.T/Fail")(b"", timeout=10)
            assert (failed.value.code(), failed.value.details()) == (grpc.StatusCode.PERMISSION_DENIED, "nope")
            assert ("why", "because") in failed.value.trailing_metadata()

            hanging = channel.unary_stream("/t.T/Hang")(b"", timeout=30)
            assert next(hanging) == b"first"
            assert proxy.open_streams("Hang") == 1
            hanging.cancel()  # the client's cancellation reaches the upstream
            assert echo.cancelled.wait(10), "the upstream call was not cancelled"
            wait_for(lambda: proxy.open_streams() == 0, what="the cancelled call to end in the proxy")
            assert proxy.calls() == 3
    finally:
        upstream.stop(None)


def test_the_proxy_class_on_its_own(emulator) -> None:
    proxy = Proxy(emulator.host, max_concurrent_streams=None)
    with pytest.raises(RuntimeError):
        _ = proxy.host  # no port before the first start
    with proxy:
        assert proxy.running
        firestore_client(proxy.host).collection(unique("own")).document("d").set({"n": 1})
        assert proxy.calls("Commit") == 1
        proxy.reset_counts()
        assert proxy.calls() == 0
    assert not proxy.running
