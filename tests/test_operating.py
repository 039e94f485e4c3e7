"""What an operator sees: /metrics summed over two workers, who may scrape it, and /ready."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    TIMEOUT,
    Client,
    Emulator,
    Refused,
    Server,
    join_url,
    owner_url,
    scrape,
    start_server,
    unique,
    value,
    wait_for,
)
from grpc_proxy import Proxy
from prometheus_client.parser import text_string_to_metric_families


@pytest.fixture
def firestore_only(store_kind: str) -> None:
    if store_kind != "firestore":
        pytest.skip("two workers share sessions through Firestore (the memory store is one process)")


def test_metrics_move_with_clients_summed_over_two_workers(firestore_only: None,
                                                           server_factory: Callable[..., Server]) -> None:
    server = server_factory(WEB_CONCURRENCY="2")
    wait_for(lambda: len(server.worker_pids()) == 2, what="two workers")
    batch, owner = server.batch()
    host = Client.connect(owner_url(server, batch, owner))
    sid = host.welcome["sessionID"]
    members = [Client.connect(join_url(server, sid, f"metered-{i}")) for i in range(6)]
    for i, member in enumerate(members):
        member.send({"type": "setImageID", "payload": {"imageID": unique(f"metered-image-{i % 3}")}})
    for member in members:
        assert {member.recv(skip=("keepalive", "member_joined"))["type"] for _ in range(2)} == \
            {"labels_snapshot", "bounding_boxes_snapshot"}

    def counted() -> dict:
        samples = scrape(server)
        # Gauges and per-type frame counts are published once a second: wait for both.
        return samples if value(samples, "canary_clients", role="member", api="seed") == 6 and \
            value(samples, "canary_frames_received_total", type="setImageID") == 6 else {}

    samples = wait_for(counted, what="6 members counted", detail=lambda: scrape(server))
    assert value(samples, "canary_clients", role="owner", api="seed") == 1
    # Each worker holds some of the 7 clients (gevent's workers take turns accepting), and /metrics,
    # wherever it is answered, counts them all.
    held = {server.stats()["participants"] for _ in range(10)}
    assert len(held) == 2
    assert sum(held) == 7
    # The gauges are summed over the workers ("livesum"), not reported per process.
    assert not any(key == "pid" for name, labels in samples if name == "canary_clients" for key, _ in labels)
    assert value(samples, "canary_sessions") >= 1
    assert value(samples, "canary_image_targets") >= 6  # 6 distinct images, 2 targets each, per worker
    assert value(samples, "canary_session_targets") >= 1
    assert value(samples, "canary_watch_streams") >= 1
    assert value(samples, "canary_process_lease_held") == 2
    assert value(samples, "canary_frames_received_total", type="setImageID") == 6
    assert value(samples, "canary_messages_sent_total", type="labels_snapshot") >= 6
    assert value(samples, "canary_membership_commits_total") >= 6  # the joins (a create is no membership change)
    assert value(samples, "canary_admission_seconds_count") == 7
    assert value(samples, "canary_notification_latency_seconds_count") >= 12

    # A refusal, and everyone leaving (a client dropped as a slow consumer is counted in test_robustness.py).
    with pytest.raises(Refused):
        Client.connect(join_url(server, unique("no-such-session"), "x"))
    for member in members:
        member.close()
    # Their leaves recorded before the owner leaves (which ends the session and closes whoever is still in
    # it with 4000): each of these closes is counted as the client's own 1000.
    wait_for(lambda: server.doc("sessions", sid)["members"] == [], what="the members gone from the document")
    host.close()

    def settled() -> dict:
        samples = scrape(server)
        return samples if value(samples, "canary_clients", role="member", api="seed") == 0 and \
            value(samples, "canary_clients", role="owner", api="seed") == 0 else {}

    samples = wait_for(settled, what="nobody counted any more", detail=lambda: scrape(server))
    assert value(samples, "canary_refusals_total", status="404") >= 1
    assert value(samples, "canary_closes_total", code="1000") >= 7
    assert value(samples, "canary_clients", role="owner", api="seed") == 0


def test_metrics_need_the_token_when_one_is_set(server_factory: Callable[..., Server]) -> None:
    server = server_factory(METRICS_TOKEN="scrape-me")
    assert server.request("GET", "/metrics")[0] == 401
    assert server.request("GET", "/metrics", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert value(scrape(server, token="scrape-me"), "canary_process_lease_held") == 1


def test_without_a_token_metrics_answer_loopback_only(server: Server) -> None:
    scrape(server)  # from 127.0.0.1
    outside = _non_loopback_address()
    if outside is None:
        pytest.skip("this machine has no non-loopback address to ask from")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"http://{outside}:{server.port}/metrics", timeout=TIMEOUT)
    assert caught.value.code == 403


def test_behind_a_declared_proxy_metrics_answer_the_proxy_s_own_clients_only() -> None:
    from canary.app import create_app
    from canary.config import Config
    from canary.memory_store import MemoryStore

    client = create_app(Config(trusted_proxies=1), MemoryStore()).test_client()
    local_proxy = {"REMOTE_ADDR": "127.0.0.1"}

    def refused() -> dict[str, float]:  # this test process's counts (other in-process apps count here too)
        body = client.get("/metrics", environ_base=local_proxy).get_data(as_text=True)
        return {s.labels["status"]: s.value for family in text_string_to_metric_families(body)
                for s in family.samples if s.name == "canary_refusals_total"}

    before = refused()
    forwarded = client.get("/metrics", environ_base=local_proxy, headers={"X-Forwarded-For": "203.0.113.9"})
    assert forwarded.status_code == 403
    after = refused()
    assert after.get("403", 0) - before.get("403", 0) == 1, "counted once"
    assert {k: v for k, v in after.items() if k != "403"} == {k: v for k, v in before.items() if k != "403"}


def test_workers_collect_garbage_on_the_tuned_schedule(server: Server) -> None:
    # gunicorn.conf.py's post_worker_init: young objects collected every 10,000 allocations (not 700), and
    # what start-up allocated frozen out of full collections (docs/benchmarks.md has the figures).
    status, _, body = server.request("GET", "/dev/stats?gc=1")
    assert status == 200, body
    stats = json.loads(body)
    assert stats["gc_threshold"] == [10_000, 10, 10]
    assert stats["gc_frozen"] > 10_000


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing address
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


def test_ready_flips_on_a_store_outage(tmp_path: Path) -> None:
    emulator = Emulator.start(tmp_path)
    try:
        server = start_server(tmp_path, emulator, READY_TIMEOUT_SECONDS="1", FIRESTORE_TIMEOUT_SECONDS="2")
    except BaseException:
        emulator.stop()
        raise
    try:
        assert server.request("GET", "/ready")[0] == 200
        emulator.stop()
        status, _, body = server.request("GET", "/ready")
        assert status == 503, body
        assert server.request("GET", "/health")[0] == 200  # liveness is not readiness
        emulator = Emulator.start(tmp_path, int(emulator.host.rsplit(":", 1)[1]))
        wait_for(lambda: server.request("GET", "/ready")[0] == 200, what="ready again", timeout=30)
    finally:
        server.stop()
        emulator.stop()


def test_a_restart_closes_every_client_with_1012_even_when_the_store_is_slow(
        proxied_server_factory: Callable[..., Server], firestore_proxy: Proxy) -> None:
    # A WebSocket's request ends once it is upgraded (its connection is served on, websocket.Connection.detach),
    # so gunicorn no longer waits for it: the worker waits itself (gunicorn.conf.py's worker_exit). Here the
    # store takes 2 s to expire the process's lease before the clients are closed, while gunicorn's own
    # wait for its requests ends within 1 s.
    server = proxied_server_factory()
    owner = Client.connect(owner_url(server, *server.batch()))
    sid = owner.welcome["sessionID"]
    members = [Client.connect(join_url(server, sid, f"restarted-{i}")) for i in range(20)]
    firestore_proxy.latency = 2.0
    server.process.send_signal(signal.SIGTERM)
    codes = [client.closed_with(skip=("keepalive", "member_joined")) for client in [owner, *members]]
    assert codes == [1012] * 21
    assert server.process.wait(timeout=TIMEOUT) == 0
    assert "WebSockets still open" not in server.log()


def test_ready_flips_on_sigterm(server_factory: Callable[..., Server]) -> None:
    server = server_factory()
    host_client = Client.connect(owner_url(server, *server.batch()))  # keeps the worker up while it stops
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    connection.request("GET", "/ready")
    first = connection.getresponse()
    first.read()
    assert first.status == 200
    server.process.send_signal(signal.SIGTERM)
    assert host_client.closed_with() == 1012
    connection.request("GET", "/ready")  # the same keep-alive connection: the worker still answers it
    second = connection.getresponse()
    assert second.status == 503, second.read()
    connection.close()
