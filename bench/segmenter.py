"""``make bench-segmenter``: the segmenter at a million contacts (issue 6).

1. **Load** (not a measured figure): ``--contacts`` contacts and about ``--events`` events
   are written straight into the segmenter's tables by ``INSERT ... SELECT`` over
   ``generate_series`` (traits with country, plan, language, dates; ``lead`` and
   ``engagement`` scores; tags, stages, consents; events of 10 names with a skew, between 90
   and 2 days old, weighted towards recent; last seen, orders and revenue derived from the
   events), then ``VACUUM ANALYZE``. The workspace's customer-value models are marked
   refreshed now, as in the steady state (``--value-refresh`` runs and times the value
   worker's real refresh instead: RFM scores and the CLV fit over every customer).
2. **Backfill**: one segment with three conditions (a trait, an event count within 30
   days, a score threshold) saved as ``backfilling``, carried to hand-over by
   ``worker.backfill_next`` in this process: ``backfill_s`` is the whole call (stage,
   apply and publish one ``segment.entered`` per member, hand-over).
   ``backfill_stage_s`` and ``backfill_apply_s`` split it; ``backfill_db_s`` is the time
   spent in SQL statements (stage included), ``backfill_publish_s`` in ``publish`` (waiting
   for the broker's acknowledgements).
3. **Real time**: 199 more active segments of every kind (200 with the backfilled one),
   memberships precomputed set-based for the contacts the phase will touch (then
   ``VACUUM ANALYZE``d, as autovacuum keeps tables that grew gradually), then one
   segmenter service process (``python -m nudge_segmenter run``) consumes
   ``contact.activity`` messages put on the contacts topic, keyed by contact, at fixed
   times. Each activity is the first of its event name within a day for its contact,
   which makes its contact enter one of ten "trigger" segments (``performed <name> at
   least once within 1 day``): the entry's envelope id is derived from the activity's, so
   the latency of each activity is from its record's timestamp to the timestamp of the
   ``segment.entered`` it caused. Two runs, each with a fresh process (what a run leaves
   unprocessed is skipped): **throughput** at ``--rate`` for ``--duration`` seconds
   (``realtime_events_per_s`` is the processing rate between 10% and 90% of the activities
   processed), then **latency** at ``--latency-rate`` (by default a quarter of the measured
   throughput) for ``--latency-duration`` seconds (``realtime_p99_ms``). This process's
   heap is frozen out of the garbage collector before each run, as the services' are: a
   full collection stalled the sending loop for ~200 ms.

Every run gets its own database and topic prefix on the stack (``scripts/stack up``),
removed afterwards; every wait is bounded. Sizes default to the issue's and can be set by
flags or by ``NUDGE_BENCH_CONTACTS`` / ``NUDGE_BENCH_EVENTS``::

    NUDGE_BENCH_CONTACTS=10000 NUDGE_BENCH_EVENTS=100000 make bench-segmenter

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import os
import pstats
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

import asyncpg
import httpx
import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.harness import admin_dsn, percentile, process_tree_cpu_s, sandbox
from bench.scoring import SANDBOX_BACKENDS, cpu_s, machine
from nudge_common import codec
from nudge_common.clock import system_clock
from nudge_common.conditions import condition_adapter
from nudge_common.consumer import ConsumerRunner, Record
from nudge_common.db import create_engine, create_sessionmaker, transaction
from nudge_common.events import CONTACT_ACTIVITY, SEGMENT_ENTERED, ContactActivity, Topic
from nudge_common.ids import stable_id
from nudge_common.kafka import OutgoingMessage, create_producer, publish
from nudge_common.service import Runtime, freeze_startup_heap
from nudge_common.settings import NudgeSettings
from nudge_devtools.pipeline import topic_partitions
from nudge_devtools.services import ServiceProcess, free_port
from nudge_segmenter import backfill, store, value, worker
from nudge_segmenter.consumer import ContactsHandler
from nudge_segmenter.settings import SegmenterSettings
from nudge_segmenter.sql import compile_condition

CONTACT_PREFIX = "5e6e0000-0000-4000-8000-"
"""Contact ids end in the contact's number (12 hex digits), so a range of numbers is a
range of ids."""

NAMES = [
    "Page Viewed",
    "Product Viewed",
    "Email Opened",
    "Email Clicked",
    "Added to Cart",
    "Searched",
    "Signed In",
    "Order Completed",
    "Feature Used",
    "Support Ticket Opened",
]
"""Event names, most frequent first: name i is drawn with probability
sqrt((i+1)/10) - sqrt(i/10) (Page Viewed 32%, the last 5%)."""
ORDER = NAMES.index("Order Completed")
COUNTRIES = ["US", "US", "US", "FR", "FR", "DE", "DE", "GB", "GB", "ES", "IT", "NL", "BR", "CA"]
PLANS = ["free"] * 10 + ["pro"] * 5 + ["team"] * 3 + ["enterprise"] * 2
CATEGORIES = ["shoes", "bags", "hats", "coats"]

BACKFILL_CONDITION: dict[str, Any] = {
    "kind": "all",
    "conditions": [
        {"kind": "trait", "name": "plan", "op": "in", "value": ["pro", "team"]},
        {"kind": "event", "event": "Page Viewed", "op": "gte", "count": 3, "within_days": 30},
        {"kind": "score", "model": "lead", "op": "gte", "value": 50},
    ],
}


def contact_id(number: int) -> uuid.UUID:
    return uuid.UUID(f"{CONTACT_PREFIX}{number:012x}")


def _sql_array(values: Sequence[str]) -> str:
    return "ARRAY[" + ", ".join(f"'{v}'" for v in values) + "]"


def _pick(values: Sequence[str]) -> str:
    """SQL: one of ``values`` at random (repeats weigh)."""
    return f"({_sql_array(values)})[1 + floor(random() * {len(values)})::int]"


def _uuid_of(number: str) -> str:
    return f"('{CONTACT_PREFIX}' || lpad(to_hex({number}), 12, '0'))::uuid"


# ----------------------------------------------------------------------------- load

EVENTS_SQL = f"""
INSERT INTO segmenter.contact_events (workspace_id, contact_id, event, at, properties, revenue)
SELECT $1, {_uuid_of("c")}, ({_sql_array(NAMES)})[i + 1], at,
       CASE WHEN revenue IS NULL THEN jsonb_build_object('category', {_pick(CATEGORIES)})
            ELSE jsonb_build_object('revenue', revenue, 'currency', 'EUR') END,
       revenue
