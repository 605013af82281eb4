"""A segmenter on the real database and broker, driven by hand: messages go through the
same handlers the consumer runner calls, the workers' rounds run when a test says, and
"now" is a clock the test moves."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from nudge_common.conditions import Condition, condition_adapter
from nudge_common.db import SessionMaker, create_engine, create_sessionmaker, transaction
from nudge_common.events import (
    CONTACT_ACTIVITY,
    CONTACT_UPDATED,
    SEGMENT_ENTERED,
    ContactActivity,
    ContactUpdated,
    Envelope,
    Topic,
)
from nudge_common.kafka import OutgoingMessage, create_producer, publish
from nudge_common.service import Runtime
from nudge_devtools.pipeline import read_topic
from nudge_segmenter import store, worker
from nudge_segmenter.consumer import ContactsHandler
from nudge_segmenter.settings import SegmenterSettings
from tests.conftest import StackHandle

T0 = datetime(2031, 3, 10, 12, 0, tzinfo=UTC)


@dataclass
class Segmenter:
    runtime: Runtime
    workspace_id: str
    now: datetime = T0

    @property
    def sessionmaker(self) -> SessionMaker:
        return self.runtime.sessionmaker

    def clock(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)

    async def handle(self, envelope: Envelope) -> list[OutgoingMessage]:
        async with transaction(self.sessionmaker) as session:
            out = list(await ContactsHandler(self.clock)(session, envelope))
            await publish(self.runtime.producer, self.runtime.settings, out)
        return out

    async def update(
        self, contact_id: uuid.UUID, *, changed: list[Any] | None = None, **payload: Any
    ) -> list[OutgoingMessage]:
        return await self.handle(
            CONTACT_UPDATED.envelope(
                workspace_id=self.workspace_id,
                payload=ContactUpdated(
                    contact_id=contact_id, changed=changed or ["traits", "scores"], **payload
                ),
                occurred_at=self.now,
            )
        )

    async def activity(
        self, contact_id: uuid.UUID, event: str, *, at: datetime | None = None, **extra: Any
    ) -> list[OutgoingMessage]:
        return await self.handle(
            CONTACT_ACTIVITY.envelope(
                workspace_id=self.workspace_id,
                payload=ContactActivity(
                    contact_id=contact_id,
                    message_id=uuid.uuid4().hex,
                    kind="track",
                    event=event,
                    at=at or self.now,
                    **extra,
                ),
                occurred_at=at or self.now,
            )
        )

    async def segment(
        self, condition: dict[str, Any] | Condition, *, name: str = "s", backfill: bool = False
    ) -> uuid.UUID:
        """A segment, active at once (nothing to backfill) or ``backfilling``."""
        parsed = condition_adapter.validate_python(condition)
        segment_id = uuid.uuid4()
        async with transaction(self.sessionmaker) as session:
            await store.create_segment(
                session,
                workspace_id=self.workspace_id,
                segment_id=segment_id,
                name=name,
                condition=parsed,
                status="backfilling" if backfill else "active",
            )
        return segment_id

    async def members(self, segment_id: uuid.UUID) -> set[uuid.UUID]:
        async with transaction(self.sessionmaker) as session:
            rows = await session.scalars(
                sa.select(store.memberships.c.contact_id).where(
                    store.memberships.c.segment_id == segment_id
                )
            )
            return set(rows)

    async def rechecks(self) -> int:
        return await worker.fire_due_rechecks(self.runtime, self.clock, 1000)

    async def backfill(self) -> int:
        done = 0
        while await worker.backfill_next(self.runtime, self.clock, 100):
            done += 1
        return done

    async def transitions(
        self, segment_id: uuid.UUID, expected: int
    ) -> list[tuple[str, uuid.UUID]]:
        """The segment's transitions on the memberships topic, in order."""
        records = await read_topic(
            self.runtime.settings,
            Topic.MEMBERSHIPS,
            where=lambda r: str(segment_id).encode() in (r.value or b""),
            expected=expected,
        )
        envelopes = [Envelope.decode(r.value or b"") for r in records]
        return [
            (
                "entered" if e.type == SEGMENT_ENTERED.name else "exited",
                uuid.UUID(e.payload["contact"]["contact_id"]),
            )
            for e in envelopes
        ]


@pytest.fixture
async def segmenter(stack: StackHandle) -> AsyncIterator[Segmenter]:
    async with running_segmenter(stack) as running:
        yield running


@asynccontextmanager
async def running_segmenter(stack: StackHandle) -> AsyncIterator[Segmenter]:
    """A segmenter harness on its own engine and producer, in a fresh workspace."""
    settings = SegmenterSettings(**stack.settings.model_dump())
    engine = create_engine(settings)
    producer = create_producer(settings)
    await producer.start()
    try:
        yield Segmenter(
            Runtime(settings, engine, create_sessionmaker(engine), producer),
            f"ws-{uuid.uuid4().hex[:12]}",
        )
    finally:
        await producer.stop()
        await engine.dispose()
