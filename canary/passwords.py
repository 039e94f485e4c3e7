"""Session passwords, stored as bcrypt hashes (cost 10, as the Go service wrote them: `$2a$`/`$2b$`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import bcrypt

from .errors import Refusal

T = TypeVar("T")
#: Runs a CPU-bound call somewhere it does not hold up the caller's event loop (a thread), returning its result.
Offload = Callable[..., Any]

COST = 10
#: bcrypt reads at most this many bytes of a password: the bcrypt package refuses longer ones (ValueError)
#: rather than cut them, and so does Go's x/crypto/bcrypt when it hashes, since 2022.
MAX_BYTES = 72


def check(password: str) -> bytes:
    """`password` as bcrypt takes it (UTF-8), or `Refusal` 400 when it cannot be a session password."""
    try:
        encoded = password.encode()
    except UnicodeEncodeError:  # a lone surrogate (a JSON "\ud800")
        raise Refusal(400, "Invalid request: the password is not valid text") from None
    if len(encoded) > MAX_BYTES:
        raise Refusal(400, f"The password is too long: at most {MAX_BYTES} bytes (in UTF-8)")
    return encoded


def _direct(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


class BcryptPasswords:
    """`sessions.Passwords` on bcrypt. A hash takes about 0.1 s of CPU: `offload` (the app passes gevent's
    thread pool; bcrypt releases the GIL) keeps it off the event loop."""

    def __init__(self, offload: Offload = _direct) -> None:
        self._offload = offload

    def hash(self, password: str) -> str:
        """The hash to store; `Refusal` 400 for a password bcrypt cannot take (`check`)."""
        return self._offload(_hash, check(password))

    def verify(self, password: str, hashed: str) -> bool:
        """Whether `password` is the one `hashed` was made from; `Refusal` 400 as `hash`."""
        return self._offload(_verify, check(password), hashed.encode())


def _hash(password: bytes) -> str:
    return bcrypt.hashpw(password, bcrypt.gensalt(COST)).decode()


def _verify(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # not a bcrypt hash
        return False
