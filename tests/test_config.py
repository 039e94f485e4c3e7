"""canary.config (validation of every setting, and a bad one stopping gunicorn with one line) and canary.auth."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import jwt
import pytest
from conftest import refused_start

from canary.auth import Authenticator, bearer_token
from canary.config import Config, ConfigError
from canary.sessions import Refusal

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-" + "x" * 64  # long enough for HS512 too, so PyJWT does not warn


def refused(env: dict[str, str], name: str) -> str:
    """The ConfigError message `env` causes; it must name the variable."""
    with pytest.raises(ConfigError) as caught:
        Config.from_env(env)
    message = str(caught.value)
    assert name in message
    return message


# -- Config.from_env ---------------------------------------------------------------

def test_defaults() -> None:
    config = Config.from_env({})
    assert config == Config()
    assert (config.port, config.jwt_secret, config.keepalive_seconds, config.idle_timeout_seconds) == \
        (8080, None, 30.0, 60.0)
    assert (config.max_message_bytes, config.client_queue_bytes, config.worker_connections) == \
        (65536, 1 << 20, 10_000)
    assert (config.store, config.seed, config.dev_api, config.cors_allow_credentials) == ("memory", {}, False, False)
    assert config.allowed_origins is None


def test_blank_values_mean_the_default() -> None:
    assert Config.from_env({"PORT": "  ", "KEEPALIVE_SECONDS": "", "JWT_SECRET": "", "CANARY_SEED": ""}) == Config()


def test_valid_values_are_read() -> None:
    config = Config.from_env({
        "PORT": " 9000 ", "JWT_SECRET": "s", "KEEPALIVE_SECONDS": "0.5", "IDLE_TIMEOUT_SECONDS": "10",
        "MAX_MESSAGE_BYTES": "64", "CLIENT_QUEUE_BYTES": "4096", "WORKER_CONNECTIONS": "1", "CANARY_STORE": "memory",
    })
    assert (config.port, config.jwt_secret, config.keepalive_seconds, config.idle_timeout_seconds) == \
        (9000, "s", 0.5, 10.0)
    assert (config.max_message_bytes, config.client_queue_bytes, config.worker_connections) == (64, 4096, 1)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "abc"), ("PORT", "80.5"), ("PORT", "0"), ("PORT", "65536"), ("PORT", "-1"),
        ("KEEPALIVE_SECONDS", "abc"), ("KEEPALIVE_SECONDS", "0"), ("KEEPALIVE_SECONDS", "-1"),
        ("KEEPALIVE_SECONDS", "nan"), ("KEEPALIVE_SECONDS", "inf"), ("IDLE_TIMEOUT_SECONDS", "inf"),
        ("FIRESTORE_TIMEOUT_SECONDS", "abc"), ("FIRESTORE_TIMEOUT_SECONDS", "0"),
        ("IDLE_TIMEOUT_SECONDS", "abc"), ("IDLE_TIMEOUT_SECONDS", "0"), ("IDLE_TIMEOUT_SECONDS", "-2.5"),
        ("MAX_MESSAGE_BYTES", "abc"), ("MAX_MESSAGE_BYTES", "63"), ("MAX_MESSAGE_BYTES", "1e6"),
        ("CLIENT_QUEUE_BYTES", "abc"), ("CLIENT_QUEUE_BYTES", "1023"),
        ("MAX_CLIENTS", "0"), ("MAX_CONNECTIONS_PER_USER", "0"), ("MAX_CONNECTIONS_PER_ADDRESS", "x"),
        ("TRUSTED_PROXIES", "-1"), ("INBOUND_FRAMES_PER_SECOND", "0"), ("SET_IMAGE_ID_PER_SECOND", "inf"),
        ("SESSION_TOKEN_SECONDS", "0"), ("MAX_LOGIN_TOKEN_SECONDS", "-5"),
        ("WORKER_CONNECTIONS", "abc"), ("WORKER_CONNECTIONS", "0"),
        ("SESSION_WRITE_SECONDS", "-1"), ("SESSION_WRITE_SECONDS", "abc"), ("SESSION_WRITE_SECONDS", "inf"),
        ("IMAGE_WRITE_SECONDS", "-1"), ("IMAGE_WRITE_SECONDS", "x"), ("IMAGE_WRITE_SECONDS", "inf"),
    ],
)
def test_numbers_are_checked(name: str, value: str) -> None:
    refused({name: value}, name)


def test_session_writes_are_paced_on_firestore_only_unless_told() -> None:
    firestore = {"CANARY_STORE": "firestore", "GCP_PROJECT_ID": "p"}
    assert Config.from_env(firestore).session_write_interval == 1.0
    assert Config.from_env({"CANARY_STORE": "memory"}).session_write_interval == 0.0
    assert Config.from_env({**firestore, "SESSION_WRITE_SECONDS": "0.25"}).session_write_interval == 0.25
    assert Config.from_env({**firestore, "SESSION_WRITE_SECONDS": "0"}).session_write_interval == 0.0


def test_member_images_are_paced_on_both_stores_unless_told() -> None:
    """The pace bounds the messages every other participant gets too, not only a document's writes."""
    assert Config.from_env({"CANARY_STORE": "firestore", "GCP_PROJECT_ID": "p"}).image_write_seconds == 1.0
    assert Config.from_env({"CANARY_STORE": "memory"}).image_write_seconds == 1.0
    assert Config.from_env({"IMAGE_WRITE_SECONDS": "0"}).image_write_seconds == 0.0


