"""Ingest never answers 200 for an event it could lose: with its broker stopped it answers
503 within the produce timeout and recovers by itself; with a worker killed -9 under load,
every event that got a 200 is in Kafka. Also: several workers on one port, and /metrics
adding up all of them."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from nudge_common import codec
from nudge_common.consumer import Record
from nudge_common.events import Topic, segment_event_id
from nudge_common.settings import NudgeSettings
from nudge_devtools.pipeline import eventually, read_topic
from nudge_devtools.seed import SeededWorkspace
from nudge_devtools.services import ServiceProcess
from tests.conftest import StackHandle, kafka_script
from tests.services.ingest.processes import ingest_process, start_with_workers, uvicorn_workers

PRODUCE_TIMEOUT_S = 2.0


def _track(message_id: str) -> dict[str, str]:
    return {"userId": f"u-{message_id[:6]}", "event": "Durable", "messageId": message_id}


async def _acked_are_in_kafka(settings: NudgeSettings, workspace_id: str, acked: set[str]) -> None:
    wanted = {str(segment_event_id(workspace_id, m)) for m in acked}

    def envelope_id(record: Record) -> str | None:
        return str(codec.loads(record.value)["id"]) if record.value is not None else None

    records = await read_topic(
        settings, Topic.EVENTS, where=lambda r: envelope_id(r) in wanted, expected=len(wanted)
    )
    assert {envelope_id(r) for r in records} == wanted


async def test_broker_down_gives_503_then_ingest_recovers_by_itself(
    stack: StackHandle, own_kafka: dict[str, str], workspace: SeededWorkspace
) -> None:
    service = ingest_process(
        stack.env,
        stack.log_dir,
        NUDGE_KAFKA_BOOTSTRAP_SERVERS=own_kafka["NUDGE_KAFKA_BOOTSTRAP_SERVERS"],
        NUDGE_PRODUCE_TIMEOUT_S=str(PRODUCE_TIMEOUT_S),
    )
    own_settings = stack.settings.model_copy(
        update={"kafka_bootstrap_servers": own_kafka["NUDGE_KAFKA_BOOTSTRAP_SERVERS"]}
    )
    auth = (workspace.write_key, "")
    service.start()
    try:
        await service.wait_ready()
        async with httpx.AsyncClient(base_url=service.url, timeout=PRODUCE_TIMEOUT_S + 5) as http:
            before = str(uuid.uuid4())
            assert (await http.post("/v1/track", json=_track(before), auth=auth)).status_code == 200

            await asyncio.to_thread(kafka_script, own_kafka, "down")
            # A hang would raise ReadTimeout: every answer comes within the produce timeout.
            during = await asyncio.gather(
                *(
                    http.post("/v1/track", json=_track(str(uuid.uuid4())), auth=auth)
                    for _ in range(10)
                ),
                http.post(
                    "/v1/batch",
                    json={"batch": [{**_track(str(uuid.uuid4())), "type": "track"}] * 1},
                    auth=auth,
                ),
            )
            assert [r.status_code for r in during] == [503] * len(during)
            assert all(r.headers["retry-after"] for r in during)
            assert during[0].json()["success"] is False

            await asyncio.to_thread(kafka_script, own_kafka, "up")
            after: set[str] = set()

            async def accepted_again() -> bool:
                message_id = str(uuid.uuid4())
                response = await http.post("/v1/track", json=_track(message_id), auth=auth)
                assert response.status_code in (200, 503)
                if response.status_code == 200:
                    after.add(message_id)
                return response.status_code == 200

            await eventually(accepted_again, deadline_s=90, what="ingest accepting again")
            for _ in range(20):
                message_id = str(uuid.uuid4())
                response = await http.post("/v1/track", json=_track(message_id), auth=auth)
                assert response.status_code == 200
                after.add(message_id)
        assert service.process is not None
        assert service.process.poll() is None  # the same process: not restarted
        await _acked_are_in_kafka(own_settings, workspace.workspace_id, {before} | after)
    finally:
        await service.stop()


@pytest.fixture
async def workers(stack: StackHandle, tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    metrics_dir = tmp_path / "metrics"
    service = ingest_process(stack.env, stack.log_dir, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    start_with_workers(service, 2)
    try:
        await service.wait_ready()
        yield service
    finally:
        await service.stop()


def _accepted_total(exposition: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in exposition.splitlines()
        if line.startswith('nudge_ingest_events_accepted_total{type="track"}')
    )


async def test_two_workers_serve_one_port_and_metrics_add_up_across_them(
    workers: ServiceProcess, workspace: SeededWorkspace
) -> None:
    auth = (workspace.write_key, "")
    # A new connection per request, so the kernel spreads them over both workers.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=workers.url, limits=limits) as http:
        answers = await asyncio.gather(
            *(http.post("/v1/track", json=_track(str(uuid.uuid4())), auth=auth) for _ in range(60))
        )
        assert [a.status_code for a in answers] == [200] * 60
        exposition = (await http.get("/metrics")).text
    assert _accepted_total(exposition) == 60
    metrics_dir = Path(workers.env["PROMETHEUS_MULTIPROC_DIR"])
    assert workers.process is not None
    worker_pids = set(uvicorn_workers(workers.process.pid))
    files = {p.stem.rsplit("_", 1)[-1] for p in await asyncio.to_thread(_db_files, metrics_dir)}
    assert len(worker_pids) >= 2
    assert files <= {str(pid) for pid in worker_pids}


async def test_kill_9_of_a_worker_under_load_loses_no_acknowledged_event(
    stack: StackHandle, workers: ServiceProcess, workspace: SeededWorkspace
) -> None:
    assert workers.process is not None
    auth = (workspace.write_key, "")
    acked: set[str] = set()
    failed = 0
    stop = asyncio.Event()

    async def load(http: httpx.AsyncClient) -> None:
        nonlocal failed
        while not stop.is_set():
            message_id = str(uuid.uuid4())
            try:
                response = await http.post("/v1/track", json=_track(message_id), auth=auth)
            except httpx.TransportError:
                failed += 1  # the killed worker's connections: the client would retry
                continue
            if response.status_code == 200:
                acked.add(message_id)
            else:
                failed += 1

    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=workers.url, limits=limits, timeout=15) as http:
        tasks = [asyncio.create_task(load(http)) for _ in range(8)]
        await eventually(lambda: _at_least(acked, 200), deadline_s=60, what="load under way")
        victim = uvicorn_workers(workers.process.pid)[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = len(acked)
        await eventually(
            lambda: _at_least(acked, killed_at + 300), deadline_s=60, what="load after kill"
        )
        stop.set()
        await asyncio.gather(*tasks)
    await _acked_are_in_kafka(stack.settings, workspace.workspace_id, acked)


def _db_files(directory: Path) -> list[Path]:
    return list(directory.glob("counter_*.db"))


async def _at_least(acked: set[str], count: int) -> bool:
    return len(acked) >= count
