"""What one connection may send: token buckets per connection (and per kind of message where it matters).

A person switching images sends a few `setImageID` a second; a client sending
thousands of frames a second is broken or hostile, and must not take the
worker's time from everyone else. Frames over the budget are refused (the
client is told at the first, then at most once a second); a client that keeps
going over it is closed (1008).

Written here rather than taken from a rate-limiting library: `limits` 5.8
(Flask-Limiter's) costs 5.2 to 7.3 µs per hit on this machine against 0.6 µs
for this bucket, on a path every client frame takes, and keys every counter
into a process-wide store, where a connection's own counter lives and dies
with the connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; `take` spends one if there is one."""

    __slots__ = ("_at", "_burst", "_rate", "_tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self._rate, self._burst = rate, burst
        self._tokens, self._at = burst, now

    def take(self, now: float) -> bool:
        tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if tokens >= 1:
            self._tokens = tokens - 1
            return True
        self._tokens = tokens
        return False


@dataclass(frozen=True)
class InboundLimits:
    """A connection's budget: frames a second (any kind), `setImageID` a second; each may burst to twice that."""

    frames_per_second: float = 50.0
    set_image_per_second: float = 10.0


class Verdict(Enum):
    ACCEPT = "accept"
    REFUSE_AND_TELL = "refuse and tell"  # refused, and the client has not been told for a second: say why
    REFUSE = "refuse"  # refused again: the client was told already
    CLOSE = "close"  # refused for too long: close the connection (1008)


class InboundBudget:
    """One connection's budget: `frames` for every frame, `kinds` for the kinds of message that have their
    own, and `strikes`, spent by refused frames, whose exhaustion means the client keeps abusing."""

    __slots__ = ("_frames", "_kinds", "_limits", "_strikes", "_told")

    #: How often a client over its budget is told so (each refused frame is not answered).
    TELL_EVERY_SECONDS = 1.0

    def __init__(self, limits: InboundLimits, now: float) -> None:
        self._limits = limits
        self._frames = TokenBucket(limits.frames_per_second, 2 * limits.frames_per_second, now)
        self._kinds: dict[str, TokenBucket] = {}
        # Refused frames may add up to four seconds of the frame rate, refilled at a fifth of it.
        self._strikes = TokenBucket(limits.frames_per_second / 5, 4 * limits.frames_per_second, now)
        self._told = float("-inf")

    def frame(self, now: float) -> Verdict:
        """Any frame from the client."""
        return self._verdict(self._frames.take(now), now)

    def set_image(self, now: float) -> Verdict:
        """A `setImageID` (after `frame`)."""
        bucket = self._kinds.get("setImageID")
        if bucket is None:
            rate = self._limits.set_image_per_second
            bucket = self._kinds["setImageID"] = TokenBucket(rate, 2 * rate, now)
        return self._verdict(bucket.take(now), now)

    def _verdict(self, accepted: bool, now: float) -> Verdict:
        if accepted:
            return Verdict.ACCEPT
        if not self._strikes.take(now):
            return Verdict.CLOSE
        if now - self._told < self.TELL_EVERY_SECONDS:
            return Verdict.REFUSE
        self._told = now
        return Verdict.REFUSE_AND_TELL
