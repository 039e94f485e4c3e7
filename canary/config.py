"""Service configuration, read once from the environment.

Every setting is validated here, so bad configuration stops start-up with one
clear line (`ConfigError`) instead of surfacing later as a traceback.
"""

from __future__ import annotations

import json
import os
import resource
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Heroku-style routers cut a WebSocket that has been idle for 55 s.
ROUTER_IDLE_CUT_SECONDS = 55


class ConfigError(Exception):
    """A setting is missing or malformed; the message names it."""


Seed = dict[str, dict[str, dict[str, Any]]]


@dataclass(frozen=True)
class Config:
    """Validated settings of one service process."""

    port: int = 8080
    jwt_secret: str | None = None
    keepalive_seconds: float = 30.0
    idle_timeout_seconds: float = 60.0
    max_message_bytes: int = 64 * 1024
    client_queue_bytes: int = 1 << 20
    #: A snapshot message's `changes` larger than this as JSON are sent as `null` (the client re-fetches).
    max_snapshot_changes_bytes: int = 64 * 1024
    worker_connections: int = 10_000
    web_concurrency: int = 1
    owner_grace_seconds: float = 0.0
    reconnect_grace_seconds: float = 30.0
    process_lease_seconds: float = 15.0
    #: The session document is written at most once per this many seconds (Firestore sustains about one
    #: write a second on a document); 0 on the memory store, which has no such limit.
    session_write_seconds: float | None = None
    #: A member's image (`member_image`) is written at most once per this many seconds: its first switch at once,
    #: the last of those that follow within it when it is over (member_images.py).
    image_write_seconds: float = 1.0
    session_token_seconds: float = 60.0
    #: A login token valid for longer than this is refused (Canary's are issued for 30 days).
    max_login_token_seconds: float = 31 * 24 * 3600.0
    inbound_frames_per_second: float = 50.0
    set_image_id_per_second: float = 10.0
    #: WebSocket clients one worker takes before it answers 503 (None: `worker_connections` less a reserve).
    max_clients: int | None = None
    max_connections_per_user: int = 16
    max_connections_per_address: int = 256
    #: How many proxies in front of the service append to X-Forwarded-For (Heroku's router: 1).
    trusted_proxies: int = 0
    #: Wrong session passwords within `password_window_seconds` that lock a user out of a session, and a client
    #: address out of every session (0: not counted by address); a lock-out lasts a window, then twice the
    #: previous one while guessing goes on, up to `password_lockout_max_seconds` (throttle.py).
    password_failures_per_user: int = 5
    password_failures_per_address: int = 20
    password_window_seconds: float = 60.0
    password_lockout_max_seconds: float = 900.0
    #: REST bodies larger than this are refused 413 (Flask's MAX_CONTENT_LENGTH); they hold a password at most.
    max_body_bytes: int = 16 * 1024
    #: A REST body must have arrived this many seconds after the request began to be read (else 408).
    body_timeout_seconds: float = 2.0
    metrics_token: str | None = None
    ready_timeout_seconds: float = 2.0
    cors_allow_origin: str = "*"
    cors_allow_methods: str = "GET, POST, DELETE, OPTIONS"
    cors_allow_headers: str = "Authorization, Content-Type, X-Session-Id"
    cors_allow_credentials: bool = False
    store: str = "memory"
    gcp_project_id: str | None = None
    firestore_database: str = "(default)"
    firestore_emulator_host: str | None = None
    firestore_timeout_seconds: float = 10.0
    seed: Seed = field(default_factory=dict)
    dev_api: bool = False

    @property
    def session_write_interval(self) -> float:
        """Seconds between two writes of one session document: SESSION_WRITE_SECONDS, else 1 on Firestore."""
        if self.session_write_seconds is not None:
            return self.session_write_seconds
        return 1.0 if self.store == "firestore" else 0.0

    @property
    def allowed_origins(self) -> frozenset[str] | None:
        """The allowed origins, or None when any origin is allowed."""
        origins = {o.strip() for o in self.cors_allow_origin.split(",") if o.strip()}
        return None if "*" in origins or not origins else frozenset(origins)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Read and validate the configuration from `env` (default: os.environ)."""
        env = os.environ if env is None else env
        reader = _Reader(env)
        config = cls(
            port=reader.integer("PORT", cls.port, low=1, high=65535),
            jwt_secret=env.get("JWT_SECRET") or None,
            keepalive_seconds=reader.number("KEEPALIVE_SECONDS", cls.keepalive_seconds),
            idle_timeout_seconds=reader.number("IDLE_TIMEOUT_SECONDS", cls.idle_timeout_seconds),
            max_message_bytes=reader.integer("MAX_MESSAGE_BYTES", cls.max_message_bytes, low=64),
            client_queue_bytes=reader.integer("CLIENT_QUEUE_BYTES", cls.client_queue_bytes, low=1024),
            max_snapshot_changes_bytes=reader.integer("MAX_SNAPSHOT_CHANGES_BYTES", cls.max_snapshot_changes_bytes,
                                                      low=0),
            worker_connections=reader.integer("WORKER_CONNECTIONS", cls.worker_connections, low=1),
            web_concurrency=reader.integer("WEB_CONCURRENCY", _default_workers(env), low=1),
            owner_grace_seconds=reader.number("OWNER_GRACE_SECONDS", cls.owner_grace_seconds, zero=True),
            reconnect_grace_seconds=reader.number("RECONNECT_GRACE_SECONDS", cls.reconnect_grace_seconds),
            process_lease_seconds=reader.number("PROCESS_LEASE_SECONDS", cls.process_lease_seconds),
            session_write_seconds=reader.number("SESSION_WRITE_SECONDS", None, zero=True),
            image_write_seconds=reader.number("IMAGE_WRITE_SECONDS", cls.image_write_seconds, zero=True),
            session_token_seconds=reader.number("SESSION_TOKEN_SECONDS", cls.session_token_seconds),
            max_login_token_seconds=reader.number("MAX_LOGIN_TOKEN_SECONDS", cls.max_login_token_seconds),
            inbound_frames_per_second=reader.number("INBOUND_FRAMES_PER_SECOND", cls.inbound_frames_per_second),
            set_image_id_per_second=reader.number("SET_IMAGE_ID_PER_SECOND", cls.set_image_id_per_second),
            max_clients=reader.integer("MAX_CLIENTS", 0, low=1) or None,
            max_connections_per_user=reader.integer("MAX_CONNECTIONS_PER_USER", cls.max_connections_per_user, low=1),
            max_connections_per_address=reader.integer("MAX_CONNECTIONS_PER_ADDRESS",
                                                       cls.max_connections_per_address, low=1),
            trusted_proxies=reader.integer("TRUSTED_PROXIES", cls.trusted_proxies, low=0),
            password_failures_per_user=reader.integer("PASSWORD_FAILURES_PER_USER", cls.password_failures_per_user,
                                                      low=1),
            password_failures_per_address=reader.integer("PASSWORD_FAILURES_PER_ADDRESS",
                                                         cls.password_failures_per_address, low=0),
            password_window_seconds=reader.number("PASSWORD_WINDOW_SECONDS", cls.password_window_seconds),
            password_lockout_max_seconds=reader.number("PASSWORD_LOCKOUT_MAX_SECONDS",
                                                       cls.password_lockout_max_seconds),
            max_body_bytes=reader.integer("MAX_BODY_BYTES", cls.max_body_bytes, low=1024),
            body_timeout_seconds=reader.number("BODY_TIMEOUT_SECONDS", cls.body_timeout_seconds),
            metrics_token=env.get("METRICS_TOKEN", "").strip() or None,
            ready_timeout_seconds=reader.number("READY_TIMEOUT_SECONDS", cls.ready_timeout_seconds),
            cors_allow_origin=env.get("CORS_ALLOW_ORIGIN") or cls.cors_allow_origin,
            cors_allow_methods=env.get("CORS_ALLOW_METHODS") or cls.cors_allow_methods,
            cors_allow_headers=env.get("CORS_ALLOW_HEADERS") or cls.cors_allow_headers,
            cors_allow_credentials=reader.boolean("CORS_ALLOW_CREDENTIALS", False),
            store=reader.choice("CANARY_STORE", _default_store(env), ("memory", "firestore")),
            gcp_project_id=env.get("GCP_PROJECT_ID", "").strip() or None,
            firestore_database=env.get("FIRESTORE_DATABASE", "").strip() or cls.firestore_database,
            firestore_emulator_host=env.get("FIRESTORE_EMULATOR_HOST", "").strip() or None,
            firestore_timeout_seconds=reader.number("FIRESTORE_TIMEOUT_SECONDS", cls.firestore_timeout_seconds),
            seed=_read_seed(env.get("CANARY_SEED")),
            dev_api=reader.boolean("CANARY_DEV_API", False),
        )
        if config.store == "firestore" and not (config.gcp_project_id or config.firestore_emulator_host):
            raise ConfigError("CANARY_STORE=firestore needs GCP_PROJECT_ID (or FIRESTORE_EMULATOR_HOST)")
        if config.store == "memory" and config.web_concurrency > 1:
            raise ConfigError(f"WEB_CONCURRENCY={config.web_concurrency} with CANARY_STORE=memory: each worker "
                              "would hold its own sessions; use 1 worker or the Firestore store")
        if config.seed and config.store == "firestore" and not config.firestore_emulator_host:
            raise ConfigError("CANARY_SEED writes documents at start: allowed with the memory store "
                              "or a Firestore emulator (FIRESTORE_EMULATOR_HOST), never a real project")
        if config.max_clients is not None and config.max_clients > config.worker_connections:
            raise ConfigError(f"MAX_CLIENTS={config.max_clients} must not exceed WORKER_CONNECTIONS="
                              f"{config.worker_connections} (the worker could then not answer /health)")
        if config.password_lockout_max_seconds < config.password_window_seconds:
            raise ConfigError(f"PASSWORD_LOCKOUT_MAX_SECONDS={config.password_lockout_max_seconds:g} must not be below "
                              f"PASSWORD_WINDOW_SECONDS={config.password_window_seconds:g} (the first lock-out "
                              "lasts one window)")
        if config.keepalive_seconds >= ROUTER_IDLE_CUT_SECONDS:
            raise ConfigError(
                f"KEEPALIVE_SECONDS={config.keepalive_seconds:g} must be below "
                f"{ROUTER_IDLE_CUT_SECONDS} (routers cut idle WebSockets at {ROUTER_IDLE_CUT_SECONDS} s)"
            )
        return config


    @property
    def client_capacity(self) -> int:
        """WebSocket clients one worker takes: `MAX_CLIENTS`, or `WORKER_CONNECTIONS` less a reserve that keeps
        the worker answering /health, REST calls and quick 503s when it is full."""
        if self.max_clients is not None:
            return self.max_clients
        return max(1, self.worker_connections - max(16, self.worker_connections // 20))

    @property
    def firestore_project(self) -> str:
        """The Firestore project: GCP_PROJECT_ID, or a demo project on an emulator."""
        return self.gcp_project_id or "demo-canary"


#: Files a worker needs besides its clients' sockets (listening socket, gRPC, logs, the store's channel, ...).
FILES_BESIDES_CLIENTS = 64


def raise_open_files_limit(worker_connections: int) -> int:
    """Raise this process's soft open-files limit to its hard limit (the workers inherit it), and refuse
    (`ConfigError`) when it still cannot hold `worker_connections` sockets; the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    needed = worker_connections + FILES_BESIDES_CLIENTS
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise ConfigError(f"WORKER_CONNECTIONS={worker_connections} needs {needed} open files per worker, but the "
                          f"limit is {soft} (raise it, e.g. `ulimit -n {needed}`, or lower WORKER_CONNECTIONS)")
    return soft