FROM (
    SELECT c, i, at,
           CASE WHEN i = {ORDER} THEN (ARRAY[19.0, 49.0, 99.0, 250.0])[1 + floor(random() * 4)::int]
           END AS revenue
    FROM (
        SELECT $2::bigint + floor(random() * ($3::bigint - $2::bigint))::bigint AS c,
               floor(10 * power(random(), 2))::int AS i,
               $5::timestamptz - interval '2 days' - power(random(), 2) * interval '88 days' AS at
        FROM generate_series(1, $4::bigint)
    ) AS drawn
) AS generated
ORDER BY c, i, at
"""
"""Events of contacts [$2, $3): $4 of them, each for a contact drawn uniformly (about
Poisson per contact), inserted in index order."""

CONTACTS_SQL = f"""
INSERT INTO segmenter.contacts (
    contact_id, workspace_id, user_id, traits, scores, tags, stages, consents,
    last_seen_at, orders, revenue, first_order_at, last_order_at,
    rfm_recency, rfm_frequency, rfm_monetary, updated_at)
SELECT id, $1, 'user-' || n,
       jsonb_strip_nulls(jsonb_build_object(
           'email', 'c' || n || '@bench.example',
           'country', {_pick(COUNTRIES)},
           'plan', {_pick(PLANS)},
           'language', {_pick(["en", "en", "fr", "de", "es"])},
           'company_size', floor(power(random(), 3) * 5000)::int + 1,
           'signed_up_at',
               ($4::timestamptz - floor(random() * 1500) * interval '1 day')::date::text,
           'birthday', CASE WHEN random() < 0.6
                            THEN (date '1950-01-01' + floor(random() * 18000)::int)::text END)),
       jsonb_build_object('lead', floor(power(random(), 2) * 200)::int,
                          'engagement', floor(random() * 100)::int),
       jsonb_strip_nulls(jsonb_build_object(
           'newsletter', CASE WHEN random() < 0.3 THEN 1 END,
           'vip', CASE WHEN random() < 0.05 THEN 1 + floor(random() * 3)::int END,
           'churn-risk', CASE WHEN random() < 0.1 THEN 1 END)),
       jsonb_build_object('lead', {_pick(["subscriber", "lead", "mql", "sql", "customer"])}),
       CASE WHEN random() < 0.7 THEN ARRAY['email'] ELSE ARRAY[]::text[] END,
       seen.last_seen_at, coalesce(seen.orders, 0), coalesce(seen.revenue, 0),
       seen.first_order_at, seen.last_order_at,
       CASE WHEN seen.orders > 0 THEN 1 + floor(random() * 5)::int END,
       CASE WHEN seen.orders > 0 THEN least(5, seen.orders) END,
       CASE WHEN seen.orders > 0 THEN 1 + floor(random() * 5)::int END,
       $4
FROM generate_series($2::bigint, $3::bigint - 1) AS n
CROSS JOIN LATERAL (SELECT {_uuid_of("n")} AS id) AS ids
LEFT JOIN (
    SELECT contact_id, max(at) AS last_seen_at,
           count(*) FILTER (WHERE event = 'Order Completed') AS orders,
           sum(revenue) FILTER (WHERE event = 'Order Completed') AS revenue,
           min(at) FILTER (WHERE event = 'Order Completed') AS first_order_at,
           max(at) FILTER (WHERE event = 'Order Completed') AS last_order_at
    FROM segmenter.contact_events
    WHERE contact_id BETWEEN {_uuid_of("$2::bigint")} AND {_uuid_of("$3::bigint - 1")}
    GROUP BY contact_id
) AS seen ON seen.contact_id = ids.id
"""
"""Contacts [$2, $3), their last seen and order totals taken from their events."""


def _dsn(settings: NudgeSettings) -> str:
    return admin_dsn(settings, make_url(settings.database_url).database)


async def load(
    settings: NudgeSettings, workspace_id: str, contacts: int, events: int, now: datetime
) -> dict[str, Any]:
    connection = await asyncpg.connect(_dsn(settings))
    started = time.perf_counter()
    try:
        await connection.execute("SET synchronous_commit = off")
        await connection.execute("SET work_mem = '256MB'")
        await connection.execute("SELECT setseed(0.6)")
        chunk = 100_000
        for first in range(0, contacts, chunk):
            last = min(first + chunk, contacts)
            count = events * last // contacts - events * first // contacts
            await connection.execute(EVENTS_SQL, workspace_id, first, last, count, now)
            await connection.execute(CONTACTS_SQL, workspace_id, first, last, now)
            print(
                f"  loaded contacts {last:,} of {contacts:,} "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        inserted_s = time.perf_counter() - started
        await vacuum_analyze(connection, ("contacts", "contact_events"))
        loaded_events = int(
            await connection.fetchval("SELECT count(*) FROM segmenter.contact_events")
        )
        size = await connection.fetchval(
            "SELECT pg_size_pretty(pg_database_size(current_database()))"
        )
    finally:
        await connection.close()
    return {
        "load_s": round(time.perf_counter() - started, 1),
        "load_insert_s": round(inserted_s, 1),
        "events": loaded_events,
        "database_size": size,
    }


async def vacuum_analyze(connection: asyncpg.Connection, tables: Sequence[str]) -> None:
    """What autovacuum gives tables that grew gradually: statistics (without them the
    segmenter's batch statements get plans for the wrong sizes) and a visibility map (for
    its index-only scans)."""
    for table in tables:
        await connection.execute(f"VACUUM ANALYZE segmenter.{table}")


# ----------------------------------------------------------------------------- statements


@dataclass
class StatementLog:
    """Every SQL statement an engine runs: its text, parameters and duration."""

    entries: list[tuple[str, Any, float]] = field(default_factory=list)

    @contextlib.contextmanager
    def recording(self, engine: AsyncEngine) -> Iterator[None]:
        sync_engine = engine.sync_engine

        def before(conn: sa.Connection, _c: Any, _s: str, _p: Any, _x: Any, _m: bool) -> None:
            conn.info["bench_started"] = time.perf_counter()

        def after(conn: sa.Connection, _c: Any, statement: str, params: Any, *_: Any) -> None:
            began = conn.info.pop("bench_started", None)
            if began is not None:
                self.entries.append((statement, params, time.perf_counter() - began))

        sa.event.listen(sync_engine, "before_cursor_execute", before)
        sa.event.listen(sync_engine, "after_cursor_execute", after)
        try:
            yield
        finally:
            sa.event.remove(sync_engine, "before_cursor_execute", before)
            sa.event.remove(sync_engine, "after_cursor_execute", after)

    def total_s(self) -> float:
        return sum(duration for _, _, duration in self.entries)

    def summary(self, top: int = 8) -> list[dict[str, Any]]:
        """The statements that took longest in all, grouped by their first words."""
        groups: dict[str, list[float]] = defaultdict(list)
        for statement, _, duration in self.entries:
            groups[_shape(statement)].append(duration)
        ranked = sorted(groups.items(), key=lambda item: -sum(item[1]))[:top]
        return [
            {"sql": shape, "calls": len(times), "total_s": round(sum(times), 3)}
            for shape, times in ranked
        ]

    def slowest(self) -> tuple[str, Any, float]:
        return max(self.entries, key=lambda entry: entry[2])


def _shape(statement: str) -> str:
    return re.sub(r"\s+", " ", statement).strip()[:110]


async def explain(
    engine: AsyncEngine, statement: str, params: Any, before: Sequence[str] = ()
) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of ``statement`` in a transaction rolled back after (with
    ``before`` run first in it, to put the data back as it was); of an executemany, with
    its first row's parameters."""
    if isinstance(params, list):
        params = params[0]
    async with engine.connect() as connection:
        transaction_ = await connection.begin()
        try:
            for undo in before:
                await connection.exec_driver_sql(undo)
            rows = await connection.exec_driver_sql(
                "EXPLAIN (ANALYZE, BUFFERS) " + statement, params
            )
            return "\n".join(str(row[0]) for row in rows)
        finally:
            await transaction_.rollback()


