"""Segmenter's Kafka wiring: two consumer groups on the one runner.

* ``segmenter`` (contacts topic; ``contacts_consumers`` of them in the group): scoring's
  ``contact.updated`` (traits, scores, tags, stages) and ``contact.activity`` (the events a
  contact performs), and the orchestrator's ``list.changed``, keep the segmenter's copy of
  each contact; each re-evaluates only the segments depending on what changed
  (:mod:`nudge_segmenter.evaluation`). A merge moves the merged contact's memberships and
  events to the survivor and leaves a tombstone (later messages about the merged id are
  stale and ignored); an erasure deletes the contacts' state, events, memberships and
  history.
* ``segmenter-consents`` (deliveries topic): the notifier's ``consent.changed`` for a
  known contact re-evaluates the segments that depend on consent.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.clock import Clock, clock_from, system_clock
from nudge_common.consumer import BatchFirstHandler, ConsumerRunner
from nudge_common.events import (
    CONSENT_CHANGED,
    CONTACT_ACTIVITY,
    CONTACT_ERASED,
    CONTACT_MERGED,
    CONTACT_UPDATED,
    LIST_CHANGED,
    ContactActivity,
    ContactUpdated,
    Envelope,
    Topic,
)
from nudge_common.kafka import OutgoingMessage
from nudge_common.service import Runtime, Worker
from nudge_segmenter import metrics, store, value
from nudge_segmenter.evaluation import Cause, ContactBatch, reevaluate
from nudge_segmenter.settings import SegmenterSettings


def touched(payloads: Sequence[ContactUpdated | ContactActivity]) -> set[str] | None:
    """The facts the messages can touch (what ``ContactBatch.apply_update`` and
    ``apply_activity`` return for a known contact); None: any (an update naming nothing)."""
    facts: set[str] = set()
    for payload in payloads:
        if isinstance(payload, ContactUpdated):
            if not payload.changed:
                return None
            facts.update(payload.changed)
        else:
            facts.update(("activity", f"event:{payload.event}"))
            if payload.revenue is not None:
                facts.add("value")
    return facts


class ContactsHandler(BatchFirstHandler):
    """Scoring's updates and activities go through :class:`ContactBatch` a run at a time
    (a few queries per run, whatever its size); merges, erasures and list changes, rarer,
    one by one in their place."""

    message_types = frozenset(
        {
            CONTACT_UPDATED.name,
            CONTACT_ACTIVITY.name,
            CONTACT_MERGED.name,
            CONTACT_ERASED.name,
            LIST_CHANGED.name,
        }
    )

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    async def handle_batch(
        self, session: AsyncSession, envelopes: Sequence[Envelope]
    ) -> Sequence[OutgoingMessage]:
        messages: list[OutgoingMessage] = []
        run: list[Envelope] = []
        for envelope in envelopes:
            if envelope.type in (CONTACT_UPDATED.name, CONTACT_ACTIVITY.name):
                run.append(envelope)
                continue
            messages += await self.apply_run(session, run)
            run = []
            messages += await self.apply_one(session, envelope)
        messages += await self.apply_run(session, run)
        return messages

    async def apply_run(
        self, session: AsyncSession, run: Sequence[Envelope]
    ) -> list[OutgoingMessage]:
        if not run:
            return []
        now = self.clock()
        by_workspace: dict[str, list[tuple[Envelope, ContactUpdated | ContactActivity]]] = {}
        for envelope in run:
            payload = (
                CONTACT_UPDATED.parse(envelope)
                if envelope.type == CONTACT_UPDATED.name
                else CONTACT_ACTIVITY.parse(envelope)
            )
            by_workspace.setdefault(envelope.workspace_id, []).append((envelope, payload))
        messages: list[OutgoingMessage] = []
        for workspace_id, items in by_workspace.items():
            batch = await ContactBatch.load(
                session,
                workspace_id,
                {payload.contact_id for _, payload in items},
                facts=touched([p for _, p in items]),
                skip_merged=True,
            )
            stale = batch.stale
            ordered = False
            for envelope, payload in items:
                if payload.contact_id in stale:
                    metrics.STALE_UPDATES.inc()
                    continue
                if isinstance(payload, ContactUpdated):
                    facts = batch.apply_update(payload)
                else:
                    facts = batch.apply_activity(payload)
                    ordered = ordered or (payload.revenue or -1) >= 0
                batch.evaluate(payload.contact_id, now=now, cause=Cause(envelope), facts=facts)
            if ordered and batch.rfm_cuts is None:
                await value.ensure_model(session, workspace_id=workspace_id)
            messages += await batch.save(session, now=now)
        return messages

    async def apply_one(self, session: AsyncSession, envelope: Envelope) -> list[OutgoingMessage]:
        workspace_id, now, cause = envelope.workspace_id, self.clock(), Cause(envelope)
        if envelope.type == CONTACT_MERGED.name:
            merge = CONTACT_MERGED.parse(envelope)
            await store.merge_contacts(
                session, survivor_id=merge.survivor_id, merged_id=merge.merged_id, at=now
            )
            return await reevaluate(
                session,
                workspace_id=workspace_id,
                contact_id=merge.survivor_id,
                now=now,
                cause=cause,
            )
        if envelope.type == CONTACT_ERASED.name:
            erased = CONTACT_ERASED.parse(envelope)
            await store.erase_contacts(
                session,
                workspace_id=workspace_id,
                contact_ids=sorted({erased.contact_id, *erased.contact_ids}),
            )
            return []
        if envelope.type == LIST_CHANGED.name:
            return await self.list_changed(session, envelope, now)
        return []

    async def list_changed(
        self, session: AsyncSession, envelope: Envelope, now: datetime
    ) -> list[OutgoingMessage]:
        change = LIST_CHANGED.parse(envelope)
        workspace_id = envelope.workspace_id
        static = await store.get_segment(
            session, workspace_id=workspace_id, segment_id=change.list_id
        )
        if static is None or static.kind != "static" or static.status == "archived":
            raise ValueError(f"list_id: no static list {change.list_id} in this workspace")
        return await apply_list_change(
            session,
            static,
            contact_id=change.contact_id,
            add=change.action == "add",
            now=now,
            cause=Cause(envelope),
        )


async def apply_list_change(
    session: AsyncSession,
    static: store.Segment,
    *,
    contact_id: uuid.UUID,
    add: bool,
    now: datetime,
    cause: Cause,
) -> list[OutgoingMessage]:
    """Add a contact to a static list or remove it: a transition like a segment's (with
    its history and message), then the segments referencing the list."""
    batch = await ContactBatch.load(session, static.workspace_id, [contact_id])
    batch.set_static(static.id, static.name, contact_id, add=add, now=now, cause=cause)
    return await batch.save(session, now=now)


class ConsentHandler:
    message_types = frozenset({CONSENT_CHANGED.name})

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    async def __call__(
        self, session: AsyncSession, envelope: Envelope
    ) -> Sequence[OutgoingMessage]:
        if envelope.type != CONSENT_CHANGED.name:
            return []
        change = CONSENT_CHANGED.parse(envelope)
        if (
            change.contact_id is None
            or change.status is None
            or change.topic
            not in (
                None,
                "marketing",
            )
        ):
            return []
        if await store.was_merged(session, contact_id=change.contact_id):
            return []
        now = self.clock()
        await store.set_consent(
            session,
            workspace_id=envelope.workspace_id,
            contact_id=change.contact_id,
            channel=change.channel,
            subscribed=change.status == "subscribed",
            at=now,
        )
        return await reevaluate(
            session,
            workspace_id=envelope.workspace_id,
            contact_id=change.contact_id,
            now=now,
            cause=Cause(envelope),
            facts=["consent"],
        )


handle_contact_updated = ContactsHandler(system_clock)


def consumers(runtime: Runtime) -> list[Worker]:
    from nudge_segmenter.worker import BackfillWorker, RecheckWorker, ValueWorker

    settings = runtime.settings
    assert isinstance(settings, SegmenterSettings)
    clock = clock_from(settings.clock_file)

    def runner(
        name: str, topic: Topic, handler: ContactsHandler | ConsentHandler
    ) -> ConsumerRunner:
        return ConsumerRunner(
            name=name,
            topics=[topic],
            handler=handler,
            settings=settings,
            sessionmaker=runtime.sessionmaker,
            producer=runtime.producer,
            processed_messages=store.processed_messages,
        )

    contacts = ContactsHandler(clock)
    return [
        *(
            runner("segmenter", Topic.CONTACTS, contacts)
            for _ in range(settings.contacts_consumers)
        ),
        runner("segmenter-consents", Topic.DELIVERIES, ConsentHandler(clock)),
        RecheckWorker(runtime, clock),
        BackfillWorker(runtime, clock),
        ValueWorker(runtime, clock),
    ]