@pytest.mark.parametrize("value", ["55", "55.0", "120"])
def test_keepalive_must_stay_under_the_router_idle_cut(value: str) -> None:
    assert "55" in refused({"KEEPALIVE_SECONDS": value}, "KEEPALIVE_SECONDS")
    assert Config.from_env({"KEEPALIVE_SECONDS": "54.9"}).keepalive_seconds == 54.9


@pytest.mark.parametrize("name", ["CORS_ALLOW_CREDENTIALS", "CANARY_DEV_API"])
def test_booleans(name: str) -> None:
    attribute = {"CORS_ALLOW_CREDENTIALS": "cors_allow_credentials", "CANARY_DEV_API": "dev_api"}[name]
    for value in ("1", "true", "TRUE", "yes", "on"):
        assert getattr(Config.from_env({name: value}), attribute) is True, value
    for value in ("0", "false", "No", "off"):
        assert getattr(Config.from_env({name: value}), attribute) is False, value
    refused({name: "maybe"}, name)


@pytest.mark.parametrize("value", ["Memory", "redis", "sqlite"])
def test_unknown_stores_are_refused(value: str) -> None:
    refused({"CANARY_STORE": value}, "CANARY_STORE")


def test_a_valid_seed_loads(tmp_path: Path) -> None:
    seed = {"users": {"u1": {"email": "u1@example.com"}}, "batches": {}}
    path = tmp_path / "seed.json"
    path.write_text(json.dumps(seed))
    assert Config.from_env({"CANARY_SEED": str(path)}).seed == seed


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "cannot be read"),  # missing file
        ("<dir>", "cannot be read"),
        ("{not json", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        ("[]", "must map"),
        ('{"users": []}', "must map"),
        ('{"users": {"u1": 3}}', "must map"),
        ('"users"', "must map"),
    ],
    ids=["missing", "directory", "bad-json", "not-utf8", "list", "collection-list", "doc-number", "string"],
)
def test_bad_seeds_are_refused(tmp_path: Path, content: str | bytes | None, words: str) -> None:
    path = tmp_path / "seed.json"
    if content == "<dir>":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert words in refused({"CANARY_SEED": str(path)}, "CANARY_SEED")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("*", None),
        ("", None),
        (" , ", None),
        ("https://a.example, *", None),
        ("https://a.example", frozenset({"https://a.example"})),
        (" https://a.example ,https://b.example,, ", frozenset({"https://a.example", "https://b.example"})),
    ],
)
def test_allowed_origins(value: str, expected: frozenset[str] | None) -> None:
    assert Config.from_env({"CORS_ALLOW_ORIGIN": value}).allowed_origins == expected


def test_client_capacity_keeps_a_reserve_below_worker_connections() -> None:
    assert Config.from_env({"WORKER_CONNECTIONS": "10000"}).client_capacity == 9500
    assert Config.from_env({"WORKER_CONNECTIONS": "100"}).client_capacity == 84
    assert Config.from_env({"WORKER_CONNECTIONS": "100", "MAX_CLIENTS": "100"}).client_capacity == 100
    refused({"WORKER_CONNECTIONS": "100", "MAX_CLIENTS": "101"}, "MAX_CLIENTS")


# -- gunicorn start-up ------------------------------------------------------------------

@pytest.mark.parametrize(
    ("variable", "env"),
    [("PORT", {"PORT": "abc"}), ("CANARY_SEED", {"CANARY_SEED": "/nonexistent.json"})],
    ids=["bad-port", "missing-seed"],
)
def test_gunicorn_stops_with_one_clear_line(variable: str, env: dict[str, str]) -> None:
    refused_start(variable, env)


