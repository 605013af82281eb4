"""SIGTERM in the middle of a stream: the batch in hand is finished and committed, the
process exits cleanly, and after a restart every event is applied exactly once."""

from __future__ import annotations

import signal
import uuid

import httpx
import sqlalchemy as sa

from nudge_common.db import SessionMaker, transaction
from nudge_devtools.pipeline import eventually, wait_until_idle
from nudge_devtools.seed import PRICING_POINTS, SeededWorkspace
from nudge_devtools.services import Fleet
from nudge_devtools.smtp_sink import SmtpSink
from nudge_scoring.store import events, score_changes, scores
from tests.conftest import StackHandle

CONTACTS = 100
EVENTS_PER_CONTACT = 250
BATCH = 100


async def count_stored(sessionmaker: SessionMaker, workspace_id: str) -> int:
    async with transaction(sessionmaker) as session:
        count = await session.scalar(
            sa.select(sa.func.count()).where(events.c.workspace_id == workspace_id)
        )
    return count or 0


async def test_sigterm_mid_stream_loses_nothing_and_duplicates_nothing(
    stack: StackHandle,
    fleet: Fleet,
    smtp_sink: SmtpSink,
    workspace: SeededWorkspace,
    sessionmaker: SessionMaker,
) -> None:
    run = uuid.uuid4().hex[:8]
    addresses = {f"c{i}-{run}@example.com" for i in range(CONTACTS)}
    calls = [
        {
            "type": "track",
            "userId": f"user-{i}-{run}",
            "event": "Viewed Pricing",
            "context": {"traits": {"name": f"Contact {i}", "email": f"c{i}-{run}@example.com"}},
        }
        for _ in range(EVENTS_PER_CONTACT)
        for i in range(CONTACTS)
    ]
    total = len(calls)
    scoring = fleet["scoring"]
    # Stopped while the stream is produced, so that it is all waiting when scoring starts
    # and the SIGTERM finds it in flight (scoring can keep up with the requests).
    await scoring.stop()
    async with httpx.AsyncClient(
        base_url=fleet["ingest"].url, auth=(workspace.write_key, ""), timeout=30
    ) as client:
        for start in range(0, total, BATCH):
            response = await client.post("/v1/batch", json={"batch": calls[start : start + BATCH]})
            assert response.status_code == 200, response.text

    async def some_stored() -> bool:
        return await count_stored(sessionmaker, workspace.workspace_id) > 0

    log_start = scoring.log_path.stat().st_size
    scoring.start()
    await eventually(some_stored, what="scoring started")
    scoring.signal(signal.SIGTERM)
    # uvicorn re-raises the signal once its graceful shutdown is complete.
    assert await scoring.wait_exit() == -signal.SIGTERM
    stored_at_stop = await count_stored(sessionmaker, workspace.workspace_id)
    assert stored_at_stop < total, "the stream should still have been in flight"
    with scoring.log_path.open(errors="replace") as log_file:
        log_file.seek(log_start)
        log = log_file.read()
    assert '"consumer stopped"' in log
    assert '"Application shutdown complete."' in log

    scoring.start()
    await scoring.wait_ready()
    await wait_until_idle(stack.settings, deadline_s=120)

    async with transaction(sessionmaker) as session:
        changes = await session.scalar(
            sa.select(sa.func.count()).where(score_changes.c.workspace_id == workspace.workspace_id)
        )
        totals = (
            (
                await session.execute(
                    sa.select(scores.c.points).where(
                        scores.c.workspace_id == workspace.workspace_id
                    )
                )
            )
            .scalars()
            .all()
        )
    assert await count_stored(sessionmaker, workspace.workspace_id) == total
    assert changes == total
    assert sorted(totals) == [EVENTS_PER_CONTACT * PRICING_POINTS] * CONTACTS
    assert len(smtp_sink.received(to=addresses)) == CONTACTS
