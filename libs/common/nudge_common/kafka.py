"""The one producer factory, and how an envelope becomes a Kafka record."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    UnknownProducerId,
)
from aiokafka.partitioner import murmur2
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from nudge_common.events import TYPE_HEADER, Envelope, Topic
from nudge_common.settings import NudgeSettings

log = structlog.get_logger(__name__)

MAX_BATCH_BYTES = 256 * 1024
MAX_REQUEST_BYTES = 1024 * 1024


@dataclass(frozen=True)
class OutgoingMessage:
    """An envelope on its way to a topic, keyed so one contact's messages stay in order."""

    topic: Topic
    key: str
    envelope: Envelope


def create_producer(settings: NudgeSettings, *, request_timeout_ms: int = 10_000) -> Producer:
    """Durable by construction: ``acks=all`` and idempotence, so a retried send never
    duplicates and an acknowledged one survives the loss of a broker."""
    return Producer(settings, request_timeout_ms=request_timeout_ms)


class Producer:
    """aiokafka's idempotent producer, made to recover from a broker outage.

    When a batch expires during an outage after aiokafka gave it sequence numbers, the
    partition's sequence has a gap and the broker refuses every later batch with
    ``OutOfOrderSequenceNumber``; aiokafka never resets its producer id, so it would fail
    forever (the Java client bumps the epoch instead). On that error, and on the other
    errors of a dead producer identity, this class starts a fresh aiokafka producer (a new
    producer id, sequences from zero) and sends through it from then on. The send that
    failed still fails: its caller retries it (ingest answers 503, a consumer retries its
    batch), and consumers recognise a re-sent message by its envelope id.
    """

    def __init__(self, settings: NudgeSettings, *, request_timeout_ms: int) -> None:
        self._settings = settings
        self._request_timeout_ms = request_timeout_ms
        self._current = self._new()
        self._replacing: asyncio.Task[None] | None = None
        self._retired: set[asyncio.Task[None]] = set()
        self.replacements = 0

    def _new(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=self._settings.kafka_bootstrap_servers,
            client_id=self._settings.service_name,
            acks="all",
            enable_idempotence=True,
            compression_type="lz4",
            linger_ms=self._settings.kafka_linger_ms,
            max_batch_size=MAX_BATCH_BYTES,
            max_request_size=MAX_REQUEST_BYTES,
            request_timeout_ms=self._request_timeout_ms,
            retry_backoff_ms=100,
        )

    @property
    def client(self) -> Any:
        return self._current.client

    async def start(self) -> None:
        await self._current.start()

    async def stop(self) -> None:
        if self._replacing:
            await asyncio.gather(self._replacing, return_exceptions=True)
        await asyncio.gather(*self._retired, return_exceptions=True)
        await self._current.stop()

    async def send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]:
        """Queue a record; the returned future resolves when the broker acknowledged it."""
        producer = self._current
        try:
            sent: asyncio.Future[Any] = await producer.send(
                topic, value=value, key=key, headers=headers
            )
        except PRODUCER_IDENTITY_ERRORS:
            self._replace(producer)
            raise
        sent.add_done_callback(lambda done: self._on_delivery(producer, done))
        return sent

    async def send_and_wait(self, topic: str, value: bytes, key: bytes | None = None) -> Any:
        return await (await self.send(topic, value=value, key=key))

    async def send_batched(self, records: Sequence[EncodedRecord]) -> None:
        """Send records as one batch per topic partition, in their order, and return once
        the broker acknowledged every one of them.

        A record costs about a third of what :meth:`send` costs (no future, no coroutine and
        no partitioner call of its own): right for a consumer's outputs. A caller that sends
        a batch to a partition waits until the batch before it there has gone out, so
        concurrent callers of a few records each (ingest's requests) should use
        :func:`send_all`, whose records share batches instead.
        """
        producer = self._current
        builders: dict[tuple[str, int], Any] = {}
        headers: dict[str, list[tuple[str, bytes]]] = {}
        acks: list[asyncio.Future[Any]] = []
        try:
            partitions = {
                topic: list(await producer.partitions_for(topic))
                for topic in {record.topic for record in records}
            }
            for topic, key, value, type_ in records:
                header = headers.get(type_)
                if header is None:
                    header = headers[type_] = [(TYPE_HEADER, type_.encode())]
                if len(value) > MAX_BATCH_BYTES:
                    check_record_size(key, value, header)
                record = {"timestamp": None, "key": key, "value": value, "headers": header}
                of_topic = partitions[topic]
                partition = of_topic[key_hash(key) % len(of_topic)]
                builder = builders.get((topic, partition))
                if builder is None or builder.append(**record) is None:
                    if builder is not None:  # full: it goes now, the record opens the next
                        acks.append(await self._send_batch(producer, builder, topic, partition))
                    builder = builders[topic, partition] = producer.create_batch()
                    if builder.append(**record) is None:
                        raise MessageSizeTooLargeError(f"a record of {len(value)} bytes")
            for (topic, partition), builder in builders.items():
                acks.append(await self._send_batch(producer, builder, topic, partition))
        except PRODUCER_IDENTITY_ERRORS:
            self._replace(producer)
            raise
        await asyncio.gather(*acks)

    async def _send_batch(
        self, producer: AIOKafkaProducer, builder: Any, topic: str, partition: int
    ) -> asyncio.Future[Any]:
        builder.close()  # complete: it need not linger for more records
        sent: asyncio.Future[Any] = await producer.send_batch(builder, topic, partition=partition)
        sent.add_done_callback(lambda done: self._on_delivery(producer, done))
        return sent

    def _on_delivery(self, producer: AIOKafkaProducer, done: asyncio.Future[Any]) -> None:
        if not done.cancelled() and isinstance(done.exception(), PRODUCER_IDENTITY_ERRORS):
            self._replace(producer)

    def _replace(self, broken: AIOKafkaProducer) -> None:
        if broken is not self._current or (self._replacing and not self._replacing.done()):
            return
        self._replacing = asyncio.create_task(self._swap(broken))

    async def _swap(self, broken: AIOKafkaProducer) -> None:
        fresh = self._new()
        while True:
            try:
                await fresh.start()
                break
            except KafkaError:
                await asyncio.sleep(1.0)
        self._current = fresh
        self.replacements += 1
        log.warning("kafka producer replaced after an unrecoverable idempotence error")
        retiring = asyncio.create_task(self._retire(broken))
        self._retired.add(retiring)
        retiring.add_done_callback(self._retired.discard)

    async def _retire(self, broken: AIOKafkaProducer) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(broken.stop(), self._request_timeout_ms / 1000)