# ----------------------------------------------------------------------------- backfill


async def segmenter_runtime(settings: NudgeSettings) -> Runtime:
    segmenter_settings = SegmenterSettings(**settings.model_dump())
    engine = create_engine(segmenter_settings)
    producer = create_producer(segmenter_settings)
    await producer.start()
    return Runtime(segmenter_settings, engine, create_sessionmaker(engine), producer)


async def topic_end(settings: NudgeSettings, topic: Topic) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    await consumer.start()
    try:
        partitions = await topic_partitions(admin, [settings.topic(topic)])
        ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
        return ends
    finally:
        await consumer.stop()
        await admin.close()


async def value_refresh(runtime: Runtime, workspace_id: str, run: bool) -> dict[str, Any]:
    """The workspace's customer-value refresh (RFM scores, CLV fit), as the value worker
    runs it daily; timed when ``run``, else only marked done now (RFM scores stay the
    loader's). Either way the real-time phase starts in the steady state: otherwise its
    first order makes the workspace's first refresh due in the middle of the measurement."""
    if not run:
        async with transaction(runtime.sessionmaker) as session:
            await session.execute(
                sa.insert(store.value_models).values(
                    workspace_id=workspace_id,
                    refreshed_at=datetime.now(UTC),
                    error="not refreshed by the benchmark (--value-refresh)",
                )
            )
        return {}
    async with transaction(runtime.sessionmaker) as session:
        await value.ensure_model(session, workspace_id=workspace_id)
    print("value: refresh ...", flush=True)
    started = time.perf_counter()
    await worker.refresh_value(runtime, system_clock)
    refresh_s = time.perf_counter() - started
    async with transaction(runtime.sessionmaker) as session:
        row = (
            await session.execute(
                sa.select(store.value_models.c.customers, store.value_models.c.error).where(
                    store.value_models.c.workspace_id == workspace_id
                )
            )
        ).one()
    print(f"value: {refresh_s:.1f} s, {row.customers:,} customers {row.error or ''}", flush=True)
    return {
        "value_refresh_s": round(refresh_s, 1),
        "value_customers": row.customers,
        "value_error": row.error,
    }


async def backfilling_segment(runtime: Runtime, workspace_id: str) -> uuid.UUID:
    segment_id = uuid.uuid4()
    async with transaction(runtime.sessionmaker) as session:
        await store.create_segment(
            session,
            workspace_id=workspace_id,
            segment_id=segment_id,
            name="backfilled: pro or team, 3+ page views in 30 days, lead >= 50",
            condition=condition_adapter.validate_python(BACKFILL_CONDITION),
            status="backfilling",
        )
    return segment_id


async def profile_backfill(runtime: Runtime, workspace_id: str, chunk: int) -> None:
    """The same backfill again (a second segment, archived after) under cProfile: prints
    where the time went."""
    segment_id = await backfilling_segment(runtime, workspace_id)
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    await worker.backfill_next(runtime, system_clock, chunk)
    profiler.disable()
    print(f"profile of the same backfill: {time.perf_counter() - started:.1f} s", flush=True)
    for order in ("tottime", "cumulative"):
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats(order).print_stats(25)
        print(stream.getvalue(), flush=True)
    async with transaction(runtime.sessionmaker) as session:
        await store.update_segment(session, segment_id=segment_id, status="archived")