def _default_store(env: Mapping[str, str]) -> str:
    return "firestore" if env.get("GCP_PROJECT_ID") or env.get("FIRESTORE_EMULATOR_HOST") else "memory"


def _default_workers(env: Mapping[str, str]) -> int:
    """One gevent worker per core on a shared store; the memory store lives in one process."""
    if (env.get("CANARY_STORE") or _default_store(env)) == "memory":
        return 1
    return os.cpu_count() or 1


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def _raw(self, name: str) -> str | None:
        value = self._env.get(name, "").strip()
        return value or None

    def integer(self, name: str, default: int, low: int, high: int | None = None) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ConfigError(f"{name}={value} must be {bounds}")
        return value

    def number(self, name: str, default: float, zero: bool = False) -> float:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a number") from None
        if not (value >= 0 if zero else value > 0) or value == float("inf"):
            bound = "0 or more" if zero else "greater than 0"
            raise ConfigError(f"{name}={raw} must be a finite number, {bound}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={raw!r} is not a boolean (use true or false)")

    def choice(self, name: str, default: str, choices: tuple[str, ...],
               fold: Callable[[str], str] = lambda raw: raw) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        if fold(raw) not in choices:
            raise ConfigError(f"{name}={raw!r} is not one of: {', '.join(choices)}")
        return fold(raw)


def choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...],
           fold: Callable[[str], str] = lambda raw: raw) -> str:
    """One setting of `env` that must be one of `choices` once `fold`ed (e.g. ``str.lower``), for the settings
    read before `Config` is (logging's); raise `ConfigError` otherwise."""
    return _Reader(env).choice(name, default, choices, fold)


def _read_seed(path: str | None) -> Seed:
    """Load a seed file: ``{"<collection>": {"<docID>": {fields}}}``."""
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ConfigError(f"CANARY_SEED={path!r} cannot be read: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"CANARY_SEED={path!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not all(
        isinstance(docs, dict) and all(isinstance(d, dict) for d in docs.values())
        for docs in data.values()
    ):
        raise ConfigError(
            f"CANARY_SEED={path!r} must map collection -> document ID -> fields"
        )
    return data
