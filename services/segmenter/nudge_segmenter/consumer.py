"""Segmenter's Kafka wiring: two consumers on the one runner.

* ``segmenter`` (contacts topic): scoring's ``contact.updated`` (traits, scores, tags,
  stages) and ``contact.activity`` (the events a contact performs), and the orchestrator's
  ``list.changed``, keep the segmenter's copy of each contact; each re-evaluates only the
  segments depending on what changed (:mod:`nudge_segmenter.evaluation`). A merge moves
  the merged contact's memberships and events to the survivor and leaves a tombstone
  (later messages about the merged id are stale and ignored); an erasure deletes the
  contacts' state, events, memberships and history.
* ``segmenter-consents`` (deliveries topic): the notifier's ``consent.changed`` for a
  known contact re-evaluates the segments that depend on consent.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.clock import Clock, clock_from, system_clock
from nudge_common.consumer import ConsumerRunner
from nudge_common.events import (
    CONSENT_CHANGED,
    CONTACT_ACTIVITY,
    CONTACT_ERASED,
    CONTACT_MERGED,
    CONTACT_UPDATED,
    LIST_CHANGED,
    ContactSnapshot,
    Envelope,
    Topic,
)
from nudge_common.kafka import OutgoingMessage
from nudge_common.service import Runtime, Worker
from nudge_segmenter import metrics, store, value
from nudge_segmenter.evaluation import Cause, reevaluate, transition
from nudge_segmenter.settings import SegmenterSettings


class ContactsHandler:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    async def __call__(
        self, session: AsyncSession, envelope: Envelope
    ) -> Sequence[OutgoingMessage]:
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
        if envelope.type == CONTACT_UPDATED.name:
            update = CONTACT_UPDATED.parse(envelope)
            if await self.stale(session, update.contact_id):
                return []
            created = await store.save_contact(
                session,
                workspace_id=workspace_id,
                contact_id=update.contact_id,
                at=now,
                user_id=update.user_id,
                traits=update.traits,
                scores=update.scores,
                tags=update.tags,
                stages=update.stages,
            )
            return await reevaluate(
                session,
                workspace_id=workspace_id,
                contact_id=update.contact_id,
                now=now,
                cause=cause,
                facts=None if created else update.changed or None,
            )
        if envelope.type == CONTACT_ACTIVITY.name:
            activity = CONTACT_ACTIVITY.parse(envelope)
            if await self.stale(session, activity.contact_id):
                return []
            created = await store.record_activity(
                session,
                workspace_id=workspace_id,
                contact_id=activity.contact_id,
                event=activity.event,
                at=activity.at,
                properties=activity.properties,
                revenue=activity.revenue,
            )
            facts = ["activity", f"event:{activity.event}"]
            if activity.revenue is not None:
                await value.rescore_contact(
                    session, workspace_id=workspace_id, contact_id=activity.contact_id
                )
                facts.append("value")
            return await reevaluate(
                session,
                workspace_id=workspace_id,
                contact_id=activity.contact_id,
                now=now,
                cause=cause,
                facts=None if created else facts,
            )
        if envelope.type == LIST_CHANGED.name:
            return await self.list_changed(session, envelope, now)
        return []

    async def stale(self, session: AsyncSession, contact_id: uuid.UUID) -> bool:
        """A message about a contact merged away before it arrived: nothing to re-create."""
        if await store.was_merged(session, contact_id=contact_id):
            metrics.STALE_UPDATES.inc()
            return True
        return False

    async def list_changed(
        self, session: AsyncSession, envelope: Envelope, now: datetime
    ) -> Sequence[OutgoingMessage]:
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
    await store.save_contact(
        session, workspace_id=static.workspace_id, contact_id=contact_id, at=now
    )
    state = await store.lock_contact(session, contact_id)
    assert state is not None
    member = static.id in state.profile_without_events.segments
    if member == add:
        return []
    if add:
        await store.enter(
            session,
            workspace_id=static.workspace_id,
            segment_id=static.id,
            contact_id=contact_id,
            at=now,
        )
    else:
        await store.exit_(session, segment_id=static.id, contact_id=contact_id, at=now)
    snapshot = ContactSnapshot(
        contact_id=contact_id, user_id=state.user_id, traits=state.traits, scores=state.scores
    )
    messages = [
        transition(
            static.workspace_id, static.id, static.name, snapshot, entered=add, at=now, cause=cause
        )
    ]
    messages += await reevaluate(
        session,
        workspace_id=static.workspace_id,
        contact_id=contact_id,
        now=now,
        cause=cause,
        facts=[f"segment:{static.id}"],
    )
    return messages


class ConsentHandler:
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

    return [
        runner("segmenter", Topic.CONTACTS, ContactsHandler(clock)),
        runner("segmenter-consents", Topic.DELIVERIES, ConsentHandler(clock)),
        RecheckWorker(runtime, clock),
        BackfillWorker(runtime, clock),
        ValueWorker(runtime, clock),
    ]
