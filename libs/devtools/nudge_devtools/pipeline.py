"""Watching the pipeline from outside: has every consumer group caught up?"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from nudge_common.consumer import Record
from nudge_common.events import Topic
from nudge_common.settings import NudgeSettings

CONSUMERS: dict[str, tuple[Topic, ...]] = {
    "scoring": (Topic.EVENTS,),
    "segmenter": (Topic.CONTACTS,),
    "orchestrator": (Topic.MEMBERSHIPS,),
    "orchestrator-events": (Topic.EVENTS,),
    "orchestrator-contacts": (Topic.CONTACTS,),
    "notifier": (Topic.NOTIFICATIONS,),
}


async def topic_partitions(admin: AIOKafkaAdminClient, names: list[str]) -> list[TopicPartition]:
    """Every partition of the named topics, as the broker reports them."""
    described = await admin.describe_topics(names)
    partitions = [
        TopicPartition(topic["topic"], partition["partition"])
        for topic in described
        for partition in topic["partitions"]
    ]
    if not partitions:
        raise LookupError(f"no partitions found for {names}")
    return partitions


async def read_topic(
    settings: NudgeSettings,
    topic: Topic,
    *,
    where: Callable[[Record], bool] = lambda _: True,
    expected: int | None = None,
    deadline_s: float = 30.0,
) -> list[Record]:
    """The records of a topic matching ``where``, read from the beginning: until
    ``expected`` of them were seen, or, without ``expected``, up to the current end."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    await consumer.start()
    try:
        partitions = await topic_partitions(admin, [settings.topic(topic)])
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)

        async def done() -> bool:
            if expected is not None:
                return len(found) >= expected
            positions = [await consumer.position(tp) for tp in partitions]
            return all(pos >= ends[tp] for tp, pos in zip(partitions, positions, strict=True))

        found: list[Record] = []
        async with asyncio.timeout(deadline_s):
            while not await done():
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    found.extend(record for record in records if where(record))
        return found
    finally:
        await consumer.stop()
        await admin.close()


async def total_lag(
    settings: NudgeSettings, consumers: Mapping[str, tuple[Topic, ...]] = CONSUMERS
) -> int:
    """Messages written to the consumers' topics that their consumer group has not yet
    committed (by default, the whole pipeline's)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    probe = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    await probe.start()
    try:
        lag = 0
        for consumer, topics in consumers.items():
            partitions = await topic_partitions(admin, [settings.topic(t) for t in topics])
            probe.assign(partitions)  # end_offsets needs the topics' metadata
            ends = await probe.end_offsets(partitions)
            committed = await admin.list_consumer_group_offsets(settings.consumer_group(consumer))
            for tp in partitions:
                done = committed[tp].offset if tp in committed else 0
                lag += max(ends[tp] - max(done, 0), 0)
        return lag
    finally:
        await probe.stop()
        await admin.close()


async def wait_until_idle(
    settings: NudgeSettings,
    deadline_s: float = 60.0,
    consumers: Mapping[str, tuple[Topic, ...]] = CONSUMERS,
) -> None:
    """Every consumer group has committed everything on its topics, twice in a row (a
    consumer may publish between two looks)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    idle_looks = 0
    while idle_looks < 2:
        idle_looks = idle_looks + 1 if await total_lag(settings, consumers) == 0 else 0
        if loop.time() > deadline:
            raise TimeoutError(f"pipeline still busy after {deadline_s}s")
        await asyncio.sleep(0.1)


async def eventually(
    probe: Callable[[], Awaitable[bool]], *, deadline_s: float = 30.0, what: str = "condition"
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while not await probe():
        if loop.time() > deadline:
            raise TimeoutError(f"{what} not met within {deadline_s}s")
        await asyncio.sleep(0.05)