async def backfill_phase(
    runtime: Runtime, workspace_id: str, chunk: int, explain_stage: bool
) -> dict[str, Any]:
    segment_id = await backfilling_segment(runtime, workspace_id)
    log = StatementLog()
    publish_s = 0.0

    async def timed_publish(
        producer: Any, settings: NudgeSettings, messages: Sequence[OutgoingMessage]
    ) -> None:
        nonlocal publish_s
        began = time.perf_counter()
        await publish(producer, settings, messages)
        publish_s += time.perf_counter() - began

    staged_at: float | None = None

    async def watch(started: float) -> None:
        """When the staged total is committed (the end of stage)."""
        nonlocal staged_at
        connection = await asyncpg.connect(_dsn(runtime.settings))
        try:
            while True:
                total = await connection.fetchval(
                    "SELECT backfill_total FROM segmenter.segments WHERE id = $1", segment_id
                )
                if total is not None:
                    staged_at = time.perf_counter() - started
                    return
                await asyncio.sleep(0.05)
        finally:
            await connection.close()

    print("backfill: backfill_next ...", flush=True)
    with log.recording(runtime.engine), mock.patch.object(worker, "publish", timed_publish):
        started = time.perf_counter()
        watcher = asyncio.create_task(watch(started))
        done = await worker.backfill_next(runtime, system_clock, chunk)
        backfill_s = time.perf_counter() - started
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    async with transaction(runtime.sessionmaker) as session:
        segment = await store.get_segment(session, workspace_id=workspace_id, segment_id=segment_id)
        members = await store.member_count(session, segment_id=segment_id)
        rechecks = int(
            await session.scalar(
                sa.select(sa.func.count()).where(store.rechecks.c.workspace_id == workspace_id)
            )
            or 0
        )
    assert done == 1
    assert segment is not None
    assert segment.status == "active", segment
    stage_s = staged_at if staged_at is not None else float("nan")
    stage_statements = [
        e
        for e in log.entries
        if e[0]
        .lstrip()
        .startswith(("INSERT INTO segmenter.backfill_changes", "INSERT INTO segmenter.rechecks"))
    ]
    results: dict[str, Any] = {
        "backfill_s": round(backfill_s, 2),
        "backfill_stage_s": round(stage_s, 2),
        "backfill_apply_s": round(backfill_s - stage_s, 2),
        "backfill_publish_s": round(publish_s, 2),
        "backfill_db_s": round(log.total_s(), 2),
        "backfill_statements": len(log.entries),
        "members": members,
        "backfill_rechecks": rechecks,
        "backfill_chunk": chunk,
        "backfill_top_statements": log.summary(),
    }
    print(f"backfill: {backfill_s:.1f} s, {members:,} members", flush=True)
    for row in results["backfill_top_statements"]:
        print(f"  {row['total_s']:8.3f} s {row['calls']:6d} x  {row['sql']}", flush=True)
    if explain_stage:
        undo = [f"DELETE FROM segmenter.memberships WHERE segment_id = '{segment_id}'"]
        for statement, params, duration in stage_statements:
            print(f"EXPLAIN ANALYZE ({duration:.2f} s in the run):\n{statement}", flush=True)
            print(await explain(runtime.engine, statement, params, before=undo), flush=True)
    return {"segment_id": segment_id, **results}


# ----------------------------------------------------------------------------- segments


