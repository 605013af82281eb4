"""Scoring's durable time-based work, kept in PostgreSQL so nothing is lost on a restart:

* **decay timers** (table ``timers``): one row per (contact, decay rule), pushed back by
  each activity, claimed when due with ``FOR UPDATE SKIP LOCKED`` (replicas share the work;
  no full-table scan: an index on ``due_at`` finds the due ones);
* **jobs** (table ``jobs``): recomputing a model's scores over history after a rule change,
  a chunk of contacts per step with its progress recorded;
* upcoming monthly partitions of ``events``.

The clock is a parameter (``now``) everywhere, so tests move time by hand.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from aiokafka import AIOKafkaProducer
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.db import SessionMaker, transaction
from nudge_common.events import (
    EVENT_RECEIVED,
    ContactUpdated,
    Envelope,
    SegmentEvent,
    Topic,
    segment_event_id,
)
from nudge_common.ids import stable_id
from nudge_common.kafka import OutgoingMessage, publish
from nudge_common.settings import NudgeSettings
from nudge_common.worker import PollingWorker
from nudge_scoring import metrics, store
from nudge_scoring.consumer import (
    Changed,
    Outputs,
    Rulebook,
    after_points,
    load_rulebook,
)
from nudge_scoring.domain import imports
from nudge_scoring.domain.rules import (
    ORDER_COMPLETED,
    DecaySpec,
    ScoreDelta,
    ScoringState,
    decay_points,
    score_event,
    score_profile,
)

log = structlog.get_logger(__name__)
Clock = Callable[[], datetime]


def system_clock() -> datetime:
    return datetime.now(UTC)


def _cause(workspace_id: str, *parts: str, at: datetime) -> Envelope:
    """A synthetic cause for time-based outputs: its id derives from what fired."""
    return Envelope(
        type="scoring.timer",
        id=stable_id(workspace_id, *parts),
        occurred_at=at,
        workspace_id=workspace_id,
        payload={},
    )


async def _contact_updated(
    session: AsyncSession, out: Outputs, contact_id: uuid.UUID, cause: str, changed: list[Changed]
) -> None:
    contact = await store.get_contact(session, contact_id=contact_id)
    if contact is None:
        return
    out.updated(
        ContactUpdated(
            contact_id=contact_id,
            user_id=contact.user_id,
            traits=contact.traits,
            scores=await store.scores_of(session, contact_id=contact_id),
            tags=await store.tags_of(session, contact_id=contact_id),
            stages=await store.stages_of(session, contact_id=contact_id),
            changed=changed,
            cause_message_id=cause,
        )
    )


async def run_due_timers(
    sessionmaker: SessionMaker,
    producer: AIOKafkaProducer,
    settings: NudgeSettings,
    *,
    now: datetime,
    limit: int = 200,
) -> int:
    """Handle up to ``limit`` due decay timers in one transaction; returns how many. Outputs
    are published before the commit, with ids derived from (contact, rule, due time)."""
    async with transaction(sessionmaker) as session:
        due = await store.claim_due_timers(session, now=now, limit=limit)
        messages = []
        books: dict[str, Rulebook] = {}
        for timer in due:
            metrics.TIMERS_FIRED.inc()
            book = books.get(timer.workspace_id)
            if book is None:
                book = books[timer.workspace_id] = await load_rulebook(
                    session, workspace_id=timer.workspace_id
                )
            rule = next((r for r in book.rules if r.id == timer.rule_id), None)
            if rule is None or not isinstance(rule.definition, DecaySpec):
                await store.reschedule_timer(session, timer=timer, due_at=None)
                continue
            spec = rule.definition
            before = await store.scores_of(session, contact_id=timer.contact_id)
            points = decay_points(spec, before.get(rule.model, 0))
            cause = f"decay:{rule.id}:{timer.due_at.isoformat()}"
            out = Outputs(
                timer.workspace_id,
                _cause(timer.workspace_id, "decay", str(timer.contact_id), cause, at=timer.due_at),
                timer.due_at,
            )
            if points:
                await store.add_points(
                    session,
                    workspace_id=timer.workspace_id,
                    contact_id=timer.contact_id,
                    deltas=[ScoreDelta(rule.id, rule.model, points)],
                    message_id=cause,
                    at=timer.due_at,
                    reason="decay",
                )
                metrics.DECAYS.labels(rule.model).inc()
                changed = await after_points(
                    session, out, book, timer.contact_id, before, at=timer.due_at
                )
                await _contact_updated(session, out, timer.contact_id, cause, changed)
            left = before.get(rule.model, 0) + points
            next_due = timer.due_at + timedelta(days=spec.after_days) if left > 0 else None
            await store.reschedule_timer(session, timer=timer, due_at=next_due)
            messages.extend(out.messages)
        await publish(producer, settings, messages)
        return len(due)


# --- recompute over history ----------------------------------------------------------------


async def start_recompute(session: AsyncSession, *, workspace_id: str, model: str) -> uuid.UUID:
    job_id = uuid.uuid4()
    total = await session.scalar(
        sa.select(sa.func.count())
        .select_from(store.contacts)
        .where(
            store.contacts.c.workspace_id == workspace_id, store.contacts.c.merged_into.is_(None)
        )
    )
    await session.execute(
        sa.insert(store.jobs).values(
            id=job_id,
            workspace_id=workspace_id,
            kind="recompute",
            status="pending",
            params={"model": model},
            total=total or 0,
        )
    )
    return job_id


def _event_of(row: Any) -> SegmentEvent:
    fields: dict[str, Any] = {
        "type": row.type,
        "messageId": row.message_id,
        "userId": "replay",
        "properties": row.properties,
        "context": row.context,
        "timestamp": row.occurred_at,
        "receivedAt": row.received_at,
    }
    fields["event" if row.type == "track" else "name"] = row.name
    return SegmentEvent.model_validate(fields)


async def recompute_contact(
    session: AsyncSession, out: Outputs, book: Rulebook, contact_id: uuid.UUID, model: str
) -> None:
    """Replay the contact's stored events under the model's current rules. Past decay is
    not replayed: the decay timer resumes from the contact's last activity. Score
    adjustments (no rule) are kept as they were."""
    rules = [r for r in book.rules if r.model == model]
    before = await store.scores_of(session, contact_id=contact_id)
    changes = store.score_changes
    await session.execute(
        sa.delete(changes).where(
            changes.c.contact_id == contact_id,
            changes.c.model == model,
            changes.c.rule_id.is_not(None),
        )
    )
    rule_ids = [r.id for r in rules]
    await session.execute(
        sa.delete(store.rule_spending).where(
            store.rule_spending.c.contact_id == contact_id,
            store.rule_spending.c.rule_id.in_(rule_ids),
        )
    )
    await session.execute(
        sa.delete(store.scores).where(
            store.scores.c.contact_id == contact_id, store.scores.c.model == model
        )
    )
    contact = await store.get_contact(session, contact_id=contact_id)
    if contact is None:
        return
    adjusted = await session.scalar(
        sa.select(sa.func.sum(changes.c.points)).where(
            changes.c.contact_id == contact_id, changes.c.model == model
        )
    )
    if adjusted is not None:
        await session.execute(
            sa.insert(store.scores).values(
                contact_id=contact_id,
                model=model,
                workspace_id=out.workspace_id,
                points=adjusted,
            )
        )
    rows = await session.execute(
        sa.select(store.events)
        .where(store.family(contact_id))
        .order_by(store.events.c.occurred_at, store.events.c.message_id)
    )
    state = ScoringState()
    for row in rows:
        event = _event_of(row)
        deltas = score_event(rules, event, state)
        if row.type == "track" and row.name == ORDER_COMPLETED:
            state.orders_before += 1
        await store.add_points(
            session,
            workspace_id=out.workspace_id,
            contact_id=contact_id,
            deltas=deltas,
            message_id=row.message_id,
            at=row.occurred_at,
            reason="recompute",
        )
    await store.add_points(
        session,
        workspace_id=out.workspace_id,
        contact_id=contact_id,
        deltas=score_profile(rules, contact.traits, {}),
        message_id="recompute:profile",
        at=out.occurred_at,
        reason="recompute",
    )
    changed = await after_points(session, out, book, contact_id, before, at=out.occurred_at)
    if changed:
        await _contact_updated(session, out, contact_id, f"recompute:{model}", changed)


async def run_job_step(
    sessionmaker: SessionMaker,
    producer: AIOKafkaProducer,
    settings: NudgeSettings,
    *,
    now: datetime,
    chunk: int = 100,
) -> bool:
    """Advance one pending job by a chunk of contacts; returns whether one was found."""
    async with transaction(sessionmaker) as session:
        job = (
            await session.execute(
                sa.select(store.jobs)
                .where(
                    store.jobs.c.status.in_(["pending", "running"]),
                    store.jobs.c.kind.in_(["recompute", "import"]),
                )
                .order_by(store.jobs.c.created_at)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
        ).first()
        if job is None:
            return False
        if job.kind == "import":
            await import_step(session, producer, settings, job, now=now)
            return True
        model = job.params["model"]
        query = (
            sa.select(store.contacts.c.id)
            .where(
                store.contacts.c.workspace_id == job.workspace_id,
                store.contacts.c.merged_into.is_(None),
            )
            .order_by(store.contacts.c.id)
            .limit(chunk)
        )
        if job.cursor:
            query = query.where(store.contacts.c.id > uuid.UUID(job.cursor))
        ids = list((await session.execute(query)).scalars())
        book = await load_rulebook(session, workspace_id=job.workspace_id)
        messages = []
        for contact_id in ids:
            out = Outputs(
                job.workspace_id,
                _cause(job.workspace_id, "recompute", str(job.id), str(contact_id), at=now),
                now,
            )
            await recompute_contact(session, out, book, contact_id, model)
            messages.extend(out.messages)
        finished = len(ids) < chunk
        await session.execute(
            sa.update(store.jobs)
            .where(store.jobs.c.id == job.id)
            .values(
                status="done" if finished else "running",
                done=store.jobs.c.done + len(ids),
                cursor=str(ids[-1]) if ids else job.cursor,
                finished_at=now if finished else None,
            )
        )
        await publish(producer, settings, messages)
        return True


# --- CSV import -----------------------------------------------------------------------------


async def start_import(
    session: AsyncSession, *, workspace_id: str, text: str, party: str
) -> uuid.UUID:
    """An import job for a CSV file (header already checked): the worker turns its rows
    into identify calls, a chunk per transaction."""
    job_id = uuid.uuid4()
    await session.execute(
        sa.insert(store.jobs).values(
            id=job_id,
            workspace_id=workspace_id,
            kind="import",
            status="pending",
            params={"csv": text, "party": party},
            total=imports.count_rows(text),
        )
    )
    return job_id


async def import_step(
    session: AsyncSession,
    producer: AIOKafkaProducer,
    settings: NudgeSettings,
    job: Any,
    *,
    now: datetime,
    chunk: int = 500,
) -> None:
    """Publish the identify calls of the next ``chunk`` rows to the events topic (scoring's
    consumer applies them like any other call: identity resolution, traits, tags, scores)
    and record the bad rows. A replayed chunk publishes the same message ids."""
    start = int(job.cursor or 0)
    found = imports.rows(job.params["csv"], start, chunk)
    errors: list[dict[str, Any]] = []
    messages = []
    for line, cells in found:
        call, row_errors = imports.identify_call(
            job.workspace_id, line, cells, party=job.params.get("party", "first"), at=now
        )
        errors.extend(error.as_dict() for error in row_errors)
        if call is None:
            continue
        event = SegmentEvent.model_validate(call)
        messages.append(
            OutgoingMessage(
                Topic.EVENTS,
                key=event.user_id or event.anonymous_id or "import",
                envelope=EVENT_RECEIVED.envelope(
                    workspace_id=job.workspace_id,
                    payload=event,
                    occurred_at=now,
                    id=segment_event_id(job.workspace_id, event.message_id),
                ),
            )
        )
    await publish(producer, settings, messages)
    metrics.IMPORTED_ROWS.labels("imported").inc(len(messages))
    metrics.IMPORTED_ROWS.labels("refused").inc(len(found) - len(messages))
    finished = len(found) < chunk
    await session.execute(
        sa.update(store.jobs)
        .where(store.jobs.c.id == job.id)
        .values(
            status="done" if finished else "running",
            done=store.jobs.c.done + len(found),
            errors=store.jobs.c.errors.op("||")(sa.bindparam("new_errors", errors, type_=JSONB)),
            cursor=str(start + len(found)),
            finished_at=now if finished else None,
        )
    )


def TimerWorker(  # noqa: N802 - a worker, built like the other services' workers
    *,
    settings: NudgeSettings,
    sessionmaker: SessionMaker,
    producer: AIOKafkaProducer,
    clock: Clock = system_clock,
    interval_s: float = 1.0,
) -> PollingWorker:
    """The durable time-based work: due decay timers and recompute jobs, and an hourly
    check that the events table has its partitions. Lost connections, and deadlocks or
    serialization failures with the consumer or the API, roll the round back; the next
    round redoes it."""
    partitions_checked: datetime | None = None

    async def round() -> int:
        nonlocal partitions_checked
        now = clock()
        if partitions_checked is None or now - partitions_checked > timedelta(hours=1):
            async with transaction(sessionmaker) as session:
                await store.ensure_event_partitions(session, around=now)
            partitions_checked = now
        fired = await run_due_timers(sessionmaker, producer, settings, now=now)
        stepped = await run_job_step(sessionmaker, producer, settings, now=now)
        return fired + int(stepped)

    return PollingWorker("scoring-timers", round, idle_s=interval_s)
