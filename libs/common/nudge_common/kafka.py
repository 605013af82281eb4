"""The one producer factory, and how an envelope becomes a Kafka record."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer

from nudge_common.events import Envelope, Topic
from nudge_common.settings import NudgeSettings


@dataclass(frozen=True)
class OutgoingMessage:
    """An envelope on its way to a topic, keyed so one contact's messages stay in order."""

    topic: Topic
    key: str
    envelope: Envelope


def create_producer(
    settings: NudgeSettings, *, request_timeout_ms: int = 10_000
) -> AIOKafkaProducer:
    """Durable by construction: ``acks=all`` and idempotence, so a retried send never
    duplicates and an acknowledged one survives the loss of a broker."""
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id=settings.service_name,
        acks="all",
        enable_idempotence=True,
        compression_type="lz4",
        linger_ms=2,
        max_batch_size=256 * 1024,
        request_timeout_ms=request_timeout_ms,
        retry_backoff_ms=100,
    )


async def publish(
    producer: AIOKafkaProducer, settings: NudgeSettings, messages: Sequence[OutgoingMessage]
) -> None:
    """Send all messages and return once the broker acknowledged every one of them."""
    if not messages:
        return
    acks = [
        await producer.send(
            settings.topic(message.topic),
            value=message.envelope.encode(),
            key=message.key.encode(),
        )
        for message in messages
    ]
    await asyncio.gather(*acks)
