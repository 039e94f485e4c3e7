"""Storms: a whole session joining at once, then leaving at once (what reconnecting clients do after a
restart). On Firestore the service reaches the emulator through the proxy, which counts its commits."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import Client, Server, close_at_once, connect_at_once, join_url, owner_url, wait_for
from grpc_proxy import Proxy

STORM = 500


@pytest.fixture
def storm_server(store_kind: str, request: pytest.FixtureRequest) -> tuple[Server, Proxy | None]:
    """A server of its own (WORKER_CONNECTIONS above the storm); on Firestore, behind the counting proxy."""
    if store_kind == "memory":
        return request.getfixturevalue("server_factory")(), None
    factory: Callable[..., Server] = request.getfixturevalue("proxied_server_factory")
    return factory(), request.getfixturevalue("firestore_proxy")


def test_a_join_storm_admits_everyone_and_a_leave_storm_empties_the_session(
        storm_server: tuple[Server, Proxy | None]) -> None:
    server, proxy = storm_server
    batch, owner = server.batch()
    host = Client.connect(owner_url(server, batch, owner))
    sid = host.welcome["sessionID"]
    users = [f"storm-{i}" for i in range(STORM)]
    commits = proxy.calls("Commit") if proxy else 0

    # Generous handshake timeouts: this checks what happens, not how fast (make bench-storm measures that).
    members, refused = connect_at_once([join_url(server, sid, user) for user in users], timeout=60)
    assert refused == []
    assert len(members) == STORM
    joined = sorted(m["id"] for m in server.doc("sessions", sid)["members"])
    assert joined == sorted(users)
    if proxy is not None:
        storm_commits = proxy.calls("Commit") - commits
        assert storm_commits <= STORM // 10, f"{storm_commits} commits for {STORM} joins"

    # The owner, reading, hears of every one of them and is not dropped as a slow client.
    announced = {host.recv()["memberID"] for _ in users}
    assert announced == set(users)
    host.roundtrip()
    for member in members[::50]:  # and members are served (not closed as slow either)
        member.roundtrip_after(skip=("member_joined",))

    close_at_once(members)  # everyone leaves at once
    left = {host.recv(timeout=30)["memberID"] for _ in users}
    assert left == set(users)
    wait_for(lambda: server.doc("sessions", sid)["members"] == [], what="no member left in the document")
    host.roundtrip()
    host.close()
