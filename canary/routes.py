"""The HTTP/WebSocket edge: health, the two session routes, refusals as JSON.

The session routes are flask-sock's (`sock.route`), which performs the
handshake before calling the view. A session request is therefore validated
(user, token, origin, store checks) in the blueprint's `before_request`,
while it is still plain HTTP, so each refusal is a real status sent before the
101; the view then serves the admitted client over flask-sock's `ws`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from flask import Blueprint, Response, current_app, g, jsonify, request
from flask_sock import Sock
from simple_websocket import ConnectionError as HandshakeError
from simple_websocket import Server

from . import protocol
from .auth import Authenticator, bearer_token
from .clients import Client
from .config import Config
from .errors import Refusal
from .sessions import Admission, SessionManager
from .store import StoreError
from .websocket import Connection, ConnectionClosed, prepare

log = logging.getLogger(__name__)

#: How long a finished connection may take to complete its close handshake.
_CLOSE_TIMEOUT_SECONDS = 2.0

bp = Blueprint("canary", __name__)
#: flask-sock: it routes the WebSocket upgrades of `bp` (its routes are registered on the blueprint).
sock = Sock()


@dataclass(frozen=True)
class Services:
    """What the routes use, built once per process by `create_app`."""

    config: Config
    sessions: SessionManager
    auth: Authenticator


def services() -> Services:
    return current_app.extensions["canary"]


def error(status: int, message: str) -> Response:
    """The JSON body every refusal carries: ``{"error", "status"}``."""
    response = jsonify(error=message, status=status)
    response.status_code = status
    return response


@bp.errorhandler(Refusal)
def _refused(e: Refusal) -> Response:
    return error(e.status, e.message)


@bp.errorhandler(StoreError)
def _store_failed(e: StoreError) -> Response:
    log.error("store failure: %s", e)
    return error(503, "the store is unavailable; try again")


@bp.get("/health")
def health() -> Response:
    return Response("OK", mimetype="text/plain")


@bp.route("/sessions/<batch_id>", methods=["GET", "POST"], endpoint="create_session_plain")
@bp.route("/sessions/<session_id>/join", methods=["GET", "POST"], endpoint="join_session_plain")
def upgrade_required(**_ids: str) -> Response:
    """The session routes speak WebSocket only (Werkzeug routes upgrades apart)."""
    response = error(426, "this endpoint upgrades to a WebSocket; connect with a WebSocket client")
    response.headers["Upgrade"] = "websocket"
    return response


# -- the WebSocket routes: admitted before flask-sock's handshake, served after it --------------

def _serve(ws: Server, **_ids: str) -> None:
    """Serve an admitted client over flask-sock's `ws` until it is gone."""
    svc = services()
    config = svc.config
    admission: Admission = g.pop("admission")
    connection = Connection(ws)
    name = f"{admission.role} {admission.user_id!r} of session {admission.session_id}"
    client = Client(connection, name=name, max_bytes=config.client_queue_bytes,
                    keepalive_seconds=config.keepalive_seconds,
                    keepalive=lambda: protocol.KEEPALIVE(role=admission.role, sessionID=admission.session_id),
                    ping_seconds=config.idle_timeout_seconds / 2, write_timeout=config.idle_timeout_seconds)
    participant = svc.sessions.connect(admission, client)
    admission = participant.admission  # the slim copy: this frame lives as long as the connection
    log.info("%s connected", name)
    try:
        while True:
            svc.sessions.receive(participant, connection.receive())
    except ConnectionClosed:
        pass
    finally:
        svc.sessions.disconnect(participant)
        client.stop(timeout=config.idle_timeout_seconds)
        connection.finish(timeout=_CLOSE_TIMEOUT_SECONDS)
        log.info("%s disconnected (close code %s)", name, connection.close_code)


#: What a WebSocket route's admission does, by endpoint: turn the user into an `Admission` or raise `Refusal`.
Admit = Callable[..., Admission]
_admissions: dict[str, Admit] = {}


def _socket_route(rule: str, endpoint: str) -> Callable[[Admit], Admit]:
    """Register `admit` as the admission of a flask-sock route at `rule`, served by `_serve`."""
    def register(admit: Admit) -> Admit:
        _admissions[f"{bp.name}.{endpoint}"] = admit
        sock.route(rule, bp=bp, endpoint=endpoint)(_serve)
        return admit
    return register


@_socket_route("/sessions/<batch_id>", "create_session")
def _admit_owner(user_id: str, batch_id: str) -> Admission:
    return services().sessions.open_session(batch_id, user_id)


@_socket_route("/sessions/<session_id>/join", "join_session")
def _admit_member(user_id: str, session_id: str) -> Admission:
    return services().sessions.join_session(session_id, user_id)


@bp.before_request
def _admit() -> None:
    """Decide a WebSocket request while it is still plain HTTP: every refusal is a real status.

    flask-sock sends the 101 before it calls the view; the admission reaches
    the view through `flask.g` (and is undone by `_undo_unserved` if the
    view never takes it).
    """
    admit = _admissions.get(request.endpoint or "")
    if admit is None:
        return
    svc = services()
    user_id = request.args.get("userID", "").strip()
    if not user_id:
        raise Refusal(400, "the userID query parameter is required")
    origins = svc.config.allowed_origins
    origin = request.headers.get("Origin")
    if origins is not None and origin is not None and origin not in origins:
        raise Refusal(403, f"origin {origin!r} is not allowed")
    svc.auth.check(bearer_token(request.headers.get("Authorization"), request.args.get("auth")), user_id)
    g.admission = admit(user_id, **(request.view_args or {}))
    prepare(request.environ)


@bp.teardown_request
def _undo_unserved(_error: BaseException | None) -> None:
    """An admission whose upgrade failed before the view took it: as if the client left at once."""
    admission: Admission | None = g.pop("admission", None)
    if admission is not None:
        log.info("upgrade failed for %s in session %s", admission.user_id, admission.session_id)
        services().sessions.abandon(admission)


@bp.errorhandler(HandshakeError)
@bp.errorhandler(OSError)
def _handshake_failed(e: Exception) -> Response:
    """flask-sock's handshake failed (the client left during it): the admission is undone."""
    log.info("WebSocket handshake failed: %r", e)
    return error(400, "the WebSocket handshake failed")
