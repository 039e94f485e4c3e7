"""The Flask application factory: configuration, store, CORS, routes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import gevent
from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from . import dev, metrics, routes, sockets, webapp
from .auth import Authenticator
from .budget import InboundLimits
from .config import Config
from .memory_store import MemoryStore
from .passwords import BcryptPasswords
from .sessions import SessionManager
from .store import Store
from .throttle import PasswordThrottle, ThrottleLimits
from .tokens import SessionTokens, development_key
from .websocket import is_upgrade, server_options

log = logging.getLogger("canary")


def build_store(config: Config) -> Store:
    """The store `config` selects; raises `StoreError` if Firestore does not answer."""
    if config.store == "memory":
        log.warning("CANARY_STORE=memory: sessions and documents live in this process only; nothing is persisted")
        return MemoryStore(config.seed)
    from .firestore_store import FirestoreStore  # imports gRPC: only when used

    store = FirestoreStore.connect(config.firestore_project, config.firestore_database,
                                   config.firestore_timeout_seconds)
    store.check()
    for collection, docs in config.seed.items():
        for doc_id, data in docs.items():
            store.set(collection, doc_id, data)
    where = config.firestore_emulator_host or "Google Cloud"
    log.info("store: Firestore project %s database %s on %s", config.firestore_project,
             config.firestore_database, where)
    return store


def create_app(config: Config | None = None, store: Store | None = None) -> Flask:
    """Build the service. `config` defaults to the environment's."""
    config = config or Config.from_env()
    store = store or build_store(config)
    app = Flask(__name__)
    app.config["SOCK_SERVER_OPTIONS"] = server_options(max_message_bytes=config.max_message_bytes)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes  # larger bodies: 413 (webapp.py words it)
    auth = Authenticator(config.jwt_secret, max_lifetime=config.max_login_token_seconds)
    if not auth.enabled:
        log.warning("JWT_SECRET is not set: the service is OPEN, any caller can act as any user (session "
                    "tokens are still minted and checked, with a key the processes on this store share)")
    tokens = SessionTokens(config.jwt_secret or development_key(store), ttl=config.session_token_seconds)
    threadpool = gevent.get_hub().threadpool
    sessions = SessionManager(store, defer=_hub_deferral(), owner_grace=config.owner_grace_seconds,
                              reconnect_grace=config.reconnect_grace_seconds,
                              lease_seconds=config.process_lease_seconds,
                              token_seconds=config.session_token_seconds,
                              passwords=BcryptPasswords(offload=lambda fn, *args: threadpool.apply(fn, args)),
                              inbound=InboundLimits(config.inbound_frames_per_second, config.set_image_id_per_second),
                              max_clients=config.client_capacity, max_per_user=config.max_connections_per_user,
                              max_per_address=config.max_connections_per_address, on_commit=metrics.commit,
                              commit_interval=config.session_write_interval,
                              settle_seconds=config.firestore_timeout_seconds,
                              image_interval=config.image_write_seconds,
                              max_snapshot_changes_bytes=config.max_snapshot_changes_bytes)
    sessions.on_session_write(metrics.session_write)
    sessions.start()
    gevent.spawn(_every, config.process_lease_seconds / 3, sessions.maintain)
    gevent.spawn(_every, 1.0, sessions.tick)
    metrics.refresh(sessions, store)
    gevent.spawn(_every, METRICS_REFRESH_SECONDS, lambda: metrics.refresh(sessions, store))
    throttle = PasswordThrottle(
        store, ThrottleLimits(config.password_failures_per_user, config.password_failures_per_address,
                              config.password_window_seconds, config.password_lockout_max_seconds),
        on_failure=metrics.password_failure, on_throttled=metrics.password_throttled)
    app.extensions["canary"] = sockets.Services(config, sessions, auth, tokens, store, throttle)
    app.register_blueprint(routes.bp)
    app.register_blueprint(webapp.bp)
    app.register_blueprint(metrics.bp)
    sockets.install(app)
    if config.dev_api:
        log.warning("CANARY_DEV_API is on: /dev/ lets anyone read and write the store")
        app.extensions["canary.store"] = store
        app.register_blueprint(dev.bp)
    _install_cors(app, config)
    app.register_error_handler(HTTPException, _http_error)
    app.wsgi_app = _PostUpgradeAsGet(app.wsgi_app)  # type: ignore[method-assign]
    return app


def _http_error(e: HTTPException) -> Response:
    """Werkzeug's own answers (an unknown path, a method a route does not take) in the API's JSON shape."""
    response = routes.error(e.code or 500, e.description or e.name)
    if isinstance(e, MethodNotAllowed) and e.valid_methods:
        response.headers["Allow"] = ", ".join(e.valid_methods)
    return response


class _PostUpgradeAsGet:
    """Route a POST that asks for a WebSocket upgrade like the GET it stands for.

    RFC 6455 handshakes are GETs (what browsers send) and Werkzeug only routes
    those to WebSocket rules, but the seed documents POST with upgrade headers.
    """

    def __init__(self, wsgi_app: Any) -> None:
        self._wsgi_app = wsgi_app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("REQUEST_METHOD") == "POST" and is_upgrade(environ):
            environ["REQUEST_METHOD"] = "GET"
        return self._wsgi_app(environ, start_response)


def shutdown(app: Flask) -> None:
    """The process is restarting: close every client with 1012 (gunicorn.conf.py calls it on SIGTERM)."""
    app.extensions["canary"].sessions.shutdown()


def _hub_deferral() -> Callable[[Callable[[], None]], None]:
    """Run store callbacks (from any thread) in a new greenlet of this process's hub."""
    loop = gevent.get_hub().loop

    def defer(fn: Callable[[], None]) -> None:
        loop.run_callback_threadsafe(gevent.spawn, fn)

    return defer


#: How often each process publishes its gauges (clients, sessions, targets, streams, lease).
METRICS_REFRESH_SECONDS = 1.0


def _every(interval: float, task: Callable[[], None]) -> None:
    """Run `task` every `interval` seconds for the life of the process: a failure is logged, never the end."""
    while True:
        gevent.sleep(interval)
        try:
            task()
        except Exception:
            log.exception("periodic task %s failed", getattr(task, "__qualname__", task))


def _install_cors(app: Flask, config: Config) -> None:
    origins = config.allowed_origins

    def allowed_origin() -> str | None:
        origin = request.headers.get("Origin")
        if origins is None:
            return "*" if not config.cors_allow_credentials or origin is None else origin
        return origin if origin in origins else None

    @app.before_request
    def preflight() -> Response | None:
        if request.method == "OPTIONS":
            return Response(status=204)
        return None

    @app.after_request
    def cors_headers(response: Response) -> Response:
        origin = allowed_origin()
        if origin is None:
            return response
        response.headers["Access-Control-Allow-Origin"] = origin
        if origin != "*":
            response.vary.add("Origin")
        response.headers["Access-Control-Allow-Methods"] = config.cors_allow_methods
        response.headers["Access-Control-Allow-Headers"] = config.cors_allow_headers
        if config.cors_allow_credentials:
            response.headers["Access-Control-Allow-Credentials"] = "true"
        return response
