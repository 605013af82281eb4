"""Scoring throughput (issue 5): one scoring service process (``--workers N``: N processes in
one consumer group) against the real Kafka and PostgreSQL, draining a topic pre-filled with
``--events`` Segment events of ``--contacts`` people, scored by ``--rules`` rules in two
models; beside it, in the same run, the raw aiokafka consume rate of the same topic (the
ceiling).

The events are produced before the service starts, so the service reads a full topic: its
rate is what its consumer group commits per second between 10% and 90% of the way (start-up
and the tail are left out), and its CPU per event the CPU time (from /proc) of the service's
processes and of its PostgreSQL backends over the same stretch. Everything is loopback, in a
sandbox (its own database and topic prefix, deleted afterwards), and bounded by
``--deadline-s``.

    .venv/bin/python -m bench.scoring [--contacts 100000 --events 1000000 --rules 50]

``--scoring-src DIR`` runs the service from another checkout (DIR/services/scoring and
DIR/libs/common go first on its PYTHONPATH): the "before" of a before/after comparison.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from bench.harness import sandbox
from nudge_common.db import create_engine, create_sessionmaker, transaction
from nudge_common.events import EVENT_RECEIVED, Envelope, Topic, segment_event_id
from nudge_common.settings import NudgeSettings
from nudge_devtools.pipeline import topic_partitions
from nudge_devtools.services import ServiceProcess, free_port
from nudge_scoring import store
from nudge_scoring.domain.rules import DEFAULT_STAGES, Rule, Stage, spec_adapter

TRACK_EVENTS = [f"Feature {i} Used" for i in range(10)]
CATEGORIES = ["shoes", "bags", "hats", "coats"]
PAGES = ["/pricing", "/docs", "/blog/post", "/careers", "/features", "/"]
COUNTRIES = ["FR", "DE", "US", "GB", "ES"]
TITLES = ["CEO", "CTO", "Engineer", "Marketing Manager", "Student"]


# ----------------------------------------------------------------------------- rules


def rulebook(count: int) -> list[tuple[str, int, dict[str, Any]]]:
    """``count`` rules (model, points, spec) of every kind, negative points, caps and a
    decay included, cycling through the templates."""
    templates: list[tuple[str, int, dict[str, Any]]] = []
    for i, name in enumerate(TRACK_EVENTS):
        templates.append(("engagement", 2 + i % 5, {"kind": "behavioural", "event": name}))
        templates.append(
            (
                "engagement",
                3,
                {
                    "kind": "behavioural",
                    "event": name,
                    "filters": [{"field": "properties.category", "op": "eq", "value": "shoes"}],
                    "cap_per_day": 9,
                },
            )
        )
        templates.append(
            (
                "fit" if i % 2 else "engagement",
                1,
                {
                    "kind": "behavioural",
                    "event": name,
                    "filters": [{"field": "properties.plan", "op": "in", "value": ["pro", "team"]}],
                    "cap_ever": 5,
                },
            )
        )
    for path, points in (("/pricing", 5), ("/features", 2), ("/docs", 1), ("/careers", -10)):
        templates.append(
            (
                "engagement",
                points,
                {
                    "kind": "behavioural",
                    "type": "page",
                    "filters": [{"field": "properties.path", "op": "starts_with", "value": path}],
                },
            )
        )
    templates += [
        ("engagement", -20, {"kind": "behavioural", "event": "Unsubscribed"}),
        ("engagement", -5, {"kind": "behavioural", "event": "Email Bounced"}),
        ("fit", 10, {"kind": "profile", "trait": "title", "op": "in", "value": ["CEO", "CTO"]}),
        ("fit", 5, {"kind": "profile", "trait": "country", "op": "eq", "value": "FR"}),
        ("fit", 3, {"kind": "profile", "trait": "phone", "op": "exists"}),
        ("fit", 3, {"kind": "profile", "trait": "company", "op": "exists"}),
        (
            "fit",
            -15,
            {
                "kind": "profile",
                "trait": "email",
                "op": "email_domain_in",
                "value": ["competitor.example"],
            },
        ),
        ("engagement", 10, {"kind": "transactional", "max_value": 50}),
        ("engagement", 25, {"kind": "transactional", "min_value": 50}),
        ("engagement", 15, {"kind": "transactional", "repeat": True}),
        ("fit", 5, {"kind": "transactional", "payment_methods": ["invoice"]}),
        ("engagement", 0, {"kind": "decay", "after_days": 7, "percent": 10}),
    ]
    return [templates[i % len(templates)] for i in range(count)]


async def create_rules(settings: NudgeSettings, workspace_id: str, count: int) -> None:
    engine = create_engine(settings)
    try:
        async with transaction(create_sessionmaker(engine)) as session:
            stages = [Stage(name=n, min_score=s) for n, s in DEFAULT_STAGES]
            for model in ("engagement", "fit"):
                await store.put_model(
                    session, workspace_id=workspace_id, name=model, description="", stages=stages
                )
            for i, (model, points, spec) in enumerate(rulebook(count)):
                rule = Rule(uuid.uuid4(), model, None, points, spec_adapter.validate_python(spec))
                await store.create_rule(
                    session, workspace_id=workspace_id, rule=rule, name=f"rule {i}"
                )
    finally:
        await engine.dispose()


# ----------------------------------------------------------------------------- events


def event_payload(rng: random.Random, n: int, contact: int, at: datetime) -> dict[str, Any]:
    stamp = at.isoformat()
    base: dict[str, Any] = {
        "messageId": f"bench-{n}",
        "userId": f"user-{contact}",
        "timestamp": stamp,
        "receivedAt": stamp,
        "context": {"library": {"name": "bench"}},
    }
    roll = rng.random()
    if roll < 0.05:
        traits: dict[str, Any] = {
            "email": f"user-{contact}@{'competitor.example' if contact % 50 == 0 else 'ex.com'}",
            "title": rng.choice(TITLES),
            "country": rng.choice(COUNTRIES),
        }
        if rng.random() < 0.5:
            traits["company"] = f"Company {contact % 1000}"
        if rng.random() < 0.3:
            traits["phone"] = f"+33{contact:09d}"
        if rng.random() < 0.2:
            traits["tags"] = [f"interest:{rng.choice(CATEGORIES)}"]
        return {**base, "type": "identify", "traits": traits}
    if roll < 0.20:
        path = rng.choice(PAGES)
        return {**base, "type": "page", "name": path, "properties": {"path": path}}
    if roll < 0.23:
        return {
            **base,
            "type": "track",
            "event": "Order Completed",
            "properties": {
                "order_id": f"o-{n}",
                "revenue": rng.choice([19.0, 49.0, 99.0, 250.0]),
                "currency": "EUR",
                "payment_method": rng.choice(["card", "invoice"]),
            },
        }
    if roll < 0.235:
        return {**base, "type": "track", "event": rng.choice(["Unsubscribed", "Email Bounced"])}
    return {
        **base,
        "type": "track",
        "event": rng.choice(TRACK_EVENTS),
        "properties": {"category": rng.choice(CATEGORIES), "plan": rng.choice(["free", "pro"])},
    }


def encoded(workspace_id: str, payload: dict[str, Any]) -> bytes:
    """The ``event.received`` envelope ingest would publish, as bytes (built directly: the
    pydantic round trip would dominate producing a million of them)."""
    envelope = {
        "type": EVENT_RECEIVED.name,
        "version": 1,
        "id": str(segment_event_id(workspace_id, payload["messageId"])),
        "occurred_at": payload["timestamp"],
        "workspace_id": workspace_id,
        "payload": payload,
    }
    return json.dumps(envelope, separators=(",", ":")).encode()


async def produce(
    settings: NudgeSettings, workspace_id: str, contacts: int, events: int, seed: int
) -> float:
    """Write the events to the topic with a raw aiokafka producer; returns seconds taken."""
    rng = random.Random(seed)
    # within the last day: no decay falls due during the run (its timers are still set)
    start_at = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
    step = timedelta(hours=20) / max(events, 1)
    sample = Envelope.decode(encoded(workspace_id, event_payload(rng, 0, 0, start_at)))
    EVENT_RECEIVED.parse(sample)  # the hand-built bytes are what the service expects
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        linger_ms=20,
        max_batch_size=512 * 1024,
        acks=1,
    )
    await producer.start()
    started = time.perf_counter()
    try:
        topic = settings.topic(Topic.EVENTS)
        pending = []
        for n in range(events):
            contact = rng.randrange(contacts)
            payload = event_payload(rng, n, contact, start_at + step * n)
            key = payload["userId"].encode()
            pending.append(await producer.send(topic, encoded(workspace_id, payload), key=key))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - started


# ----------------------------------------------------------------------------- measuring


async def raw_consume_rate(settings: NudgeSettings, events: int, deadline_s: float) -> float:
    """Records per second a bare aiokafka consumer reads the topic at (no decoding, no
    database), with the batch size the service's runner asks for."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers, isolation_level="read_committed"
    )
    await admin.start()
    await consumer.start()
    try:
        partitions = await topic_partitions(admin, [settings.topic(Topic.EVENTS)])
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        seen = 0
        started = time.perf_counter()
        async with asyncio.timeout(deadline_s):
            while seen < events:
                batches = await consumer.getmany(
                    timeout_ms=200, max_records=settings.consumer_batch_max_records
                )
                seen += sum(len(records) for records in batches.values())
        return seen / (time.perf_counter() - started)
    finally:
        await consumer.stop()
        await admin.close()


