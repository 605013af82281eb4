"""The one consumer runner every service uses.

A batch moves through small steps, in this order, and offsets are always committed last:

1. **poll** a batch of records;
2. **decode** each into an :class:`Envelope` (undecodable records become dead letters),
   passing over the types the handler does not read (:class:`SelectiveHandler`);
3. **apply**, in one PostgreSQL transaction: record the message ids in the service's
   ``processed_messages`` table (ids already there are duplicates and are skipped), then hand
   the new messages to the service's handler (all at once to a handler that also has
   ``handle_batch``, see :class:`BatchHandler`), with no savepoint. If that fails for any
   reason but a transient one, the transaction is rolled back and the batch applied again
   in a new one, each message in its own savepoint, so one bad message is dead-lettered
   alone while the rest of the batch keeps its effects;
4. **publish** what the handlers produced and the dead letters, waiting for the broker's
   acknowledgements;
5. **commit** the database transaction, then the Kafka offsets.

A crash anywhere before 5 replays the batch: ids in ``processed_messages`` make the replay
change nothing, and outputs carry ids derived from their cause, so a re-published output is
recognised downstream as the same message.

Failures: :class:`~nudge_common.errors.InvalidMessage` (or any unexpected error in a
handler) dead-letters that message; :class:`~nudge_common.errors.RetryLater` and lost
connections to PostgreSQL or Kafka retry the whole batch with back-off.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import asyncpg
import sqlalchemy as sa
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaConnectionError, KafkaError
from pydantic import ValidationError
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common import metrics
from nudge_common.db import SessionMaker, array_param, transaction
from nudge_common.errors import DeadLetterLimitExceeded, InvalidMessage, RetryLater
from nudge_common.events import TYPE_HEADER, Envelope, Topic
from nudge_common.kafka import OutgoingMessage, publish
from nudge_common.settings import NudgeSettings

log = structlog.get_logger(__name__)

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    RetryLater,
    sa.exc.OperationalError,
    sa.exc.InterfaceError,
    KafkaError,
    OSError,
    TimeoutError,
)

# SQLSTATE classes of a database that is unreachable or busy rather than of a bad message:
# connection exceptions, transaction rollbacks (deadlock, serialization), insufficient
# resources, operator intervention (shutdown, starting up).
TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57"})


def is_transient(error: BaseException) -> bool:
    """Whether retrying later can succeed: a dependency is down or busy. asyncpg reports a
    shutting-down or starting-up server, a deadlock or a serialization failure as a plain
    ``DBAPIError``, so its SQLSTATE decides."""
    if isinstance(error, TRANSIENT_ERRORS):
        return True
    if isinstance(error, asyncpg.PostgresError):  # raised as it is while connecting
        sqlstate = getattr(error, "sqlstate", None)
        return isinstance(sqlstate, str) and sqlstate[:2] in TRANSIENT_SQLSTATE_CLASSES
    if isinstance(error, sa.exc.DBAPIError):
        if error.connection_invalidated:
            return True
        sqlstate = getattr(error.orig, "sqlstate", None) or getattr(
            error.orig.__cause__ if error.orig else None, "sqlstate", None
        )
        return isinstance(sqlstate, str) and sqlstate[:2] in TRANSIENT_SQLSTATE_CLASSES
    return False


class Record(Protocol):
    """The fields of aiokafka's ``ConsumerRecord`` that the runner reads."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


class MessageHandler(Protocol):
    """Applies one message's effects through ``session`` (never committing it) and returns
    the messages to publish as a result."""

    async def __call__(
        self, session: AsyncSession, envelope: Envelope
    ) -> Sequence[OutgoingMessage]: ...


@runtime_checkable
class BatchPreparer(Protocol):
    """Optional: a handler that also has ``prepare`` is given the whole decoded batch before
    the batch's transaction opens, to do slow outside work for all messages concurrently
    (the notifier's sends) in its own transactions. It must keep per-message failures for
    ``__call__`` to raise, and raise only what retries the whole batch."""

    async def prepare(self, envelopes: Sequence[Envelope]) -> None: ...


@runtime_checkable
class BatchHandler(Protocol):
    """Optional: a handler that also has ``handle_batch`` is given all the new messages of a
    batch at once (in order), to apply their effects with a few set-based queries instead
    of several per message. Its effects must equal those of calling the handler on each
    message in turn. If it raises anything but a transient error, the runner rolls the
    batch's transaction back and applies the messages one by one in a new one, each in its
    own savepoint, so a bad message is still dead-lettered alone."""

    async def handle_batch(
        self, session: AsyncSession, envelopes: Sequence[Envelope]
    ) -> Sequence[OutgoingMessage]: ...


