"""Identity: Canary's login tokens (HS256 JWTs with `userID`, `email`, `exp`, `iat`)."""

from __future__ import annotations

import jwt

from .errors import Refusal


class Authenticator:
    """Checks that a request carries a valid login token for the user it names.

    With no secret the service runs open: every request is let through.
    """

    def __init__(self, secret: str | None) -> None:
        self._secret = secret

    @property
    def enabled(self) -> bool:
        return self._secret is not None

    def check(self, token: str | None, user_id: str) -> None:
        """Raise `Refusal` 401 (no or bad token) or 403 (token of another user)."""
        if self._secret is None:
            return
        if not token:
            raise Refusal(401, "a login token is required (Authorization: Bearer, or the auth query parameter)")
        try:
            claims = jwt.decode(token, self._secret, algorithms=["HS256"],
                                options={"require": ["exp", "userID"]})
        except jwt.ExpiredSignatureError:
            raise Refusal(401, "the login token has expired") from None
        except jwt.InvalidTokenError:
            raise Refusal(401, "the login token is invalid") from None
        if claims["userID"] != user_id:
            raise Refusal(403, "the login token belongs to another user")


def bearer_token(authorization: str | None, query_token: str | None) -> str | None:
    """The token from `Authorization: Bearer …`, else from the `auth` query parameter."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return query_token or None
