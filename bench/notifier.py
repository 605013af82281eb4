"""``make bench-notifier``: email throughput and latency of the notifier process, to a local
SMTP server (aiosmtpd) on loopback.

1. **Throughput**: ``--burst`` requests are put on the notifications topic at once while the
   notifier runs; ``emails_per_s`` is (accepted - 1) / (last acceptance - first
   acceptance) at the SMTP server: the sustained rate, start-up excluded. Measured twice,
   side by side in the same run: with a pool of one SMTP connection (sends in a batch
   queue up on it, as before the pool) and with ``--connections``.
2. **Latency at 100/s**: requests paced at ``--rate`` for ``--seconds``; the latency of a
   message is from the broker's acknowledgement of its request to the SMTP server's
   acceptance (so it includes the consumer's poll: an upper bound of "consumed to
   accepted"). ``p99_ms_at_100_per_s`` is its 99th percentile.

Every run gets its own database and topic prefix on the stack (``scripts/stack up``) and
removes them afterwards. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from aiosmtpd.controller import Controller
from sqlalchemy.engine import make_url

from nudge_common import codec
from nudge_common.db import create_engine, create_sessionmaker, transaction
from nudge_common.events import (
    NOTIFICATION_REQUESTED,
    ContactSnapshot,
    NotificationRequested,
    Topic,
)
from nudge_common.kafka import OutgoingMessage, create_producer
from nudge_common.settings import NudgeSettings
from nudge_common.topics import delete_topics, ensure_topics
from nudge_devtools.services import ServiceProcess, free_port, migrate_all
from nudge_notifier import store
from nudge_notifier.domain.templates import Template

KEY_HEADER = b"X-Nudge-Idempotency-Key: "


class Sink:
    """Accepts everything and records (monotonic time, idempotency key): no parsing
    beyond finding the one header. aiosmtpd itself still costs: a bare aiosmtplib client
    gets about 1,500 emails/s through it on one connection, 2,200 on four, on the 2-core
    development machine (docs/benchmarks.md)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.arrivals: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's hook name
        now = time.monotonic()
        content: bytes = envelope.content
        start = content.find(KEY_HEADER) + len(KEY_HEADER)
        key = content[start : content.find(b"\r\n", start)].decode()
        with self.lock:
            self.arrivals.append((now, key))
        return "250 OK"

    def snapshot(self) -> list[tuple[float, str]]:
        with self.lock:
            return list(self.arrivals)


