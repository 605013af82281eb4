"""Applied message ids are forgotten once older than the retention, by the worker every
service with consumers runs, a chunk at a time; younger ids stay."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.consumer import ConsumerRunner
from nudge_common.db import SessionMaker, processed_messages_table, transaction
from nudge_common.events import Envelope, Topic
from nudge_common.kafka import OutgoingMessage
from nudge_common.retention import trim_processed_messages
from nudge_common.service import Runtime, create_service_app
from nudge_common.settings import NudgeSettings
from nudge_common.topics import delete_topics, ensure_topics
from nudge_devtools.pipeline import eventually
from tests.conftest import StackHandle

SCHEMA = "retention_test"
processed = processed_messages_table(sa.MetaData(schema=SCHEMA))
NOW = datetime.now(UTC)


@pytest.fixture
async def settings(stack: StackHandle, sessionmaker: SessionMaker) -> AsyncIterator[NudgeSettings]:
    settings = stack.settings.model_copy(
        update={
            "topic_prefix": f"{stack.settings.topic_prefix}retention-{uuid.uuid4().hex[:6]}.",
            "processed_messages_retention_s": 3600.0,
            "processed_messages_trim_every_s": 0.05,
        }
    )
    await ensure_topics(settings)
    async with sessionmaker() as session, session.begin():
        await session.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
        await session.run_sync(lambda s: processed.metadata.create_all(s.connection()))
        await session.execute(sa.delete(processed))
    yield settings
    await delete_topics(settings)


async def remember(sessionmaker: SessionMaker, count: int, *, age: timedelta) -> set[uuid.UUID]:
    ids = {uuid.uuid4() for _ in range(count)}
    async with transaction(sessionmaker) as session:
        await session.execute(
            sa.insert(processed),
            [{"consumer": "c", "message_id": i, "processed_at": NOW - age} for i in ids],
        )
    return ids


async def remembered(sessionmaker: SessionMaker) -> set[uuid.UUID]:
    async with transaction(sessionmaker) as session:
        return set((await session.execute(sa.select(processed.c.message_id))).scalars())


async def test_ids_older_than_the_cutoff_go_a_chunk_at_a_time(
    settings: NudgeSettings, sessionmaker: SessionMaker
) -> None:
    old = await remember(sessionmaker, 5, age=timedelta(days=20))
    young = await remember(sessionmaker, 3, age=timedelta(days=2))
    before = NOW - timedelta(days=14)
    deleted = [
        await trim_processed_messages(sessionmaker, processed, before=before, chunk=2)
        for _ in range(4)
    ]
    assert deleted == [2, 2, 1, 0]
    assert await remembered(sessionmaker) == young
    assert not old & await remembered(sessionmaker)


async def test_a_service_with_consumers_trims_its_ids_by_itself(
    settings: NudgeSettings, sessionmaker: SessionMaker
) -> None:
    async def ignore(session: AsyncSession, envelope: Envelope) -> Sequence[OutgoingMessage]:
        return []

    def consumers(runtime: Runtime) -> list[ConsumerRunner]:
        return [
            ConsumerRunner(
                name="retention",
                topics=[Topic.EVENTS],
                handler=ignore,
                settings=settings,
                sessionmaker=runtime.sessionmaker,
                producer=runtime.producer,
                processed_messages=processed,
            )
        ]

    old = await remember(sessionmaker, 30, age=timedelta(hours=2))
    young = await remember(sessionmaker, 10, age=timedelta(minutes=5))
    app = create_service_app(settings=settings, consumers=consumers)
    async with app.router.lifespan_context(app):

        async def only_young_left() -> bool:
            return await remembered(sessionmaker) == young

        await eventually(only_young_left, deadline_s=20, what="the old ids trimmed")
    assert not old & await remembered(sessionmaker)
