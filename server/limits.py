"""Rate and concurrency limits of the server: token buckets per key, a bounded call count.

Pure and clock-injectable (no gRPC): `server/services/guard.py` applies them to
calls. A refusal is a `Refusal` with the seconds after which a retry can succeed,
so a device told RESOURCE_EXHAUSTED knows how long to back off.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Refusal:
    """Why a call was refused, and when trying again can succeed."""

    message: str
    retry_after_s: float

    @property
    def retry_after_ms(self) -> int:
        return max(1, math.ceil(self.retry_after_s * 1000))


class TokenBuckets:
    """One token bucket per key (device id, peer address), at most `max_keys` of them.

    Each key may make `burst` calls at once and `rate` calls per second
    sustained. Buckets are kept in least-recently-used order; when more than
    `max_keys` keys are live, the oldest is forgotten, which can only let a
    forgotten key start over with a full bucket (memory stays bounded however
    many addresses or ids an attacker makes up).
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        what: str,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"{what}: the rate must be a positive number of calls per second")
        if not (math.isfinite(burst) and burst >= 1):
            raise ValueError(f"{what}: the burst must be at least 1 call")
        if max_keys < 1:
            raise ValueError(f"{what}: max_keys must be at least 1")
        self.rate, self.burst, self.what = rate, burst, what
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str) -> Refusal | None:
        """Spend one token of `key`'s bucket: None when allowed, else why and when to retry."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                refusal = None
            else:
                self._buckets[key] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
                refusal = Refusal(
                    f"too many {self.what}: at most {self.rate:g} per second "
                    f"(bursts of {self.burst:g}); retry in {math.ceil(wait * 1000)} ms",
                    wait,
                )
            while len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        return refusal

    def __len__(self) -> int:
        return len(self._buckets)


class CallLimit:
    """At most `limit` calls in flight at once; `enter` refuses the one over it."""

    def __init__(self, limit: int, retry_after_s: float = 1.0) -> None:
        if limit < 1:
            raise ValueError("the concurrent call limit must be at least 1")
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.active = 0
        self._lock = threading.Lock()

    def enter(self) -> Refusal | None:
        with self._lock:
            if self.active >= self.limit:
                return Refusal(
                    f"server busy: {self.limit} calls already in progress "
                    f"(--max-concurrent-rpcs); retry in {math.ceil(self.retry_after_s * 1000)} ms",
                    self.retry_after_s,
                )
            self.active += 1
            return None

    def exit(self) -> None:
        with self._lock:
            if self.active <= 0:
                raise RuntimeError("CallLimit.exit without a matching enter")
            self.active -= 1
