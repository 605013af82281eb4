"""``make bench-orchestrator``: the orchestrator process under a mass entry and a timer flood.

1. **Entry**: ``--contacts`` contacts enter one workflow at once (``segment.entered``
   messages put on the memberships topic as fast as the producer goes, with an orchestrator
   process already running); the workflow's first step sends an email, its second waits a
   day. ``entry_all_requested_s`` is from the first membership message sent to the moment
   every contact's email request is committed (a row in ``sends``, written in the
   transaction that published the request).
2. **Timers**: ``--timers`` active runs waiting in a ``wait`` step, bulk-inserted with
   due times spread evenly at ``--timer-rate`` per second, starting a few seconds after the
   orchestrator processes (``--replicas``) are up; when a wait fires, the run sends an
   email. The lag of a timer is from its due time to the broker timestamp of the request it
   caused (each contact id encodes its timer's number, so the due time is known without
   decoding the message); ``timer_lag_p99_ms`` is its 99th percentile over all timers.

Every run gets its own database and topic prefix on the stack (``scripts/stack up``) and
removes them afterwards; every wait is bounded by ``--deadline``. The last line printed is
one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer
from sqlalchemy.engine import make_url

from bench.harness import admin_dsn, percentile, sandbox
from nudge_common import codec
from nudge_common.db import create_engine, create_sessionmaker, transaction
from nudge_common.events import SEGMENT_ENTERED, ContactSnapshot, MembershipChanged, Topic
from nudge_common.kafka import create_producer
from nudge_common.settings import NudgeSettings
from nudge_devtools.services import ServiceProcess, free_port
from nudge_orchestrator import store
from nudge_orchestrator.domain.workflows import WorkflowDefinition

TEMPLATE = uuid.UUID("00000000-0000-4000-8000-00000000e1a1")
CONTACT_PREFIX = "0000b0b0-0000-4000-8000-"
"""Contact ids of the timer phase end in their timer's number (12 hex digits)."""


def contact_id(number: int) -> uuid.UUID:
    return uuid.UUID(f"{CONTACT_PREFIX}{number:012x}")


def number_of(contact: str) -> int:
    return int(contact[-12:], 16)


async def _workflow(
    settings: NudgeSettings, workspace_id: str, trigger: dict[str, Any]
) -> uuid.UUID:
    definition = WorkflowDefinition.model_validate(
        {
            "trigger": trigger,
            "entry": {"rule": "once"},
            "steps": [
                {"kind": "send", "channel": "email", "template_id": str(TEMPLATE)},
                {"kind": "wait", "seconds": 86400},
                {"kind": "send", "channel": "email", "template_id": str(TEMPLATE)},
            ],
        }
    )
    workflow_id = uuid.uuid4()
    engine = create_engine(settings)
    try:
        async with transaction(create_sessionmaker(engine)) as session:
            await store.create_workflow(
                session,
                workspace_id=workspace_id,
                workflow_id=workflow_id,
                name="bench",
                definition=definition,
            )
    finally:
        await engine.dispose()
    return workflow_id


def _dsn(settings: NudgeSettings) -> str:
    return admin_dsn(settings, make_url(settings.database_url).database)


async def _count(dsn: str, sql: str, *args: Any) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        return int(await connection.fetchval(sql, *args))
    finally:
        await connection.close()


def _orchestrator(env: dict[str, str], logs: Path, label: str) -> ServiceProcess:
    return ServiceProcess(
        "orchestrator",
        free_port(),
        {**os.environ, **env, "NUDGE_LOG_LEVEL": "warning"},
        logs / f"orchestrator-{label}.log",
    )


async def entry_phase(
    settings: NudgeSettings, env: dict[str, str], logs: Path, contacts: int, deadline_s: float
) -> dict[str, Any]:
    workspace_id = f"bench-entry-{uuid.uuid4().hex[:8]}"
    segment_id = uuid.uuid4()
    workflow_id = await _workflow(
        settings, workspace_id, {"kind": "segment_entered", "segment_id": str(segment_id)}
    )
    process = _orchestrator(env, logs, "entry")
    process.start()
    producer = create_producer(settings)
    await producer.start()
    dsn = _dsn(settings)
    try:
        await process.wait_ready()
        topic = settings.topic(Topic.MEMBERSHIPS)
        now = datetime.now(UTC)
        started = time.monotonic()
        pending = []
        for number in range(contacts):
            envelope = SEGMENT_ENTERED.envelope(
                workspace_id=workspace_id,
                payload=MembershipChanged(
                    segment_id=segment_id,
                    segment_name="bench",
                    contact=ContactSnapshot(
                        contact_id=uuid.uuid4(),
                        traits={"email": f"c{number}@example.com"},
                    ),
                    at=now,
                ),
                occurred_at=now,
            )
            pending.append(
                await producer.send(
                    topic,
                    envelope.encode(),
                    key=str(envelope.payload["contact"]["contact_id"]).encode(),
                )
            )
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
        produced_s = time.monotonic() - started
        query = "SELECT count(*) FROM orchestrator.sends WHERE workflow_id = $1"
        requested = 0
        while time.monotonic() - started < deadline_s:
            requested = await _count(dsn, query, workflow_id)
            if requested >= contacts:
                break
            await asyncio.sleep(0.25)
        elapsed = time.monotonic() - started
        return {
            "entry_contacts": contacts,
            "entry_requested": requested,
            "entry_all_requested_s": round(elapsed, 2) if requested >= contacts else None,
            "entry_produce_s": round(produced_s, 2),
            "entry_contacts_per_s": round(requested / elapsed, 1),
        }
    finally:
        await producer.stop()
        await process.stop()


