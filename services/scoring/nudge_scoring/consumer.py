"""Scoring's Kafka wiring: inbound events become contacts, stored events, score changes
and ``contact.updated`` messages."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.consumer import ConsumerRunner
from nudge_common.events import (
    CONTACT_UPDATED,
    EVENT_RECEIVED,
    ContactUpdated,
    Envelope,
    Topic,
)
from nudge_common.kafka import OutgoingMessage
from nudge_common.service import Runtime
from nudge_scoring import metrics, store
from nudge_scoring.domain.scoring import incoming_traits, merge_traits, score_event


async def handle_event(session: AsyncSession, envelope: Envelope) -> Sequence[OutgoingMessage]:
    if envelope.type != EVENT_RECEIVED.name:
        return []
    event = EVENT_RECEIVED.parse(envelope)
    workspace_id = envelope.workspace_id
    contact = await store.resolve_contact(session, workspace_id=workspace_id, event=event)
    if not await store.store_event(
        session, workspace_id=workspace_id, contact_id=contact.id, event=event
    ):
        return []
    metrics.EVENTS_STORED.labels(event.type.value).inc()

    changed: list[Literal["traits", "scores"]] = []
    traits = merge_traits(contact.traits, incoming_traits(event))
    if traits is not None:
        await store.set_traits(session, contact_id=contact.id, traits=traits)
        changed.append("traits")
    deltas = score_event(await store.list_rules(session, workspace_id=workspace_id), event)
    if deltas:
        await store.add_points(
            session,
            workspace_id=workspace_id,
            contact_id=contact.id,
            deltas=deltas,
            message_id=event.message_id,
            at=event.timestamp,
        )
        for delta in deltas:
            metrics.SCORE_CHANGES.labels(delta.model).inc()
        changed.append("scores")
    if not changed:
        return []
    update = ContactUpdated(
        contact_id=contact.id,
        user_id=contact.user_id,
        traits=traits if traits is not None else contact.traits,
        scores=await store.scores_of(session, contact_id=contact.id),
        changed=changed,
        cause_message_id=event.message_id,
    )
    return [
        OutgoingMessage(
            Topic.CONTACTS,
            key=str(contact.id),
            envelope=CONTACT_UPDATED.envelope(
                workspace_id=workspace_id,
                payload=update,
                occurred_at=event.timestamp,
                caused_by=envelope,
            ),
        )
    ]


def consumers(runtime: Runtime) -> list[ConsumerRunner]:
    return [
        ConsumerRunner(
            name="scoring",
            topics=[Topic.EVENTS],
            handler=handle_event,
            settings=runtime.settings,
            sessionmaker=runtime.sessionmaker,
            producer=runtime.producer,
            processed_messages=store.processed_messages,
        )
    ]
