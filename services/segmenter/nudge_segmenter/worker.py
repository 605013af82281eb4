"""Segmenter's durable work, shared by every replica: time-driven rechecks, backfills
(:mod:`nudge_segmenter.backfill`) and customer-value refreshes (:mod:`nudge_segmenter.value`)."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from nudge_common.clock import Clock
from nudge_common.db import transaction
from nudge_common.kafka import OutgoingMessage, publish
from nudge_common.service import Runtime
from nudge_common.worker import PollingWorker
from nudge_segmenter import backfill, metrics, store, value
from nudge_segmenter.domain.segments import TIME
from nudge_segmenter.evaluation import Cause, reevaluate
from nudge_segmenter.settings import SegmenterSettings


def _settings(runtime: Runtime) -> SegmenterSettings:
    settings = runtime.settings
    assert isinstance(settings, SegmenterSettings)
    return settings


async def fire_due_rechecks(runtime: Runtime, clock: Clock, limit: int) -> int:
    """Re-evaluate the time-driven segments of up to ``limit`` contacts whose recheck is
    due, in one transaction."""
    now = clock()
    async with transaction(runtime.sessionmaker) as session:
        due = await store.claim_due_rechecks(session, now=now, limit=limit)
        messages: list[OutgoingMessage] = []
        for recheck in due:
            messages += await reevaluate(
                session,
                workspace_id=recheck.workspace_id,
                contact_id=recheck.contact_id,
                now=now,
                cause=Cause(work=f"recheck:{recheck.due_at.isoformat()}"),
                facts=[TIME],
            )
        await publish(runtime.producer, runtime.settings, messages)
    for recheck in due:
        metrics.RECHECK_LAG.observe(max((clock() - recheck.due_at).total_seconds(), 0.0))
    return len(due)


def RecheckWorker(runtime: Runtime, clock: Clock) -> PollingWorker:  # noqa: N802
    settings = _settings(runtime)
    return PollingWorker(
        "segmenter-rechecks",
        lambda: fire_due_rechecks(runtime, clock, settings.recheck_batch),
        idle_s=settings.recheck_idle_s,
    )


_CANDIDATES = (
    sa.select(store.segments.c.id)
    .where(store.segments.c.status == "backfilling")
    .union(sa.select(store.backfill_dirty.c.segment_id).distinct())
)
"""Built once, as the worker polls it twice a second."""


async def backfill_next(runtime: Runtime, clock: Clock, chunk: int) -> int:
    """Take one segment that is backfilling or has contacts to settle, and carry it to the
    end; returns 1 if there was one."""
    async with runtime.engine.connect() as connection:
        candidates = (await connection.execute(_CANDIDATES)).scalars().all()
        await connection.commit()
        for segment_id in candidates:
            key = backfill.lock_key(segment_id)
            locked = await connection.scalar(sa.select(sa.func.pg_try_advisory_lock(key)))
            await connection.commit()
            if not locked:
                continue
            try:
                await _backfill(connection, runtime, clock, segment_id, chunk)
            finally:
                await connection.execute(sa.select(sa.func.pg_advisory_unlock(key)))
                await connection.commit()
            return 1
    return 0


async def _backfill(
    connection: AsyncConnection, runtime: Runtime, clock: Clock, segment_id: uuid.UUID, chunk: int
) -> None:
    async def segment_now(session: AsyncSession) -> store.Segment | None:
        row = await session.scalar(
            sa.select(store.segments.c.workspace_id).where(store.segments.c.id == segment_id)
        )
        if row is None:
            return None
        return await store.get_segment(session, workspace_id=row, segment_id=segment_id)

    started = time.perf_counter()
    async with AsyncSession(bind=connection) as session, session.begin():
        segment = await segment_now(session)
        if segment is None:
            return
        staging = segment.status == "backfilling" and segment.backfill_total is None
        if staging:
            await backfill.stage(session, segment, clock())
    if staging:
        await _analyze_bulk_written(connection)
    if segment.status == "backfilling":
        while True:
            async with AsyncSession(bind=connection) as session, session.begin():
                messages = await backfill.apply_chunk(session, segment, clock(), chunk)
                await publish(runtime.producer, runtime.settings, messages)
            if not messages:
                break
        async with AsyncSession(bind=connection) as session, session.begin():
            if not await backfill.hand_over(session, segment, clock()):
                return
        await _analyze_bulk_written(connection)
        metrics.BACKFILL_SECONDS.observe(time.perf_counter() - started)
    while True:
        async with AsyncSession(bind=connection) as session, session.begin():
            settled, messages = await backfill.settle_dirty(session, segment, clock(), chunk)
            await publish(runtime.producer, runtime.settings, messages)
        if settled == 0:
            return


async def _analyze_bulk_written(connection: AsyncConnection) -> None:
    """A backfill's rows planned on statistics that never saw them make the real-time
    batch's reads seq-scan (:func:`store.analyze_bulk_written`): the staged rechecks before
    applying, the memberships and history before real time takes the segment over."""
    async with AsyncSession(bind=connection) as session, session.begin():
        await store.analyze_bulk_written(session)


def BackfillWorker(runtime: Runtime, clock: Clock) -> PollingWorker:  # noqa: N802
    settings = _settings(runtime)
    return PollingWorker(
        "segmenter-backfills",
        lambda: backfill_next(runtime, clock, settings.backfill_chunk),
        idle_s=settings.backfill_idle_s,
    )


async def refresh_value(runtime: Runtime, clock: Clock) -> int:
    settings = _settings(runtime)
    refreshed = await value.refresh_due(
        runtime.sessionmaker,
        now=clock(),
        every=timedelta(seconds=settings.value_refresh_s),
        window_days=settings.rfm_window_days,
        horizon_days=settings.clv_horizon_days,
    )
    return 0 if refreshed is None else 1


def ValueWorker(runtime: Runtime, clock: Clock) -> PollingWorker:  # noqa: N802
    return PollingWorker(
        "segmenter-value",
        lambda: refresh_value(runtime, clock),
        idle_s=_settings(runtime).value_idle_s,
    )
