"""Orchestrator's Kafka wiring: three consumers on the one runner.

* ``orchestrator`` (memberships): a contact entering or leaving a segment starts the
  workflows it triggers;
* ``orchestrator-events`` (events): a track event starts event-triggered workflows, ends
  the waits for it, converts goals, and is remembered by the contact's active runs;
* ``orchestrator-contacts`` (contacts): the orchestrator's copy of each contact's traits
  and scores, read when a step runs (messages go to the address known *then*).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.clock import Clock, clock_from
from nudge_common.conditions import Profile, matches
from nudge_common.consumer import ConsumerRunner, MessageHandler
from nudge_common.events import (
    CONTACT_STAGE_CHANGED,
    CONTACT_UPDATED,
    DELIVERY_REPORTED,
    EVENT_RECEIVED,
    SEGMENT_ENTERED,
    SEGMENT_EXITED,
    Envelope,
    SegmentType,
    Topic,
)
from nudge_common.ids import stable_id
from nudge_common.kafka import OutgoingMessage
from nudge_common.service import Runtime, Worker
from nudge_orchestrator import execution, store
from nudge_orchestrator.domain.workflows import (
    DateTrait,
    EventPerformed,
    ScoreCrossed,
    StageChanged,
    crossed,
    next_date_occurrence,
    stage_matches,
)
from nudge_orchestrator.settings import OrchestratorSettings
from nudge_orchestrator.worker import BroadcastWorker, TimerWorker, WebhookWorker


class MembershipHandler:
    """Segment entries and exits start the workflows they trigger. A whole batch (a segment
    that many contacts enter at once) goes through :meth:`handle_batch`: one lookup of the
    workflows per segment, one entry check and one insert of runs per workflow."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    async def __call__(
        self, session: AsyncSession, envelope: Envelope
    ) -> Sequence[OutgoingMessage]:
        return await self.handle_batch(session, [envelope])

    async def handle_batch(
        self, session: AsyncSession, envelopes: Sequence[Envelope]
    ) -> Sequence[OutgoingMessage]:
        changes = [e for e in envelopes if e.type in (SEGMENT_ENTERED.name, SEGMENT_EXITED.name)]
        if len(
            {(e.workspace_id, SEGMENT_ENTERED.parse(e).contact.contact_id) for e in changes}
        ) < len(changes):
            # One contact twice in the batch: in order, one at a time (the second entry
            # depends on the first).
            messages: list[OutgoingMessage] = []
            for envelope in changes:
                messages.extend(await self.handle_batch(session, [envelope]))
            return messages
        now = self.clock()
        out = execution.Outputs()
        entrants: dict[uuid.UUID, tuple[store.Published, list[execution.Entrant]]] = {}
        triggered: dict[tuple[str, str, str], list[store.Published]] = {}
        parsed = [(envelope, SEGMENT_ENTERED.parse(envelope)) for envelope in changes]
        # The copy first, so what the entries send already sees the new membership.
        await store.apply_memberships(
            session,
            [
                store.Membership(
                    contact_id=change.contact.contact_id,
                    workspace_id=envelope.workspace_id,
                    segment_id=change.segment_id,
                    segment_name=change.segment_name,
                    entered=envelope.type == SEGMENT_ENTERED.name,
                    user_id=change.contact.user_id,
                    traits=change.contact.traits,
                    scores=change.contact.scores,
                )
                for envelope, change in parsed
            ],
        )
        for envelope, change in parsed:
            kind = "segment_entered" if envelope.type == SEGMENT_ENTERED.name else "segment_exited"
            key = (envelope.workspace_id, kind, str(change.segment_id))
            if key not in triggered:
                triggered[key] = await store.triggered_workflows(
                    session, workspace_id=key[0], kind=kind, key=key[2]
                )
            for workflow in triggered[key]:
                entrants.setdefault(workflow.id, (workflow, []))[1].append(
                    execution.Entrant(
                        change.contact.contact_id,
                        change.contact.model_dump(mode="json", exclude={"contact_id", "segments"}),
                        str(envelope.id),
                        envelope.origin_received_at,
                        change.segment_id,
                    )
                )
        for workflow, group in entrants.values():
            await execution.enter_many(session, out, workflow=workflow, entrants=group, now=now)
        return out.messages


