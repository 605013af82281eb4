"""The timer worker: fires due waits, shared by every replica.

Each round claims up to ``timer_batch`` due timers with ``FOR UPDATE SKIP LOCKED`` (a timer
another replica holds is skipped), deletes them, advances their runs and publishes the
outputs, then commits. A crash before the commit brings the timers back for any replica;
their outputs are re-published with the same ids and idempotency keys.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from aiokafka import AIOKafkaProducer

from nudge_common.consumer import TRANSIENT_ERRORS
from nudge_common.db import SessionMaker, transaction
from nudge_common.kafka import publish
from nudge_common.settings import NudgeSettings
from nudge_orchestrator import execution, metrics, store
from nudge_orchestrator.clock import Clock, system_clock

log = structlog.get_logger(__name__)


async def fire_due_timers(
    sessionmaker: SessionMaker,
    producer: AIOKafkaProducer,
    settings: NudgeSettings,
    *,
    clock: Clock,
    limit: int = 500,
) -> int:
    """Fire up to ``limit`` due timers in one transaction; returns how many."""
    now = clock()
    async with transaction(sessionmaker) as session:
        due = await store.claim_due_timers(session, now=now, limit=limit)
        out = execution.Outputs()
        await execution.resume_many(
            session, out, [(timer.run_id, timer.resume_step) for timer in due], now=now
        )
        await publish(producer, settings, out.messages)
    # observed once committed: the lag of work that really happened
    for timer in due:
        metrics.TIMERS_FIRED.labels(timer.kind).inc()
        metrics.TIMER_LAG.observe(max((clock() - timer.due_at).total_seconds(), 0.0))
    return len(due)


class TimerWorker:
    name = "orchestrator-timers"

    def __init__(
        self,
        *,
        settings: NudgeSettings,
        sessionmaker: SessionMaker,
        producer: AIOKafkaProducer,
        clock: Clock = system_clock,
        batch: int = 500,
        idle_s: float = 0.2,
    ) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.producer = producer
        self.clock = clock
        self.batch = batch
        self.idle_s = idle_s
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            fired = 0
            try:
                fired = await fire_due_timers(
                    self.sessionmaker,
                    self.producer,
                    self.settings,
                    clock=self.clock,
                    limit=self.batch,
                )
            except TRANSIENT_ERRORS as error:
                log.warning("timer round failed, retrying", error=repr(error))
            if fired == 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=self.idle_s)
