"""``make bench-ingest``: how fast ingest takes events, next to the raw aiokafka producer
sending the same envelopes with the same settings (the ceiling), in the same run.

Phases, each bounded in time: closed-loop ``/v1/track`` (max requests/s), open-loop
``/v1/track`` at a fixed rate (p99 latency, measured from each request's scheduled time, so
a stalled server cannot hide its queue), closed-loop ``/v1/batch`` with 100 events per
request, then the raw producer. The load generator is a small keep-alive HTTP/1.1 client on
asyncio streams (loopback only); it shares the machine's cores with ingest and Kafka.

Prints one JSON line at the end."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.harness import KeepAlive, new_workspace, sandbox
from nudge_common import codec
from nudge_common.events import EVENT_RECEIVED, SegmentType, Topic, segment_event_id
from nudge_common.kafka import create_producer
from nudge_common.service import freeze_startup_heap
from nudge_common.settings import NudgeSettings
from nudge_devtools.services import ServiceProcess, free_port
from nudge_ingest.domain.calls import SegmentCall, normalise

BATCH_SIZE = 100


def track_body(write_key: str, message_id: str) -> bytes:
    return codec.dumps(
        {
            "writeKey": write_key,
            "userId": f"user-{message_id[-4:]}",
            "event": "Viewed Pricing",
            "messageId": message_id,
            "properties": {"plan": "pro", "path": "/pricing", "price": 49.0},
            "context": {"page": {"url": "https://shop.example/pricing"}, "locale": "en-GB"},
            "timestamp": "2026-11-23T10:00:00Z",
            "sentAt": "2026-11-23T10:00:01Z",
        }
    )


def batch_body(write_key: str, prefix: str) -> bytes:
    events = [
        {**codec.loads(track_body(write_key, f"{prefix}-{i}")), "type": "track"}
        for i in range(BATCH_SIZE)
    ]
    for event in events:
        del event["writeKey"]
    return codec.dumps({"writeKey": write_key, "batch": events})


async def closed_loop(
    client: KeepAlive,
    path: str,
    make: Callable[[int], bytes],
    *,
    connections: int,
    duration_s: float,
) -> tuple[int, int, float]:
    """``connections`` senders post back to back for ``duration_s``: (ok, failed, elapsed)."""
    counter = iter(range(1 << 62))
    ok = failed = 0
    deadline = time.perf_counter() + duration_s

    async def sender() -> None:
        nonlocal ok, failed
        while time.perf_counter() < deadline:
            try:
                status = await client.post(path, make(next(counter)))
            except ConnectionError:
                status = 0
            if status == 200:
                ok += 1
            else:
                failed += 1

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(connections)))
    return ok, failed, time.perf_counter() - started


async def open_loop(
    client: KeepAlive,
    path: str,
    make: Callable[[int], bytes],
    *,
    rate: float,
    duration_s: float,
    pool: int,
) -> tuple[list[float], int]:
    """Requests at ``rate``/s for ``duration_s``, at most ``pool`` in flight; latency of
    each from its scheduled time. Returns (latencies in s, failures)."""
    in_flight = asyncio.Semaphore(pool)
    latencies: list[float] = []
    failed = 0
    total = int(rate * duration_s)
    start = time.perf_counter() + 0.05

    async def one(index: int, scheduled: float) -> None:
        nonlocal failed
        async with in_flight:
            try:
                status = await client.post(path, make(index))
            except ConnectionError:
                status = 0
        latencies.append(time.perf_counter() - scheduled)
        if status != 200:
            failed += 1

    tasks = []
    for index in range(total):
        scheduled = start + index / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(index, scheduled)))
    await asyncio.gather(*tasks)
    return latencies, failed


def envelopes(workspace_id: str, write_key: str, run: str, count: int) -> list[tuple[bytes, bytes]]:
    """The records ingest would publish for ``count`` of the benchmark's track calls."""
    records = []
    now = datetime.now(UTC)
    for i in range(count):
        call = SegmentCall.model_validate(codec.loads(track_body(write_key, f"{run}-raw-{i}")))
        event = normalise(
            call, SegmentType.TRACK, received_at=now, client_ip="127.0.0.1", user_agent=None
        )
        envelope = EVENT_RECEIVED.envelope(
            id=segment_event_id(workspace_id, event.message_id),
            workspace_id=workspace_id,
            payload=event,
            occurred_at=event.timestamp,
            origin_received_at=event.received_at,
        )
        records.append((event.identity.encode(), envelope.encode()))
    return records


