"""The workers shared by every replica: timers (due waits), webhooks (the outbox) and
broadcasts (a page of members at a time).

Each timer round claims up to ``timer_batch`` due timers with ``FOR UPDATE SKIP LOCKED`` (a
timer another replica holds is skipped), deletes them, advances their runs and publishes the
outputs, then commits. A crash before the commit brings the timers back for any replica;
their outputs are re-published with the same ids and idempotency keys. Broadcasts work the
same way, a page of members per round.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from datetime import datetime, timedelta

import httpx
import structlog
from aiokafka import AIOKafkaProducer
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common import codec
from nudge_common.clock import Clock, system_clock
from nudge_common.db import SessionMaker, transaction
from nudge_common.kafka import publish
from nudge_common.settings import NudgeSettings
from nudge_common.worker import PollingWorker
from nudge_orchestrator import execution, metrics, segmenter, store
from nudge_orchestrator.domain import broadcasts
from nudge_orchestrator.domain.broadcasts import ABTest, in_test
from nudge_orchestrator.domain.workflows import DateTrait, next_date_occurrence
from nudge_orchestrator.settings import OrchestratorSettings

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


def TimerWorker(  # noqa: N802 - a worker, built like the other services' workers
    *,
    settings: NudgeSettings,
    sessionmaker: SessionMaker,
    producer: AIOKafkaProducer,
    clock: Clock = system_clock,
    batch: int = 500,
    idle_s: float = 0.2,
) -> PollingWorker:
    """Fires due timers; a deadlock with the events consumer (it locks a contact's runs,
    then their waits; a round locks timers, then their runs) is transient, retried."""
    return PollingWorker(
        "orchestrator-timers",
        lambda: fire_due_timers(sessionmaker, producer, settings, clock=clock, limit=batch),
        idle_s=idle_s,
    )


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """``X-Nudge-Signature``: ``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">``.
    A receiver recomputes it with the shared secret and refuses old timestamps."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def backoff(attempts: int) -> timedelta:
    """Wait before attempt ``attempts + 1``: 2, 4, 8 ... seconds, at most an hour."""
    return timedelta(seconds=min(2 ** max(attempts, 1), 3600))


async def deliver_due_webhooks(
    sessionmaker: SessionMaker,
    settings: OrchestratorSettings,
    client: httpx.AsyncClient,
    *,
    clock: Clock,
    limit: int = 20,
) -> int:
    """Attempt up to ``limit`` due webhook calls (concurrently), holding their rows locked
    (SKIP LOCKED) until the outcome is written: 2xx delivered; anything else retried with
    backoff until ``webhook_attempts``, then failed. Returns how many were attempted. A
    receiver may see a call twice (a crash after its 2xx, before the commit): the
    ``X-Nudge-Delivery`` header (run:step) lets it deduplicate."""
    now = clock()
    secret = settings.webhook_secret.get_secret_value()
    async with transaction(sessionmaker) as session:
        due = await store.claim_due_webhooks(session, now=now, limit=limit)

        async def attempt(hook: store.PendingWebhook) -> str | None:
            body = codec.dumps(hook.body)
            try:
                answer = await client.post(
                    hook.url,
                    content=body,
                    headers={
                        "Content-Type": "application/json",
                        "X-Nudge-Signature": sign(secret, int(now.timestamp()), body),
                        "X-Nudge-Delivery": f"{hook.run_id}:{hook.step}",
                    },
                )
            except httpx.HTTPError as error:
                return f"{type(error).__name__}: {error}"[:500]
            return None if answer.is_success else f"HTTP {answer.status_code}"

        errors = await asyncio.gather(*(attempt(hook) for hook in due))
        for hook, error in zip(due, errors, strict=True):
            if error is None:
                status, next_at = "delivered", None
            elif hook.attempts + 1 >= settings.webhook_attempts:
                status, next_at = "failed", None
            else:
                status, next_at = "pending", now + backoff(hook.attempts + 1)
            metrics.WEBHOOK_ATTEMPTS.labels(
                "delivered" if error is None else ("failed" if next_at is None else "retry")
            ).inc()
            await store.webhook_attempted(
                session,
                run_id=hook.run_id,
                step=hook.step,
                status=status,
                next_at=next_at,
                error=error,
            )
    return len(due)


def WebhookWorker(  # noqa: N802
    *,
    settings: OrchestratorSettings,
    sessionmaker: SessionMaker,
    clock: Clock = system_clock,
    idle_s: float = 0.5,
) -> PollingWorker:
    client = httpx.AsyncClient(timeout=10.0)
    return PollingWorker(
        "orchestrator-webhooks",
        lambda: deliver_due_webhooks(sessionmaker, settings, client, clock=clock),
        idle_s=idle_s,
        holding=client,
    )


BROADCAST_RETRY = timedelta(seconds=5)
"""How long a broadcast waits when the segmenter does not answer before asking again."""


