"""Canary's web app, as it calls the service (docs/protocol.md, "The web app's API"; contract §6.3):
REST create / join / stop / kick / active, session tokens, and the /ws/ sockets, on both stores."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
import websocket
from conftest import RFC3339_Z, TIMEOUT, Client, Refused, Server, join_url, unique, wait_for

SECRET = "webapp-test-secret-" + "0123456789abcdef" * 3
ORIGIN = "https://canary.example"


def login_token(user: str, *, secret: str = SECRET, ttl: float = 3600, **claims: Any) -> str:
    """A login JWT as Canary's auth service issues it."""
    now = int(time.time())
    return jwt.encode({"userID": user, "email": f"{user}@example.com", "iat": now, "exp": now + int(ttl), **claims},
                      secret, algorithm="HS256")


def session_token(user: str, session: str, batch: str = "", *, purpose: str = "session-join", ttl: float = 60,
                  secret: str = SECRET) -> str:
    now = time.time()
    return jwt.encode({"userID": user, "sessionID": session, "batchID": batch, "purpose": purpose,
                       "exp": int(now + ttl), "iat": now}, secret, algorithm="HS256")


@dataclass
class WebApp:
    """One signed-in user of the web app: its REST calls (with `Authorization: Bearer`, as `CallAPI` sends
    them) and its sockets."""

    server: Server
    user: str
    secret: str | None = SECRET

    def call(self, method: str, path: str, body: Any = None, *, auth: bool = True,
             headers: dict[str, str] | None = None, timeout: float = TIMEOUT) -> tuple[int, Any]:
        all_headers = {"Accept": "application/json", **(headers or {})}
        if auth and self.secret:
            all_headers["Authorization"] = f"Bearer {login_token(self.user, secret=self.secret)}"
        status, response_headers, raw = self.server.request(method, path, body, headers=all_headers,
                                                            timeout=timeout)
        if response_headers.get("Content-Type", "").startswith("application/json"):
            return status, json.loads(raw)
        return status, raw.decode()

    def create(self, batch: str, password: str | None = None) -> dict[str, Any]:
        status, body = self.call("POST", f"/sessions/{batch}?userID={self.user}",
                                 {"password": password} if password else None)
        assert status == 201, body
        return body

    def join(self, session: str, password: str = "") -> dict[str, Any]:
        status, body = self.call("POST", f"/sessions/{session}/join?userID={self.user}", {"password": password})
        assert status == 200, body
        return body

    def socket(self, session: str, token: str, role: str) -> Client:
        """The socket the annotate page opens: /ws/create (owner) or /ws/join (member)."""
        kind = "create" if role == "owner" else "join"
        url = f"{self.server.ws}/sessions/{session}/ws/{kind}?token={token}"
        if self.secret:
            url += f"&auth={login_token(self.user, secret=self.secret)}"
        return Client.connect(url, welcome=False)

    def enter(self, session: str, password: str = "") -> Client:
        """REST join for a token, then the socket, as the web app does it."""
        grant = self.join(session, password)
        return self.socket(session, grant["token"], grant["role"])

    def active(self, **query: str) -> list[dict[str, Any]]:
        status, body = self.call("GET", "/sessions/active?" + "&".join(f"{k}={v}" for k, v in query.items()))
        assert status == 200, body
        return body["sessions"]


@pytest.fixture(scope="module")
def secured(server_factory: Callable[..., Server]) -> Server:
    """The service as production runs it: a JWT secret, and the web app's origin."""
    return server_factory(JWT_SECRET=SECRET, CORS_ALLOW_ORIGIN=ORIGIN)


def project(server: Server) -> tuple[str, WebApp]:
    """A batch of a new project and its owner, signed in."""
    batch, owner = server.batch()
    return batch, WebApp(server, owner)


def member(server: Server, name: str, secret: str | None = SECRET) -> WebApp:
    user = unique(name)
    server.put("users", user, {"email": f"{user}@example.com"})
    return WebApp(server, user, secret)


def types_until(client: Client, last: str, skip: tuple[str, ...] = ("keepalive",)) -> list[str]:
    """The message types a client receives up to and including the first `last`."""
    seen: list[str] = []
    while not seen or seen[-1] != last:
        seen.append(client.recv(skip=skip)["type"])
    return seen


