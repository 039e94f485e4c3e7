"""Identity: Canary's login tokens (HS256 JWTs with `userID`, `email`, `exp`, `iat`)."""

from __future__ import annotations

import time
from typing import Any

import jwt

from .errors import Refusal


class Authenticator:
    """Checks that a request carries a valid login token (for the user it names).

    With no secret the service runs open: every request is let through.
    """

    def __init__(self, secret: str | None, max_lifetime: float = 31 * 24 * 3600.0) -> None:
        self._secret = secret
        self._max_lifetime = max_lifetime

    @property
    def enabled(self) -> bool:
        return self._secret is not None

    def identify(self, token: str | None) -> dict[str, Any] | None:
        """The claims of a valid login token, or None when the service is open; raise `Refusal` 401."""
        if self._secret is None:
            return None
        if not token:
            raise Refusal(401, "a login token is required (Authorization: Bearer, or the auth query parameter)")
        try:
            claims = jwt.decode(token, self._secret, algorithms=["HS256"], options={"require": ["exp", "userID"]})
        except jwt.ExpiredSignatureError:
            raise Refusal(401, "the login token has expired") from None
        except jwt.InvalidTokenError:
            raise Refusal(401, "the login token is invalid") from None
        exp = claims["exp"]
        # PyJWT accepts a numeric string; a token that never really expires is no login either.
        if not isinstance(exp, int | float) or isinstance(exp, bool) or exp - time.time() > self._max_lifetime:
            raise Refusal(401, "the login token's expiry is not a time within the allowed lifetime")
        if not isinstance(claims["userID"], str):
            raise Refusal(401, "the login token is invalid")
        return claims

    def check(self, token: str | None, user_id: str) -> dict[str, Any]:
        """The claims of a valid login token of `user_id` ({} when the service is open); raise `Refusal` 401
        (no or bad token) or 403 (a token of another user)."""
        claims = self.identify(token)
        if claims is None:
            return {}
        if claims["userID"] != user_id:
            raise Refusal(403, "the login token belongs to another user")
        return claims


def bearer_token(authorization: str | None, query_token: str | None) -> str | None:
    """The token from `Authorization: Bearer …`, else from the `auth` query parameter."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return query_token or None