def realtime_conditions(ids: Sequence[uuid.UUID]) -> list[tuple[str, dict[str, Any]]]:
    """One varied segment per id: traits, scores, tags, stages, consent, value, last seen,
    event counts in windows (with and without property filters), "has not performed",
    nesting and references to other segments."""
    out: list[tuple[str, dict[str, Any]]] = []
    for i in range(len(ids)):
        name, other = NAMES[i % 10], NAMES[(3 * i + 1) % 10]
        country = COUNTRIES[i % len(COUNTRIES)]
        window = (7, 30, 90)[i % 3]
        condition: dict[str, Any]
        match i % 16:
            case 0:
                condition = {"kind": "trait", "name": "country", "op": "eq", "value": country}
            case 1:
                plans = (["pro", "team"], ["enterprise"], ["free"])[i % 3]
                condition = {"kind": "trait", "name": "plan", "op": "in", "value": plans}
            case 2:
                threshold = (20, 50, 80, 120, 160)[i % 5]
                condition = {"kind": "score", "model": "lead", "op": "gte", "value": threshold}
            case 3:
                condition = {
                    "kind": "event",
                    "event": name,
                    "op": "gte",
                    "count": 1 + i % 5,
                    "within_days": window,
                }
            case 4:
                condition = {
                    "kind": "all",
                    "conditions": [
                        {"kind": "trait", "name": "country", "op": "eq", "value": country},
                        {"kind": "event", "event": other, "count": 2, "within_days": 30},
                    ],
                }
            case 5:
                op = "less_than" if (i // 16) % 2 else "more_than"
                days = (3, 7, 14, 30, 60)[i % 5]
                condition = {"kind": "last_seen", "op": op, "days": days}
            case 6:
                tag = ("newsletter", "vip", "churn-risk")[i % 3]
                condition = {"kind": "tag", "tag": tag}
            case 7:
                condition = {
                    "kind": "all",
                    "conditions": [
                        {"kind": "score", "model": "lead", "op": "gte", "value": 40},
                        {"kind": "event", "event": name, "within_days": 7},
                    ],
                }
            case 8:
                condition = {
                    "kind": "event",
                    "event": name,
                    "op": "eq",
                    "count": 0,
                    "within_days": (14, 30)[i % 2],
                }
            case 9:
                condition = (
                    {"kind": "value", "metric": "orders", "op": "gte", "value": 1}
                    if i % 2
                    else {"kind": "value", "metric": "revenue", "op": "gt", "value": 100}
                )
            case 10:
                condition = {"kind": "stage", "model": "lead", "op": "in", "value": ["mql", "sql"]}
            case 11:
                condition = {
                    "kind": "any",
                    "conditions": [
                        {"kind": "event", "event": name, "count": 5},
                        {"kind": "tag", "tag": "vip"},
                    ],
                }
            case 12:
                condition = {
                    "kind": "event",
                    "event": name,
                    "where": {"kind": "trait", "name": "category", "op": "eq", "value": "shoes"},
                    "within_days": 30,
                }
            case 13:
                condition = {
                    "kind": "all",
                    "conditions": [
                        {"kind": "consent", "channel": "email"},
                        {"kind": "last_seen", "op": "less_than", "days": 30},
                    ],
                }
            case 14:
                condition = {
                    "kind": "all",
                    "conditions": [
                        {"kind": "segment", "segment_id": str(ids[i - 11])},
                        {"kind": "score", "model": "lead", "op": "gte", "value": 30},
                    ],
                }
            case _:
                condition = {
                    "kind": "any",
                    "conditions": [
                        {"kind": "age", "op": "gte", "value": 40},
                        {"kind": "date", "name": "signed_up_at", "op": "within_last", "days": 365},
                    ],
                }
        out.append((f"segment {i} ({condition['kind']})", condition))
    return out


async def create_realtime_segments(
    runtime: Runtime, workspace_id: str, count: int, pool: range, now: datetime
) -> tuple[dict[str, uuid.UUID], float]:
    """``count`` active segments, ten of them the triggers (``performed <name> within 1
    day``, one per name); the memberships and rechecks of the contacts in ``pool`` are
    computed set-based as a backfill leaves them. Returns the trigger of each name, and the
    seconds the memberships took."""
    triggers = {name: uuid.uuid4() for name in NAMES}
    ids = [uuid.uuid4() for _ in range(count - len(triggers))]
    definitions = realtime_conditions(ids)
    definitions += [
        (f"trigger: {name} today", {"kind": "event", "event": name, "within_days": 1})
        for name in NAMES
    ]
    low, high = contact_id(pool.start), contact_id(pool.stop - 1)
    started = time.perf_counter()
    for segment_id, (name, definition) in zip([*ids, *triggers.values()], definitions, strict=True):
        condition = condition_adapter.validate_python(definition)
        async with transaction(runtime.sessionmaker) as session:
            await store.create_segment(
                session,
                workspace_id=workspace_id,
                segment_id=segment_id,
                name=name,
                condition=condition,
            )
            compiled = compile_condition(condition, now)
            matching = sa.select(
                sa.literal(segment_id),
                store.contacts.c.contact_id,
                sa.literal(workspace_id),
                sa.literal(now, store.TIMESTAMP),
            ).where(
                store.contacts.c.workspace_id == workspace_id,
                store.contacts.c.contact_id.between(low, high),
                compiled.matches,
            )
            columns = ["segment_id", "contact_id", "workspace_id", "entered_at"]
            await session.execute(sa.insert(store.memberships).from_select(columns, matching))
            if compiled.recheck_at is not None:
                await session.execute(
                    backfill.schedule_rechecks(
                        compiled.recheck_at,
                        store.contacts.c.workspace_id == workspace_id,
                        store.contacts.c.contact_id.between(low, high),
                    )
                )
            await session.execute(
                sa.insert(store.membership_history).from_select(
                    columns,
                    sa.select(
                        store.memberships.c.segment_id,
                        store.memberships.c.contact_id,
                        store.memberships.c.workspace_id,
                        store.memberships.c.entered_at,
                    ).where(store.memberships.c.segment_id == segment_id),
                )
            )
    # Inserted in bulk after the load's VACUUM ANALYZE: without fresh statistics the
    # batches' state read planned sequential scans of memberships and rechecks from ~80
    # contacts on (~200 ms at 100,000 contacts), and the history update a merge join over
    # the whole table: autovacuum had not analyzed them by the measurement.
    elapsed = time.perf_counter() - started
    connection = await asyncpg.connect(_dsn(runtime.settings))
    try:
        await vacuum_analyze(connection, ("memberships", "membership_history", "rechecks"))
    finally:
        await connection.close()
    return triggers, elapsed


# ----------------------------------------------------------------------------- real time


@dataclass(frozen=True)
class Activity:
    key: bytes
    value: bytes
    expected: uuid.UUID
    """The id of the ``segment.entered`` (into its trigger) this activity causes."""


def activities(
    workspace_id: str,
    contacts: range,
    count: int,
    triggers: dict[str, uuid.UUID],
    rng: random.Random,
) -> list[Activity]:
    """``count`` activities of the ``contacts``, each the first of its name for its contact
    within the day: contact ``m % len``, name rotated by ``m // len`` from a skewed start."""
    assert count <= 10 * len(contacts), "not enough contacts for unique (contact, event)"
    first_name = [min(9, int(10 * rng.random() ** 2)) for _ in contacts]
    now = datetime.now(UTC)
    out = []
    for m in range(count):
        slot = m % len(contacts)
        number = contacts[slot]
        name = NAMES[(first_name[slot] + m // len(contacts)) % 10]
        payload = ContactActivity(
            contact_id=contact_id(number),
            message_id=f"bench-{number}-{m}",
            kind="page" if name == "Page Viewed" else "track",
            event=name,
            properties=(
                {"revenue": 49.0, "currency": "EUR"}
                if name == "Order Completed"
                else {"category": rng.choice(CATEGORIES)}
            ),
            revenue=49.0 if name == "Order Completed" else None,
            at=now,
        )
        envelope = CONTACT_ACTIVITY.envelope(
            workspace_id=workspace_id, payload=payload, occurred_at=now
        )
        out.append(
            Activity(
                key=str(payload.contact_id).encode(),
                value=envelope.encode(),
                expected=stable_id(str(envelope.id), SEGMENT_ENTERED.name, str(triggers[name])),
            )
        )
    return out


class Outputs:
    """Collects the id and timestamp of every record on the memberships topic from the
    given offsets on, in the background."""

    def __init__(self, settings: NudgeSettings, start: dict[TopicPartition, int]) -> None:
        self.settings = settings
        self.start = start
        self.seen: dict[uuid.UUID, int] = {}
        self.count = 0
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def wait_for(self, ids: Collection[uuid.UUID], timeout_s: float) -> bool:
        """Wait until every one of ``ids`` has arrived (False after ``timeout_s``)."""
        deadline = time.perf_counter() + timeout_s
        missing = [i for i in ids if i not in self.seen]
        while missing:
            self._arrived.clear()
            missing = [i for i in missing if i not in self.seen]
            remaining = deadline - time.perf_counter()
            if not missing or remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        return not missing

    async def __aenter__(self) -> Outputs:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap_servers, enable_auto_commit=False
        )
        await consumer.start()
        consumer.assign(list(self.start))
        for tp, offset in self.start.items():
            consumer.seek(tp, offset)
        self._task = asyncio.create_task(self._run(consumer))
        return self

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=100, max_records=5000)
                for records in batches.values():
                    for record in records:
                        self.seen[uuid.UUID(codec.loads(record.value)["id"])] = record.timestamp
                        self.count += 1
                if batches:
                    self._arrived.set()
        finally:
            await consumer.stop()

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@dataclass
class RunResult:
    rate: float
    sent: int
    send_s: float
    processed: int
    processed_rate: float
    latencies_ms: list[float]
    elapsed_s: float
    metrics: dict[str, float]

    @property
    def finished(self) -> bool:
        return self.processed == self.sent

    def figures(self, prefix: str) -> dict[str, Any]:
        def p(q: float) -> float | None:
            return round(percentile(self.latencies_ms, q), 1) if self.latencies_ms else None

        return {
            f"{prefix}_rate": self.rate,
            f"{prefix}_sent": self.sent,
            f"{prefix}_achieved_send_rate": round(self.sent / max(self.send_s, 1e-9), 1),
            f"{prefix}_processed": self.processed,
            f"{prefix}_finished": self.finished,
            f"{prefix}_events_per_s": round(self.processed_rate, 1),
            f"{prefix}_p50_ms": p(50),
            f"{prefix}_p99_ms": p(99),
            f"{prefix}_max_ms": round(max(self.latencies_ms), 1) if self.latencies_ms else None,
            **{f"{prefix}_{k}": v for k, v in self.metrics.items()},
        }


async def scrape(url: str) -> dict[str, float]:
    """The service's counters that say where a batch's time goes, summed over labels."""
    async with httpx.AsyncClient(timeout=5.0) as client:
        text = (await client.get(f"{url}/metrics")).text
    wanted: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            consumer = sample.labels.get("consumer")
            if sample.name.startswith("nudge_consumer_batch_") and consumer == "segmenter":
                wanted[sample.name] += sample.value
            elif sample.name == "nudge_segmenter_transitions_total":
                wanted[f"transitions:{sample.labels.get('direction', '')}"] += sample.value
            elif sample.name in (
                "nudge_db_query_duration_seconds_sum",
                "nudge_db_query_duration_seconds_count",
            ):
                wanted[sample.name] += sample.value
                statement = sample.labels.get("statement", "")
                wanted[f"{sample.name}:{statement}"] += sample.value
    return wanted


def per_message(
    before: dict[str, float], after: dict[str, float], messages: int
) -> dict[str, float]:
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    batches = delta("nudge_consumer_batch_duration_seconds_count")
    if not messages or not batches:
        return {}
    return {
        "batches": batches,
        "mean_batch_size": round(delta("nudge_consumer_batch_size_sum") / batches, 1),
        "batch_ms_per_message": round(
            1000 * delta("nudge_consumer_batch_duration_seconds_sum") / messages, 3
        ),
        "sql_statements_per_message": round(
            delta("nudge_db_query_duration_seconds_count") / messages, 1
        ),
        "sql_ms_per_message": round(
            1000 * delta("nudge_db_query_duration_seconds_sum") / messages, 3
        ),
        **{
            f"{direction}_per_message": round(delta(f"transitions:{direction}") / messages, 2)
            for direction in ("entered", "exited")
        },
        **{
            f"sql_{kind}_per_message": round(
                delta(f"nudge_db_query_duration_seconds_count:{kind}") / messages, 1
            )
            for kind in ("select", "insert", "update", "delete")
        },
    }


@dataclass
class SegmenterProcess(ServiceProcess):
    """``python -m nudge_segmenter run --workers N``: N consumer processes sharing the
    contacts topic's partitions (uvicorn workers, metrics summed over them)."""

    workers: int = 1

    def start(self) -> None:
        env = {**os.environ, **self.env, "NUDGE_HTTP_PORT": str(self.port)}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "nudge_segmenter", "run", "--workers", str(self.workers)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )


