"""The consumer runner against the real broker and database: every message applied once,
a replay changes nothing, bad messages are dead-lettered with their reason, and a transient
failure is retried instead."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from aiokafka import AIOKafkaProducer
from prometheus_client import REGISTRY
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.consumer import ConsumerRunner, MessageHandler
from nudge_common.db import SessionMaker, processed_messages_table, transaction
from nudge_common.errors import InvalidMessage, RetryLater
from nudge_common.events import Envelope, EventType, Topic
from nudge_common.kafka import OutgoingMessage, Producer, create_producer, publish
from nudge_common.settings import NudgeSettings
from nudge_common.topics import delete_topics, ensure_topics
from nudge_devtools.pipeline import eventually, read_topic, wait_until_idle
from tests.conftest import StackHandle

SCHEMA = "runner_test"
metadata = sa.MetaData(schema=SCHEMA)
processed = processed_messages_table(metadata)
effects = sa.Table(
    "effects",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("message_id", sa.Uuid, nullable=False),
)


class Thing(BaseModel):
    behaviour: str = "ok"


THING = EventType("test.thing", Thing, Topic.EVENTS)


class Handler:
    def __init__(self) -> None:
        self.transient_failures_left = 1

    async def __call__(
        self, session: AsyncSession, envelope: Envelope
    ) -> Sequence[OutgoingMessage]:
        thing = THING.parse(envelope)
        if thing.behaviour == "flaky" and self.transient_failures_left:
            self.transient_failures_left -= 1
            raise RetryLater("dependency briefly unavailable")
        await session.execute(sa.insert(effects).values(message_id=envelope.id))
        if thing.behaviour == "bad":
            raise InvalidMessage("this thing can never be applied")
        return []


@pytest.fixture
async def settings(stack: StackHandle, sessionmaker: SessionMaker) -> AsyncIterator[NudgeSettings]:
    settings = stack.settings.model_copy(
        update={"topic_prefix": f"{stack.settings.topic_prefix}runner-{uuid.uuid4().hex[:6]}."}
    )
    await ensure_topics(settings)
    async with sessionmaker() as session, session.begin():
        await session.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
        await session.run_sync(lambda s: metadata.create_all(s.connection()))
        await session.execute(sa.delete(effects))
    yield settings
    await delete_topics(settings)


def events_runner(
    name: str,
    handler: MessageHandler,
    settings: NudgeSettings,
    sessionmaker: SessionMaker,
    producer: Producer,
    *,
    min_batch_interval_s: float = 0.0,
) -> ConsumerRunner:
    """A runner of the events topic recording into the test schema's processed ids."""
    return ConsumerRunner(
        name=name,
        topics=[Topic.EVENTS],
        handler=handler,
        settings=settings,
        sessionmaker=sessionmaker,
        producer=producer,
        processed_messages=processed,
        min_batch_interval_s=min_batch_interval_s,
    )


async def count_effects(sessionmaker: SessionMaker) -> int:
    async with transaction(sessionmaker) as session:
        return await session.scalar(sa.select(sa.func.count()).select_from(effects)) or 0


async def test_runner_applies_once_dead_letters_bad_messages_and_retries_transient_ones(
    settings: NudgeSettings, sessionmaker: SessionMaker
) -> None:
    now = datetime.now(UTC)
    good = [THING.envelope(workspace_id="ws", payload=Thing(), occurred_at=now) for _ in range(20)]
    flaky = THING.envelope(workspace_id="ws", payload=Thing(behaviour="flaky"), occurred_at=now)
    bad = THING.envelope(workspace_id="ws", payload=Thing(behaviour="bad"), occurred_at=now)
    messages = [OutgoingMessage(Topic.EVENTS, str(e.id), e) for e in [*good, flaky, bad]]

    producer = create_producer(settings)
    await producer.start()
    try:
        await publish(producer, settings, messages)
        await producer.send_and_wait(settings.topic(Topic.EVENTS), b"not json", key=b"x")

        async def run_once() -> None:
            runner = events_runner("runner-test", Handler(), settings, sessionmaker, producer)
            task = asyncio.create_task(runner.run())
            await wait_until_idle(settings, consumers={"runner-test": (Topic.EVENTS,)})
            runner.stop()
            await asyncio.wait_for(task, 30)

        await run_once()
        assert await count_effects(sessionmaker) == len(good) + 1
        dead = [
            {key: value.decode() for key, value in record.headers}
            for record in await read_topic(settings, Topic.DEAD_LETTER, expected=2)
        ]
        assert {d["nudge.error"] for d in dead} == {"InvalidMessage", "ValidationError"}
        assert any(d["nudge.reason"] == "this thing can never be applied" for d in dead)
        assert all(d["nudge.source_topic"] == settings.topic(Topic.EVENTS) for d in dead)

        # Replay: the same messages again, as after a crash before the offset commit.
        await publish(producer, settings, messages)
        await run_once()
        assert await count_effects(sessionmaker) == len(good) + 1
    finally:
        await producer.stop()


