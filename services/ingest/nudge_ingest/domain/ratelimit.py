"""Rate limits per write key: one token bucket per key, refilled continuously. Pure: the
clock is handed in."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """``rate`` requests per second per key, with bursts up to ``burst`` requests. Holds
    state for the keys it has seen, so give it only authenticated keys (their number is
    bounded by the write keys that exist)."""

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = float(burst if burst > 0 else max(1, math.ceil(rate)))
        self._buckets: dict[str, _Bucket] = {}

    def acquire(self, key: str, now: float, cost: float = 1.0) -> float:
        """Take ``cost`` tokens for ``key``: 0.0 when allowed, otherwise the seconds to wait
        before the request would be allowed (nothing is taken then)."""
        cost = min(cost, self.burst)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return 0.0
        return (cost - bucket.tokens) / self.rate
