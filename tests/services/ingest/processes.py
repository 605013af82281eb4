"""Ingest as real processes for the end-to-end tests (tests/e2e/test_ingest_*.py), and how
to find what those tests published."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Collection, Mapping
from pathlib import Path

from nudge_common.consumer import Record
from nudge_common.events import EVENT_RECEIVED, Envelope, SegmentEvent, Topic
from nudge_common.settings import NudgeSettings
from nudge_devtools.pipeline import read_topic
from nudge_devtools.services import ServiceProcess, free_port


def ingest_process(env: Mapping[str, str], log_dir: Path, **extra: str) -> ServiceProcess:
    """One ``python -m nudge_ingest run`` on a free port (not started yet)."""
    port = free_port()
    return ServiceProcess("ingest", port, {**env, **extra}, log_dir / f"ingest-{port}.log")


def start_with_workers(service: ServiceProcess, workers: int) -> None:
    """Start ``service`` as ``run --workers N`` (uvicorn's supervisor and N workers)."""
    run_env = {**os.environ, **service.env, "NUDGE_HTTP_PORT": str(service.port)}
    service.log_path.parent.mkdir(parents=True, exist_ok=True)
    with service.log_path.open("ab") as log:
        service.process = subprocess.Popen(
            [sys.executable, "-m", "nudge_ingest", "run", "--workers", str(workers)],
            env=run_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


async def events_of(
    settings: NudgeSettings,
    workspace_id: str,
    *,
    expected: int | None = None,
    where_event: Collection[str] | None = None,
    deadline_s: float = 30.0,
) -> list[SegmentEvent]:
    """The Segment events ingest published for ``workspace_id``, in topic order per
    partition."""
    marker = f'"workspace_id":"{workspace_id}"'.encode()

    def mine(record: Record) -> bool:
        return record.value is not None and marker in record.value

    records = await read_topic(
        settings, Topic.EVENTS, where=mine, expected=expected, deadline_s=deadline_s
    )
    events = []
    for record in records:
        assert record.value is not None
        envelope = Envelope.decode(record.value)
        assert envelope.workspace_id == workspace_id
        event = EVENT_RECEIVED.parse(envelope)
        assert record.key == event.identity.encode()
        if where_event is None or event.message_id in where_event:
            events.append(event)
    return events


def uvicorn_workers(pid: int) -> list[int]:
    """The worker processes of uvicorn's supervisor ``pid`` (not multiprocessing helpers)."""
    workers = []
    for child in children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            workers.append(child)
    return workers
