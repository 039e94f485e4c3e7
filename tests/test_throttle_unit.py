"""canary.throttle without I/O (a MemoryStore that counts its calls, a clock the test moves), its use by
SessionManager.grant, passwords.check, and the settings that configure them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import refused_start

from canary.config import Config, ConfigError
from canary.errors import Refusal
from canary.memory_store import MemoryStore
from canary.passwords import MAX_BYTES, check
from canary.sessions import SessionManager
from canary.store import PASSWORD_THROTTLES, SESSIONS, Data, T, Transaction
from canary.throttle import ADDRESS, USER, PasswordThrottle, ThrottleLimits, address_key, user_key

LIMITS = ThrottleLimits(user_failures=5, address_failures=8, window_seconds=60, max_lockout_seconds=150)


class CountingStore(MemoryStore):
    """A MemoryStore that counts reads (`get`/`get_many` calls) and writes (transactions, sets, deletes)."""

    def __init__(self, seed: dict[str, dict[str, Data]] | None = None) -> None:
        super().__init__(seed)
        self.calls: Counter[str] = Counter()

    def get_many(self, collection: str, doc_ids: list[str]) -> dict[str, Data | None]:
        self.calls["read"] += 1
        return {doc_id: self._read(collection, doc_id) for doc_id in doc_ids}

    def transaction(self, fn: Callable[[Transaction], T]) -> T:
        self.calls["write"] += 1
        return super().transaction(fn)

    def delete(self, collection: str, doc_id: str) -> None:
        self.calls["delete"] += 1
        MemoryStore.transaction(self, lambda t: t.delete(collection, doc_id))  # not also counted as a write


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def store() -> CountingStore:
    return CountingStore()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def events() -> list[str]:
    return []


@pytest.fixture
def throttle(store: CountingStore, clock: Clock, events: list[str]) -> PasswordThrottle:
    return PasswordThrottle(store, LIMITS, clock=clock, on_failure=lambda: events.append("failure"),
                            on_throttled=lambda counter: events.append(f"throttled:{counter}"))


def guess(throttle: PasswordThrottle, right: bool, user: str = "mallory", address: str | None = "192.0.2.1",
          session: str = "s1") -> None:
    """One attempt: through the throttle (which may refuse it), then its outcome reported."""
    with throttle.attempt(session, user, address) as attempt:
        if right:
            attempt.succeeded()
        else:
            attempt.failed()


def refused(throttle: PasswordThrottle, **kwargs: Any) -> Refusal:
    with pytest.raises(Refusal) as caught:
        guess(throttle, right=True, **kwargs)
    assert caught.value.status == 429
    return caught.value


def test_five_failures_lock_the_user_out_for_a_window_even_with_the_right_password(
        throttle: PasswordThrottle, store: CountingStore, clock: Clock, events: list[str]) -> None:
    for _ in range(5):
        guess(throttle, right=False)
    refusal = refused(throttle)
    assert refusal.headers == {"Retry-After": "60"}
    assert refusal.message == "Too many wrong passwords; try again in 60 seconds"
    assert events == ["failure"] * 5 + ["throttled:user"]
    clock.advance(59.5)
    assert refused(throttle).headers == {"Retry-After": "1"}
    clock.advance(0.5)
    guess(throttle, right=True)  # the window is over
    assert store.get(PASSWORD_THROTTLES, user_key("s1", "mallory")) is None  # and the success reset it


def test_failures_older_than_the_window_are_forgotten(throttle: PasswordThrottle, clock: Clock) -> None:
    for _ in range(4):
        guess(throttle, right=False)
    clock.advance(60)
    for _ in range(4):
        guess(throttle, right=False)
    guess(throttle, right=True)


def test_each_lockout_lasts_twice_the_previous_up_to_the_cap(throttle: PasswordThrottle, clock: Clock) -> None:
    waits = []
    for _ in range(4):
        for _ in range(5):
            guess(throttle, right=False)
        wait = int(refused(throttle).headers["Retry-After"])
        waits.append(wait)
        clock.advance(wait)
    assert waits == [60, 120, 150, 150]
    # Lock-outs are forgotten a longest lock-out after the last one ended: then a window again.
    clock.advance(150)
    for _ in range(5):
        guess(throttle, right=False)
    assert refused(throttle).headers == {"Retry-After": "60"}


def test_a_success_resets_the_users_count_for_that_session_only(throttle: PasswordThrottle) -> None:
    for _ in range(4):
        guess(throttle, right=False, address=None)
        guess(throttle, right=False, address=None, session="s2")
    guess(throttle, right=True, address=None)
    for _ in range(4):
        guess(throttle, right=False, address=None)
    guess(throttle, right=False, address=None, session="s2")
    refused(throttle, address=None, session="s2")
    guess(throttle, right=True, address=None)


def test_other_users_are_never_throttled_by_someone_elses_guessing(throttle: PasswordThrottle) -> None:
    for _ in range(5):
        guess(throttle, right=False, address="192.0.2.1")
    refused(throttle, address="192.0.2.1")
    guess(throttle, right=True, user="bob", address="198.51.100.2")
    guess(throttle, right=True, user="carol", address="192.0.2.1")  # the same address: 5 of its 8 failures


def test_an_address_is_locked_out_after_more_failures_over_many_user_ids(
        throttle: PasswordThrottle, events: list[str]) -> None:
    for n in range(8):
        guess(throttle, right=False, user=f"sock-puppet-{n}")
    refusal = refused(throttle, user="fresh-id")
    assert refusal.headers == {"Retry-After": "60"}
    assert events[-1] == f"throttled:{ADDRESS}"
    refused(throttle, user="fresh-id", session="another-session")  # the address, in every session
    guess(throttle, right=True, user="fresh-id", address="198.51.100.2")
    guess(throttle, right=True, user="fresh-id", address=None)  # not counted by address (loopback)


def test_the_address_counter_can_be_turned_off(store: CountingStore, clock: Clock) -> None:
    throttle = PasswordThrottle(store, ThrottleLimits(address_failures=0), clock=clock)
    for n in range(30):
        guess(throttle, right=False, user=f"sock-puppet-{n}")
    guess(throttle, right=True, user="fresh-id")
    assert all(not doc_id.startswith("address_") for doc_id, _ in store.documents(PASSWORD_THROTTLES))


def test_the_success_path_costs_one_read_and_no_write(throttle: PasswordThrottle, store: CountingStore) -> None:
    guess(throttle, right=True)
    assert store.calls == {"read": 1}
    store.calls.clear()
    guess(throttle, right=False)  # a failure: one transaction over both counters
    assert store.calls == {"read": 1, "write": 1}
    assert {d.id for d in store.documents(PASSWORD_THROTTLES)} == {user_key("s1", "mallory"),
                                                                    address_key("192.0.2.1")}
    store.calls.clear()
    guess(throttle, right=True)  # a success after failures: one delete (the user's counter)
    assert store.calls == {"read": 1, "delete": 1}
    for _ in range(5):
        guess(throttle, right=False)
    store.calls.clear()
    refused(throttle)  # throttled: the read only
    assert store.calls == {"read": 1}


def test_counters_carry_an_expiry_and_count_as_absent_after_it(
        throttle: PasswordThrottle, store: CountingStore, clock: Clock) -> None:
    guess(throttle, right=False)
    doc = store.get(PASSWORD_THROTTLES, user_key("s1", "mallory"))
    assert doc is not None
    assert (doc["kind"], doc["sessionID"], doc["userID"], doc["failures"]) == (USER, "s1", "mallory", 1)
    assert doc["expireAt"] == clock.now + timedelta(seconds=60)
    assert "address" not in store.get(PASSWORD_THROTTLES, address_key("192.0.2.1"))  # no address is stored
    for _ in range(4):
        guess(throttle, right=False)
    doc = store.get(PASSWORD_THROTTLES, user_key("s1", "mallory"))
    assert doc["lockouts"] == 1
    assert doc["lockedUntil"] == clock.now + timedelta(seconds=60)
    assert doc["expireAt"] == doc["lockedUntil"] + timedelta(seconds=150)
    # A TTL policy deletes a document some time after its expireAt: until then it must mean nothing.
    store.set(PASSWORD_THROTTLES, user_key("s1", "mallory"), {**doc, "expireAt": clock.now})
    store.calls.clear()
    guess(throttle, right=True)
    assert store.calls == {"read": 1}  # nothing to reset either


def test_malformed_counters_count_as_absent(throttle: PasswordThrottle, store: CountingStore, clock: Clock) -> None:
    store.set(PASSWORD_THROTTLES, user_key("s1", "mallory"),
              {"failures": "many", "lockedUntil": "soon", "expireAt": clock.now + timedelta(hours=1)})
    guess(throttle, right=False)
    assert store.get(PASSWORD_THROTTLES, user_key("s1", "mallory"))["failures"] == 1


def test_no_more_of_a_users_attempts_are_checked_at_once_than_it_has_failures_left(
        throttle: PasswordThrottle) -> None:
    for _ in range(3):
        guess(throttle, right=False)
    with throttle.attempt("s1", "mallory", None), throttle.attempt("s1", "mallory", None):
        refusal = refused(throttle)
        assert refusal.headers == {"Retry-After": "1"}
        guess(throttle, right=True, user="bob")
    guess(throttle, right=True)  # the two attempts are over (and reported nothing)


# -- SessionManager.grant through the throttle ------------------------------------------------------

class Passwords:
    """Plain-text "hashes", counting the checks (bcrypt's cost)."""

    def __init__(self) -> None:
        self.checks = 0

    def hash(self, password: str) -> str:
        return f"hashed:{password}"

    def verify(self, password: str, hashed: str) -> bool:
        self.checks += 1
        return hashed == f"hashed:{password}"


def test_grant_refuses_a_throttled_attempt_without_checking_the_password(
        store: CountingStore, throttle: PasswordThrottle) -> None:
    store.set(SESSIONS, "s1", {"owner": {"id": "owner"}, "batchID": "b1", "projectID": "p1", "members": [],
                               "password": "hashed:right", "persistent": True,
                               "lastUpdated": datetime(2026, 1, 1, tzinfo=UTC)})
    passwords = Passwords()
    sessions = SessionManager(store, passwords=passwords)

    def grant(user: str, password: str) -> int:
        try:
            sessions.grant("s1", user, password, f"{user}@example.com", throttle=throttle, address="192.0.2.1")
        except Refusal as e:
            return e.status
        return 200

    assert [grant("mallory", "wrong") for _ in range(5)] == [403] * 5
    assert passwords.checks == 5
    assert [grant("mallory", "wrong"), grant("mallory", "right")] == [429, 429]
    assert passwords.checks == 5
    assert grant("bob", "right") == 200
    assert grant("mallory", "") == 400  # no password: nothing to check, nothing counted


# -- passwords.check -----------------------------------------------------------------------------------

def test_passwords_bcrypt_cannot_take_are_refused_400() -> None:
    assert check("x" * MAX_BYTES) == b"x" * MAX_BYTES
    assert check("é" * 36) == "é".encode() * 36
    for password in ("x" * 73, "é" * 37, "\ud800"):
        with pytest.raises(Refusal) as caught:
            check(password)
        assert caught.value.status == 400


# -- the settings ----------------------------------------------------------------------------------------

def test_settings_defaults_and_values() -> None:
    config = Config.from_env({})
    assert (config.password_failures_per_user, config.password_failures_per_address, config.password_window_seconds,
            config.password_lockout_max_seconds) == (5, 20, 60.0, 900.0)
    assert (config.max_body_bytes, config.body_timeout_seconds) == (16384, 2.0)
    config = Config.from_env({"PASSWORD_FAILURES_PER_USER": "3", "PASSWORD_FAILURES_PER_ADDRESS": "0",
                              "PASSWORD_WINDOW_SECONDS": "2.5", "PASSWORD_LOCKOUT_MAX_SECONDS": "2.5",
                              "MAX_BODY_BYTES": "1024", "BODY_TIMEOUT_SECONDS": "0.5"})
    assert (config.password_failures_per_user, config.password_failures_per_address, config.password_window_seconds,
            config.password_lockout_max_seconds) == (3, 0, 2.5, 2.5)
    assert (config.max_body_bytes, config.body_timeout_seconds) == (1024, 0.5)


@pytest.mark.parametrize(("name", "value"), [
    ("PASSWORD_FAILURES_PER_USER", "0"), ("PASSWORD_FAILURES_PER_USER", "five"),
    ("PASSWORD_FAILURES_PER_ADDRESS", "-1"), ("PASSWORD_WINDOW_SECONDS", "0"),
    ("PASSWORD_LOCKOUT_MAX_SECONDS", "inf"), ("PASSWORD_LOCKOUT_MAX_SECONDS", "30"),
    ("MAX_BODY_BYTES", "100"), ("BODY_TIMEOUT_SECONDS", "-1"),
])
def test_bad_settings_are_refused_naming_them(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_env({name: value})
    assert name in str(caught.value)


def test_a_bad_setting_stops_gunicorn_with_one_line() -> None:
    refused_start("PASSWORD_LOCKOUT_MAX_SECONDS",
                  {"PASSWORD_WINDOW_SECONDS": "120", "PASSWORD_LOCKOUT_MAX_SECONDS": "60"})