def test_gunicorn_stops_when_the_open_files_limit_cannot_hold_worker_connections() -> None:
    """The soft limit is raised to the hard one first; a hard limit of 512 cannot hold 1,000 sockets."""
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 512))
    output = refused_start("WORKER_CONNECTIONS", {"WORKER_CONNECTIONS": "1000"}, low_limit)
    assert "the limit is 512" in output


# -- canary.auth ----------------------------------------------------------------------------

def token(claims: dict[str, object] | None = None, *, secret: str = SECRET, algorithm: str = "HS256",
          expires_in: float | None = 300) -> str:
    body: dict[str, object] = {"userID": "u1", "email": "u1@example.com", "iat": int(time.time())}
    if expires_in is not None:
        body["exp"] = int(time.time() + expires_in)
    body.update(claims or {})
    return jwt.encode({k: v for k, v in body.items() if v is not None}, secret, algorithm=algorithm)


def test_without_a_secret_everyone_passes() -> None:
    auth = Authenticator(None)
    assert auth.enabled is False
    auth.check(None, "anyone")
    auth.check("garbage", "anyone")


@pytest.mark.parametrize(
    "bad",
    [
        None,
        "",
        "garbage",
        "a.b.c",
        token(expires_in=-60),
        token(secret=SECRET + "-other"),
        token(algorithm="HS512"),
        token(expires_in=None),
        token({"userID": None}),
    ],
    ids=["missing", "empty", "garbage", "three-parts", "expired", "wrong-signature", "hs512", "no-exp",
         "no-userID"],
)
def test_bad_tokens_get_401(bad: str | None) -> None:
    auth = Authenticator(SECRET)
    assert auth.enabled is True
    with pytest.raises(Refusal) as caught:
        auth.check(bad, "u1")
    assert caught.value.status == 401


def test_another_users_token_gets_403() -> None:
    with pytest.raises(Refusal) as caught:
        Authenticator(SECRET).check(token({"userID": "u2"}), "u1")
    assert caught.value.status == 403


def test_a_valid_token_passes() -> None:
    Authenticator(SECRET).check(token(), "u1")


@pytest.mark.parametrize(
    ("authorization", "query", "expected"),
    [
        ("Bearer header-token", "query-token", "header-token"),
        ("bearer  header-token ", None, "header-token"),
        ("Basic dXNlcjpwdw==", "query-token", "query-token"),
        ("Bearer ", "query-token", "query-token"),
        ("Bearer", "query-token", "query-token"),
        (None, "query-token", "query-token"),
        ("", "", None),
        (None, None, None),
    ],
)
def test_bearer_token(authorization: str | None, query: str | None, expected: str | None) -> None:
    assert bearer_token(authorization, query) == expected


@pytest.mark.parametrize(("env", "store"), [
    ({}, "memory"),
    ({"GCP_PROJECT_ID": "p"}, "firestore"),
    ({"FIRESTORE_EMULATOR_HOST": "127.0.0.1:8681"}, "firestore"),
    ({"GCP_PROJECT_ID": "p", "CANARY_STORE": "memory"}, "memory"),
    ({"CANARY_STORE": "firestore", "GCP_PROJECT_ID": "p"}, "firestore"),
])
def test_store_selection(env: dict[str, str], store: str) -> None:
    assert Config.from_env(env).store == store


def test_firestore_settings() -> None:
    config = Config.from_env({"GCP_PROJECT_ID": "canary-prod", "FIRESTORE_DATABASE": "collab"})
    assert (config.firestore_project, config.firestore_database) == ("canary-prod", "collab")
    emulated = Config.from_env({"FIRESTORE_EMULATOR_HOST": "127.0.0.1:8681"})
    assert (emulated.firestore_project, emulated.firestore_database) == ("demo-canary", "(default)")


def test_firestore_needs_a_project() -> None:
    refused({"CANARY_STORE": "firestore"}, "GCP_PROJECT_ID")


def test_a_seed_is_never_written_to_a_real_project(tmp_path) -> None:
    seed = tmp_path / "seed.json"
    seed.write_text('{"users": {"u": {"email": "u@example.com"}}}')
    refused({"GCP_PROJECT_ID": "canary-prod", "CANARY_SEED": str(seed)}, "CANARY_SEED")
    assert Config.from_env({"FIRESTORE_EMULATOR_HOST": "127.0.0.1:1", "CANARY_SEED": str(seed)}).seed


def test_several_workers_need_a_shared_store() -> None:
    refused({"WEB_CONCURRENCY": "2"}, "WEB_CONCURRENCY")
    refused({"WEB_CONCURRENCY": "zero"}, "WEB_CONCURRENCY")
    assert Config.from_env({"WEB_CONCURRENCY": "2", "GCP_PROJECT_ID": "p"}).web_concurrency == 2
