"""WebSocket routes of both APIs: flask-sock routes, admitted before its handshake, served after it.

flask-sock's `Sock.route` performs the handshake (simple-websocket's `Server`
sends the 101) before it calls the view, so a view could never refuse with a
real HTTP status. Each socket route therefore registers an *admission* with
`socket_route`; the app's `before_request` (`admit`) runs it while the request
is still plain HTTP (every refusal a real status, rendered by the route's
blueprint in its API's vocabulary), hands the result to the view through
`flask.g`, and prepares the environ flask-sock's `Server` is built from
(websocket.prepare). The view (`serve`) connects the client and returns: the
connection is served in a greenlet of its own until it is gone
(`Connection.detach`), holding nothing of the request. An admission the view
never took (the handshake failed) is undone in `teardown_request`
(`undo_unserved`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from flask import Blueprint, Flask, Response, current_app, g, request
from flask_sock import Sock
from simple_websocket import ConnectionError as HandshakeError
from simple_websocket import Server

from . import metrics
from .auth import Authenticator
from .clients import Client
from .config import Config
from .errors import Refusal
from .logs import is_loopback, log_upgrade, peer_address
from .protocol import Event, Frame, Kind, Vocabulary
from .sessions import Admission, Participant, SessionManager
from .store import Store, StoreError
from .throttle import PasswordThrottle
from .tokens import SessionTokens
from .websocket import Connection, check_handshake, prepare

log = logging.getLogger(__name__)

#: How long a finished connection may take to complete its close handshake.
_CLOSE_TIMEOUT_SECONDS = 2.0

#: flask-sock: routes the WebSocket upgrades (its routes are registered on the blueprints).
sock = Sock()

#: What a socket route's admission does: turn the request (its URL values, and `address`: the client address
#: its connection counts against, None if not capped) into an `Admission`, or raise `Refusal`.
Admit = Callable[..., Admission]


@dataclass(frozen=True)
class Services:
    """What the routes use, built once per process by `create_app`."""

    config: Config
    sessions: SessionManager
    auth: Authenticator
    tokens: SessionTokens
    store: Store
    throttle: PasswordThrottle


def services() -> Services:
    return current_app.extensions["canary"]


@dataclass(frozen=True)
class _SocketRoute:
    admit: Admit
    vocabulary: Vocabulary


_routes: dict[str, _SocketRoute] = {}


def socket_route(bp: Blueprint, rule: str, *, endpoint: str, vocabulary: Vocabulary) -> Callable[[Admit], Admit]:
    """Register `admit` as the admission of a flask-sock route of `bp` at `rule`, whose clients speak
    `vocabulary`; the view is `serve`. A plain GET of `rule` is answered 426 (`refusals` says how)."""
    def register(admit: Admit) -> Admit:
        _routes[f"{bp.name}.{endpoint}"] = _SocketRoute(admit, vocabulary)
        sock.route(rule, bp=bp, endpoint=endpoint)(serve)
        bp.add_url_rule(rule, f"{endpoint}_plain", _upgrade_required[bp.name], methods=["GET"])
        return admit
    return register


#: How an API words a refusal: (status, reason) -> response.
Render = Callable[[int, str], Response]
#: Each blueprint's answer to a plain GET of a socket route (`refusals`).
_upgrade_required: dict[str, Callable[..., Response]] = {}


def refusals(bp: Blueprint, render: Render, *, store_unavailable: str, handshake_failed: str,
             upgrade_required: str) -> None:
    """Answer `bp`'s refusals with `render`: a `Refusal` (with its headers), a store that failed (503),
    flask-sock's handshake failing after the admission (400; the admission is then undone), and a plain GET
    of a socket route (426 `upgrade_required`). Called before `bp`'s socket routes are registered."""
    def plain_get(**_ids: str) -> Response:
        response = render(426, upgrade_required)
        response.headers["Upgrade"] = "websocket"
        return response

    _upgrade_required[bp.name] = plain_get

    @bp.errorhandler(Refusal)
    def refused(e: Refusal) -> Response:
        response = render(e.status, e.message)
        response.headers.update(e.headers)
        return response

    @bp.errorhandler(StoreError)
    def store_failed(e: StoreError) -> Response:
        log.error("store failure: %s", e)
        return render(503, store_unavailable)

    @bp.errorhandler(HandshakeError)
    @bp.errorhandler(OSError)
    def handshake_error(e: Exception) -> Response:
        if "admission" not in g:  # not an admitted upgrade whose handshake failed: an error like any other
            raise e
        log.info("WebSocket handshake failed: %r", e)
        return render(400, handshake_failed)


