"""The web app's API at the edge: its REST session calls and its `/ws/` sockets.

Canary's web app speaks the Go service's later API (docs/protocol.md, "The web
app's API"): REST creates, joins (handing out a 60-second session token),
stops, kicks and lists sessions; its sockets open at
`/sessions/<id>/ws/create` (owner) and `/ws/join` (member) with that token.
Its REST paths are the seed's too: a plain request is this API's, a request
with upgrade headers the seed's (routes.py). The session rules are the same
core (sessions.py); only the vocabulary differs.

A refusal here is `text/plain` with the reason and a newline, as the Go
service answered: the web app shows that body to its user ("Failed to join
session: Invalid session password").
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

import gevent
from flask import Blueprint, Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from . import ids, passwords
from .auth import bearer_token
from .errors import Refusal
from .logs import is_loopback, peer_address
from .protocol import WEBAPP, rfc3339
from .records import MEMBER, OWNER
from .sessions import Admission
from .sockets import refusals, services, socket_route

log = logging.getLogger(__name__)

bp = Blueprint("webapp", __name__)


def text_error(status: int, message: str) -> Response:
    """A refusal as the web app shows it: the reason, as text."""
    response = Response(f"{message}\n", status=status, mimetype="text/plain")
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


refusals(bp, text_error, store_unavailable="The session service cannot reach its database; try again",
         handshake_failed="Bad Request", upgrade_required="This endpoint opens a WebSocket")


@bp.errorhandler(HTTPException)
def _http_error(e: HTTPException) -> Response:
    """Werkzeug's own refusals raised in this API's routes (reading a body the client cut short, say), in
    text as the others."""
    return text_error(e.code or 500, e.name)


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(body) + "\n", status=status, mimetype="application/json")


def _caller() -> tuple[str, dict[str, Any]]:
    """The `userID` a REST call names (one that can be a document key: ids.py) and its login token's claims
    ({} when the service is open)."""
    user_id = request.args.get("userID", "").strip()
    if not user_id:
        raise Refusal(400, "Missing userID query parameter")
    ids.user_id(user_id)
    return user_id, services().auth.check(bearer_token(request.headers.get("Authorization"), None), user_id)


def _password() -> str | None:
    """The optional `{"password": …}` body of a create or a join, checked before anything is read or written:
    `_body`'s limits, then `Content-Type: application/json` (415), a JSON object (400) whose `password`, if
    any, is a string bcrypt can take (400). No body, an empty one, and an empty or null password are no
    password; other fields are ignored."""
    data = _body()
    if not data:
        return None
    if request.mimetype != "application/json":
        raise Refusal(415, "Send the request body as JSON (Content-Type: application/json)")
    try:
        body = json.loads(data)
    except ValueError:
        raise Refusal(400, "Invalid request") from None
    except RecursionError:  # the decoder's nesting limit, as for socket frames (protocol.parse_client_frame)
        raise Refusal(400, "Invalid request: the JSON is nested too deeply") from None
    if not isinstance(body, dict):
        raise Refusal(400, "Invalid request: the body must be a JSON object")
    password = body.get("password")
    if password is not None and not isinstance(password, str):
        raise Refusal(400, "Invalid request: the password must be a string")
    if not password:
        return None
    passwords.check(password)  # over bcrypt's 72 bytes: 400 at create and join alike, never a guess counted
    return password


def _body() -> bytes:
    """The request's body: at most `MAX_BODY_BYTES` (413), all of it within `BODY_TIMEOUT_SECONDS` (408: a
    `Content-Length` larger than what is sent would otherwise hold the request until the client gives up;
    gunicorn sets no timeout on reading a body)."""
    config = services().config
    timeout = gevent.Timeout(config.body_timeout_seconds)
    timeout.start()
    try:
        data = request.get_data()
        if request.content_length is None and len(data) >= config.max_body_bytes:
            raise RequestEntityTooLarge  # a body without Content-Length (chunked) is cut at the limit, silently
        return data
    except RequestEntityTooLarge:
        raise Refusal(413, f"The request body is too large: at most {config.max_body_bytes} bytes") from None
    except gevent.Timeout as e:
        if e is not timeout:
            raise
        raise Refusal(408, "The request body did not arrive in time") from None
    finally:
        timeout.cancel()


def _email(claims: dict[str, Any]) -> str | None:
    """The e-mail of the login token, if it has one (else the store's is read)."""
    email = claims.get("email")
    return email if isinstance(email, str) else None


@bp.post("/sessions/<batch_id>")
def create_session(batch_id: str) -> Response:
    ids.batch_id(batch_id)
    user_id, claims = _caller()
    password = _password()
    state = services().sessions.create_session(batch_id, user_id, password, _email(claims))
    return _json({"sessionID": state.session_id, "batchID": state.batch_id, "projectID": state.project_id,
                  "role": OWNER}, 201)


@bp.post("/sessions/<session_id>/join")
def join_session(session_id: str) -> Response:
    ids.session_id(session_id)
    user_id, claims = _caller()
    password = _password()
    svc = services()
    # Counted per address too (throttle.py), as sockets count connections: a loopback client is not (a local
    # proxy's clients would all share one address: it is declared in TRUSTED_PROXIES).
    address = peer_address(request.environ, svc.config.trusted_proxies)
    grant = svc.sessions.grant(session_id, user_id, password, _email(claims),
                               throttle=svc.throttle,
                               address=None if is_loopback(address) else address)
    batch_claim = grant.state.batch_id if grant.role == OWNER else ""
    return _json({"sessionID": session_id, "batchID": grant.state.batch_id, "projectID": grant.state.project_id,
                  "token": svc.tokens.mint(user_id, session_id, batch_claim), "expiresIn": round(svc.tokens.ttl),
                  "role": grant.role})


@bp.delete("/sessions/<session_id>")
def stop_session(session_id: str) -> Response:
    ids.session_id(session_id)
    user_id, _ = _caller()
    services().sessions.stop(session_id, user_id)
    return Response(status=204)


@bp.delete("/sessions/<session_id>/members/<member_id>")
def kick_member(session_id: str, member_id: str) -> Response:
    ids.session_id(session_id)
    ids.user_id(member_id, "memberID")
    user_id, _ = _caller()
    services().sessions.kick(session_id, user_id, member_id)
    return _json({"removed": True})


@bp.get("/sessions/active")
def active_sessions() -> Response:
    batch_id, project_id = request.args.get("batchID"), request.args.get("projectID")
    if not batch_id and not project_id:
        raise Refusal(400, "Provide projectID or batchID")
    if batch_id:
        ids.batch_id(batch_id)
    elif project_id:
        ids.project_id(project_id)
    svc = services()
    claims = svc.auth.identify(bearer_token(request.headers.get("Authorization"), None))
    # Without a JWT secret (development) the caller is the userID it names, if any: then every session shows.
    if claims is not None:
        caller: str | None = ids.user_id(claims["userID"], "userID in the login token")
    else:
        caller = request.args.get("userID") or None
        if caller is not None:
            ids.user_id(caller)
    found = svc.sessions.active(batch_id=batch_id or None, project_id=None if batch_id else project_id,
                                caller=caller)
    return _json({"sessions": [{
        "sessionID": s.session_id, "batchID": s.doc.get("batchID", ""), "projectID": s.doc.get("projectID", ""),
        "owner": {"id": s.doc["owner"]["id"], "email": s.doc["owner"].get("email", ""),
                  "imageID": s.images.get(s.doc["owner"]["id"])},
        "members": [{"id": m["id"], "email": m.get("email", ""), "imageID": s.images.get(m["id"])}
                    for m in s.doc.get("members", [])],
        "ownerConnected": s.owner_connected,
        "lastUpdated": _rfc3339(s.doc.get("lastUpdated")),
    } for s in found]})


def _rfc3339(value: Any) -> str:
    """A stored timestamp as RFC 3339 UTC with a `Z` (Go's zero time when there is none)."""
    return rfc3339(value, "microseconds") if isinstance(value, datetime) else "0001-01-01T00:00:00Z"


def _attach(session_id: str, role: str, address: str | None) -> Admission:
    """A web-app socket: its session token, its login token, then the store (sessions.attach)."""
    svc = services()
    ids.session_id(session_id)
    token = request.args.get("token", "")
    if not token:
        raise Refusal(401, "missing token")
    claims = svc.tokens.verify(token, session_id)
    # Signed by this service's key, but checked as any ID a request names (another service may share the key).
    ids.user_id(claims.user_id, "userID in the session token")
    if claims.batch_id:
        ids.batch_id(claims.batch_id, "batchID in the session token")
    if svc.auth.enabled:  # the login token (browsers pass it as `auth`) must be the same user's
        try:
            svc.auth.check(bearer_token(request.headers.get("Authorization"), request.args.get("auth")),
                           claims.user_id)
        except Refusal:
            raise Refusal(401, "auth failed") from None
    if role == OWNER and not claims.batch_id:
        raise Refusal(400, "missing batch id")
    return svc.sessions.attach(session_id, claims.user_id, role, claims.issued_at, address)


@socket_route(bp, "/sessions/<session_id>/ws/create", endpoint="ws_create", vocabulary=WEBAPP)
def _admit_owner(session_id: str, address: str | None) -> Admission:
    return _attach(session_id, OWNER, address)


@socket_route(bp, "/sessions/<session_id>/ws/join", endpoint="ws_join", vocabulary=WEBAPP)
def _admit_member(session_id: str, address: str | None) -> Admission:
    return _attach(session_id, MEMBER, address)
