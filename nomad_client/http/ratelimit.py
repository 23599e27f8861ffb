"""A token bucket per task socket (``client { task_api { rate_limit { ... } } }``).

The bucket only counts; the Task API server decides what a refusal costs the caller. Rate
and burst are passed on every call rather than fixed at construction, because a reload may
change them while the socket lives: the next request obeys the new values, and tokens
already held are capped at the new burst.

A refused request is not answered at once: it is held until the bucket would have a token
for it, counting the refused requests already held before it, and for at most
``MAX_HOLD`` seconds. So a flooding task's connections queue up behind each other and each
gets about one answer per ``MAX_HOLD`` while the flood lasts, instead of a fresh 429 per
connection per loop turn, and what the flood costs the agent stays bounded by the rate and
the connection limit, not by how fast the task can send.
"""

from __future__ import annotations

import math

MAX_HOLD = 1.0
# A token due "now" may be short by a rounding error of the clock's floats: count it.
_EPSILON = 1e-9


class TokenBucket:
    """Tokens refill at ``rate`` per second up to ``burst``; a request takes one. Starts
    full. Times are the event loop's clock (seconds)."""

    __slots__ = ("_stamp", "_tokens", "held")

    def __init__(self) -> None:
        self._tokens = 0.0
        self._stamp = -math.inf  # the first take fills the bucket to its burst
        # Refused requests being held right now: each one waits behind the others.
        self.held = 0

    def take(self, now: float, rate: float, burst: float) -> float:
        """Take a token and return 0.0, or return how long a refused request is to be held
        (> 0, at most ``MAX_HOLD``). ``rate`` > 0."""
        tokens = min(burst, self._tokens + (now - self._stamp) * rate)
        self._stamp = now
        if tokens >= 1.0 - _EPSILON:
            self._tokens = tokens - 1.0
            return 0.0
        self._tokens = tokens
        return min(MAX_HOLD, (1.0 - tokens + self.held) / rate)

    def retry_after(self, now: float, rate: float, burst: float) -> int:
        """Whole seconds (at least 1) until the bucket holds a token again: ``Retry-After``."""
        tokens = min(burst, self._tokens + (now - self._stamp) * rate)
        return max(1, math.ceil((1.0 - tokens) / rate))
