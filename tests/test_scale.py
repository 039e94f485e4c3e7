"""Firestore at production scale, behind Google's front-end limit (the proxy: 100 concurrent streams per
connection): one process watching 300 distinct images (600 query targets) and 20 sessions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Client, Emulator, Server, connect_at_once, join_url, owner_url, start_server, unique
from grpc_proxy import Proxy

SESSIONS, MEMBERS = 20, 15  # 300 members, each watching an image of its own
CHANGED_EVERY = 5  # the images changed: 60 of the 300 (see `quiet_emulator`)


@pytest.fixture
def quiet_emulator(store_kind: str, tmp_path: Path) -> Iterator[Emulator]:
    """An emulator of this test's own, behind nothing else. The npm one answers each write by re-running every
    listener's query over its whole collection (writes x listeners x documents), Google's by re-sending every
    query target's result, so on the shared one, full of every other test's documents and listeners, 600
    listeners make each write take seconds."""
    if store_kind != "firestore":
        pytest.skip("the stream limit is Firestore's")
    emulator = Emulator.start(tmp_path)
    yield emulator
    emulator.stop()


def test_300_images_and_20_sessions_on_one_stream_behind_the_limit(quiet_emulator: Emulator,
                                                                   tmp_path: Path) -> None:
    with Proxy(quiet_emulator.host) as firestore_proxy:
        server = start_server(tmp_path, quiet_emulator, via=firestore_proxy)
        clients: list[Client] = []
        try:
            crowd(server, firestore_proxy, clients)
        finally:
            server.stop()  # first: 320 leaves and 20 ends, one by one, would keep the emulator busy for seconds
            for client in clients:
                client.close()


def crowd(server: Server, firestore_proxy: Proxy, clients: list[Client]) -> None:
    hosts, _ = connect_at_once([owner_url(server, *server.batch()) for _ in range(SESSIONS)])
    clients += hosts
    assert len(hosts) == SESSIONS
    joined, refused = connect_at_once([join_url(server, host.welcome["sessionID"], f"crowd-{s}-{m}")
                                       for s, host in enumerate(hosts) for m in range(MEMBERS)], timeout=60)
    clients += joined
    assert (len(joined), refused) == (SESSIONS * MEMBERS, [])
    members = [(member, unique("crowd-image")) for member in joined]
    for member, image in members:
        member.send({"type": "setImageID", "payload": {"imageID": image}})
    for member, _ in members:  # every initial snapshot (Google's emulator re-sends every target's result on each
        # write meanwhile: hundreds of targets take it a while)
        got = {member.recv(timeout=60, skip=("keepalive", "member_joined"))["type"] for _ in range(2)}
        assert got == {"labels_snapshot", "bounding_boxes_snapshot"}
    stats = server.stats(watch=True)
    # 600 image targets, and each session's presences (this process writes them all), members' images and
    # document.
    assert (stats["query_targets"], stats["document_targets"], stats["streams"]) == (600 + 2 * SESSIONS, SESSIONS, 1)
    assert stats["image_listeners"] == 600
    # One stream (a stream reopened after a failure may overlap its predecessor at the proxy for a moment).
    assert firestore_proxy.peak_streams("Listen") <= 1 + stats["stream_reopens"]

    # A change to every fifth image, written as another Canary service would: each of its watchers is told,
    # and nobody else.
    changed = members[::CHANGED_EVERY]
    writes = server.firestore.batch()
    for _, image in changed:
        writes.set(server.firestore.collection("keypoints").document(unique("kp")), {"imageID": image})
    writes.commit()
    for member, _ in changed:
        assert member.recv(timeout=60, skip=("keepalive", "member_joined"))["type"] == "labels_snapshot"
    for member, _ in members:
        member.roundtrip_after(skip=("member_joined",))

    # The process still answers unary calls and admits clients: nothing queues behind the stream.
    late = Client.connect(join_url(server, hosts[0].welcome["sessionID"], "late-comer"))
    clients.append(late)
    assert late.welcome["type"] == "session_joined"