async def committed(
    admin: AIOKafkaAdminClient, settings: NudgeSettings, partitions: list[TopicPartition]
) -> int:
    offsets = await admin.list_consumer_group_offsets(settings.consumer_group("scoring"))
    return sum(max(offsets[tp].offset, 0) for tp in partitions if tp in offsets)


def cpu_s(pids: set[int], *, children_of: int | None = None) -> float:
    """CPU seconds (user and system) of these processes and of the live children of
    ``children_of`` (``--workers N`` starts them), from /proc; 0 where there is none."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat.parent.name) in pids or (children_of and fields[1] == str(children_of)):
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


Sample = tuple[float, int, float, float]
"""(seconds since start, committed offsets, CPU seconds of the service and of its
PostgreSQL backends)"""

SANDBOX_BACKENDS = sa.text(
    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
    "AND pid <> pg_backend_pid()"
)


async def watch_service(
    settings: NudgeSettings, events: int, deadline_s: float, pid: int
) -> tuple[list[Sample], bool]:
    """A sample every half second until all are committed or the deadline passes; and
    whether all were. The service's PostgreSQL backends are those of the sandbox's
    database (the pool keeps them for the run)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    engine = create_engine(settings)
    try:
        partitions = await topic_partitions(admin, [settings.topic(Topic.EVENTS)])
        samples: list[Sample] = []
        started = time.perf_counter()
        while time.perf_counter() - started < deadline_s:
            done = await committed(admin, settings, partitions)
            async with engine.connect() as connection:
                backends = set((await connection.execute(SANDBOX_BACKENDS)).scalars())
            samples.append(
                (
                    time.perf_counter() - started,
                    done,
                    cpu_s({pid}, children_of=pid),
                    cpu_s(backends),
                )
            )
            if done >= events:
                return samples, True
            await asyncio.sleep(0.5)
        return samples, False
    finally:
        await engine.dispose()
        await admin.close()


