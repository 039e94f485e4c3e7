"""The JWT secret from Secret Manager, through the real client library (REST transport)
talking to a local HTTP endpoint that answers like Secret Manager."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
from conftest import ROOT, Client, Refused, free_port, owner_url, start_server

from canary import jwt_secret
from canary.config import ConfigError

SECRET_VALUE = "from-secret-manager-" + "x" * 40
PATH = "projects/canary-test/secrets/jwt-secret/versions/latest"


class FakeSecretManager(ThreadingHTTPServer):
    """Answers `GET /v1/{name}:access` as Secret Manager's REST API does."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode = "ok"
        self.requests: list[str] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeSecretManager

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        name = self.path.split("?")[0].removeprefix("/v1/").removesuffix(":access")
        if self.server.mode == "ok" and name == PATH:
            status, body = 200, {"name": name.replace("latest", "3"),
                                 "payload": {"data": base64.b64encode(SECRET_VALUE.encode()).decode()}}
        elif self.server.mode == "denied":
            status, body = 403, {"error": {"code": 403, "status": "PERMISSION_DENIED",
                                           "message": f"Permission 'secretmanager.versions.access' denied on {name}"}}
        else:
            status, body = 404, {"error": {"code": 404, "status": "NOT_FOUND",
                                           "message": f"Secret [{name}] not found or has no versions."}}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def secret_manager() -> Iterator[FakeSecretManager]:
    server = FakeSecretManager()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    thread.join(5)


def _env(endpoint: str) -> dict[str, str]:
    return {"JWT_SECRET_NAME": "jwt-secret", "GCP_PROJECT_ID": "canary-test", "SECRET_MANAGER_ENDPOINT": endpoint}


def test_the_secret_is_read_through_the_client_library(secret_manager: FakeSecretManager) -> None:
    assert jwt_secret.load(_env(secret_manager.endpoint)) == SECRET_VALUE
    assert len(secret_manager.requests) == 1
    assert secret_manager.requests[0].startswith(f"/v1/{PATH}:access")


def test_jwt_secret_in_the_environment_wins(secret_manager: FakeSecretManager) -> None:
    assert jwt_secret.load({**_env(secret_manager.endpoint), "JWT_SECRET": "env-secret"}) == "env-secret"
    assert secret_manager.requests == []


def test_no_secret_configured_means_none() -> None:
    assert jwt_secret.load({}) is None


def test_a_secret_name_without_a_project_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="GCP_PROJECT_ID"):
        jwt_secret.load({"JWT_SECRET_NAME": "jwt-secret"})


@pytest.mark.parametrize(("mode", "kind"), [("denied", "Forbidden"), ("missing", "NotFound")])
def test_refusals_name_the_secret(secret_manager: FakeSecretManager, mode: str, kind: str) -> None:
    secret_manager.mode = mode
    with pytest.raises(ConfigError) as e:
        jwt_secret.load(_env(secret_manager.endpoint))
    assert str(e.value).startswith(f"JWT secret {PATH} could not be read from Secret Manager: {kind}")


def test_no_network_fails_within_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jwt_secret, "SECRET_DEADLINE", 3.0)  # the rule, not the production figure, is tested
    started = time.monotonic()
    with pytest.raises(ConfigError) as e:
        jwt_secret.load(_env(f"http://127.0.0.1:{free_port()}"))  # nothing listens there
    assert PATH in str(e.value)
    assert time.monotonic() - started < jwt_secret.SECRET_DEADLINE + 5


def test_the_service_uses_the_secret_from_secret_manager(secret_manager: FakeSecretManager, tmp_path) -> None:
    server = start_server(tmp_path, **_env(secret_manager.endpoint))
    try:
        with pytest.raises(Refused) as e:
            Client.connect(owner_url(server, "any-batch", "alice"))
        assert e.value.status == 401
        batch, owner = server.batch()
        token = jwt.encode({"userID": owner, "email": "o@example.com", "iat": int(time.time()),
                            "exp": int(time.time()) + 600}, SECRET_VALUE, algorithm="HS256")
        host = Client.connect(owner_url(server, batch, owner) + f"&auth={token}")
        assert host.welcome["type"] == "session_created"
        host.close()
    finally:
        server.stop()
    assert len(secret_manager.requests) == 1  # read once, in the master, before the fork


def test_the_service_does_not_start_when_the_secret_cannot_be_read(secret_manager: FakeSecretManager) -> None:
    secret_manager.mode = "denied"
    env = {"PATH": "/usr/bin:/bin", "PORT": str(free_port()), **_env(secret_manager.endpoint)}
    result = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "Traceback" not in output
    assert output.strip().splitlines() == [
        f"canary: configuration error: JWT secret {PATH} could not be read from Secret Manager: "
        f"Forbidden: Permission 'secretmanager.versions.access' denied on {PATH}"]
