"""Scoring on the real broker and database: the scoring handler runs in a consumer runner in
this process, on topics of its own; tests publish Segment events to Kafka and wait until the
consumer group has committed everything."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from aiokafka import AIOKafkaProducer

from nudge_common.consumer import ConsumerRunner
from nudge_common.db import SessionMaker, transaction
from nudge_common.events import EVENT_RECEIVED, Envelope, SegmentEvent, Topic, segment_event_id
from nudge_common.kafka import OutgoingMessage, create_producer, publish
from nudge_common.settings import NudgeSettings
from nudge_common.topics import delete_topics, ensure_topics
from nudge_devtools.pipeline import read_topic, wait_until_idle
from nudge_scoring import store
from nudge_scoring.consumer import handle_event
from tests.conftest import StackHandle

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
_sequence = itertools.count()


def segment(workspace_id: str, type: str = "track", **fields: Any) -> Envelope:
    """An ``event.received`` envelope as ingest would publish it."""
    at = fields.pop("at", T0)
    message_id = fields.pop("messageId", f"m-{next(_sequence)}-{uuid.uuid4().hex[:6]}")
    event = SegmentEvent.model_validate(
        {"type": type, "messageId": message_id, "timestamp": at, "receivedAt": at, **fields}
    )
    return EVENT_RECEIVED.envelope(
        workspace_id=workspace_id,
        payload=event,
        occurred_at=at,
        id=segment_event_id(workspace_id, message_id),
    )


@dataclass
class ScoringHarness:
    settings: NudgeSettings
    sessionmaker: SessionMaker
    producer: AIOKafkaProducer

    async def send(self, *envelopes: Envelope) -> None:
        messages = [
            OutgoingMessage(Topic.EVENTS, key=_key(envelope), envelope=envelope)
            for envelope in envelopes
        ]
        await publish(self.producer, self.settings, messages)
        await self.idle()

    async def send_raw(self, value: bytes, key: bytes = b"raw") -> None:
        await self.producer.send_and_wait(self.settings.topic(Topic.EVENTS), value, key=key)
        await self.idle()

    async def idle(self) -> None:
        await wait_until_idle(self.settings, consumers={"scoring": (Topic.EVENTS,)})

    async def contact_of(self, workspace_id: str, kind: str, value: str) -> uuid.UUID:
        async with transaction(self.sessionmaker) as session:
            found = await store.identities_of(
                session, workspace_id=workspace_id, keys=[(kind, value)]
            )
        return found[(kind, value)]

    async def scores(self, contact_id: uuid.UUID) -> dict[str, int]:
        async with transaction(self.sessionmaker) as session:
            return await store.scores_of(session, contact_id=contact_id)

    async def rows(self, query: sa.Select[Any]) -> Sequence[Any]:
        async with transaction(self.sessionmaker) as session:
            result: Sequence[Any] = (await session.execute(query)).all()
            return result

    async def messages(self, workspace_id: str, type_: str) -> list[Envelope]:
        records = await read_topic(self.settings, Topic.CONTACTS)
        envelopes = [Envelope.decode(r.value) for r in records if r.value]
        return [e for e in envelopes if e.workspace_id == workspace_id and e.type == type_]


def _key(envelope: Envelope) -> str:
    payload = envelope.payload
    return str(payload.get("userId") or payload.get("anonymousId") or "none")


@pytest.fixture(scope="module")
async def scoring(stack: StackHandle, sessionmaker: SessionMaker) -> AsyncIterator[ScoringHarness]:
    settings = stack.settings.model_copy(
        update={"topic_prefix": f"{stack.settings.topic_prefix}scoring-{uuid.uuid4().hex[:6]}."}
    )
    await ensure_topics(settings)
    producer = create_producer(settings)
    await producer.start()
    runner = ConsumerRunner(
        name="scoring",
        topics=[Topic.EVENTS],
        handler=handle_event,
        settings=settings.model_copy(update={"consumer_poll_timeout_ms": 50}),
        sessionmaker=sessionmaker,
        producer=producer,
        processed_messages=store.processed_messages,
    )
    task = asyncio.create_task(runner.run())
    try:
        yield ScoringHarness(settings, sessionmaker, producer)
    finally:
        runner.stop()
        await asyncio.wait_for(task, 30)
        await producer.stop()
        await delete_topics(settings)


@pytest.fixture
def ws() -> str:
    return f"ws-{uuid.uuid4().hex[:10]}"
