"""Session-password guessing, throttled: failed password joins counted in the store, for every process.

A web-app join of a session with a password runs bcrypt (about 0.1 s of CPU), so without a limit a
guesser tries dozens of passwords a second per worker. Each wrong password is counted twice:

- per (session, user): `user_failures` (5) within `window_seconds` (60) lock that user out of that
  session: every attempt, the right password included, is refused 429 with `Retry-After`, before bcrypt.
  Nobody else is affected: the other members of the session have counters of their own.
- per client address (as the edge derives it behind `TRUSTED_PROXIES`; None: not counted): for a guesser
  who changes user IDs. Its threshold, `address_failures` (20), is higher, because a classroom or an
  office behind one NAT shares one address: many people mistyping (or a password written wrong on the
  board) must not lock them all out at once; 0 turns it off.

The first lock-out lasts one window; each further one (while the counter remembers the last) twice the
previous, up to `max_lockout_seconds` (900). A counter forgets its lock-outs `max_lockout_seconds` after
the last one ended, and a window's failures when the window ends. A success resets the user's counter
for that session (not the address's: a guesser could otherwise reset it with a session of its own).

Each counter is one small document of `passwordThrottles` (`failures`, `windowUntil`, `lockouts`,
`lockedUntil`, `expireAt`), updated in a transaction, so every process sees the same counts. A
document past its `expireAt` counts as absent: a Firestore TTL policy on `expireAt` may delete it any
time after. Store costs: a session without a password, nothing; with one, one read (both counters in one
call) before bcrypt; a right password writes nothing unless the user's counter held failures (then one
delete); a wrong one, one transaction over both counters; a throttled attempt, the read only.

Racing attempts can each be checked before any of them is counted. This process lets no more of one
user's attempts at one session be checked at once than it has failures left; across processes, and for
one address over several user IDs, the overshoot is at most those in flight. (Reserving each attempt in
the store before bcrypt would close it, at a write per right password too.)

Sans I/O: a `Store` and a clock; no Flask, gevent or Firestore.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from hashlib import sha256
from typing import Any

from .errors import Refusal
from .session_writer import presence_id
from .store import PASSWORD_THROTTLES, Data, Store, StoreError, Transaction

log = logging.getLogger(__name__)

#: The counters, as `on_throttled` names the one that refused an attempt.
USER = "user"
ADDRESS = "address"


@dataclass(frozen=True)
class ThrottleLimits:
    """Failures each counter takes within `window_seconds` before it locks (address: 0 is never), and the
    longest lock-out."""

    user_failures: int = 5
    address_failures: int = 20
    window_seconds: float = 60.0
    max_lockout_seconds: float = 900.0


def user_key(session_id: str, user_id: str) -> str:
    """The counter document of `user_id`'s password joins of `session_id`: its presence key, prefixed (within
    Firestore's key limit as ids.py bounds that key)."""
    return "user_" + presence_id(session_id, user_id)