@contextlib.asynccontextmanager
async def segmenter_process(
    env: dict[str, str], logs: Path, label: str, workers: int = 1
) -> AsyncIterator[SegmenterProcess]:
    process = SegmenterProcess(
        "segmenter",
        free_port(),
        {**os.environ, **env, "NUDGE_LOG_LEVEL": "warning"},
        logs / f"segmenter-{label}.log",
        workers=workers,
    )
    process.start()
    try:
        await process.wait_ready()
        yield process
    finally:
        await process.stop()


async def send_at_rate(
    producer: AIOKafkaProducer, topic: str, batch: Sequence[Activity], rate: float
) -> tuple[dict[uuid.UUID, int], float]:
    """Send each activity at its slot (open loop); returns each one's record timestamp (ms)
    by its expected output id, and the seconds sending took."""
    sent_at: dict[uuid.UUID, int] = {}
    acks = []
    started = time.perf_counter()
    for index, activity in enumerate(batch):
        wait = started + index / rate - time.perf_counter()
        if wait > 0.001:
            await asyncio.sleep(wait)
        stamp = int(time.time() * 1000)
        sent_at[activity.expected] = stamp
        acks.append(
            await producer.send(topic, activity.value, key=activity.key, timestamp_ms=stamp)
        )
    await asyncio.gather(*acks)
    return sent_at, time.perf_counter() - started


async def cpu_now(engine: AsyncEngine, service: SegmenterProcess) -> tuple[float, float]:
    """CPU seconds so far of the service's processes and of the sandbox database's
    PostgreSQL backends (the service's pool keeps its connections for the run)."""
    async with engine.connect() as connection:
        backends = set((await connection.execute(SANDBOX_BACKENDS)).scalars())
    assert service.process is not None
    return process_tree_cpu_s(service.process.pid), cpu_s(backends)


