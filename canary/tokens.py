"""Session tokens: what a web-app join hands out and its socket brings back (HS256 JWTs).

Claims, as the Go service minted them: `userID`, `sessionID`, `batchID` (the
session's for its owner, `""` for a member), `purpose: "session-join"`,
`exp` (now + `ttl`), `iat` (now, to the millisecond: a token issued before a
member was removed must not attach it again, even within the same second).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import NamedTuple

import jwt

from .errors import Refusal
from .store import AlreadyExists, Store, StoreError

PURPOSE = "session-join"
#: Where processes without a configured JWT secret share the key they sign session tokens with.
DEV_KEY = ("collabSettings", "devSessionTokenKey")


class Claims(NamedTuple):
    user_id: str
    session_id: str
    batch_id: str  # "" in a member's token
    issued_at: datetime


class SessionTokens:
    """Mints and checks session tokens with `key`, valid for `ttl` seconds."""

    def __init__(self, key: str, ttl: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self._key = key
        self.ttl = ttl
        self._clock = clock

    def mint(self, user_id: str, session_id: str, batch_id: str) -> str:
        now = round(self._clock(), 3)
        return jwt.encode({"userID": user_id, "sessionID": session_id, "batchID": batch_id, "purpose": PURPOSE,
                           "exp": int(now + self.ttl), "iat": now}, self._key, algorithm="HS256")

    def verify(self, token: str, session_id: str) -> Claims:
        """The claims of a valid token for `session_id`; else `Refusal` 401 (`invalid token`)."""
        try:
            claims = jwt.decode(token, self._key, algorithms=["HS256"],
                                options={"require": ["exp", "iat", "userID", "sessionID", "purpose"]})
        except jwt.InvalidTokenError:
            raise Refusal(401, "invalid token") from None
        user_id, batch_id = claims.get("userID"), claims.get("batchID", "")
        if (claims.get("purpose") != PURPOSE or claims.get("sessionID") != session_id
                or not isinstance(user_id, str) or not user_id or not isinstance(batch_id, str)):
            raise Refusal(401, "invalid token")
        return Claims(user_id, session_id, batch_id, datetime.fromtimestamp(float(claims["iat"]), UTC))


def development_key(store: Store) -> str:
    """The key every process on `store` signs session tokens with when no JWT secret is configured:
    the first process to start writes a random one (an existence precondition decides), the others read it."""
    collection, doc_id = DEV_KEY
    try:
        store.transaction(lambda t: t.create(collection, doc_id, {"key": secrets.token_urlsafe(32)}))
    except AlreadyExists:
        pass
    key = (store.get(collection, doc_id) or {}).get("key")
    if not isinstance(key, str) or not key:
        raise StoreError(f"{collection}/{doc_id} holds no key")
    return key
