"""``Producer.send_batched`` (what ``publish`` uses) against the real broker: every record
arrives once, on the partition aiokafka's own ``send`` gives its key, in the order sent,
with its type header and a timestamp of when it was sent; batches that fill up are split;
a record too large for a request is refused before anything of it is queued."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator

import pytest
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.structs import ConsumerRecord

from nudge_common.events import TYPE_HEADER, Topic
from nudge_common.kafka import MAX_BATCH_BYTES, MAX_REQUEST_BYTES, EncodedRecord, create_producer
from nudge_common.settings import NudgeSettings
from nudge_common.topics import delete_topics, ensure_topics
from nudge_devtools.pipeline import read_topic
from tests.conftest import StackHandle

KEYS = 300
RECORDS = 3_000
VALUE_BYTES = 1_500
"""3,000 records of 1.5 kB over 12 partitions: ~375 kB a partition, more than one batch."""


@pytest.fixture
async def settings(stack: StackHandle) -> AsyncIterator[NudgeSettings]:
    settings = stack.settings.model_copy(
        update={"topic_prefix": f"{stack.settings.topic_prefix}batches-{uuid.uuid4().hex[:6]}."}
    )
    await ensure_topics(settings)
    yield settings
    await delete_topics(settings)


async def test_batched_records_arrive_in_order_on_their_keys_partitions(
    settings: NudgeSettings,
) -> None:
    assert RECORDS * VALUE_BYTES / 12 > MAX_BATCH_BYTES
    topic = settings.topic(Topic.EVENTS)
    keys = [f"contact-{n}".encode() for n in range(KEYS)]
    producer = create_producer(settings)
    await producer.start()
    try:
        partition_of = {
            key: (await producer.send_and_wait(topic, b"probe", key)).partition for key in keys
        }
        started_ms = time.time() * 1000
        records = [
            EncodedRecord(
                topic,
                keys[n % KEYS],
                f"{n:08d}".encode() + b"x" * (VALUE_BYTES - 8),
                "test.numbered",
            )
            for n in range(RECORDS)
        ]
        await producer.send_batched(records)
        sent_ms = time.time() * 1000
    finally:
        await producer.stop()

    found = await read_topic(
        settings, Topic.EVENTS, where=lambda record: record.value != b"probe", expected=RECORDS
    )
    assert len(found) == RECORDS
    numbers_by_key: dict[bytes, list[int]] = defaultdict(list)
    for record in found:
        assert isinstance(record, ConsumerRecord)
        assert record.key is not None
        assert record.value is not None
        assert record.partition == partition_of[record.key]
        assert dict(record.headers) == {TYPE_HEADER: b"test.numbered"}
        assert started_ms - 1 <= record.timestamp <= sent_ms + 1
        numbers_by_key[record.key].append(int(record.value[:8]))
    for n, key in enumerate(keys):
        assert numbers_by_key[key] == list(range(n, RECORDS, KEYS))


async def test_a_record_too_large_for_a_request_is_refused(settings: NudgeSettings) -> None:
    producer = create_producer(settings)
    await producer.start()
    try:
        with pytest.raises(MessageSizeTooLargeError):
            await producer.send_batched(
                [EncodedRecord(settings.topic(Topic.EVENTS), b"k", b"x" * MAX_REQUEST_BYTES, "t")]
            )
    finally:
        await producer.stop()
    assert await read_topic(settings, Topic.EVENTS) == []
