"""Orchestrator's Kafka wiring: a contact entering a segment starts the workflows it
triggers, and their send steps become notification requests."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.consumer import ConsumerRunner
from nudge_common.events import (
    NOTIFICATION_REQUESTED,
    SEGMENT_ENTERED,
    Envelope,
    NotificationRequested,
    Topic,
)
from nudge_common.ids import stable_id
from nudge_common.kafka import OutgoingMessage
from nudge_common.service import Runtime
from nudge_orchestrator import metrics, store
from nudge_orchestrator.domain.workflows import run_steps


async def handle_membership(session: AsyncSession, envelope: Envelope) -> Sequence[OutgoingMessage]:
    if envelope.type != SEGMENT_ENTERED.name:
        return []
    change = SEGMENT_ENTERED.parse(envelope)
    contact = change.contact
    now = datetime.now(UTC)
    outgoing: list[OutgoingMessage] = []
    workflows = await store.workflows_entered_by(
        session, workspace_id=envelope.workspace_id, segment_id=change.segment_id
    )
    for workflow in workflows:
        # Derived from the trigger, so a replay of it can never mint a second run (and with
        # it a second idempotency key).
        run_id = stable_id(str(envelope.id), str(workflow.id))
        if not await store.start_run(
            session,
            run_id=run_id,
            workflow_id=workflow.id,
            workspace_id=envelope.workspace_id,
            contact_id=contact.contact_id,
            at=now,
        ):
            continue
        metrics.RUNS_STARTED.inc()
        for send in run_steps(workflow.definition, run_id):
            if not await store.record_step(session, run_id=run_id, step=send.step, at=now):
                continue
            request = NotificationRequested(
                idempotency_key=send.idempotency_key,
                channel=send.channel,
                template_id=send.template_id,
                contact=contact,
                workflow_id=workflow.id,
                run_id=run_id,
                step=send.step,
            )
            outgoing.append(
                OutgoingMessage(
                    Topic.NOTIFICATIONS,
                    key=str(contact.contact_id),
                    envelope=NOTIFICATION_REQUESTED.envelope(
                        workspace_id=envelope.workspace_id,
                        payload=request,
                        occurred_at=now,
                        caused_by=envelope,
                        scope=send.idempotency_key,
                    ),
                )
            )
            metrics.MESSAGES_REQUESTED.labels(send.channel).inc()
        await store.finish_run(session, run_id=run_id, at=now)
    return outgoing


def consumers(runtime: Runtime) -> list[ConsumerRunner]:
    return [
        ConsumerRunner(
            name="orchestrator",
            topics=[Topic.MEMBERSHIPS],
            handler=handle_membership,
            settings=runtime.settings,
            sessionmaker=runtime.sessionmaker,
            producer=runtime.producer,
            processed_messages=store.processed_messages,
        )
    ]