def address_key(address: str) -> str:
    """The counter document of a client address: hashed, so that no address is stored and whatever the
    proxies pass makes a valid document ID."""
    return "address_" + sha256(address.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _now() -> datetime:
    return datetime.now(UTC)


def _time(value: Any) -> datetime | None:
    return value if isinstance(value, datetime) else None


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


@dataclass(frozen=True)
class _Counter:
    """One counter as of `now`: failures of the window still running, lock-outs remembered."""

    failures: int = 0
    window_until: datetime | None = None
    lockouts: int = 0
    locked_until: datetime | None = None
    #: A live document holds it (a reset has something to delete).
    stored: bool = False

    @classmethod
    def read(cls, doc: Data | None, now: datetime) -> _Counter:
        expire_at = _time((doc or {}).get("expireAt"))
        if doc is None or expire_at is None or expire_at <= now:
            return cls()
        window_until = _time(doc.get("windowUntil"))
        failures = _count(doc.get("failures")) if window_until is not None and window_until > now else 0
        return cls(failures, window_until, _count(doc.get("lockouts")), _time(doc.get("lockedUntil")), True)

    def wait(self, now: datetime) -> float:
        """Seconds during which every attempt is still refused (0: none)."""
        return max(0.0, (self.locked_until - now).total_seconds()) if self.locked_until is not None else 0.0

    def failed(self, now: datetime, threshold: int, limits: ThrottleLimits) -> tuple[_Counter, float]:
        """This counter after one more failure at `now`, and the seconds of the lock-out that starts (0: none)."""
        if self.failures:
            failures, window_until = self.failures + 1, self.window_until
        else:
            failures, window_until = 1, now + timedelta(seconds=limits.window_seconds)
        if failures < threshold:
            return _Counter(failures, window_until, self.lockouts, self.locked_until, True), 0.0
        lockout = min(limits.window_seconds * 2 ** min(self.lockouts, 32), limits.max_lockout_seconds)
        locked_until = now + timedelta(seconds=lockout)
        if self.locked_until is not None and self.locked_until > locked_until:
            locked_until = self.locked_until
        return _Counter(0, window_until, self.lockouts + 1, locked_until, True), lockout

    def document(self, limits: ThrottleLimits, **fields: str) -> Data:
        ends = max(t for t in (self.window_until, self.locked_until) if t is not None)
        # Lock-outs are remembered for a longest lock-out after the last one ends, failures for their window.
        expire_at = ends + timedelta(seconds=limits.max_lockout_seconds) if self.lockouts else ends
        return {**fields, "failures": self.failures, "windowUntil": self.window_until, "lockouts": self.lockouts,
                "lockedUntil": self.locked_until, "expireAt": expire_at}


def _refusal(seconds: float, reason: str) -> Refusal:
    wait = max(1, math.ceil(seconds))
    unit = "second" if wait == 1 else "seconds"
    return Refusal(429, f"{reason}; try again in {wait} {unit}", headers={"Retry-After": str(wait)})


class Guess:
    """A password attempt `PasswordThrottle.attempt` let through to bcrypt: tell it how it went."""

    def __init__(self, throttle: PasswordThrottle, keys: dict[str, str], counters: dict[str, _Counter],
                 fields: dict[str, dict[str, str]], what: dict[str, str]) -> None:
        self._throttle = throttle
        self._keys = keys
        self._counters = counters
        self._fields = fields
        self._what = what

    def failed(self) -> None:
        """A wrong password: one more failure on each counter (one transaction)."""
        self._throttle._failed(self._keys, self._fields, self._what)

    def succeeded(self) -> None:
        """The right password: the user's count for this session starts again (nothing to write if it had
        none). A reset the store fails is only logged: the join itself succeeded."""
        if self._counters[USER].stored:
            try:
                self._throttle._store.delete(PASSWORD_THROTTLES, self._keys[USER])
            except StoreError as e:
                log.warning("could not reset the password failures of %s: %s", self._what[USER], e)


class PasswordThrottle:
    """Failed session-password joins, counted in `store` for every process (see the module's docstring).
    `on_failure()` is called for each wrong password, `on_throttled(counter)` for each attempt refused 429
    (`USER` or `ADDRESS`: the counter that refused it)."""

    def __init__(self, store: Store, limits: ThrottleLimits | None = None, *, clock: Callable[[], datetime] = _now,
                 on_failure: Callable[[], None] = lambda: None,
                 on_throttled: Callable[[str], None] = lambda _counter: None) -> None:
        self._store = store
        self._limits = limits or ThrottleLimits()
        self._clock = clock
        self._on_failure = on_failure
        self._on_throttled = on_throttled
        self._lock = threading.Lock()
        self._checking: Counter[str] = Counter()  # this process's attempts being checked, by user counter

    @property
    def limits(self) -> ThrottleLimits:
        return self._limits

    @contextmanager
    def attempt(self, session_id: str, user_id: str, address: str | None) -> Iterator[Guess]:
        """Let one attempt of `user_id` at `session_id`'s password, from `address` (None: not counted by
        address), through to bcrypt, and yield the `Guess` to report its outcome on; or raise `Refusal` 429
        with `Retry-After` while a counter is locked, or while as many of this user's attempts as it has
        failures left are being checked already. One store read."""
        keys = {USER: user_key(session_id, user_id)}
        fields = {USER: {"kind": USER, "sessionID": session_id, "userID": user_id}}
        what = {USER: f"user {user_id!r} of session {session_id}"}
        if address is not None and self._limits.address_failures:
            keys[ADDRESS] = address_key(address)
            fields[ADDRESS] = {"kind": ADDRESS}
            what[ADDRESS] = f"address {address}"
        docs = self._store.get_many(PASSWORD_THROTTLES, list(keys.values()))
        now = self._clock()
        counters = {kind: _Counter.read(docs.get(key), now) for kind, key in keys.items()}
        kind, wait = max(((kind, c.wait(now)) for kind, c in counters.items()), key=lambda kw: kw[1])
        if wait > 0:
            self._on_throttled(kind)
            raise _refusal(wait, "Too many wrong passwords")
        key = keys[USER]
        with self._lock:
            admitted = counters[USER].failures + self._checking[key] < self._limits.user_failures
            if admitted:
                self._checking[key] += 1
        if not admitted:
            self._on_throttled(USER)
            raise _refusal(1, "Another attempt to join is being checked")
        try:
            yield Guess(self, keys, counters, fields, what)
        finally:
            with self._lock:
                self._checking[key] -= 1
                if self._checking[key] <= 0:
                    del self._checking[key]

    def _threshold(self, kind: str) -> int:
        return self._limits.user_failures if kind == USER else self._limits.address_failures

    def _failed(self, keys: dict[str, str], fields: dict[str, dict[str, str]], what: dict[str, str]) -> None:
        def record(t: Transaction) -> dict[str, float]:
            now = self._clock()
            docs = t.get_many(PASSWORD_THROTTLES, list(keys.values()))
            lockouts = {}
            for kind, key in keys.items():
                counter, lockout = _Counter.read(docs.get(key), now).failed(now, self._threshold(kind), self._limits)
                t.set(PASSWORD_THROTTLES, key, counter.document(self._limits, **fields[kind]))
                if lockout:
                    lockouts[kind] = lockout
            return lockouts

        lockouts = self._store.transaction(record)
        self._on_failure()
        for kind, seconds in lockouts.items():
            context = {k: v for k, v in fields[kind].items() if k in ("sessionID", "userID")}  # JSON logs' fields
            log.warning("password guessing: %s locked out for %g s", what[kind], seconds, extra=context)