def membership_handler(clock: Clock) -> MembershipHandler:
    return MembershipHandler(clock)


async def contact_of(
    session: AsyncSession, workspace_id: str, user_id: str | None, anonymous_id: str | None
) -> uuid.UUID:
    """The contact an event belongs to: the one known with this user id, else the id
    scoring gives a contact first seen with this identity."""
    if user_id:
        known = await store.contact_by_user_id(session, workspace_id=workspace_id, user_id=user_id)
        if known is not None:
            return known
        return stable_id(workspace_id, "contact", "user_id", user_id)
    return stable_id(workspace_id, "contact", "anonymous_id", anonymous_id or "")


def event_handler(clock: Clock) -> MessageHandler:
    async def handle(session: AsyncSession, envelope: Envelope) -> Sequence[OutgoingMessage]:
        if envelope.type != EVENT_RECEIVED.name:
            return []  # score.adjusted, for scoring
        event = EVENT_RECEIVED.parse(envelope)
        if event.type is not SegmentType.TRACK or not event.event:
            return []
        workspace_id = envelope.workspace_id
        contact_id = await contact_of(session, workspace_id, event.user_id, event.anonymous_id)
        out = execution.Outputs(origin_received_at=envelope.origin_received_at)
        now = clock()
        await execution.on_event(
            session,
            out,
            workspace_id=workspace_id,
            contact_id=contact_id,
            event=event.event,
            now=now,
        )
        workflows = await store.triggered_workflows(
            session, workspace_id=workspace_id, kind="event", key=event.event
        )
        if workflows:
            known = await store.get_contact(session, contact_id=contact_id)
            contact: dict[str, Any] = known or {
                "user_id": event.user_id,
                "traits": {},
                "scores": {},
            }
            for workflow in workflows:
                trigger = workflow.definition.trigger
                assert isinstance(trigger, EventPerformed)
                if trigger.properties is not None and not matches(
                    trigger.properties, Profile(traits=event.properties)
                ):
                    continue
                await execution.enter(
                    session,
                    out,
                    workflow=workflow,
                    contact_id=contact_id,
                    contact=contact,
                    cause=str(envelope.id),
                    now=now,
                )
        return out.messages

    return handle


def contact_handler(clock: Clock) -> MessageHandler:
    """Keeps the orchestrator's copy of each contact, and starts what a contact's change
    triggers: a score crossing a threshold, a lifecycle stage change; a date trait learned
    or changed (re)schedules its date-trait workflows for that contact."""

    async def handle(session: AsyncSession, envelope: Envelope) -> Sequence[OutgoingMessage]:
        if envelope.type == CONTACT_STAGE_CHANGED.name:
            return await _stage_changed(session, envelope, clock())
        if envelope.type != CONTACT_UPDATED.name:
            return []
        update = CONTACT_UPDATED.parse(envelope)
        workspace_id = envelope.workspace_id
        before = await store.get_contact(session, contact_id=update.contact_id)
        await store.upsert_contact(
            session,
            workspace_id=workspace_id,
            contact_id=update.contact_id,
            user_id=update.user_id,
            traits=update.traits,
            scores=update.scores,
            tags=update.tags if update.tags or "tags" in update.changed else None,
            stages=update.stages if update.stages or "stages" in update.changed else None,
        )
        now = clock()
        contact = {"user_id": update.user_id, "traits": update.traits, "scores": update.scores}
        out = execution.Outputs(origin_received_at=envelope.origin_received_at)
        old_scores: dict[str, int] = (before or {}).get("scores") or {}
        for model in sorted(set(old_scores) | set(update.scores)):
            if old_scores.get(model) == update.scores.get(model):
                continue
            for workflow in await store.triggered_workflows(
                session, workspace_id=workspace_id, kind="score_crossed", key=model
            ):
                trigger = workflow.definition.trigger
                assert isinstance(trigger, ScoreCrossed)
                if crossed(trigger, old_scores.get(model), update.scores.get(model)):
                    await execution.enter(
                        session,
                        out,
                        workflow=workflow,
                        contact_id=update.contact_id,
                        contact=contact,
                        cause=str(envelope.id),
                        now=now,
                    )
        old_traits: dict[str, Any] = (before or {}).get("traits") or {}
        if old_traits != update.traits:
            for workflow in await store.triggered_workflows(
                session, workspace_id=workspace_id, kind="date_trait"
            ):
                trigger = workflow.definition.trigger
                assert isinstance(trigger, DateTrait)
                if before is not None and all(
                    old_traits.get(name) == update.traits.get(name)
                    for name in (trigger.trait, "timezone")
                ):
                    continue
                await schedule_date(
                    session, workflow, update.contact_id, update.traits, trigger, now
                )
        return out.messages

    return handle