async def send_due_broadcasts(
    sessionmaker: SessionMaker,
    producer: AIOKafkaProducer,
    settings: OrchestratorSettings,
    client: httpx.AsyncClient,
    *,
    clock: Clock,
) -> int:
    """Send the next page of the broadcast most overdue (locked with SKIP LOCKED, so
    replicas share broadcasts): its members after the last one done, each entering the
    broadcast's workflow (caps, quiet hours and the send as any run; the run id derives
    from the broadcast and the contact, and the entry rule is ``once``, so no member runs
    it twice), then the cursor moves, in the same transaction, after the outputs are
    acknowledged: a crash before the commit replays the page with the same ids.
    ``rate_per_s`` paces the pages (at most that many messages a second).

    An A/B broadcast first pages through the members for its test group only (``testing``),
    then (``deciding``) looks at the variants' results every ``broadcast_ab_check_s``
    until a winner is chosen, then pages through the members again (``sending``) with the
    winner's send. Returns how many members a page looked at (0: none due, an empty last
    page, or a decision round)."""
    now = clock()
    async with transaction(sessionmaker) as session:
        broadcast = await store.claim_due_broadcast(session, now=now)
        if broadcast is None:
            return 0
        ab = broadcast.ab()
        if ab is not None and broadcast.status == "deciding":
            await _decide(session, broadcast, ab, settings, now)
            return 0
        testing = ab is not None and broadcast.status in ("scheduled", "testing")
        rate = broadcast.rate_per_s
        limit = (
            settings.broadcast_page
            if rate is None
            else max(1, min(settings.broadcast_page, int(rate)))
        )
        try:
            page = await segmenter.members(
                client,
                settings.segmenter_url,
                workspace_id=broadcast.workspace_id,
                segment_id=broadcast.segment_id,
                after=broadcast.after,
                limit=limit,
            )
        except (segmenter.SegmentNotFound, segmenter.SegmenterUnavailable) as error:
            gone = isinstance(error, segmenter.SegmentNotFound)
            log.warning("broadcast page failed", broadcast=str(broadcast.id), error=str(error))
            await store.broadcast_progressed(
                session,
                broadcast_id=broadcast.id,
                status="failed" if gone else broadcast.status,
                after=broadcast.after,
                members=0,
                next_at=None if gone else now + BROADCAST_RETRY,
                last_error=str(error),
                at=now,
            )
            return 0
        members = list(dict.fromkeys(page.members))
        if ab is not None and testing:
            members_in = [m for m in members if in_test(broadcast.id, m, ab.test_fraction)]
        else:
            members_in = members
        known = await store.get_contacts(session, contact_ids=members_in) if members_in else {}
        workflow = await store.get_workflow(
            session, workspace_id=broadcast.workspace_id, workflow_id=broadcast.id
        )
        assert workflow is not None
        definition = await store.version_definition(
            session, workflow_id=broadcast.id, version=workflow.version
        )
        out = execution.Outputs()
        started = await execution.enter_many(
            session,
            out,
            workflow=store.Published(
                broadcast.id, broadcast.workspace_id, workflow.version, definition
            ),
            entrants=[
                execution.Entrant(
                    contact_id,
                    known.get(contact_id) or {"user_id": None, "traits": {}, "scores": {}},
                    f"broadcast:{broadcast.id}",
                    segment_id=broadcast.segment_id,
                )
                for contact_id in members_in
            ],
            now=now,
            copies=known,
        )
        over = page.next_after is None or not members
        paced = now + timedelta(seconds=len(started) / rate if rate else 0)
        if ab is not None and testing:
            status = "deciding" if over else "testing"
            next_at: datetime | None = (
                min(
                    now + timedelta(seconds=settings.broadcast_ab_check_s),
                    now + timedelta(seconds=ab.decide_after_s),
                )
                if over
                else paced
            )
        else:
            status = "sent" if over else "sending"
            next_at = None if over else paced
        await store.broadcast_progressed(
            session,
            broadcast_id=broadcast.id,
            status=status,
            # the rest of an A/B broadcast's members start again from the first
            after=None
            if testing and over
            else page.next_after or (members[-1] if members else broadcast.after),
            members=len(started),
            test_members=len(started) if testing else 0,
            tested=testing and over,
            next_at=next_at,
            last_error=None,
            at=now,
        )
        await publish(producer, settings, out.messages)
    metrics.BROADCAST_MEMBERS.inc(len(members_in))
    return len(members)


async def _decide(
    session: AsyncSession,
    broadcast: store.Broadcast,
    ab: ABTest,
    settings: OrchestratorSettings,
    now: datetime,
) -> None:
    """Choose an A/B broadcast's winner when its test is significant or its time is up
    (the best so far); otherwise look again ``broadcast_ab_check_s`` later."""
    assert broadcast.tested_at is not None
    deadline = broadcast.tested_at + timedelta(seconds=ab.decide_after_s)
    counts = await store.workflow_counts(session, workflow_id=broadcast.id)
    _, per_variant = broadcasts.results(counts.runs, counts.sends, counts.deliveries)
    counted = broadcasts.groups(ab, per_variant)
    decision = broadcasts.choose(counted, ab.alpha, deadline_passed=now >= deadline)
    if decision is None:
        await store.broadcast_progressed(
            session,
            broadcast_id=broadcast.id,
            status="deciding",
            after=None,
            members=0,
            next_at=min(now + timedelta(seconds=settings.broadcast_ab_check_s), deadline),
            last_error=None,
            at=now,
        )
        return
    await store.broadcast_decided(
        session,
        broadcast_id=broadcast.id,
        winner=ab.variant(decision.winner),
        decision=broadcasts.decision_record(decision, counted, now.isoformat()),
        at=now,
    )
    metrics.BROADCAST_WINNERS.labels(decision.reason).inc()
    log.info(
        "broadcast winner chosen",
        broadcast=str(broadcast.id),
        winner=decision.winner,
        reason=decision.reason,
    )


def BroadcastWorker(  # noqa: N802
    *,
    settings: OrchestratorSettings,
    sessionmaker: SessionMaker,
    producer: AIOKafkaProducer,
    clock: Clock = system_clock,
) -> PollingWorker:
    client = httpx.AsyncClient()
    return PollingWorker(
        "orchestrator-broadcasts",
        lambda: send_due_broadcasts(sessionmaker, producer, settings, client, clock=clock),
        idle_s=settings.broadcast_idle_s,
        holding=client,
    )
