"""The HTTP/WebSocket edge: health, the two session routes, refusals as JSON.

A session route validates everything (user, token, origin, store checks) while
the request is still plain HTTP, so each refusal is a real status sent before
the 101; only then does it upgrade and hand the connection to the session
logic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from flask import Blueprint, Response, current_app, jsonify, request

from . import protocol
from .auth import Authenticator, bearer_token
from .clients import Client
from .config import Config
from .errors import Refusal
from .sessions import Admission, SessionManager
from .store import StoreError
from .websocket import ConnectionClosed, accept, handled

log = logging.getLogger(__name__)

#: How long a finished connection may take to complete its close handshake.
_CLOSE_TIMEOUT_SECONDS = 2.0

bp = Blueprint("canary", __name__)


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


@bp.get("/sessions/<batch_id>", websocket=True)
def create_session(batch_id: str) -> Response:
    return _serve(lambda user_id: services().sessions.open_session(batch_id, user_id))


@bp.get("/sessions/<session_id>/join", websocket=True)
def join_session(session_id: str) -> Response:
    return _serve(lambda user_id: services().sessions.join_session(session_id, user_id))


@bp.route("/sessions/<batch_id>", methods=["GET", "POST"], endpoint="create_session_plain")
@bp.route("/sessions/<session_id>/join", methods=["GET", "POST"], endpoint="join_session_plain")
def upgrade_required(**_ids: str) -> Response:
    """The session routes speak WebSocket only (Werkzeug routes upgrades apart)."""
    response = error(426, "this endpoint upgrades to a WebSocket; connect with a WebSocket client")
    response.headers["Upgrade"] = "websocket"
    return response


def _serve(admit: Callable[[str], Admission]) -> Response:
    svc = services()
    config = svc.config
    user_id = request.args.get("userID", "").strip()
    if not user_id:
        raise Refusal(400, "the userID query parameter is required")
    origins = config.allowed_origins
    origin = request.headers.get("Origin")
    if origins is not None and origin is not None and origin not in origins:
        raise Refusal(403, f"origin {origin!r} is not allowed")
    svc.auth.check(bearer_token(request.headers.get("Authorization"), request.args.get("auth")), user_id)
    admission = admit(user_id)
    try:
        connection = accept(request.environ, max_message_bytes=config.max_message_bytes)
    except Exception as e:  # a malformed handshake, or the client left during it
        log.info("upgrade failed for %s in session %s: %r", user_id, admission.session_id, e)
        svc.sessions.abandon(admission)
        return error(400, "the WebSocket handshake failed")
    name = f"{admission.role} {user_id!r} of session {admission.session_id}"
    client = Client(connection, name=name, limit=config.client_queue_size,
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
    return handled()