async def run_at_rate(
    runtime: Runtime,
    outputs: Outputs,
    service: SegmenterProcess,
    batch: Sequence[Activity],
    rate: float,
    drain_s: float,
    producer: AIOKafkaProducer,
) -> RunResult:
    settings, url = runtime.settings, service.url
    before = await scrape(url)
    cpu_before = await cpu_now(runtime.engine, service)
    # A full collection of this process's heap (the activities, the outputs seen) stalled
    # the sending loop for ~200-250 ms: the activities stamped meanwhile went out late.
    freeze_startup_heap()
    started = time.perf_counter()
    sent_at, send_s = await send_at_rate(producer, settings.topic(Topic.CONTACTS), batch, rate)
    await outputs.wait_for(sent_at.keys(), drain_s)
    elapsed = time.perf_counter() - started
    done = sorted(outputs.seen[key] for key in sent_at if key in outputs.seen)
    latencies = [
        float(outputs.seen[key] - stamp) for key, stamp in sent_at.items() if key in outputs.seen
    ]
    after = await scrape(url)
    cpu_after = await cpu_now(runtime.engine, service)
    service_cpu, pg_cpu = (a - b for a, b in zip(cpu_after, cpu_before, strict=True))
    rate_done = 0.0
    if len(done) >= 10:
        low, high = len(done) // 10, (len(done) * 9) // 10
        if done[high] > done[low]:
            rate_done = (high - low) / ((done[high] - done[low]) / 1000)
    return RunResult(
        rate=rate,
        sent=len(batch),
        send_s=send_s,
        processed=len(done),
        processed_rate=rate_done,
        latencies_ms=latencies,
        elapsed_s=elapsed,
        metrics={
            **per_message(before, after, len(done)),
            "cpu_us_per_message": round(1e6 * service_cpu / max(len(done), 1)),
            "pg_cpu_us_per_message": round(1e6 * pg_cpu / max(len(done), 1)),
        },
    )


async def skip_backlog(settings: NudgeSettings) -> int:
    """Move the segmenter's consumer group to the end of the contacts topic (with no
    member in it); returns how many messages were skipped."""
    ends = await topic_end(settings, Topic.CONTACTS)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=settings.consumer_group("segmenter"),
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        consumer.assign(list(ends))
        committed = 0
        for tp in ends:
            committed += max(await consumer.committed(tp) or 0, 0)
        await consumer.commit(dict(ends))
        return sum(ends.values()) - committed
    finally:
        await consumer.stop()