def sustained(samples: list[Sample], events: int) -> tuple[float, float, float]:
    """Events per second between the samples at 10% and 90% of the events (or the last
    sample, when the run did not get that far), and the CPU microseconds per event of the
    service and of its PostgreSQL backends over the same stretch."""
    low = next((s for s in samples if s[1] >= events * 0.1), samples[0])
    high = next((s for s in samples if s[1] >= events * 0.9), samples[-1])
    if high[0] <= low[0]:
        high = samples[-1]
    if high[0] <= low[0] or high[1] <= low[1]:
        return 0.0, 0.0, 0.0
    count = high[1] - low[1]
    return (
        count / (high[0] - low[0]),
        (high[2] - low[2]) / count * 1e6,
        (high[3] - low[3]) / count * 1e6,
    )


BATCH_SERIES = re.compile(
    r'^nudge_consumer_batch_(size|duration_seconds)_(sum|count)\{consumer="scoring"\} (\S+)$'
)


async def batch_stats(url: str) -> dict[str, float]:
    """Mean size and duration of the consumer's batches, from the service's /metrics (one
    process's, with ``--workers N``)."""
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"{url}/metrics")).text
    found = {
        (match[1], match[2]): float(match[3])
        for line in text.splitlines()
        if (match := BATCH_SERIES.match(line))
    }
    batches = found.get(("size", "count"), 0.0)
    if not batches:
        return {}
    return {
        "batches": batches,
        "mean_size": round(found[("size", "sum")] / batches, 1),
        "mean_ms": round(found[("duration_seconds", "sum")] / batches * 1000, 1),
    }


