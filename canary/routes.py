"""The seed's API at the edge: health, its two session sockets, refusals as JSON.

`/sessions/<batchID>` (create) and `/sessions/<sessionID>/join` are flask-sock
routes (sockets.py): the upgrade itself creates or joins the session, so the
admission checks the user, its login token and the store before the 101, and
a refusal is `{"error", "status"}`. The web app's API (webapp.py) shares these
paths for its plain REST requests.
"""

from __future__ import annotations

import logging

from flask import Blueprint, Response, jsonify, request

from . import ids
from .auth import bearer_token
from .errors import Refusal
from .protocol import SEED
from .sessions import Admission
from .sockets import refusals, services, socket_route

log = logging.getLogger(__name__)

bp = Blueprint("canary", __name__)


def error(status: int, message: str) -> Response:
    """The JSON body every refusal carries: ``{"error", "status"}``."""
    response = jsonify(error=message, status=status)
    response.status_code = status
    return response


refusals(bp, error, store_unavailable="the store is unavailable; try again",
         handshake_failed="the WebSocket handshake failed",
         upgrade_required="this endpoint upgrades to a WebSocket; connect with a WebSocket client")


@bp.get("/health")
def health() -> Response:
    """Liveness: the process answers (nothing else is checked)."""
    return Response("OK", mimetype="text/plain")


@bp.get("/ready")
def ready() -> Response:
    """Readiness: 200 while the store answers within `READY_TIMEOUT_SECONDS` and the process is not stopping."""
    svc = services()
    if svc.sessions.stopping:
        return error(503, "this process is stopping")
    if not svc.store.ready(svc.config.ready_timeout_seconds):
        return error(503, "the store does not answer")
    return Response("READY", mimetype="text/plain")


def _user() -> str:
    """The `userID` the request names (one that can be a document key: ids.py), checked against its login
    token."""
    user_id = request.args.get("userID", "").strip()
    if not user_id:
        raise Refusal(400, "the userID query parameter is required")
    ids.user_id(user_id)
    services().auth.check(bearer_token(request.headers.get("Authorization"), request.args.get("auth")), user_id)
    return user_id


@socket_route(bp, "/sessions/<batch_id>", endpoint="create_session", vocabulary=SEED)
def _admit_owner(batch_id: str, address: str | None) -> Admission:
    return services().sessions.open_session(ids.batch_id(batch_id), _user(), address)


@socket_route(bp, "/sessions/<session_id>/join", endpoint="join_session", vocabulary=SEED)
def _admit_member(session_id: str, address: str | None) -> Admission:
    return services().sessions.join_session(ids.session_id(session_id), _user(), address)