async def realtime_phase(
    runtime: Runtime,
    env: dict[str, str],
    workspace_id: str,
    args: argparse.Namespace,
    contacts: int,
) -> dict[str, Any]:
    settings = runtime.settings
    pool = range(0, min(contacts, args.pool))
    warm = 300
    now = datetime.now(UTC)
    print(f"real time: {args.segments} segments, memberships of {len(pool):,} contacts", flush=True)
    triggers, memberships_s = await create_realtime_segments(
        runtime, workspace_id, args.segments - 1, pool, now
    )
    async with transaction(runtime.sessionmaker) as session:
        active = len(await store.list_segments(session, workspace_id=workspace_id))
    print(f"  {active} active segments; memberships in {memberships_s:.1f} s", flush=True)
    profiled = min(args.profile, len(pool) // 10)
    rest = len(pool) - 2 * warm - profiled
    slices = {
        "warm-1": range(0, warm),
        "throughput": range(warm, warm + rest * 2 // 3),
        "warm-2": range(warm + rest * 2 // 3, 2 * warm + rest * 2 // 3),
        "latency": range(2 * warm + rest * 2 // 3, len(pool) - profiled),
        "profile": range(len(pool) - profiled, len(pool)),
    }
    rng = random.Random(7)
    throughput_batch = activities(
        workspace_id,
        slices["throughput"],
        min(int(args.rate * args.duration), 10 * len(slices["throughput"])),
        triggers,
        rng,
    )
    warm_batches = [
        activities(workspace_id, slices[name], warm, triggers, rng) for name in ("warm-1", "warm-2")
    ]
    logs = Path(tempfile.mkdtemp(prefix="bench-segmenter-"))
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers, acks=1, linger_ms=2
    )
    await producer.start()
    results: dict[str, Any] = {
        "active_segments": active,
        "segmenter_workers": args.workers,
        "realtime_pool_contacts": len(pool),
        "realtime_memberships_s": round(memberships_s, 1),
        "logs": str(logs),
    }
    try:
        start = await topic_end(settings, Topic.MEMBERSHIPS)
        async with Outputs(settings, start) as outputs:
            async with segmenter_process(env, logs, "throughput", args.workers) as service:
                warmed = await run_at_rate(
                    runtime, outputs, service, warm_batches[0], 100, 60, producer
                )
                print(f"  warm-up: {warmed.processed} of {warmed.sent} processed", flush=True)
                print(f"  throughput: {len(throughput_batch):,} at {args.rate}/s", flush=True)
                throughput = await run_at_rate(
                    runtime, outputs, service, throughput_batch, args.rate, args.drain_s, producer
                )
            skipped = await skip_backlog(settings)
            print(
                f"  throughput: {throughput.processed:,} of {throughput.sent:,} processed, "
                f"{throughput.processed_rate:.0f}/s; {skipped:,} left unprocessed",
                flush=True,
            )
            latency_rate = args.latency_rate or max(
                1.0, round(throughput.processed_rate * args.latency_share)
            )
            latency_batch = activities(
                workspace_id,
                slices["latency"],
                min(int(latency_rate * args.latency_duration), 10 * len(slices["latency"])),
                triggers,
                rng,
            )
            async with segmenter_process(env, logs, "latency", args.workers) as service:
                await run_at_rate(runtime, outputs, service, warm_batches[1], 100, 60, producer)
                print(f"  latency: {len(latency_batch):,} at {latency_rate}/s", flush=True)
                latency = await run_at_rate(
                    runtime, outputs, service, latency_batch, latency_rate, args.drain_s, producer
                )
            print(
                f"  latency: p50 {percentile(latency.latencies_ms, 50):.0f} ms, "
                f"p99 {percentile(latency.latencies_ms, 99):.0f} ms",
                flush=True,
            )
    finally:
        await producer.stop()
    results.update(
        {
            "realtime_events_per_s": round(throughput.processed_rate, 1),
            "realtime_p99_ms": latency.figures("x")["x_p99_ms"],
            "realtime_p99_rate": latency_rate,
            "realtime_skipped": skipped,
            **throughput.figures("throughput"),
            **latency.figures("latency"),
        }
    )
    if profiled:
        results["profile_top"] = await profile_handler(
            runtime, workspace_id, triggers, slices["profile"], profiled, 4 if args.explain else 0
        )
    return results


@dataclass
class _Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] = field(default_factory=list)


async def profile_handler(
    runtime: Runtime,
    workspace_id: str,
    triggers: dict[str, uuid.UUID],
    contacts: range,
    count: int,
    explain_top: int,
) -> list[str]:
    """``count`` activities applied in this process by the service's own consumer runner
    (its ``_apply``: decode, claim the ids, the batch handler, publish, commit) in batches
    of the runner's size, under cProfile; prints where the time went and returns the SQL
    statements that took longest."""
    batch = activities(workspace_id, contacts, count, triggers, random.Random(11))
    topic = runtime.settings.topic(Topic.CONTACTS)
    records: list[Record] = [_Record(topic, 0, i, a.key, a.value) for i, a in enumerate(batch)]
    runner = ConsumerRunner(
        name="segmenter",
        topics=[Topic.CONTACTS],
        handler=ContactsHandler(system_clock),
        settings=runtime.settings,
        sessionmaker=runtime.sessionmaker,
        producer=runtime.producer,
        processed_messages=store.processed_messages,
    )
    size = runtime.settings.consumer_batch_max_records
    profiler = cProfile.Profile()
    log = StatementLog()
    started = time.perf_counter()
    with log.recording(runtime.engine):
        profiler.enable()
        for first in range(0, len(records), size):
            await runner._apply(records[first : first + size])
        profiler.disable()
    elapsed = time.perf_counter() - started
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(30)
    print(
        f"profile: {count} activities in {elapsed:.2f} s in process, batches of {size} "
        f"({1000 * elapsed / count:.2f} ms each; SQL {1000 * log.total_s() / count:.2f} ms "
        f"in {len(log.entries) / count:.2f} statements each)",
        flush=True,
    )
    print(stream.getvalue(), flush=True)
    for row in log.summary(12):
        print(f"  {row['total_s']:8.3f} s {row['calls']:6d} x  {row['sql']}", flush=True)
    if explain_top:
        for row in log.summary(explain_top):
            statement, params, duration = max(
                (e for e in log.entries if _shape(e[0]) == row["sql"]), key=lambda e: e[2]
            )
            print(f"EXPLAIN ANALYZE (slowest call: {duration * 1000:.1f} ms):\n{statement}")
            print(await explain(runtime.engine, statement, params), flush=True)
    return [f"{r['sql']} ({r['calls']} x, {r['total_s']} s)" for r in log.summary(6)]


# ----------------------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "contacts": args.contacts,
        "commit": checkout(),
        "date": datetime.now(UTC).isoformat(timespec="minutes"),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }
    workspace_id = f"bench-seg-{uuid.uuid4().hex[:8]}"
    async with sandbox(NudgeSettings(), "bseg") as box:
        print(f"load: {args.contacts:,} contacts, {args.events:,} events", flush=True)
        results.update(
            await load(box.settings, workspace_id, args.contacts, args.events, datetime.now(UTC))
        )
        print(f"load: {results['load_s']} s, database {results['database_size']}", flush=True)
        runtime = await segmenter_runtime(box.settings)
        try:
            results.update(await value_refresh(runtime, workspace_id, args.value_refresh))
            backfilled = await backfill_phase(
                runtime, workspace_id, args.backfill_chunk, args.explain
            )
            backfilled.pop("segment_id")
            results.update(backfilled)
            results["backfill_published"] = sum(
                (await topic_end(box.settings, Topic.MEMBERSHIPS)).values()
            )
            if args.profile:
                await profile_backfill(runtime, workspace_id, args.backfill_chunk)
            if args.duration > 0:
                results.update(
                    await realtime_phase(runtime, box.env, workspace_id, args, args.contacts)
                )
        finally:
            await runtime.producer.stop()
            await runtime.engine.dispose()
    results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results["machine"] = machine()
    return results


def checkout() -> str:
    """The commit measured, with "+changes" when the segmenter's files differ from it."""
    root = Path(__file__).resolve().parents[1]
    git = shutil.which("git")
    if git is None:
        return "unknown"
    commit = subprocess.run(
        [git, "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    changed = subprocess.run(
        [git, "status", "--porcelain", "--", "services/segmenter", "libs/common"],
        cwd=root,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return f"{commit}+changes" if changed else commit


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contacts", type=int, default=_env_int("NUDGE_BENCH_CONTACTS", 1_000_000))
    parser.add_argument("--events", type=int, default=_env_int("NUDGE_BENCH_EVENTS", 10_000_000))
    parser.add_argument("--backfill-chunk", type=int, default=SegmenterSettings().backfill_chunk)
    parser.add_argument("--segments", type=int, default=200, help="active segments in real time")
    parser.add_argument("--pool", type=int, default=60_000, help="contacts real time touches")
    parser.add_argument("--rate", type=float, default=5000.0, help="throughput run, events/s")
    parser.add_argument("--duration", type=float, default=10.0, help="0 skips real time")
    parser.add_argument("--drain-s", type=float, default=90.0)
    parser.add_argument(
        "--latency-rate", type=float, default=0.0, help="0: --latency-share of the throughput"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=_env_int("NUDGE_BENCH_SEGMENTER_WORKERS", 1),
        help="segmenter processes (run --workers)",
    )
    parser.add_argument("--latency-share", type=float, default=0.25)
    parser.add_argument("--latency-duration", type=float, default=20.0)
    parser.add_argument(
        "--explain", action="store_true", help="EXPLAIN ANALYZE the stage (and the profile)"
    )
    parser.add_argument(
        "--value-refresh",
        action="store_true",
        help="time the value worker's RFM and CLV refresh of the workspace (long at 1M)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        help="activities to profile in process (and profile a second backfill)",
    )
    return parser.parse_args(argv)


def main() -> None:
    results = asyncio.run(run(parse()))
    print(codec.dumps(results).decode())


if __name__ == "__main__":
    main()
