"""Start-up secrets: the JWT secret from the environment or from Secret Manager.

As the Go service did: `JWT_SECRET` wins; else, when `JWT_SECRET_NAME` is set,
`projects/{GCP_PROJECT_ID}/secrets/{JWT_SECRET_NAME}/versions/latest` is read.
It runs once, in the gunicorn master before the workers fork, over Secret
Manager's REST transport (no gRPC channel exists before the fork).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .config import ConfigError

#: Overall deadline for reading the secret, retries included (seconds).
SECRET_DEADLINE = 15.0


def load(env: Mapping[str, str]) -> str | None:
    """The JWT secret the environment points at, or None; raises `ConfigError` naming the secret."""
    if env.get("JWT_SECRET"):
        return env["JWT_SECRET"]
    name = env.get("JWT_SECRET_NAME", "").strip()
    if not name:
        return None
    project = env.get("GCP_PROJECT_ID", "").strip()
    if not project:
        raise ConfigError("JWT_SECRET_NAME is set but GCP_PROJECT_ID is not: cannot locate the secret")
    path = f"projects/{project}/secrets/{name}/versions/latest"
    try:
        value = _access(path, env.get("SECRET_MANAGER_ENDPOINT", "").strip() or None)
    except Exception as e:  # every failure ends start-up the same way: one line naming the secret
        # REST errors read "GET <url>: <message>"; the URL only repeats the path.
        reason = re.sub(r"^[A-Z]+ \S+: ", "", getattr(e, "message", None) or str(e)) or "no detail"
        raise ConfigError(f"JWT secret {path} could not be read from Secret Manager: "
                          f"{type(e).__name__}: {reason}") from None
    if not value:
        raise ConfigError(f"JWT secret {path} is empty")
    return value


def _access(path: str, endpoint: str | None) -> str:
    from google.api_core.client_options import ClientOptions
    from google.api_core.retry import Retry
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import secretmanager

    options = ClientOptions(api_endpoint=endpoint) if endpoint else None
    # A plain-HTTP endpoint is a local stand-in (tests, development): no credentials to send.
    credentials = AnonymousCredentials() if endpoint and endpoint.startswith("http://") else None
    client = secretmanager.SecretManagerServiceClient(
        transport="rest", client_options=options, credentials=credentials)
    try:
        response = client.access_secret_version(
            name=path, timeout=SECRET_DEADLINE / 3,
            retry=Retry(initial=0.5, maximum=2.0, timeout=SECRET_DEADLINE))
    finally:
        client.transport.close()
    return response.payload.data.decode("utf-8")
