"""Applying a run's decisions durably, in the caller's transaction.

Every path into a run (a trigger in a consumer, a due timer, an awaited event, a goal)
ends here. A step's execution is recorded in ``step_executions`` before its effect, so a
step executes once per run; its outputs (notification requests) carry ids and idempotency
keys derived from (run, step), so re-publishing them after a crash changes nothing
downstream. Waits become rows in ``timers``, in the same transaction.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.conditions import Profile
from nudge_common.events import (
    NOTIFICATION_REQUESTED,
    ContactSnapshot,
    NotificationRequested,
    Topic,
)
from nudge_common.ids import stable_id
from nudge_common.kafka import OutgoingMessage
from nudge_orchestrator import metrics, store
from nudge_orchestrator.domain.workflows import (
    Context,
    Defer,
    End,
    Goto,
    QuietHours,
    Schedule,
    Send,
    WorkflowDefinition,
    decide,
    idempotency_key,
)

CAP_WINDOWS = {"per_day": timedelta(days=1), "per_week": timedelta(days=7)}


@dataclass
class Outputs:
    messages: list[OutgoingMessage] = field(default_factory=list)
    origin_received_at: datetime | None = None
    """When ingest received the outside event behind this work (None for timers): carried
    on, so the notifier measures the end-to-end latency."""


def run_id_for(workflow_id: uuid.UUID, contact_id: uuid.UUID, cause: str) -> uuid.UUID:
    """Derived from what triggered it, so a replayed trigger can never mint a second run."""
    return stable_id(str(workflow_id), str(contact_id), cause)


async def enter(
    session: AsyncSession,
    out: Outputs,
    *,
    workflow: store.Published,
    contact_id: uuid.UUID,
    contact: dict[str, Any],
    cause: str,
    now: datetime,
) -> uuid.UUID | None:
    """Start a run when the entry rule allows it, and advance it as far as it goes now.
    Returns the run id, or None when the contact may not enter."""
    definition = workflow.definition
    entry = definition.entry
    if not await store.may_enter(
        session,
        workflow_id=workflow.id,
        contact_id=contact_id,
        rule=entry.rule,
        cooldown_s=entry.cooldown_s,
        concurrent=entry.concurrent,
        at=now,
    ):
        metrics.ENTRIES_REFUSED.inc()
        return None
    run_id = run_id_for(workflow.id, contact_id, cause)
    async with session.begin_nested():
        started = await store.start_run(
            session,
            run_id=run_id,
            workflow_id=workflow.id,
            version=workflow.version,
            workspace_id=workflow.workspace_id,
            contact_id=contact_id,
            exclusive=not entry.concurrent,
            goal_event=definition.goal.event if definition.goal else None,
            contact=contact,
            at=now,
        )
    if not started:
        return None
    metrics.RUNS_STARTED.inc()
    run = await store.get_run(session, run_id=run_id)
    assert run is not None
    await advance(session, out, run=run, definition=definition, index=0, now=now)
    return run_id


async def resume(
    session: AsyncSession, out: Outputs, *, run_id: uuid.UUID, index: int | None, now: datetime
) -> None:
    """Go on with a run at step ``index`` (None: it ends) after a wait."""
    run = await store.get_run(session, run_id=run_id, lock=True)
    if run is None or run.status != store.ACTIVE:
        return
    definition = await store.version_definition(
        session, workflow_id=run.workflow_id, version=run.version
    )
    await advance(session, out, run=run, definition=definition, index=index, now=now)


async def advance(
    session: AsyncSession,
    out: Outputs,
    *,
    run: store.Run,
    definition: WorkflowDefinition,
    index: int | None,
    now: datetime,
) -> None:
    """Execute steps from ``index`` until the run waits or ends."""
    fresh = await store.get_contact(session, contact_id=run.contact_id)
    contact = fresh or run.contact
    traits = contact.get("traits") or {}
    caps, quiet = await store.get_messaging_settings(session, workspace_id=run.workspace_id)
    variant = run.variant
    while index is not None:
        ctx = Context(
            run_id=run.id,
            contact_id=run.contact_id,
            workflow_id=run.workflow_id,
            now=now,
            profile=Profile(traits, contact.get("scores") or {}),
            performed=frozenset(run.performed),
            timezone=traits.get("timezone") if isinstance(traits.get("timezone"), str) else None,
            quiet_hours=_quiet_hours(quiet),
        )
        decision = decide(definition, index, ctx)
        kind = definition.steps[index].kind
        match decision:
            case Defer(until=until):
                # Quiet hours: the same step runs again when they end; nothing recorded yet.
                metrics.MESSAGES_DEFERRED.inc()
                await store.schedule(
                    session,
                    store.Timer(
                        run.id,
                        run.workspace_id,
                        run.contact_id,
                        index,
                        until,
                        index,
                        None,
                        None,
                        "quiet",
                    ),
                )
                return
            case Send(channel=channel, template_id=template, next=nxt):
                capped = await _capped(session, caps, run.contact_id, channel, now)
                outcome = "capped" if capped else "requested"
                if not await store.record_step(
                    session, run_id=run.id, step=index, at=now, outcome=outcome
                ):
                    return
                if capped:
                    metrics.MESSAGES_CAPPED.labels(channel).inc()
                else:
                    key = idempotency_key(run.id, index)
                    await store.record_send(
                        session,
                        run=run,
                        step=index,
                        channel=channel,
                        variant=variant,
                        idempotency_key=key,
                        at=now,
                    )
                    out.messages.append(
                        _notification(run, contact, index, channel, template, key, now, out)
                    )
                    metrics.MESSAGES_REQUESTED.labels(channel).inc()
                index = nxt
            case Schedule(due=due, resume=nxt, event=event, on_event=on_event):
                if not await store.record_step(
                    session, run_id=run.id, step=index, at=now, outcome="waiting"
                ):
                    return
                await store.schedule(
                    session,
                    store.Timer(
                        run.id,
                        run.workspace_id,
                        run.contact_id,
                        index,
                        due,
                        nxt,
                        event,
                        on_event,
                        "event" if event else "wait",
                    ),
                )
                metrics.TIMERS_SCHEDULED.labels(kind).inc()
                return
            case Goto(next=nxt, outcome=outcome):
                if not await store.record_step(
                    session, run_id=run.id, step=index, at=now, outcome=outcome
                ):
                    return
                if kind == "split":
                    variant = outcome
                    await store.set_variant(session, run_id=run.id, variant=outcome)
                index = nxt
            case End(outcome=outcome):
                if not await store.record_step(
                    session, run_id=run.id, step=index, at=now, outcome=outcome
                ):
                    return
                await store.finish_run(session, run_id=run.id, status="exited", at=now)
                metrics.RUNS_FINISHED.labels("exited").inc()
                return
    await store.finish_run(session, run_id=run.id, status="completed", at=now)
    metrics.RUNS_FINISHED.labels("completed").inc()


def _quiet_hours(raw: dict[str, Any] | None) -> QuietHours | None:
    if not raw:
        return None
    return QuietHours(time.fromisoformat(raw["start"]), time.fromisoformat(raw["end"]))


async def _capped(
    session: AsyncSession, caps: dict[str, Any], contact_id: uuid.UUID, channel: str, now: datetime
) -> bool:
    for window, limit in (caps.get(channel) or {}).items():
        span = CAP_WINDOWS.get(window)
        if span is None:
            continue
        if (
            await store.sends_since(
                session, contact_id=contact_id, channel=channel, since=now - span
            )
            >= limit
        ):
            return True
    return False


def _notification(
    run: store.Run,
    contact: dict[str, Any],
    step: int,
    channel: Any,
    template_id: uuid.UUID,
    key: str,
    now: datetime,
    out: Outputs,
) -> OutgoingMessage:
    request = NotificationRequested(
        idempotency_key=key,
        channel=channel,
        template_id=template_id,
        contact=ContactSnapshot(
            contact_id=run.contact_id,
            user_id=contact.get("user_id"),
            traits=contact.get("traits") or {},
            scores=contact.get("scores") or {},
        ),
        workflow_id=run.workflow_id,
        run_id=run.id,
        step=step,
    )
    return OutgoingMessage(
        Topic.NOTIFICATIONS,
        key=str(run.contact_id),
        envelope=NOTIFICATION_REQUESTED.envelope(
            workspace_id=run.workspace_id,
            payload=request,
            occurred_at=now,
            # Derived from (run, step): a re-publication after a crash is the same message.
            id=stable_id(str(run.id), "notification.requested", str(step)),
            origin_received_at=out.origin_received_at,
        ),
    )


async def on_event(
    session: AsyncSession,
    out: Outputs,
    *,
    workspace_id: str,
    contact_id: uuid.UUID,
    event: str,
    now: datetime,
) -> None:
    """A contact performed ``event``: runs remember it, goals convert, waits for it end."""
    active = await store.active_runs_of(session, workspace_id=workspace_id, contact_id=contact_id)
    if not active:
        return
    await store.note_performed(session, run_ids=[run.id for run in active], event=event)
    converted = set()
    for run in active:
        definition = await store.version_definition(
            session, workflow_id=run.workflow_id, version=run.version
        )
        if definition.goal is not None and definition.goal.event == event:
            await store.finish_run(session, run_id=run.id, status="converted", at=now)
            metrics.RUNS_FINISHED.labels("converted").inc()
            converted.add(run.id)
    for timer in await store.claim_event_waits(
        session, workspace_id=workspace_id, contact_id=contact_id, event=event
    ):
        if timer.run_id in converted:
            continue
        await resume(session, out, run_id=timer.run_id, index=timer.event_step, now=now)
