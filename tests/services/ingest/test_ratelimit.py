from __future__ import annotations

import pytest

from nudge_ingest.domain.ratelimit import RateLimiter


def test_a_key_gets_its_burst_then_its_rate() -> None:
    limiter = RateLimiter(rate=2, burst=3)
    assert [limiter.acquire("k", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("k", now=0.0) == pytest.approx(0.5)
    assert limiter.acquire("k", now=0.5) == 0.0
    assert limiter.acquire("k", now=0.5) == pytest.approx(0.5)


def test_keys_do_not_share_a_bucket() -> None:
    limiter = RateLimiter(rate=1, burst=1)
    assert limiter.acquire("a", now=0.0) == 0.0
    assert limiter.acquire("a", now=0.0) > 0
    assert limiter.acquire("b", now=0.0) == 0.0


def test_burst_defaults_to_one_second_of_rate_and_refill_is_capped() -> None:
    limiter = RateLimiter(rate=5, burst=0)
    assert limiter.burst == 5
    assert limiter.acquire("k", now=0.0) == 0.0
    # a long idle time refills to the burst, not beyond
    assert [limiter.acquire("k", now=100.0) for _ in range(6)].count(0.0) == 5


def test_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        RateLimiter(rate=0, burst=1)