class BatchFirstHandler(ABC):
    """A handler written for batches (:class:`BatchHandler`): one message, as the runner
    applies it when its batch failed, is a batch of one, so each message has one way to be
    applied whatever the batch size."""

    async def __call__(
        self, session: AsyncSession, envelope: Envelope
    ) -> Sequence[OutgoingMessage]:
        return await self.handle_batch(session, [envelope])

    @abstractmethod
    async def handle_batch(
        self, session: AsyncSession, envelopes: Sequence[Envelope]
    ) -> Sequence[OutgoingMessage]: ...


@runtime_checkable
class SelectiveHandler(Protocol):
    """Optional: a handler that names the envelope types it reads. The runner passes over
    the others before decoding them (by the record's ``TYPE_HEADER``; a record without it
    is decoded and passed over by its envelope's type) and before recording them in
    ``processed_messages``: contacts and deliveries topics carry several types, and most
    consumers read one or two of them."""

    message_types: frozenset[str]


class _BatchFailed(Exception):
    """The batch applied in one go failed for a reason of its own (``__cause__``)."""


@dataclass(frozen=True)
class Decoded:
    record: Record
    envelope: Envelope


@dataclass(frozen=True)
class DeadLetter:
    record: Record
    error: str
    reason: str


class DeadLetterBudget:
    """A sliding one-minute window of dead letters with a hard cap."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._times: deque[float] = deque()

    def spend(self, count: int) -> None:
        now = time.monotonic()
        while self._times and now - self._times[0] > 60:
            self._times.popleft()
        self._times.extend([now] * count)
        if len(self._times) > self.per_minute:
            raise DeadLetterLimitExceeded(
                f"{len(self._times)} dead letters in the last minute "
                f"(limit {self.per_minute}): stopping instead of draining the stream"
            )


class ConsumerRunner:
    def __init__(
        self,
        *,
        name: str,
        topics: Sequence[Topic],
        handler: MessageHandler,
        settings: NudgeSettings,
        sessionmaker: SessionMaker,
        producer: AIOKafkaProducer,
        processed_messages: sa.Table,
        min_batch_interval_s: float = 0.0,
    ) -> None:
        """``min_batch_interval_s``: a batch starts at least this long after the one before,
        for consumers that can wait (analytics): what arrives meanwhile joins the next batch,
        and fewer, larger batches cost less (a transaction, a claim and a commit each)."""
        self.name = name
        self.min_batch_interval_s = min_batch_interval_s
        self.topics = [settings.topic(topic) for topic in topics]
        self.handler = handler
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.producer = producer
        self.processed_messages = processed_messages
        self.dead_letter_budget = DeadLetterBudget(settings.dead_letters_per_minute_limit)
        self.message_types = (
            handler.message_types if isinstance(handler, SelectiveHandler) else None
        )
        self._stopping = asyncio.Event()
        self._committed: dict[TopicPartition, int] = {}
        # built once, executed with the batch's ids as one array parameter
        table = processed_messages
        self._claim_statement = (
            pg_insert(table)
            .from_select(
                ["consumer", "message_id"],
                sa.select(
                    sa.bindparam("consumer", type_=sa.Text),
                    sa.func.unnest(array_param("ids", table.c.message_id.type)),
                ),
            )
            .on_conflict_do_nothing()
            .returning(table.c.message_id)
        )

    def stop(self) -> None:
        """Ask the runner to finish the batch in hand, commit it, and leave the group."""
        self._stopping.set()

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(
            *self.topics,
            bootstrap_servers=self.settings.kafka_bootstrap_servers,
            group_id=self.settings.consumer_group(self.name),
            client_id=f"{self.settings.service_name}-{self.name}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
        if not await self._start(consumer):
            return
        log.info("consumer started", consumer=self.name, topics=self.topics)
        # The batch's effects are durable before its offsets are committed, so the commit
        # need not hold up the next batch: it runs beside it, and each waits for the one
        # before (a lost commit only means a replay, which processed_messages absorbs).
        committing: asyncio.Task[None] | None = None
        last_batch = -math.inf
        try:
            while not self._stopping.is_set():
                wait = last_batch + self.min_batch_interval_s - time.monotonic()
                if wait > 0 and await self._sleep_unless_stopping(wait):
                    break
                batches = await consumer.getmany(
                    timeout_ms=self.settings.consumer_poll_timeout_ms,
                    max_records=self.settings.consumer_batch_max_records,
                )
                records = [record for partition in batches.values() for record in partition]
                if records:
                    last_batch = time.monotonic()
                    started = time.perf_counter()
                    oldest_s = min(record.timestamp for record in records) / 1000
                    metrics.CONSUMER_RECORD_AGE.labels(self.name).observe(
                        max(0.0, time.time() - oldest_s)
                    )
                    # Left alone, aiokafka fetches the next records as soon as these are
                    # handed out, and what arrives after that fetch waits on the broker for
                    # the batch after next. Paused while the batch is applied, it fetches
                    # everything up to now once the batch is done.
                    consumer.pause(*consumer.assignment())
                    if not await self._apply_until_done(records):
                        break  # stopping while a dependency is down: the batch replays later
                    consumer.resume(*consumer.paused())
                    if committing is not None:
                        await committing
                    committing = asyncio.create_task(self._commit(consumer, batches))
                    metrics.CONSUMER_BATCH_SIZE.labels(self.name).observe(len(records))
                    metrics.CONSUMER_BATCH_DURATION.labels(self.name).observe(
                        time.perf_counter() - started
                    )
                self._observe_lag(consumer)
        finally:
            if committing is not None:
                await committing
            await consumer.stop()
            log.info("consumer stopped", consumer=self.name)

    async def _start(self, consumer: AIOKafkaConsumer) -> bool:
        delay = 0.5
        while not self._stopping.is_set():
            try:
                await consumer.start()
                return True
            except KafkaConnectionError as error:
                log.warning("kafka not reachable yet", consumer=self.name, error=str(error))
                await self._sleep_unless_stopping(delay)
                delay = min(delay * 2, 10.0)
        return False

    async def _apply_until_done(self, records: list[Record]) -> bool:
        delay = 0.1
        while True:
            try:
                await self._apply(records)
                return True
            except Exception as error:
                if not is_transient(error):
                    raise
                metrics.CONSUMER_RETRIES.labels(self.name, type(error).__name__).inc()
                log.warning("batch failed, retrying", consumer=self.name, error=repr(error))
                if await self._sleep_unless_stopping(delay):
                    return False
                delay = min(delay * 2, 10.0)

    async def _apply(self, records: list[Record]) -> None:
        decoded, dead_letters, passed_over = decode(records, self.message_types)
        self._count(passed_over, "passed_over")
        if isinstance(self.handler, BatchPreparer):
            await self.handler.prepare([item.envelope for item in decoded])
        try:
            await self._apply_in_one_go(decoded, dead_letters)
        except _BatchFailed as failed:
            # a bad message, probably: its transaction is rolled back, and the batch
            # applied again one message at a time finds it
            error = failed.__cause__
            metrics.CONSUMER_BATCH_FALLBACKS.labels(self.name, type(error).__name__).inc()
            log.warning(
                "batch failed, applying its messages one by one",
                consumer=self.name,
                error=repr(error)[:500],
            )
            await self._apply_one_by_one(decoded, dead_letters)

    async def _apply_in_one_go(
        self, decoded: list[Decoded], dead_letters: list[DeadLetter]
    ) -> None:
        """The batch's new messages applied with no savepoint (``handle_batch`` at once when
        the handler has it); any failure but a transient one is raised as
        :class:`_BatchFailed`, after the transaction rolled back."""
        async with transaction(self.sessionmaker) as session:
            fresh, duplicates = await self._fresh(session, decoded)
            outgoing: list[OutgoingMessage] = []
            try:
                if isinstance(self.handler, BatchHandler):
                    if fresh:
                        outgoing.extend(
                            await self.handler.handle_batch(
                                session, [item.envelope for item in fresh]
                            )
                        )
                else:
                    for item in fresh:
                        outgoing.extend(await self.handler(session, item.envelope))
            except Exception as error:
                if is_transient(error):
                    raise
                raise _BatchFailed from error
            self._count([item.record for item in fresh], "applied")
            await self._finish(outgoing, dead_letters, duplicates)

    async def _apply_one_by_one(
        self, decoded: list[Decoded], dead_letters: list[DeadLetter]
    ) -> None:
        """Each new message in its own savepoint: a failing one is dead-lettered alone while
        the others keep their effects."""
        dead_letters = list(dead_letters)
        async with transaction(self.sessionmaker) as session:
            outgoing: list[OutgoingMessage] = []
            applied: list[Record] = []
            fresh, duplicates = await self._fresh(session, decoded)
            for item in fresh:
                try:
                    async with session.begin_nested():
                        outgoing.extend(await self.handler(session, item.envelope))
                except Exception as error:
                    if is_transient(error):
                        raise
                    # any other failure is this message's own
                    dead_letters.append(dead_letter_for(item.record, error))
                    if not isinstance(error, InvalidMessage | ValidationError):
                        log.exception("handler failed", consumer=self.name)
                else:
                    applied.append(item.record)
            self._count(applied, "applied")
            await self._finish(outgoing, dead_letters, duplicates)

    async def _fresh(
        self, session: AsyncSession, decoded: list[Decoded]
    ) -> tuple[list[Decoded], list[Decoded]]:
        """Claim the messages' ids: those not claimed before, and the duplicates (claimed
        before, or twice in the batch)."""
        unclaimed = await self._claim(session, [item.envelope.id for item in decoded])
        fresh: list[Decoded] = []
        duplicates: list[Decoded] = []
        for item in decoded:
            if item.envelope.id in unclaimed:
                unclaimed.discard(item.envelope.id)
                fresh.append(item)
            else:
                duplicates.append(item)
        return fresh, duplicates

    async def _finish(
        self,
        outgoing: list[OutgoingMessage],
        dead_letters: list[DeadLetter],
        duplicates: list[Decoded],
    ) -> None:
        """Publish the outputs and dead letters, inside the batch's transaction: it commits
        only once the broker has them."""
        self._count([item.record for item in duplicates], "duplicate")
        self.dead_letter_budget.spend(len(dead_letters))
        await publish(self.producer, self.settings, outgoing)
        await self._publish_dead_letters(dead_letters)

    async def _claim(self, session: AsyncSession, ids: list[uuid.UUID]) -> set[uuid.UUID]:
        """Record ``ids`` as processed; returns those that were not recorded before."""
        if not ids:
            return set()
        rows = await session.execute(self._claim_statement, {"consumer": self.name, "ids": ids})
        return set(rows.scalars())

    async def _publish_dead_letters(self, dead_letters: list[DeadLetter]) -> None:
        topic = self.settings.topic(Topic.DEAD_LETTER)
        acks = []
        for dead in dead_letters:
            record = dead.record
            headers = [
                ("nudge.consumer", self.name.encode()),
                ("nudge.source_topic", record.topic.encode()),
                ("nudge.source_partition", str(record.partition).encode()),
                ("nudge.source_offset", str(record.offset).encode()),
                ("nudge.error", dead.error.encode()),
                ("nudge.reason", dead.reason.encode()),
            ]
            acks.append(
                await self.producer.send(
                    topic, value=record.value or b"", key=record.key, headers=headers
                )
            )
            self._count([record], "dead_lettered")
            metrics.DEAD_LETTERS.labels(self.name, record.topic, dead.error).inc()
            log.warning(
                "dead-lettered",
                consumer=self.name,
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                error=dead.error,
                reason=dead.reason,
            )
        await asyncio.gather(*acks)

    async def _commit(
        self, consumer: AIOKafkaConsumer, batches: dict[TopicPartition, list[Record]]
    ) -> None:
        offsets = {tp: records[-1].offset + 1 for tp, records in batches.items() if records}
        try:
            await consumer.commit(offsets)
            self._committed.update(offsets)
        except (CommitFailedError, KafkaError) as error:
            # The partitions moved to another member, which replays from the last commit;
            # processed_messages makes that replay change nothing.
            log.warning("offset commit failed", consumer=self.name, error=repr(error))

    def _observe_lag(self, consumer: AIOKafkaConsumer) -> None:
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            committed = self._committed.get(tp)
            if highwater is not None and committed is not None:
                metrics.CONSUMER_LAG.labels(self.name, tp.topic, str(tp.partition)).set(
                    max(highwater - committed, 0)
                )

    def _count(self, records: Sequence[Record], outcome: str) -> None:
        for topic, count in Counter(record.topic for record in records).items():
            metrics.CONSUMER_MESSAGES.labels(self.name, topic, outcome).inc(count)

    async def _sleep_unless_stopping(self, seconds: float) -> bool:
        """Sleep, waking early on stop; returns whether a stop was requested."""
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True


def decode(
    records: list[Record], message_types: frozenset[str] | None = None
) -> tuple[list[Decoded], list[DeadLetter], list[Record]]:
    """The records' envelopes, the dead letters of those that do not decode, and the records
    passed over because their type is not in ``message_types`` (``None``: every type is
    read)."""
    decoded: list[Decoded] = []
    dead_letters: list[DeadLetter] = []
    passed_over: list[Record] = []
    wanted = None if message_types is None else {name.encode() for name in message_types}
    for record in records:
        if wanted is not None:
            declared = next((v for k, v in record.headers if k == TYPE_HEADER), None)
            if declared is not None and declared not in wanted:
                passed_over.append(record)
                continue
        if not record.value:
            dead_letters.append(DeadLetter(record, "EmptyValue", "record has no value"))
            continue
        try:
            envelope = Envelope.decode(record.value)
        except ValidationError as error:
            dead_letters.append(dead_letter_for(record, error))
            continue
        if message_types is not None and envelope.type not in message_types:
            passed_over.append(record)
            continue
        decoded.append(Decoded(record, envelope))
    return decoded, dead_letters, passed_over


def dead_letter_for(record: Record, error: Exception) -> DeadLetter:
    reason = error.reason if isinstance(error, InvalidMessage) else str(error)
    return DeadLetter(record, type(error).__name__, reason[:2000])
