"""The loop of a worker doing durable work in rounds (due timers, backfills): run a round,
and when it found nothing to do, wait ``idle_s`` or until asked to stop. A transient
database error (a deadlock with a consumer, a lost connection) is logged and the round
retried; anything else stops the service, as a consumer's would."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import structlog

from nudge_common.consumer import is_transient

log = structlog.get_logger(__name__)


class PollingWorker:
    def __init__(
        self,
        name: str,
        round: Callable[[], Awaitable[int]],
        *,
        idle_s: float,
        holding: AbstractAsyncContextManager[Any] | None = None,
    ) -> None:
        """``round`` returns how much it did; ``holding`` (an HTTP client, say) is open
        while the worker runs."""
        self.name = name
        self._round = round
        self.idle_s = idle_s
        self._holding = holding
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        async with self._holding or contextlib.nullcontext():
            await self._loop()

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            done = 0
            try:
                done = await self._round()
            except Exception as error:
                if not is_transient(error):
                    raise
                log.warning("round failed, retrying", worker=self.name, error=repr(error))
            if done == 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=self.idle_s)