# -- the flows, in the web app's order ---------------------------------------------------------------

def test_owner_and_member_flow_create_join_watch_list_kick_stop(secured: Server) -> None:
    server = secured
    batch, owner = project(server)
    created = owner.create(batch)
    sid = created["sessionID"]
    assert set(created) == {"sessionID", "batchID", "projectID", "role"}
    assert (created["batchID"], created["role"]) == (batch, "owner")
    assert created["projectID"] == server.doc("batches", batch)["projectID"]
    doc = server.doc("sessions", sid)
    assert doc["members"] == []
    assert "password" not in doc

    grant = owner.join(sid)
    assert set(grant) == {"sessionID", "batchID", "projectID", "token", "expiresIn", "role"}
    assert (grant["role"], grant["expiresIn"], grant["batchID"]) == ("owner", 60, batch)
    claims = jwt.decode(grant["token"], SECRET, algorithms=["HS256"])
    assert (claims["userID"], claims["sessionID"], claims["batchID"], claims["purpose"]) == \
        (owner.user, sid, batch, "session-join")
    assert claims["exp"] - claims["iat"] == pytest.approx(60, abs=1)
    host = owner.socket(sid, grant["token"], "owner")

    ann = member(server, "ann")
    grant = ann.join(sid)
    assert (grant["role"], grant["batchID"]) == ("member", batch)
    assert jwt.decode(grant["token"], SECRET, algorithms=["HS256"])["batchID"] == ""
    # Listed at the REST join, before any socket (the project service authorises by members[].id).
    assert [m["id"] for m in server.doc("sessions", sid)["members"]] == [ann.user]
    joined = host.recv()
    assert joined == {"type": "member_joined", "sessionID": sid, "memberID": ann.user,
                      "memberEmail": f"{ann.user}@example.com", "time": joined["time"]}
    ann_ws = ann.socket(sid, grant["token"], "member")
    image = unique("image")
    ann_ws.send({"type": "setImageID", "payload": {"imageID": image}})
    assert sorted(ann_ws.recv()["type"] for _ in range(2)) == ["bounding_boxes_snapshot", "key_points_snapshot"]
    host.roundtrip()  # nothing else reached the owner (no second member_joined at the socket)

    (listed,) = owner.active(batchID=batch)
    assert listed["sessionID"] == sid
    assert listed["members"] == [{"id": ann.user, "email": f"{ann.user}@example.com", "imageID": image}]
    assert listed["owner"] == {"id": owner.user, "email": f"{owner.user}@example.com", "imageID": None}
    assert listed["ownerConnected"] is True
    assert RFC3339_Z.match(listed["lastUpdated"])
    assert [s["sessionID"] for s in ann.active(batchID=batch)] == [sid]
    assert [s["sessionID"] for s in owner.active(projectID=created["projectID"])] == [sid]

    ben = member(server, "ben")
    ben_ws = ben.enter(sid)
    assert host.recv()["memberID"] == ben.user
    assert ann_ws.recv()["memberID"] == ben.user

    status, body = owner.call("DELETE", f"/sessions/{sid}/members/{ann.user}?userID={owner.user}")
    assert (status, body) == (200, {"removed": True})
    kicked = ann_ws.recv(skip=("keepalive", "member_joined"))
    assert kicked == {"type": "member_kicked", "sessionID": sid, "time": kicked["time"]}
    assert ann_ws.closed_with() == 4001
    for client in (host, ben_ws):
        left = client.recv()
        assert (left["type"], left["memberID"]) == ("member_left", ann.user)
    assert [m["id"] for m in server.doc("sessions", sid)["members"]] == [ben.user]

    status, body = owner.call("DELETE", f"/sessions/{sid}?userID={owner.user}")
    assert (status, body) == (204, "")
    for client in (host, ben_ws):
        closed = client.recv()
        assert closed == {"type": "session_closed", "sessionID": sid, "time": closed["time"]}
        assert client.closed_with() == 4000
    assert server.doc("sessions", sid) is None
    assert owner.active(batchID=batch) == []


