"""Session passwords, stored as bcrypt hashes (cost 10, as the Go service wrote them: `$2a$`/`$2b$`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import bcrypt

T = TypeVar("T")
#: Runs a CPU-bound call somewhere it does not hold up the caller's event loop (a thread), returning its result.
Offload = Callable[..., Any]

COST = 10


def _direct(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


class BcryptPasswords:
    """`sessions.Passwords` on bcrypt. A hash takes about 0.1 s of CPU: `offload` (the app passes gevent's
    thread pool; bcrypt releases the GIL) keeps it off the event loop."""

    def __init__(self, offload: Offload = _direct) -> None:
        self._offload = offload

    def hash(self, password: str) -> str:
        return self._offload(_hash, password.encode())

    def verify(self, password: str, hashed: str) -> bool:
        return self._offload(_verify, password.encode(), hashed.encode())


def _hash(password: bytes) -> str:
    return bcrypt.hashpw(password, bcrypt.gensalt(COST)).decode()


def _verify(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # not a bcrypt hash
        return False