PRODUCER_IDENTITY_ERRORS: tuple[type[BaseException], ...] = (
    OutOfOrderSequenceNumber,
    UnknownProducerId,
    InvalidProducerEpoch,
    ProducerFenced,
)


@functools.lru_cache(maxsize=1 << 16)
def key_hash(key: bytes) -> int:
    """The Java client's and aiokafka's default partitioner: a key's partition is this
    modulo the topic's partition count, so one contact's records share a partition whichever
    way they were sent."""
    return int(murmur2(key)) & 0x7FFFFFFF


def check_record_size(key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> None:
    """What :meth:`AIOKafkaProducer.send` checks before it queues a record."""
    size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
    if size > MAX_REQUEST_BYTES:
        raise MessageSizeTooLargeError(
            f"The message is {size} bytes when serialized, over the {MAX_REQUEST_BYTES}"
            " bytes of a request"
        )


async def publish(
    producer: Producer, settings: NudgeSettings, messages: Sequence[OutgoingMessage]
) -> None:
    """Send all messages, one batch per partition, and return once the broker acknowledged
    every one of them."""
    await producer.send_batched(
        [
            EncodedRecord(
                settings.topic(message.topic),
                message.key.encode(),
                message.envelope.encode(),
                message.envelope.type,
            )
            for message in messages
        ],
    )


class EncodedRecord(NamedTuple):
    topic: str
    key: bytes
    value: bytes
    type: str
    """The envelope's type, sent as the ``TYPE_HEADER`` header."""


async def send_all(producer: Producer, records: Sequence[EncodedRecord]) -> None:
    """Send encoded records, all queued before any is awaited, and return once the broker
    acknowledged every one of them. Each record joins the partition's open batch, which
    other callers' records join too: right for many concurrent requests of a few records
    each; a consumer's outputs go faster through :meth:`Producer.send_batched`."""
    headers: dict[str, list[tuple[str, bytes]]] = {}
    acks = []
    for topic, key, value, type_ in records:
        header = headers.get(type_)
        if header is None:
            header = headers[type_] = [(TYPE_HEADER, type_.encode())]
        acks.append(await producer.send(topic, value=value, key=key, headers=header))
    await asyncio.gather(*acks)
