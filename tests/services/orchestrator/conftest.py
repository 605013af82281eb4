"""The orchestrator's engine on the real database and broker, in this process: tests hand
messages to the consumer handlers in a transaction (as the consumer runner does), publish
the outputs to this session's topics, and move a hand clock to fire timers."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from aiokafka import AIOKafkaProducer

from nudge_common.db import SessionMaker, transaction
from nudge_common.events import (
    EVENT_RECEIVED,
    SEGMENT_ENTERED,
    ContactSnapshot,
    Envelope,
    MembershipChanged,
    SegmentEvent,
    segment_event_id,
)
from nudge_common.ids import stable_id
from nudge_common.kafka import create_producer, publish
from nudge_common.settings import NudgeSettings
from nudge_orchestrator import store
from nudge_orchestrator.consumer import contact_handler, event_handler, membership_handler
from nudge_orchestrator.domain.workflows import WorkflowDefinition
from nudge_orchestrator.worker import fire_due_timers
from tests.conftest import StackHandle

T0 = datetime(2030, 3, 4, 12, 0, tzinfo=UTC)
"""A Monday noon in the future: orchestrator processes on the system clock (the end-to-end
tests) never fire these timers."""
_sequence = itertools.count()


@dataclass
class Engine:
    settings: NudgeSettings
    sessionmaker: SessionMaker
    producer: AIOKafkaProducer
    workspace_id: str
    now: datetime = T0
    published: list[Envelope] = field(default_factory=list)

    def clock(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)

    async def workflow(self, definition: dict[str, Any], *, name: str = "wf") -> uuid.UUID:
        workflow_id = uuid.uuid4()
        async with transaction(self.sessionmaker) as session:
            await store.create_workflow(
                session,
                workspace_id=self.workspace_id,
                workflow_id=workflow_id,
                name=name,
                definition=WorkflowDefinition.model_validate(definition),
            )
        return workflow_id

    async def apply(self, handler: Any, envelope: Envelope) -> None:
        async with transaction(self.sessionmaker) as session:
            out = await handler(session, envelope)
            await publish(self.producer, self.settings, out)
        self.published.extend(message.envelope for message in out)

    async def contact(self, user_id: str, **traits: Any) -> uuid.UUID:
        return await self.update(user_id, {}, **traits)

    async def update(
        self,
        user_id: str,
        scores: dict[str, int],
        *,
        tags: dict[str, int] | None = None,
        stages: dict[str, str] | None = None,
        **traits: Any,
    ) -> uuid.UUID:
        """Scoring's ``contact.updated`` for this contact: these traits and scores (and
        tags and stages when given)."""
        contact_id = stable_id(self.workspace_id, "contact", "user_id", user_id)
        envelope = Envelope(
            type="contact.updated",
            id=uuid.uuid4(),
            occurred_at=self.now,
            workspace_id=self.workspace_id,
            payload={
                "contact_id": str(contact_id),
                "user_id": user_id,
                "traits": {"email": f"{user_id}@example.com", **traits},
                "scores": scores,
                "tags": tags or {},
                "stages": stages or {},
                "changed": [
                    "traits",
                    "scores",
                    *(["tags"] if tags is not None else []),
                    *(["stages"] if stages is not None else []),
                ],
            },
        )
        await self.apply(contact_handler(self.clock), envelope)
        return contact_id

    async def track(self, user_id: str, event: str, **properties: Any) -> None:
        message_id = f"m-{next(_sequence)}-{uuid.uuid4().hex[:6]}"
        payload = SegmentEvent.model_validate(
            {
                "type": "track",
                "event": event,
                "userId": user_id,
                "properties": properties,
                "messageId": message_id,
                "timestamp": self.now,
                "receivedAt": self.now,
            }
        )
        envelope = EVENT_RECEIVED.envelope(
            workspace_id=self.workspace_id,
            payload=payload,
            occurred_at=self.now,
            id=segment_event_id(self.workspace_id, message_id),
        )
        await self.apply(event_handler(self.clock), envelope)

    async def enter_segment(self, segment_id: uuid.UUID, contact_id: uuid.UUID) -> Envelope:
        envelope = SEGMENT_ENTERED.envelope(
            workspace_id=self.workspace_id,
            payload=MembershipChanged(
                segment_id=segment_id,
                segment_name="s",
                contact=ContactSnapshot(contact_id=contact_id, traits={"email": "x@example.com"}),
                at=self.now,
            ),
            occurred_at=self.now,
        )
        await self.apply(membership_handler(self.clock), envelope)
        return envelope

    async def fire(self) -> int:
        fired = 0
        while batch := await fire_due_timers(
            self.sessionmaker, self.producer, self.settings, clock=self.clock
        ):
            fired += batch
        return fired

    async def runs(self, workflow_id: uuid.UUID) -> list[Any]:
        async with transaction(self.sessionmaker) as session:
            rows = await session.execute(
                sa.select(store.runs).where(store.runs.c.workflow_id == workflow_id)
            )
            return list(rows)

    async def sent(self, workflow_id: uuid.UUID) -> list[tuple[str, int]]:
        """(channel, step) of every message requested by the workflow, in order."""
        async with transaction(self.sessionmaker) as session:
            rows = await session.execute(
                sa.select(store.sends.c.channel, store.sends.c.step)
                .where(store.sends.c.workflow_id == workflow_id)
                .order_by(store.sends.c.at, store.sends.c.step)
            )
            return [(row.channel, row.step) for row in rows]

    async def timers(self, workflow_id: uuid.UUID) -> list[Any]:
        async with transaction(self.sessionmaker) as session:
            rows = await session.execute(
                sa.select(store.timers)
                .join(store.runs, store.runs.c.id == store.timers.c.run_id)
                .where(store.runs.c.workflow_id == workflow_id)
            )
            return list(rows)


@pytest.fixture
async def engine(stack: StackHandle, sessionmaker: SessionMaker) -> AsyncIterator[Engine]:
    producer = create_producer(stack.settings)
    await producer.start()
    try:
        yield Engine(stack.settings, sessionmaker, producer, f"ws-{uuid.uuid4().hex[:12]}")
    finally:
        await producer.stop()
