"""The one provider interface every channel implements, and what all providers share:
the two kinds of failure, per-provider rate limits and concurrency, and retries with
exponential backoff and full jitter."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from nudge_common.events import Channel
from nudge_notifier.domain.templates import Rendered


class PermanentFailure(Exception):
    """The provider refused the message for good (5xx SMTP reply, 4xx API answer, invalid
    address): never retried. ``hard_bounce`` marks a refusal that suppresses the address;
    ``status`` is the HTTP status of an API's refusal."""

    def __init__(
        self, reason: str, *, hard_bounce: bool = False, status: int | None = None
    ) -> None:
        super().__init__(reason)
        self.hard_bounce = hard_bounce
        self.status = status


class TransientFailure(Exception):
    """The provider refused the message for now (4xx SMTP reply, 429/5xx API answer, no
    connection): safe to retry, because the provider has certainly not accepted it.
    ``per_recipient`` marks a refusal of this recipient (a 4xx reply to RCPT: a soft
    bounce) rather than of everything (no connection)."""

    def __init__(self, reason: str, *, per_recipient: bool = False) -> None:
        super().__init__(reason)
        self.per_recipient = per_recipient


@dataclass(frozen=True)
class Outbound:
    """One message ready to go: rendered, addressed, with its channel's extras."""

    channel: Channel
    to: str
    rendered: Rendered
    idempotency_key: str
    headers: dict[str, str] = field(default_factory=dict)
    """Email: extra headers (List-Unsubscribe...)."""
    data: dict[str, Any] = field(default_factory=dict)
    """Push: the Web Push subscription, or extra data for the app."""


class Provider(Protocol):
    """Hands one message to the outside world and returns the provider's message id.

    Raises :class:`TransientFailure` or :class:`PermanentFailure` when the provider
    certainly did not take the message; any other exception means the outcome is unknown
    (the message may have been taken) and is never retried."""

    name: str

    async def send(self, message: Outbound) -> str: ...

    async def close(self) -> None: ...


class Limiter:
    """At most ``concurrency`` calls at once and, when ``rate_per_s`` > 0, at most that
    many starts per second (a token bucket holding one second's worth)."""

    def __init__(self, *, rate_per_s: float, concurrency: int) -> None:
        self.rate = rate_per_s
        self.capacity = max(rate_per_s, 1.0)
        self.tokens = self.capacity
        self.updated = time.monotonic()
        self.semaphore = asyncio.Semaphore(concurrency)
        self._lock = asyncio.Lock()

    async def _take(self) -> None:
        if self.rate <= 0:
            return
        async with self._lock:
            while True:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                await asyncio.sleep((1 - self.tokens) / self.rate)

    async def run(self, call: Callable[[], Awaitable[T]]) -> T:
        async with self.semaphore:
            await self._take()
            return await call()


T = TypeVar("T")


def backoff_delays(attempts: int, *, base_s: float, max_s: float) -> list[float]:
    """Sleeps between ``attempts`` tries: exponential with full jitter (uniform between 0
    and ``base * 2**n``, capped), so retrying senders do not stampede a recovering server."""
    return [random.uniform(0, min(max_s, base_s * 2**n)) for n in range(attempts - 1)]  # noqa: S311 - jitter, not security


async def with_retries(
    call: Callable[[], Awaitable[T]], *, attempts: int, base_s: float, max_s: float
) -> tuple[T, int]:
    """Call until it succeeds, retrying only :class:`TransientFailure`; returns the result
    and the number of attempts made. The last transient failure propagates."""
    delays = backoff_delays(attempts, base_s=base_s, max_s=max_s)
    for attempt, delay in enumerate([*delays, None], start=1):
        try:
            return await call(), attempt
        except TransientFailure:
            if delay is None:
                raise
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")