def _admin_dsn(settings: NudgeSettings) -> str:
    url = make_url(settings.database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


@contextlib.asynccontextmanager
async def sandbox() -> AsyncIterator[tuple[NudgeSettings, dict[str, str]]]:
    base = NudgeSettings()
    suffix = uuid.uuid4().hex[:10]
    database = f"nudge_bench_{suffix}"
    admin = await asyncpg.connect(_admin_dsn(base))
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()
    url = make_url(base.database_url).set(database=database).render_as_string(hide_password=False)
    settings = base.model_copy(update={"database_url": url, "topic_prefix": f"bench-{suffix}."})
    await ensure_topics(settings)
    await asyncio.to_thread(migrate_all, settings)
    env = {
        "NUDGE_DATABASE_URL": url,
        "NUDGE_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "NUDGE_TOPIC_PREFIX": settings.topic_prefix,
        "NUDGE_LOG_LEVEL": "warning",
    }
    try:
        yield settings, env
    finally:
        await delete_topics(settings)
        admin = await asyncpg.connect(_admin_dsn(base))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await admin.close()


def request(workspace_id: str, template_id: uuid.UUID, key: str) -> OutgoingMessage:
    contact = ContactSnapshot(
        contact_id=uuid.uuid4(), traits={"email": f"{key}@example.com", "name": "Ada"}
    )
    payload = NotificationRequested(
        idempotency_key=key, channel="email", template_id=template_id, contact=contact
    )
    return OutgoingMessage(
        Topic.NOTIFICATIONS,
        key=str(contact.contact_id),
        envelope=NOTIFICATION_REQUESTED.envelope(
            workspace_id=workspace_id, payload=payload, occurred_at=datetime.now(UTC)
        ),
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def wait_for(sink: Sink, keys: set[str], deadline_s: float) -> list[tuple[float, str]]:
    deadline = time.monotonic() + deadline_s
    while True:
        arrivals = [a for a in sink.snapshot() if a[1] in keys]
        if len({key for _, key in arrivals}) >= len(keys) or time.monotonic() > deadline:
            return arrivals
        await asyncio.sleep(0.05)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sink = Sink()
    sink.controller.start()
    results: dict[str, Any] = {}
    async with sandbox() as (settings, env):
        workspace_id = f"bench-{uuid.uuid4().hex[:8]}"
        template_id = uuid.uuid4()
        engine = create_engine(settings)
        async with transaction(create_sessionmaker(engine)) as session:
            await store.create_template(
                session,
                workspace_id=workspace_id,
                template=Template(
                    template_id,
                    "bench",
                    "email",
                    "Hello {{ contact.traits.name }}",
                    '<p>Hi {{ contact.traits.name }}</p><a href="https://example.com/x">x</a>',
                    "Hi {{ contact.traits.name }}",
                ),
            )
        await engine.dispose()
        producer = create_producer(settings)
        await producer.start()
        logs = Path(tempfile.mkdtemp(prefix="bench-notifier-"))
        all_keys: list[str] = []

        async def notifier(connections: int, label: str) -> ServiceProcess:
            process = ServiceProcess(
                "notifier",
                free_port(),
                {
                    **os.environ,
                    **env,
                    "NUDGE_SMTP_PORT": str(sink.port),
                    "NUDGE_SMTP_MAX_CONNECTIONS": str(connections),
                    "NUDGE_DATABASE_POOL_SIZE": "10",
                },
                logs / f"notifier-{label}.log",
            )
            process.start()
            await process.wait_ready()
            # A first message makes sure the consumer joined the group before timing.
            key = f"warm-{label}-{uuid.uuid4().hex}"
            all_keys.append(key)
            await (await producer.send(*_record(settings, request(workspace_id, template_id, key))))
            await wait_for(sink, {key}, 60)
            return process

        async def burst(connections: int, count: int, label: str) -> float:
            process = await notifier(connections, label)
            try:
                keys = [f"{label}-{i}-{uuid.uuid4().hex[:8]}" for i in range(count)]
                all_keys.extend(keys)
                acks = [
                    await producer.send(*_record(settings, request(workspace_id, template_id, k)))
                    for k in keys
                ]
                await asyncio.gather(*acks)
                arrivals = await wait_for(sink, set(keys), args.deadline)
                times = sorted(t for t, _ in arrivals)
                rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
                print(f"{label}: {len(times)}/{count} emails, {rate:.0f}/s", flush=True)
                return rate
            finally:
                await process.stop()

        results["emails_per_s_one_connection"] = round(await burst(1, args.burst, "pool1"))
        results["emails_per_s"] = round(await burst(args.connections, args.burst, "pool"))

        process = await notifier(args.connections, "paced")
        try:
            interval = 1.0 / args.rate
            acked: dict[str, float] = {}
            start = time.monotonic()
            pending = []
            for i in range(int(args.rate * args.seconds)):
                await asyncio.sleep(max(0.0, start + i * interval - time.monotonic()))
                key = f"paced-{i}-{uuid.uuid4().hex[:8]}"
                all_keys.append(key)
                ack = await producer.send(
                    *_record(settings, request(workspace_id, template_id, key))
                )

                def done(_: Any, key: str = key) -> None:
                    acked[key] = time.monotonic()

                ack.add_done_callback(done)
                pending.append(ack)
            await asyncio.gather(*pending)
            arrivals = await wait_for(sink, set(acked), args.deadline)
            latencies = [(t - acked[k]) * 1000 for t, k in arrivals if k in acked]
            results["p50_ms_at_100_per_s"] = round(percentile(latencies, 0.50), 1)
            results["p99_ms_at_100_per_s"] = round(percentile(latencies, 0.99), 1)
            print(f"paced: {len(latencies)} emails at {args.rate}/s", flush=True)
        finally:
            await process.stop()
            await producer.stop()
    sink.controller.stop()
    received = Counter(key for _, key in sink.snapshot())
    results["emails_sent"] = sum(received.values())
    results["duplicates"] = sum(n - 1 for n in received.values() if n > 1)
    results["missing"] = len(set(all_keys) - set(received))
    results["smtp_connections"] = args.connections
    return results


def _record(settings: NudgeSettings, message: OutgoingMessage) -> tuple[str, bytes, bytes]:
    return settings.topic(message.topic), message.envelope.encode(), message.key.encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--burst", type=int, default=4000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--deadline", type=float, default=120.0)
    results = asyncio.run(run(parser.parse_args()))
    print(codec.dumps(results).decode())


if __name__ == "__main__":
    main()
