"""The timer worker: fires due waits, shared by every replica.

Each round claims up to ``timer_batch`` due timers with ``FOR UPDATE SKIP LOCKED`` (a timer
another replica holds is skipped), deletes them, advances their runs and publishes the
outputs, then commits. A crash before the commit brings the timers back for any replica;
their outputs are re-published with the same ids and idempotency keys.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime

import structlog
from aiokafka import AIOKafkaProducer
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.consumer import TRANSIENT_ERRORS
from nudge_common.db import SessionMaker, transaction
from nudge_common.kafka import publish
from nudge_common.settings import NudgeSettings
from nudge_orchestrator import execution, metrics, store
from nudge_orchestrator.clock import Clock, system_clock
from nudge_orchestrator.domain.workflows import DateTrait, next_date_occurrence

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
        dates = await store.claim_due_date_triggers(session, now=now, limit=limit)
        await _fire_dates(session, out, dates, now)
        await publish(producer, settings, out.messages)
    for trigger in dates:
        metrics.TIMERS_FIRED.labels("date").inc()
        metrics.TIMER_LAG.observe(max((clock() - trigger.due_at).total_seconds(), 0.0))
    # observed once committed: the lag of work that really happened
    for timer in due:
        metrics.TIMERS_FIRED.labels(timer.kind).inc()
        metrics.TIMER_LAG.observe(max((clock() - timer.due_at).total_seconds(), 0.0))
    return len(due) + len(dates)


async def _fire_dates(
    session: AsyncSession, out: execution.Outputs, dates: list[store.DateTrigger], now: datetime
) -> None:
    """Date-trait workflows due for their contacts: enter (the run id derives from the
    occurrence, so a replay cannot start a second run), then schedule the next year's."""
    for due in dates:
        workflow = await store.get_workflow(
            session, workspace_id=due.workspace_id, workflow_id=due.workflow_id
        )
        contact = await store.get_contact(session, contact_id=due.contact_id)
        if workflow is None or workflow.status == "archived" or workflow.version == 0:
            continue
        if contact is None:
            continue
        definition = await store.version_definition(
            session, workflow_id=workflow.id, version=workflow.version
        )
        trigger = definition.trigger
        if not isinstance(trigger, DateTrait):
            continue  # republished with another trigger
        if workflow.status == "active":
            await execution.enter(
                session,
                out,
                workflow=store.Published(
                    workflow.id, workflow.workspace_id, workflow.version, definition
                ),
                contact_id=due.contact_id,
                contact=contact,
                cause=f"date:{trigger.trait}:{due.due_at.isoformat()}",
                now=now,
            )
        if trigger.yearly:
            traits = contact.get("traits") or {}
            timezone = traits.get("timezone") if isinstance(traits.get("timezone"), str) else None
            await store.put_date_trigger(
                session,
                workflow_id=workflow.id,
                contact_id=due.contact_id,
                workspace_id=due.workspace_id,
                due_at=next_date_occurrence(
                    trigger, traits.get(trigger.trait), timezone, max(now, due.due_at)
                ),
            )


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
