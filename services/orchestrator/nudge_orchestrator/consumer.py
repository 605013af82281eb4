"""Orchestrator's Kafka wiring: three consumers on the one runner.

* ``orchestrator`` (memberships): a contact entering or leaving a segment starts the
  workflows it triggers;
* ``orchestrator-events`` (events): a track event starts event-triggered workflows, ends
  the waits for it, converts goals, and is remembered by the contact's active runs;
* ``orchestrator-contacts`` (contacts): the orchestrator's copy of each contact's traits
  and scores, read when a step runs (messages go to the address known *then*).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.clock import Clock, clock_from
from nudge_common.conditions import Profile, matches
from nudge_common.consumer import BatchFirstHandler, ConsumerRunner, MessageHandler
from nudge_common.events import (
    CONTACT_STAGE_CHANGED,
    CONTACT_UPDATED,
    DELIVERY_REPORTED,
    EVENT_RECEIVED,
    SEGMENT_ENTERED,
    SEGMENT_EXITED,
    Envelope,
    SegmentEvent,
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

_SEGMENT_TRIGGERS = {SEGMENT_ENTERED.name: "segment_entered", SEGMENT_EXITED.name: "segment_exited"}


class MembershipHandler(BatchFirstHandler):
    """Segment entries and exits start the workflows they trigger. A whole batch (a segment
    that many contacts enter at once) goes through :meth:`handle_batch`: one lookup of the
    workflows (with their workspaces' messaging settings), the copies' update (read back
    for the runs) and the entry states, all in one statement for the batch; then one
    insert of runs per workflow."""

    message_types = frozenset({SEGMENT_ENTERED.name, SEGMENT_EXITED.name})

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    async def handle_batch(
        self, session: AsyncSession, envelopes: Sequence[Envelope]
    ) -> Sequence[OutgoingMessage]:
        parsed = [(envelope, SEGMENT_ENTERED.parse(envelope)) for envelope in envelopes]
        if len({(e.workspace_id, change.contact.contact_id) for e, change in parsed}) < len(parsed):
            # One contact twice in the batch: in order, one at a time (the second entry
            # depends on the first).
            messages: list[OutgoingMessage] = []
            for envelope, _ in parsed:
                messages.extend(await self.handle_batch(session, [envelope]))
            return messages
        now = self.clock()
        out = execution.Outputs()
        # The copy first, so what the entries send already sees the new membership.
        applied = await store.apply_memberships(
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
            kinds={_SEGMENT_TRIGGERS[envelope.type] for envelope, _ in parsed},
        )
        if not applied.workflows:
            return []
        entrants: dict[uuid.UUID, tuple[store.Published, list[execution.Entrant]]] = {}
        for envelope, change in parsed:
            key = (envelope.workspace_id, _SEGMENT_TRIGGERS[envelope.type], str(change.segment_id))
            for workflow in applied.workflows.get(key, ()):
                entrants.setdefault(workflow.id, (workflow, []))[1].append(
                    execution.Entrant(
                        change.contact.contact_id,
                        # the snapshot's JSON as it came (model_dump would copy it)
                        {
                            "user_id": change.contact.user_id,
                            "traits": change.contact.traits,
                            "scores": change.contact.scores,
                        },
                        str(envelope.id),
                        envelope.origin_received_at,
                        change.segment_id,
                    )
                )
        for workflow, group in entrants.values():
            await execution.enter_many(
                session,
                out,
                workflow=workflow,
                entrants=group,
                now=now,
                copies=applied.copies,
                entry_states={
                    entrant.contact_id: state
                    for entrant in group
                    if (state := applied.entry_states.get((workflow.id, entrant.contact_id)))
                },
            )
        return out.messages


def identity_of(workspace_id: str, event: SegmentEvent) -> store.Identity:
    if event.user_id:
        first_seen_id = _first_seen_id(workspace_id, "user_id", event.user_id)
    else:
        first_seen_id = _first_seen_id(workspace_id, "anonymous_id", event.anonymous_id or "")
    return store.Identity(workspace_id, event.user_id or None, first_seen_id)


@functools.lru_cache(maxsize=8192)
def _first_seen_id(workspace_id: str, kind: str, value: str) -> uuid.UUID:
    """The id scoring gives a contact first seen with this identity (cached: a contact's
    events come close together)."""
    return stable_id(workspace_id, "contact", kind, value)


class EventHandler(BatchFirstHandler):
    """Track events start the workflows they trigger and reach the active runs of their
    contact (what it performed, goals, waits for an event). A batch costs one query
    whatever its size; only the events of contacts in a run, or of a name a workflow
    listens to, are then applied one at a time, in order."""

    message_types = frozenset({EVENT_RECEIVED.name})  # not score.adjusted, for scoring

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    async def handle_batch(
        self, session: AsyncSession, envelopes: Sequence[Envelope]
    ) -> Sequence[OutgoingMessage]:
        tracks: list[tuple[Envelope, SegmentEvent, str]] = []
        for envelope in envelopes:
            event = EVENT_RECEIVED.parse(envelope)
            if event.type is SegmentType.TRACK and event.event:
                tracks.append((envelope, event, event.event))
        if not tracks:
            return []
        identities = [identity_of(envelope.workspace_id, event) for envelope, event, _ in tracks]
        contacts, listening = await store.event_contacts(
            session, identities=set(identities), kinds={"event"}
        )
        located = [
            (envelope, event, name, contacts[identity.first_seen_id][0])
            for (envelope, event, name), identity in zip(tracks, identities, strict=True)
        ]
        in_runs = {contact_id for contact_id, in_run in contacts.values() if in_run}
        now = self.clock()
        messages: list[OutgoingMessage] = []
        for envelope, event, name, contact_id in located:
            workflows = listening.get((envelope.workspace_id, "event", name), [])
            if contact_id not in in_runs and not workflows:
                continue
            out = execution.Outputs(origin_received_at=envelope.origin_received_at)
            await execution.on_event(
                session,
                out,
                workspace_id=envelope.workspace_id,
                contact_id=contact_id,
                event=name,
                now=now,
            )
            if workflows:
                await self._enter(session, out, envelope, event, contact_id, workflows, now)
                in_runs.add(contact_id)
            messages.extend(out.messages)
        return messages

    @staticmethod
    async def _enter(
        session: AsyncSession,
        out: execution.Outputs,
        envelope: Envelope,
        event: SegmentEvent,
        contact_id: uuid.UUID,
        workflows: list[store.Published],
        now: datetime,
    ) -> None:
        known = await store.get_contact(session, contact_id=contact_id)
        contact: dict[str, Any] = known or {"user_id": event.user_id, "traits": {}, "scores": {}}
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


@dataclass
class _Entry:
    out: execution.Outputs
    workflow: store.Published
    contact_id: uuid.UUID
    contact: dict[str, Any]
    cause: str


class ContactHandler(BatchFirstHandler):
    """Keeps the orchestrator's copy of each contact, and starts what a contact's change
    triggers: a score crossing a threshold, a lifecycle stage change; a date trait learned
    or changed (re)schedules its date-trait workflows for that contact.

    A batch's updates are compared in memory, each with the one before it (the stored copy
    for a contact's first), the copies are written in one statement, and only then do the
    triggered workflows start: a run started by a contact's first update of a batch already
    sees the copy of its last. A stage change is applied where it stands in the batch."""

    message_types = frozenset({CONTACT_UPDATED.name, CONTACT_STAGE_CHANGED.name})

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    async def handle_batch(
        self, session: AsyncSession, envelopes: Sequence[Envelope]
    ) -> Sequence[OutgoingMessage]:
        messages: list[OutgoingMessage] = []
        updates: list[Envelope] = []
        for envelope in envelopes:
            if envelope.type == CONTACT_UPDATED.name:
                updates.append(envelope)
            elif envelope.type == CONTACT_STAGE_CHANGED.name:
                messages.extend(await self._apply_updates(session, updates))
                updates = []
                messages.extend(await _stage_changed(session, envelope, self.clock()))
        messages.extend(await self._apply_updates(session, updates))
        return messages

    async def _apply_updates(
        self, session: AsyncSession, envelopes: list[Envelope]
    ) -> list[OutgoingMessage]:
        if not envelopes:
            return []
        parsed = [(envelope, CONTACT_UPDATED.parse(envelope)) for envelope in envelopes]
        stored, listening = await store.profiles(
            session,
            contact_ids=list({update.contact_id for _, update in parsed}),
            workspace_ids={envelope.workspace_id for envelope in envelopes},
            kinds={"score_crossed", "date_trait"},
        )
        now = self.clock()
        copies: dict[uuid.UUID, store.ContactCopy] = {}
        entries: list[_Entry] = []
        outs: list[execution.Outputs] = []
        for envelope, update in parsed:
            workspace_id = envelope.workspace_id
            previous = copies.get(update.contact_id)
            before = (
                stored.get(update.contact_id)
                if previous is None
                else {"traits": previous.traits, "scores": previous.scores}
            )
            copies[update.contact_id] = store.ContactCopy(
                contact_id=update.contact_id,
                workspace_id=workspace_id,
                user_id=update.user_id or (previous.user_id if previous else None),
                traits=update.traits,
                scores=update.scores,
                tags=update.tags
                if update.tags or "tags" in update.changed
                else (previous.tags if previous else None),
                stages=update.stages
                if update.stages or "stages" in update.changed
                else (previous.stages if previous else None),
            )
            contact = {"user_id": update.user_id, "traits": update.traits, "scores": update.scores}
            out = execution.Outputs(origin_received_at=envelope.origin_received_at)
            outs.append(out)
            old_scores: dict[str, int] = (before or {}).get("scores") or {}
            for model in sorted(set(old_scores) | set(update.scores)):
                if old_scores.get(model) == update.scores.get(model):
                    continue
                for workflow in listening.get((workspace_id, "score_crossed", model), []):
                    trigger = workflow.definition.trigger
                    assert isinstance(trigger, ScoreCrossed)
                    if crossed(trigger, old_scores.get(model), update.scores.get(model)):
                        entries.append(
                            _Entry(out, workflow, update.contact_id, contact, str(envelope.id))
                        )
            old_traits: dict[str, Any] = (before or {}).get("traits") or {}
            if old_traits == update.traits:
                continue
            for (listener_workspace, kind, _), workflows in listening.items():
                if listener_workspace != workspace_id or kind != "date_trait":
                    continue
                for workflow in workflows:
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
        await store.upsert_contacts(session, list(copies.values()))
        for entry in entries:
            await execution.enter(
                session,
                entry.out,
                workflow=entry.workflow,
                contact_id=entry.contact_id,
                contact=entry.contact,
                cause=entry.cause,
                now=now,
            )
        return [message for out in outs for message in out.messages]


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


class DeliveryHandler(BatchFirstHandler):
    """What became of a message a run requested (its idempotency key is ``<run>:<step>``),
    counted once per status for analytics; other deliveries (not from a run) are ignored.
    Analytics can wait: its runner paces the batches (``delivery_batch_interval_s``)."""

    message_types = frozenset({DELIVERY_REPORTED.name})

    async def handle_batch(
        self, session: AsyncSession, envelopes: Sequence[Envelope]
    ) -> Sequence[OutgoingMessage]:
        reports: list[store.Delivery] = []
        for envelope in envelopes:
            report = DELIVERY_REPORTED.parse(envelope)
            run, _, step = report.idempotency_key.partition(":")
            try:
                run_id, index = uuid.UUID(run), int(step)
            except ValueError:
                continue
            reports.append(store.Delivery(run_id, index, report.status, envelope.occurred_at))
        await store.record_deliveries(session, reports)
        return []


def consumers(runtime: Runtime) -> list[Worker]:
    settings = runtime.settings
    assert isinstance(settings, OrchestratorSettings)
    clock = clock_from(settings.clock_file)

    def runner(
        name: str, topic: Topic, handler: MessageHandler, min_batch_interval_s: float = 0.0
    ) -> ConsumerRunner:
        return ConsumerRunner(
            name=name,
            topics=[topic],
            handler=handler,
            settings=settings,
            sessionmaker=runtime.sessionmaker,
            producer=runtime.producer,
            processed_messages=store.processed_messages,
            min_batch_interval_s=min_batch_interval_s,
        )

    return [
        runner("orchestrator-contacts", Topic.CONTACTS, ContactHandler(clock)),
        runner("orchestrator", Topic.MEMBERSHIPS, MembershipHandler(clock)),
        runner("orchestrator-events", Topic.EVENTS, EventHandler(clock)),
        runner(
            "orchestrator-deliveries",
            Topic.DELIVERIES,
            DeliveryHandler(),
            # fewer, larger batches leave the process's one event loop to the consumers a
            # workflow waits for
            min_batch_interval_s=settings.delivery_batch_interval_s,
        ),
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