def install(app: Flask) -> None:
    """Admit socket requests before any view runs, and undo admissions no view took."""
    app.before_request(admit)
    app.teardown_request(undo_unserved)


def admit() -> None:
    """Decide a socket request while it is still plain HTTP: every refusal is a real status."""
    route = _routes.get(request.endpoint or "")
    if route is None:
        return
    check_handshake(request.environ)
    config = services().config
    origins = config.allowed_origins
    origin = request.headers.get("Origin")
    if origins is not None and origin is not None and origin not in origins:
        raise Refusal(403, f"origin {origin!r} is not allowed")
    address = peer_address(request.environ, config.trusted_proxies)
    # A client on this machine (a local proxy not declared in TRUSTED_PROXIES, a benchmark) is not capped
    # by address: all of a local proxy's clients would share one cap.
    capped = None if is_loopback(address) else address
    g.admit_started = time.monotonic()
    try:
        g.admission = route.admit(address=capped, **(request.view_args or {}))
    except Exception:
        metrics.ADMISSION.observe(time.monotonic() - g.admit_started)
        raise
    prepare(request.environ)


def undo_unserved(_error: BaseException | None) -> None:
    """An admission whose upgrade failed before the view took it: as if the client left at once."""
    admission: Admission | None = g.pop("admission", None)
    if admission is not None:
        log.info("upgrade failed for %s in session %s", admission.user_id, admission.session_id)
        services().sessions.abandon(admission)


def serve(ws: Server, **_ids: str) -> None:
    """Connect an admitted client over flask-sock's `ws`, then serve it until it is gone, in a greenlet of its own
    once this view returns: what only the handshake needed (gunicorn's request, Flask's contexts, the handshake's
    h11 state, the deep stack of a view parked in a read) is not kept for the connection's life."""
    svc = services()
    config = svc.config
    admission: Admission = g.admission  # popped once connected: until then `undo_unserved` undoes it
    vocabulary = _routes[request.endpoint or ""].vocabulary
    connection = Connection(ws)
    name = f"{admission.role} {admission.user_id!r} of session {admission.session_id}"
    role, session_id = admission.role, admission.session_id

    def keepalive() -> Frame:
        frame = Event(Kind.KEEPALIVE, role=role, sessionID=session_id).frame(vocabulary)
        assert frame is not None  # every vocabulary has one
        return frame

    client = Client(connection, name=name, max_bytes=config.client_queue_bytes,
                    keepalive_seconds=config.keepalive_seconds, keepalive=keepalive,
                    ping_seconds=config.idle_timeout_seconds / 2, write_timeout=config.idle_timeout_seconds)
    try:
        participant = svc.sessions.connect(admission, client, vocabulary)
    except BaseException:
        client.stop(timeout=0)
        raise
    del g.admission, admission  # the participant keeps a slim copy: this frame lives as long as the connection
    context = {"sessionID": session_id, "userID": participant.user_id, "role": role}  # JSON logs' fields
    try:
        metrics.ADMISSION.observe(time.monotonic() - g.pop("admit_started"))
        log_upgrade(request.environ, 101, request.url_rule.rule if request.url_rule else "-",
                    trusted_proxies=config.trusted_proxies, userID=participant.user_id, role=role,
                    sessionID=session_id)
        log.info("%s connected", name, extra=context)
    except BaseException:
        _disconnect(svc, participant, client, connection, name, context)
        raise

    def run() -> None:
        try:
            connection.serve(lambda message: metrics.received(svc.sessions.receive(participant, message)),
                             lambda: svc.sessions.ping_allowed(participant))
        finally:
            _disconnect(svc, participant, client, connection, name, context)

    connection.detach(run)


def _disconnect(svc: Services, participant: Participant, client: Client, connection: Connection, name: str,
                context: dict[str, str]) -> None:
    """The client is gone: leave its session, end its writer, complete the close handshake."""
    svc.sessions.disconnect(participant)
    client.stop(timeout=svc.config.idle_timeout_seconds)
    connection.finish(timeout=_CLOSE_TIMEOUT_SECONDS)
    metrics.CLOSES.labels(str(connection.close_code)).inc()
    log.info("%s disconnected (close code %s)", name, connection.close_code,
             extra={**context, "closeCode": connection.close_code})
