"""Segmenter's Kafka wiring: each contact change re-evaluates the workspace's segments and
publishes one ``segment.entered`` or ``segment.exited`` per real transition. A merge moves
the merged contact's memberships to the survivor and leaves a tombstone (later updates of
the merged id are stale and ignored); an erasure deletes the contacts' state, memberships
and history."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.conditions import Profile, matches
from nudge_common.consumer import ConsumerRunner
from nudge_common.events import (
    CONTACT_ERASED,
    CONTACT_MERGED,
    CONTACT_UPDATED,
    SEGMENT_ENTERED,
    SEGMENT_EXITED,
    ContactSnapshot,
    Envelope,
    MembershipChanged,
    Topic,
)
from nudge_common.kafka import OutgoingMessage
from nudge_common.service import Runtime
from nudge_segmenter import metrics, store


async def handle_contact_updated(
    session: AsyncSession, envelope: Envelope
) -> Sequence[OutgoingMessage]:
    if envelope.type == CONTACT_MERGED.name:
        merge = CONTACT_MERGED.parse(envelope)
        await store.merge_contacts(
            session, survivor_id=merge.survivor_id, merged_id=merge.merged_id, at=merge.at
        )
        return []
    if envelope.type == CONTACT_ERASED.name:
        erased = CONTACT_ERASED.parse(envelope)
        await store.erase_contacts(
            session,
            workspace_id=envelope.workspace_id,
            contact_ids=sorted({erased.contact_id, *erased.contact_ids}),
        )
        return []
    if envelope.type != CONTACT_UPDATED.name:
        return []
    update = CONTACT_UPDATED.parse(envelope)
    if await store.was_merged(session, contact_id=update.contact_id):
        metrics.STALE_UPDATES.inc()
        return []  # an update from before the merge, overtaken by it: nothing to re-create
    workspace_id = envelope.workspace_id
    at = envelope.occurred_at
    await store.save_contact(session, workspace_id=workspace_id, update=update, at=at)
    profile = Profile(traits=update.traits, scores=update.scores)
    member_of = await store.segment_ids_of(session, contact_id=update.contact_id)
    snapshot = ContactSnapshot.model_validate(update.model_dump())
    outgoing: list[OutgoingMessage] = []
    for segment in await store.list_segments(session, workspace_id=workspace_id):
        is_match = matches(segment.condition, profile)
        if is_match == (segment.id in member_of):
            continue
        if is_match:
            await store.enter(
                session,
                workspace_id=workspace_id,
                segment_id=segment.id,
                contact_id=update.contact_id,
                at=at,
            )
            event_type, direction = SEGMENT_ENTERED, "entered"
        else:
            await store.exit_(session, segment_id=segment.id, contact_id=update.contact_id, at=at)
            event_type, direction = SEGMENT_EXITED, "exited"
        metrics.TRANSITIONS.labels(direction).inc()
        change = MembershipChanged(
            segment_id=segment.id, segment_name=segment.name, contact=snapshot, at=at
        )
        outgoing.append(
            OutgoingMessage(
                Topic.MEMBERSHIPS,
                key=str(update.contact_id),
                envelope=event_type.envelope(
                    workspace_id=workspace_id,
                    payload=change,
                    occurred_at=at,
                    caused_by=envelope,
                    scope=str(segment.id),
                ),
            )
        )
    return outgoing


def consumers(runtime: Runtime) -> list[ConsumerRunner]:
    return [
        ConsumerRunner(
            name="segmenter",
            topics=[Topic.CONTACTS],
            handler=handle_contact_updated,
            settings=runtime.settings,
            sessionmaker=runtime.sessionmaker,
            producer=runtime.producer,
            processed_messages=store.processed_messages,
        )
    ]