def test_passwords(secured: Server) -> None:
    server = secured
    batch, owner = project(server)
    sid = owner.create(batch, password="s3cret")["sessionID"]
    stored = server.doc("sessions", sid)["password"]
    assert stored.startswith(("$2a$", "$2b$"))
    assert "s3cret" not in stored
    ann = member(server, "ann")
    assert ann.call("POST", f"/sessions/{sid}/join?userID={ann.user}", {"password": ""}) == \
        (400, "Missing password\n")
    assert ann.call("POST", f"/sessions/{sid}/join?userID={ann.user}", {"password": "wrong"}) == \
        (403, "Invalid session password\n")
    assert server.doc("sessions", sid)["members"] == []
    assert ann.join(sid, "s3cret")["role"] == "member"
    assert owner.join(sid)["role"] == "owner"  # the owner needs no password
    assert all("password" not in s for s in owner.active(batchID=batch))
    owner.call("DELETE", f"/sessions/{sid}?userID={owner.user}")


def test_the_owners_socket_closing_keeps_the_session(secured: Server) -> None:
    server = secured
    batch, owner = project(server)
    sid = owner.create(batch)["sessionID"]
    ann = member(server, "ann")
    ann_ws = ann.enter(sid)
    host = owner.enter(sid)
    joined = ann_ws.recv()
    assert joined == {"type": "owner_joined", "sessionID": sid, "ownerID": owner.user,
                      "ownerEmail": f"{owner.user}@example.com", "time": joined["time"]}
    host.close()
    left = ann_ws.recv()
    assert (left["type"], left["ownerID"], left["ownerEmail"]) == ("owner_left", owner.user,
                                                                   f"{owner.user}@example.com")
    assert server.doc("sessions", sid) is not None
    wait_for(lambda: owner.active(batchID=batch)[0]["ownerConnected"] is False, what="ownerConnected false")
    host = owner.enter(sid)  # back through the Batches tab: a new token
    assert ann_ws.recv()["type"] == "owner_joined"
    ann_ws.roundtrip()
    owner.call("DELETE", f"/sessions/{sid}?userID={owner.user}")
    assert types_until(ann_ws, "session_closed") == ["session_closed"]
    assert host.recv()["type"] == "session_closed"


def test_a_member_page_reload_and_a_second_tab(secured: Server) -> None:
    server = secured
    batch, owner = project(server)
    sid = owner.create(batch)["sessionID"]
    host = owner.enter(sid)
    ann = member(server, "ann")
    ann_ws = ann.enter(sid)
    assert host.recv()["type"] == "member_joined"
    # A second tab (a live connection holds the member's place): refused.
    status, body = ann.call("POST", f"/sessions/{sid}/join?userID={ann.user}", {"password": ""})
    assert (status, body) == (409, "User is already in session\n")
    # A reload: the old socket closes (the member leaves), the page joins again.
    ann_ws.close()
    assert host.recv()["type"] == "member_left"
    ann_ws = ann.enter(sid)
    assert host.recv()["type"] == "member_joined"
    # Joining again while listed but not connected yet gives a fresh token, not 409.
    bob = member(server, "bob")
    first = bob.join(sid)
    assert host.recv()["memberID"] == bob.user
    second = bob.join(sid)
    bob.socket(sid, second["token"], "member").close()
    assert first["token"] != second["token"]
    owner.call("DELETE", f"/sessions/{sid}?userID={owner.user}")


def test_one_session_speaks_both_vocabularies(secured: Server) -> None:
    server = secured
    batch, owner = project(server)
    sid = owner.create(batch)["sessionID"]
    host = owner.enter(sid)
    seed_user = unique("seed")
    seed_client = Client.connect(join_url(server, sid, seed_user) + f"&auth={login_token(seed_user)}")
    assert seed_client.welcome["type"] == "session_joined"
    joined = host.recv()
    assert (joined["type"], joined["memberID"], joined["memberEmail"]) == ("member_joined", seed_user, "")
    ann = member(server, "ann")
    ann.enter(sid)
    seen = seed_client.recv()
    assert set(seen) == {"type", "sessionID", "memberID", "time"}  # the seed's member_joined: no e-mail
    seed_client.send({"type": "setImageID", "payload": {"imageID": unique("image")}})
    assert {seed_client.recv()["type"] for _ in range(2)} == {"labels_snapshot", "bounding_boxes_snapshot"}
    owner.call("DELETE", f"/sessions/{sid}?userID={owner.user}")
    assert seed_client.recv(skip=("keepalive", "member_joined"))["type"] == "session_closed"
    assert seed_client.closed_with() == 4000