async def raw_producer(
    settings: NudgeSettings,
    records: list[tuple[bytes, bytes]],
    *,
    concurrency: int,
    duration_s: float,
) -> float:
    """Events/s of the producer factory ingest uses, sending batches of ``BATCH_SIZE`` and
    awaiting their acknowledgements, ``concurrency`` batches in flight (as ingest's
    connections would be)."""
    producer = create_producer(settings)
    await producer.start()
    topic = settings.topic(Topic.EVENTS)
    sent = 0
    try:
        deadline = time.perf_counter() + duration_s

        async def worker(offset: int) -> None:
            nonlocal sent
            position = offset
            while time.perf_counter() < deadline:
                acks = []
                for _ in range(BATCH_SIZE):
                    key, value = records[position % len(records)]
                    position += 1
                    acks.append(await producer.send(topic, value=value, key=key))
                await asyncio.gather(*acks)
                sent += BATCH_SIZE

        started = time.perf_counter()
        await asyncio.gather(*(worker(i * 997) for i in range(concurrency)))
        return sent / (time.perf_counter() - started)
    finally:
        await producer.stop()


def start_ingest(env: dict[str, str], workers: int, log_dir: Path) -> ServiceProcess:
    port = free_port()
    service = ServiceProcess("ingest", port, env, log_dir / "bench-ingest.log")
    run_env = {**os.environ, **env, "NUDGE_HTTP_PORT": str(port), "NUDGE_LOG_LEVEL": "warning"}
    log_dir.mkdir(parents=True, exist_ok=True)
    with service.log_path.open("ab") as log:
        service.process = subprocess.Popen(
            [sys.executable, "-m", "nudge_ingest", "run", "--workers", str(workers)],
            env=run_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return service


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else float("nan")


def machine() -> dict[str, Any]:
    cpu = "unknown"
    memory_gb = 0.0
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("MemTotal"):
                memory_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": memory_gb,
        "python": platform.python_version(),
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    async with sandbox(NudgeSettings(), "benchingest") as box:
        workspace = await new_workspace(box.settings, "bench")
        key = workspace.write_key
        env = {**box.env, "NUDGE_ENVIRONMENT": "test"}
        service = start_ingest(env, args.workers, Path(args.log_dir))
        try:
            await service.wait_ready()
            run = os.urandom(4).hex()
            client = KeepAlive(service.url, {})

            def track(i: int) -> bytes:
                return track_body(key, f"{run}-t-{i}")

            freeze_startup_heap()
            # Warm up (connections, caches, producer metadata), not counted.
            await closed_loop(client, "/v1/track", track, connections=8, duration_s=1.0)

            ok, failed, elapsed = await closed_loop(
                client, "/v1/track", track, connections=args.connections, duration_s=args.duration
            )
            track_rps = ok / elapsed
            track_failed = failed

            def track_at(i: int) -> bytes:
                return track_body(key, f"{run}-o-{i}")

            latencies, open_failed = await open_loop(
                client, "/v1/track", track_at, rate=args.rate, duration_s=args.duration, pool=64
            )

            # Batch bodies built ahead of time (the generator must not be the bottleneck).
            bodies = [batch_body(key, f"{run}-b-{i}") for i in range(200)]

            def next_batch(i: int) -> bytes:
                return bodies[i % len(bodies)]

            ok_b, failed_b, elapsed_b = await closed_loop(
                client,
                "/v1/batch",
                next_batch,
                connections=args.batch_connections,
                duration_s=args.duration,
            )
            client.close()
            batch_events_per_s = ok_b * BATCH_SIZE / elapsed_b
        finally:
            await service.stop()

        records = envelopes(workspace.workspace_id, key, run, 2000)
        raw = await raw_producer(
            box.settings, records, concurrency=args.batch_connections, duration_s=args.duration
        )
    return {
        "track_rps": round(track_rps, 1),
        "track_p99_ms_at_1000rps": round(p99(latencies) * 1000, 2),
        "batch_events_per_s": round(batch_events_per_s, 1),
        "raw_producer_events_per_s": round(raw, 1),
        "batch_ratio_to_raw": round(batch_events_per_s / raw, 3),
        "track_failed": track_failed,
        "open_loop_rate": args.rate,
        "open_loop_failed": open_failed,
        "batch_failed": failed_b,
        "workers": args.workers,
        "connections": args.connections,
        "batch_connections": args.batch_connections,
        "duration_s": args.duration,
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": machine(),
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest")
    parser.add_argument("--workers", type=int, default=2, help="ingest worker processes")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--connections", type=int, default=64, help="track connections")
    parser.add_argument("--batch-connections", type=int, default=8)
    parser.add_argument("--rate", type=float, default=1000.0, help="open-loop requests/s")
    parser.add_argument("--log-dir", default=".data/bench")
    return parser.parse_args(argv)


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency of uvicorn[standard]
        pass
    result = asyncio.run(main(parse()))
    print(codec.dumps(result).decode(), flush=True)
