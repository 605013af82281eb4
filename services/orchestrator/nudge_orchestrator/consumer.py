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
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.conditions import Profile, matches
from nudge_common.consumer import ConsumerRunner, MessageHandler
from nudge_common.events import (
    CONTACT_UPDATED,
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
from nudge_orchestrator.clock import Clock, clock_from
from nudge_orchestrator.domain.workflows import EventPerformed
from nudge_orchestrator.settings import OrchestratorSettings
from nudge_orchestrator.worker import TimerWorker


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
        for envelope in changes:
            kind = "segment_entered" if envelope.type == SEGMENT_ENTERED.name else "segment_exited"
            change = SEGMENT_ENTERED.parse(envelope)
            key = (envelope.workspace_id, kind, str(change.segment_id))
            if key not in triggered:
                triggered[key] = await store.triggered_workflows(
                    session, workspace_id=key[0], kind=kind, key=key[2]
                )
            for workflow in triggered[key]:
                entrants.setdefault(workflow.id, (workflow, []))[1].append(
                    execution.Entrant(
                        change.contact.contact_id,
                        change.contact.model_dump(mode="json", exclude={"contact_id"}),
                        str(envelope.id),
                        envelope.origin_received_at,
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


async def handle_contact(session: AsyncSession, envelope: Envelope) -> Sequence[OutgoingMessage]:
    if envelope.type != CONTACT_UPDATED.name:
        return []
    update = CONTACT_UPDATED.parse(envelope)
    await store.upsert_contact(
        session,
        workspace_id=envelope.workspace_id,
        contact_id=update.contact_id,
        user_id=update.user_id,
        traits=update.traits,
        scores=update.scores,
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
        runner("orchestrator-contacts", Topic.CONTACTS, handle_contact),
        runner("orchestrator", Topic.MEMBERSHIPS, membership_handler(clock)),
        runner("orchestrator-events", Topic.EVENTS, event_handler(clock)),
        TimerWorker(
            settings=settings,
            sessionmaker=runtime.sessionmaker,
            producer=runtime.producer,
            clock=clock,
            batch=settings.timer_batch,
            idle_s=settings.timer_idle_s,
        ),
    ]