def machine() -> dict[str, Any]:
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_kb = 0
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        memory_kb = int(meminfo.read_text().split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory_gb": round(memory_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
    }


def start_scoring(env: dict[str, str], workers: int, log_path: Path) -> ServiceProcess:
    """``python -m nudge_scoring run --workers N``: N processes in one consumer group."""
    service = ServiceProcess("scoring", free_port(), env, log_path)
    with log_path.open("ab") as log:
        service.process = subprocess.Popen(
            [sys.executable, "-m", "nudge_scoring", "run", "--workers", str(workers)],
            env={**os.environ, **env, "NUDGE_HTTP_PORT": str(service.port)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return service


async def main(args: argparse.Namespace) -> dict[str, Any]:
    base = NudgeSettings()
    workspace_id = f"bench-{uuid.uuid4().hex[:8]}"
    async with sandbox(base, "bscoring") as box:
        settings = box.settings
        await create_rules(settings, workspace_id, args.rules)
        print(f"producing {args.events} events of {args.contacts} contacts", flush=True)
        produce_s = await produce(settings, workspace_id, args.contacts, args.events, args.seed)
        print(f"produced in {produce_s:.1f}s; raw consume", flush=True)
        raw = await raw_consume_rate(settings, args.events, args.deadline_s)
        print(f"raw aiokafka consume: {raw:.0f} events/s; starting scoring", flush=True)
        env = {**box.env, "NUDGE_LOG_LEVEL": "warning"}
        if args.scoring_src:
            src = Path(args.scoring_src)
            paths = [src / "services" / "scoring", src / "libs" / "common"]
            env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths)
        log_dir = Path(tempfile.mkdtemp(prefix="bench-scoring-"))
        service = start_scoring(env, args.workers, log_dir / "scoring.log")
        try:
            await service.wait_ready()
            assert service.process is not None
            samples, finished = await watch_service(
                settings, args.events, args.deadline_s, service.process.pid
            )
            batches = await batch_stats(service.url)
        finally:
            await service.stop()
        done = samples[-1][1]
        rate, cpu_us, pg_cpu_us = sustained(samples, args.events)
        print(
            f"scoring: {done} of {args.events} committed in {samples[-1][0]:.1f}s, "
            f"sustained {rate:.0f} events/s; CPU per event: {cpu_us:.0f} us in the service, "
            f"{pg_cpu_us:.0f} us in PostgreSQL (10%..90%)",
            flush=True,
        )
        return {
            "bench": "scoring",
            "events_per_s": round(rate),
            "cpu_us_per_event": round(cpu_us),
            "pg_cpu_us_per_event": round(pg_cpu_us),
            "batches": batches,
            "raw_consume_events_per_s": round(raw),
            "contacts": args.contacts,
            "events": args.events,
            "events_done": done,
            "finished": finished,
            "elapsed_s": round(samples[-1][0], 1),
            "rules": args.rules,
            "workers": args.workers,
            "produce_s": round(produce_s, 1),
            "scoring_src": args.scoring_src or "this checkout",
            "date": datetime.now(UTC).date().isoformat(),
            "machine": machine(),
        }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rules", type=int, default=50)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--deadline-s", type=float, default=1800.0)
    parser.add_argument("--scoring-src", default=None)
    parser.add_argument(
        "--workers", type=int, default=1, help="scoring processes (run --workers), one group"
    )
    args = parser.parse_args(argv)
    if args.scoring_src:
        args.scoring_src = str(Path(args.scoring_src).resolve())
    return args


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(parse()))))