# -- refusals ---------------------------------------------------------------------------------------

def test_rest_refusals_read_well_to_the_user(secured: Server) -> None:
    server = secured
    batch, owner = project(server)
    stranger = member(server, "stranger")
    assert owner.call("POST", f"/sessions/{batch}") == (400, "Missing userID query parameter\n")
    sid = owner.create(batch)["sessionID"]
    assert owner.call("POST", f"/sessions/{batch}?userID={owner.user}") == \
        (409, "Session already exists for this batch\n")
    assert stranger.call("POST", f"/sessions/{batch}?userID={stranger.user}")[0] == 403
    assert owner.call("POST", f"/sessions/{unique('nope')}?userID={owner.user}")[0] == 404
    raw = server.request("POST", f"/sessions/{sid}/join?userID={owner.user}", headers={
        "Authorization": f"Bearer {login_token(owner.user)}", "Content-Type": "application/json"})
    assert raw[0] == 200  # an empty body is no password
    status, headers, body = server.request("POST", f"/sessions/{sid}/join?userID={owner.user}", raw=b"{not json",
                                           headers={"Authorization": f"Bearer {login_token(owner.user)}"})
    assert (status, body) == (400, b"Invalid request\n")
    assert headers["Content-Type"].startswith("text/plain")
    assert owner.call("POST", f"/sessions/{unique('nope')}/join?userID={owner.user}") == (404, "Session not found\n")
    # Identity: the login token must be there, and be this user's.
    assert owner.call("POST", f"/sessions/{sid}/join?userID={owner.user}", auth=False)[0] == 401
    status, _ = owner.call("DELETE", f"/sessions/{sid}?userID={owner.user}",
                           headers={"Authorization": f"Bearer {login_token(stranger.user)}"}, auth=False)
    assert status == 403
    # Owner-only routes.
    ann = member(server, "ann")
    ann.join(sid)
    assert stranger.call("DELETE", f"/sessions/{sid}?userID={stranger.user}") == \
        (403, "Only the session owner can stop the session\n")
    assert stranger.call("DELETE", f"/sessions/{sid}/members/{ann.user}?userID={stranger.user}") == \
        (403, "Only the session owner can remove members\n")
    assert owner.call("DELETE", f"/sessions/{sid}/members/{owner.user}?userID={owner.user}") == \
        (400, "Owner cannot be removed from session\n")
    assert owner.call("DELETE", f"/sessions/{sid}/members/{stranger.user}?userID={owner.user}") == \
        (404, "Member not found in session\n")
    assert owner.call("GET", "/sessions/active") == (400, "Provide projectID or batchID\n")
    assert stranger.active(batchID=batch) == []  # neither its owner nor a member
    assert owner.call("DELETE", f"/sessions/{sid}?userID={owner.user}")[0] == 204
    assert owner.call("DELETE", f"/sessions/{sid}?userID={owner.user}") == (404, "Session not found\n")


@pytest.mark.parametrize("case", ["missing", "garbage", "expired", "wrong-purpose", "other-session",
                                  "other-secret", "member-on-create", "other-users-login", "no-login"])
def test_session_token_refusals_before_the_upgrade(secured: Server, case: str) -> None:
    server = secured
    batch, owner = project(server)
    sid = owner.create(batch)["sessionID"]
    other = owner.create(server.batch(owner.user)[0])["sessionID"]
    ann = member(server, "ann")
    ann.join(sid)
    user, kind, auth = ann.user, "join", login_token(ann.user)
    token = {
        "missing": "",
        "garbage": "not-a-jwt",
        "expired": session_token(user, sid, ttl=-5),
        "wrong-purpose": session_token(user, sid, purpose="login"),
        "other-session": session_token(user, other),
        "other-secret": session_token(user, sid, secret="another-secret-" + "x" * 32),
        "member-on-create": session_token(user, sid),
        "other-users-login": session_token(user, sid),
        "no-login": session_token(user, sid),
    }[case]
    if case == "member-on-create":
        kind = "create"
    if case == "other-users-login":
        auth = login_token(owner.user)
    url = f"{server.ws}/sessions/{sid}/ws/{kind}?token={token}" + ("" if case == "no-login" else f"&auth={auth}")
    with pytest.raises(websocket.WebSocketBadStatusException) as caught:
        websocket.create_connection(url, timeout=TIMEOUT, suppress_origin=True)
    expected = {"missing": (401, b"missing token\n"), "member-on-create": (400, b"missing batch id\n"),
                "other-users-login": (401, b"auth failed\n"), "no-login": (401, b"auth failed\n")}
    status, body = expected.get(case, (401, b"invalid token\n"))
    assert (caught.value.status_code, caught.value.resp_body) == (status, body)
    for s in (sid, other):
        owner.call("DELETE", f"/sessions/{s}?userID={owner.user}")