class BatchHandler(Handler):
    """A handler with a batch form: all of a batch's effects in one statement."""

    def __init__(self) -> None:
        super().__init__()
        self.batches_applied: list[int] = []

    async def handle_batch(
        self, session: AsyncSession, envelopes: Sequence[Envelope]
    ) -> Sequence[OutgoingMessage]:
        await session.execute(sa.insert(effects), [{"message_id": e.id} for e in envelopes])
        if any(THING.parse(e).behaviour == "bad" for e in envelopes):
            raise InvalidMessage("this thing can never be applied")
        self.batches_applied.append(len(envelopes))
        return []


async def test_batch_handler_applies_whole_batches_and_isolates_a_bad_message(
    settings: NudgeSettings, sessionmaker: SessionMaker
) -> None:
    now = datetime.now(UTC)
    good = [THING.envelope(workspace_id="ws", payload=Thing(), occurred_at=now) for _ in range(20)]
    bad = THING.envelope(workspace_id="ws", payload=Thing(behaviour="bad"), occurred_at=now)
    handler = BatchHandler()
    producer = create_producer(settings)
    await producer.start()
    runner = events_runner("runner-batch-test", handler, settings, sessionmaker, producer)
    task = asyncio.create_task(runner.run())
    try:
        # one partition key: the bad message lands in the batch of the good ones
        messages = [OutgoingMessage(Topic.EVENTS, "k", e) for e in [*good[:10], bad, *good[10:]]]
        await publish(producer, settings, messages)
        await wait_until_idle(settings, consumers={"runner-batch-test": (Topic.EVENTS,)})
        # the failed batch's effects were rolled back and its messages applied one by one
        assert await count_effects(sessionmaker) == len(good)
        dead = await read_topic(settings, Topic.DEAD_LETTER, expected=1)
        assert [dict(r.headers)["nudge.error"] for r in dead] == [b"InvalidMessage"]

        more = [
            THING.envelope(workspace_id="ws", payload=Thing(), occurred_at=now) for _ in range(30)
        ]
        await publish(producer, settings, [OutgoingMessage(Topic.EVENTS, "k", e) for e in more])
        await publish(producer, settings, [OutgoingMessage(Topic.EVENTS, "k", e) for e in more])
        await wait_until_idle(settings, consumers={"runner-batch-test": (Topic.EVENTS,)})
        assert await count_effects(sessionmaker) == len(good) + len(more)  # replay: no change
        assert handler.batches_applied  # batches of two or more went through handle_batch
    finally:
        runner.stop()
        await asyncio.wait_for(task, 30)
        await producer.stop()


class TimedHandler(BatchHandler):
    def __init__(self) -> None:
        super().__init__()
        self.batch_starts: list[float] = []

    async def prepare(self, envelopes: Sequence[Envelope]) -> None:
        """Called as soon as the runner has decoded a batch it took."""
        self.batch_starts.append(time.monotonic())