async def schedule_date(
    session: AsyncSession,
    workflow: store.Published,
    contact_id: uuid.UUID,
    traits: dict[str, Any],
    trigger: DateTrait,
    now: datetime,
) -> None:
    """The contact's next firing of a date-trait workflow (none when the trait is no date
    or a one-off date passed)."""
    timezone = traits.get("timezone") if isinstance(traits.get("timezone"), str) else None
    await store.put_date_trigger(
        session,
        workflow_id=workflow.id,
        contact_id=contact_id,
        workspace_id=workflow.workspace_id,
        due_at=next_date_occurrence(trigger, traits.get(trigger.trait), timezone, now),
    )


async def _stage_changed(
    session: AsyncSession, envelope: Envelope, now: datetime
) -> Sequence[OutgoingMessage]:
    change = CONTACT_STAGE_CHANGED.parse(envelope)
    await store.set_contact_stage(
        session, contact_id=change.contact_id, model=change.model, stage=change.stage
    )
    out = execution.Outputs(origin_received_at=envelope.origin_received_at)
    workflows = await store.triggered_workflows(
        session, workspace_id=envelope.workspace_id, kind="stage_changed", key=change.model
    )
    known = await store.get_contact(session, contact_id=change.contact_id) if workflows else None
    for workflow in workflows:
        trigger = workflow.definition.trigger
        assert isinstance(trigger, StageChanged)
        if stage_matches(trigger, change.previous_stage, change.stage):
            await execution.enter(
                session,
                out,
                workflow=workflow,
                contact_id=change.contact_id,
                contact=known or {"user_id": None, "traits": {}, "scores": {}},
                cause=str(envelope.id),
                now=now,
            )
    return out.messages


async def handle_delivery(session: AsyncSession, envelope: Envelope) -> Sequence[OutgoingMessage]:
    """What became of a message a run requested (its idempotency key is ``<run>:<step>``),
    counted once per status for analytics; other deliveries (not from a run) are ignored."""
    if envelope.type != DELIVERY_REPORTED.name:
        return []
    report = DELIVERY_REPORTED.parse(envelope)
    run, _, step = report.idempotency_key.partition(":")
    try:
        run_id, index = uuid.UUID(run), int(step)
    except ValueError:
        return []
    await store.record_delivery(
        session, run_id=run_id, step=index, status=report.status, at=envelope.occurred_at
    )
    return []


def consumers(runtime: Runtime) -> list[Worker]:
    settings = runtime.settings
    assert isinstance(settings, OrchestratorSettings)
    clock = clock_from(settings.clock_file)

    def runner(name: str, topic: Topic, handler: MessageHandler) -> ConsumerRunner:
        return ConsumerRunner(
            name=name,
            topics=[topic],
            handler=handler,
            settings=settings,
            sessionmaker=runtime.sessionmaker,
            producer=runtime.producer,
            processed_messages=store.processed_messages,
        )

    return [
        runner("orchestrator-contacts", Topic.CONTACTS, contact_handler(clock)),
        runner("orchestrator", Topic.MEMBERSHIPS, membership_handler(clock)),
        runner("orchestrator-events", Topic.EVENTS, event_handler(clock)),
        runner("orchestrator-deliveries", Topic.DELIVERIES, handle_delivery),
        TimerWorker(
            settings=settings,
            sessionmaker=runtime.sessionmaker,
            producer=runtime.producer,
            clock=clock,
            batch=settings.timer_batch,
            idle_s=settings.timer_idle_s,
        ),
        WebhookWorker(settings=settings, sessionmaker=runtime.sessionmaker, clock=clock),
        BroadcastWorker(
            settings=settings,
            sessionmaker=runtime.sessionmaker,
            producer=runtime.producer,
            clock=clock,
        ),
    ]