def test_a_token_minted_before_a_kick_opens_no_socket(secured: Server) -> None:
    server = secured
    batch, owner = project(server)
    sid = owner.create(batch)["sessionID"]
    ann = member(server, "ann")
    before = ann.join(sid)["token"]
    assert owner.call("DELETE", f"/sessions/{sid}/members/{ann.user}?userID={owner.user}")[0] == 200
    with pytest.raises(Refused) as caught:
        ann.socket(sid, before, "member")
    assert caught.value.status == 403
    # Joining again (no ban list, as in the Go service) gives a token that works; the old one still does not.
    after = ann.join(sid)["token"]
    with pytest.raises(Refused):
        ann.socket(sid, before, "member")
    ann.socket(sid, after, "member").close()
    owner.call("DELETE", f"/sessions/{sid}?userID={owner.user}")


def test_preflights_from_the_web_apps_origin(secured: Server) -> None:
    for method, path in (("POST", "/sessions/b/join?userID=u"), ("DELETE", "/sessions/s/members/m?userID=u"),
                         ("GET", "/sessions/active?projectID=p")):
        status, headers, _ = secured.request("OPTIONS", path, headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization,content-type,x-session-id"})
        assert 200 <= status < 300
        assert headers["Access-Control-Allow-Origin"] == ORIGIN
        assert method in headers["Access-Control-Allow-Methods"]
        allowed = {h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")}
        assert {"authorization", "content-type", "x-session-id"} <= allowed


# -- without a JWT secret (development) -------------------------------------------------------------

def test_development_without_a_secret_still_checks_session_tokens(server: Server) -> None:
    batch, owner_id = server.batch()
    owner = WebApp(server, owner_id, secret=None)
    sid = owner.create(batch)["sessionID"]
    ann = member(server, "ann", secret=None)
    grant = ann.join(sid)
    ann.socket(sid, grant["token"], "member").close()  # no login token needed
    with pytest.raises(Refused) as caught:  # but the session token is checked
        ann.socket(sid, session_token(ann.user, sid, secret="guessed-" + "x" * 32), "member")
    assert caught.value.status == 401
    owner.call("DELETE", f"/sessions/{sid}?userID={owner.user}")


def test_a_member_that_never_opens_its_socket_is_removed(server_factory: Callable[..., Server]) -> None:
    server = server_factory(SESSION_TOKEN_SECONDS="1", RECONNECT_GRACE_SECONDS="1", PROCESS_LEASE_SECONDS="1")
    try:
        batch, owner_id = server.batch()
        owner = WebApp(server, owner_id, secret=None)
        sid = owner.create(batch)["sessionID"]
        host = owner.enter(sid)
        ann = member(server, "ann", secret=None)
        ann.join(sid)
        assert host.recv()["type"] == "member_joined"
        left = host.recv(timeout=30)  # its token (1 s) and then the reconnect grace (1 s) run out
        assert (left["type"], left["memberID"]) == ("member_left", ann.user)
        assert server.doc("sessions", sid)["members"] == []
        owner.call("DELETE", f"/sessions/{sid}?userID={owner.user}")
    finally:
        server.stop()  # its 1 s graces would apply to other tests' processes that stop (see test_processes.py)


def test_plain_requests_where_neither_api_has_a_meaning(server: Server) -> None:
    for path in ("/sessions/s/ws/create?token=t", "/sessions/s/ws/join?token=t"):
        status, headers, body = server.request("GET", path)
        assert (status, headers["Upgrade"]) == (426, "websocket")
        assert headers["Content-Type"].startswith("text/plain")
    status, _, body = server.request("POST", "/sessions/some-batch")  # the web app's create, without userID
    assert (status, body) == (400, b"Missing userID query parameter\n")