async def test_a_paced_runner_starts_a_batch_at_most_every_interval(
    settings: NudgeSettings, sessionmaker: SessionMaker
) -> None:
    now = datetime.now(UTC)
    handler = TimedHandler()
    producer = create_producer(settings)
    await producer.start()
    runner = events_runner(
        "runner-paced-test", handler, settings, sessionmaker, producer, min_batch_interval_s=1.0
    )
    task = asyncio.create_task(runner.run())
    try:
        for applied in (1, 2):
            thing = THING.envelope(workspace_id="ws", payload=Thing(), occurred_at=now)
            await publish(producer, settings, [OutgoingMessage(Topic.EVENTS, "k", thing)])

            async def effects_counted(count: int = applied) -> bool:
                return await count_effects(sessionmaker) == count

            await eventually(effects_counted, what=f"{applied} effects")
        # The second message was published as soon as the first was applied (~0.1 s later
        # unpaced). The runner's interval runs from when it took the records, a few
        # microseconds before it decoded them.
        first, second = handler.batch_starts
        assert second - first >= 0.99
    finally:
        runner.stop()
        await asyncio.wait_for(task, 30)
        await producer.stop()


OTHER = EventType("test.other", Thing, Topic.EVENTS)


class SelectiveHandler(Handler):
    message_types = frozenset({THING.name})


async def test_a_selective_handler_never_sees_nor_records_the_types_it_does_not_read(
    settings: NudgeSettings, sessionmaker: SessionMaker
) -> None:
    now = datetime.now(UTC)
    things = [THING.envelope(workspace_id="ws", payload=Thing(), occurred_at=now) for _ in range(5)]
    # "bad" would be dead-lettered if the handler saw it
    others = [
        OTHER.envelope(workspace_id="ws", payload=Thing(behaviour="bad"), occurred_at=now)
        for _ in range(6)
    ]
    producer = create_producer(settings)
    await producer.start()
    runner = events_runner(
        "runner-selective-test", SelectiveHandler(), settings, sessionmaker, producer
    )
    task = asyncio.create_task(runner.run())
    try:
        await publish(
            producer, settings, [OutgoingMessage(Topic.EVENTS, "k", e) for e in things + others]
        )
        # a record from a producer that sets no type header is passed over once decoded
        unlabelled = others[0].model_copy(update={"id": uuid.uuid4()})
        await producer.send_and_wait(settings.topic(Topic.EVENTS), unlabelled.encode(), b"k")
        await wait_until_idle(settings, consumers={"runner-selective-test": (Topic.EVENTS,)})

        records = await read_topic(settings, Topic.EVENTS, expected=len(things) + len(others) + 1)
        labelled = [dict(r.headers).get("nudge.type") for r in records]
        assert sorted(labelled, key=str) == sorted(
            [b"test.thing"] * len(things) + [b"test.other"] * len(others) + [None], key=str
        )
        assert await count_effects(sessionmaker) == len(things)
        async with transaction(sessionmaker) as session:
            recorded = set(
                await session.scalars(
                    sa.select(processed.c.message_id).where(
                        processed.c.consumer == "runner-selective-test"
                    )
                )
            )
        assert recorded == {e.id for e in things}
        assert await read_topic(settings, Topic.DEAD_LETTER) == []
    finally:
        runner.stop()
        await asyncio.wait_for(task, 30)
        await producer.stop()


async def test_the_record_age_metric_shows_how_far_behind_the_consumer_is(
    settings: NudgeSettings, sessionmaker: SessionMaker
) -> None:
    """A record written two minutes before the consumer takes it is observed as a batch
    between one and five minutes behind (the broker keeps the producer's timestamp)."""
    name = f"runner-age-{uuid.uuid4().hex[:6]}"
    thing = THING.envelope(workspace_id="ws", payload=Thing(), occurred_at=datetime.now(UTC))
    written_before = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await written_before.start()
    try:
        await written_before.send_and_wait(
            settings.topic(Topic.EVENTS),
            thing.encode(),
            key=b"k",
            timestamp_ms=int((time.time() - 120) * 1000),
        )
    finally:
        await written_before.stop()
    producer = create_producer(settings)
    await producer.start()
    runner = events_runner(name, Handler(), settings, sessionmaker, producer)
    task = asyncio.create_task(runner.run())
    try:
        await wait_until_idle(settings, consumers={name: (Topic.EVENTS,)})
    finally:
        runner.stop()
        await asyncio.wait_for(task, 30)
        await producer.stop()

    def batches(le: str) -> float:
        labels = {"consumer": name, "le": le}
        return REGISTRY.get_sample_value("nudge_consumer_record_age_seconds_bucket", labels) or 0

    assert batches("+Inf") == 1
    assert batches("60.0") == 0
    assert batches("300.0") == 1