TIMERS_SQL = """
WITH numbers AS (SELECT n FROM generate_series($1::bigint, $2::bigint) AS n),
new_runs AS (
    INSERT INTO orchestrator.runs (id, workflow_id, version, workspace_id, contact_id, status,
                                   exclusive, contact, started_at)
    SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(n), 12, '0'))::uuid, $3, 1, $4,
           ('{prefix}' || lpad(to_hex(n), 12, '0'))::uuid, 'active', true,
           jsonb_build_object('traits', jsonb_build_object('email', 'c' || n || '@example.com')),
           $5
    FROM numbers
),
executed AS (
    INSERT INTO orchestrator.step_executions (run_id, step, executed_at, outcome)
    SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(n), 12, '0'))::uuid, s, $5,
           CASE s WHEN 0 THEN 'requested' ELSE 'waiting' END
    FROM numbers, (VALUES (0), (1)) AS steps (s)
)
INSERT INTO orchestrator.timers (run_id, workspace_id, contact_id, step, due_at, resume_step,
                                 kind)
SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(n), 12, '0'))::uuid, $4,
       ('{prefix}' || lpad(to_hex(n), 12, '0'))::uuid, 1,
       $6::timestamptz + make_interval(secs => n / $7::float8), 2, 'wait'
FROM numbers
""".replace("{prefix}", CONTACT_PREFIX)


async def timer_phase(
    settings: NudgeSettings,
    env: dict[str, str],
    logs: Path,
    timers: int,
    rate: float,
    replicas: int,
    deadline_s: float,
) -> dict[str, Any]:
    workspace_id = f"bench-timers-{uuid.uuid4().hex[:8]}"
    workflow_id = await _workflow(settings, workspace_id, {"kind": "api"})
    dsn = _dsn(settings)
    processes = [_orchestrator(env, logs, f"timers-{i}") for i in range(replicas)]
    for process in processes:
        process.start()
    # The sandbox's notifications topic, from its start (the entry phase's requests are
    # skipped by their keys).
    consumer = AIOKafkaConsumer(
        settings.topic(Topic.NOTIFICATIONS),
        bootstrap_servers=settings.kafka_bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        for process in processes:
            await process.wait_ready()
        # Inserted well before they are due: the first is due once all are in.
        connection = await asyncpg.connect(dsn)
        insert_started = time.monotonic()
        try:
            placeholder = datetime(2100, 1, 1, tzinfo=UTC)
            chunk = 100_000
            for first in range(0, timers, chunk):
                last = min(first + chunk, timers) - 1
                await connection.execute(
                    TIMERS_SQL,
                    first,
                    last,
                    workflow_id,
                    workspace_id,
                    datetime.now(UTC),
                    placeholder,
                    rate,
                )
            inserted_s = time.monotonic() - insert_started
            await connection.execute("ANALYZE orchestrator.timers")
            # The shift below takes a while on many rows: start late enough.
            first_due = datetime.now(UTC) + timedelta(seconds=3 + timers / 50_000)
            # Move all due times to start at first_due, in one statement.
            await connection.execute(
                "UPDATE orchestrator.timers "
                "SET due_at = due_at - $1::timestamptz + $2::timestamptz "
                "WHERE workspace_id = $3",
                placeholder,
                first_due,
                workspace_id,
            )
        finally:
            await connection.close()
        first_due_ms = first_due.timestamp() * 1000
        lags: list[float] = []
        seen: set[int] = set()
        deadline = time.monotonic() + timers / rate + deadline_s
        while len(seen) < timers and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for records in batches.values():
                for record in records:
                    if record.key is None or not record.key.startswith(CONTACT_PREFIX.encode()):
                        continue
                    number = number_of(record.key.decode())
                    if number in seen:
                        continue
                    seen.add(number)
                    due_ms = first_due_ms + number / rate * 1000
                    lags.append(record.timestamp - due_ms)
        left = await _count(
            dsn, "SELECT count(*) FROM orchestrator.timers WHERE workspace_id = $1", workspace_id
        )
        fired = await _count(
            dsn, "SELECT count(*) FROM orchestrator.sends WHERE workflow_id = $1", workflow_id
        )
        return {
            "timers": timers,
            "timers_fired": fired,
            "timers_left": left,
            "timer_requests_read": len(seen),
            "timer_rate_per_s": rate,
            "timer_replicas": replicas,
            "timer_insert_s": round(inserted_s, 1),
            "timer_lag_p50_ms": round(percentile(lags, 50), 1) if lags else None,
            "timer_lag_p99_ms": round(percentile(lags, 99), 1) if lags else None,
            "timer_lag_max_ms": round(max(lags), 1) if lags else None,
        }
    finally:
        await consumer.stop()
        for process in processes:
            await process.stop()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    logs = Path(tempfile.mkdtemp(prefix="bench-orchestrator-"))
    async with sandbox(NudgeSettings(), "orch") as box:
        if args.contacts:
            results.update(
                await entry_phase(box.settings, box.env, logs, args.contacts, args.deadline)
            )
        if args.timers:
            results.update(
                await timer_phase(
                    box.settings,
                    box.env,
                    logs,
                    args.timers,
                    args.timer_rate,
                    args.replicas,
                    args.deadline,
                )
            )
    results["nproc"] = os.cpu_count()
    results["logs"] = str(logs)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--timers", type=int, default=1_000_000)
    parser.add_argument("--timer-rate", type=float, default=2000.0)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--deadline", type=float, default=600.0)
    results = asyncio.run(run(parser.parse_args()))
    print(codec.dumps(results).decode())


if __name__ == "__main__":
    main()
