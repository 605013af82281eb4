"""One contact's events travel ingest -> scoring -> segmenter -> orchestrator -> notifier and
become exactly one email; replaying the same events sends nothing more."""

from __future__ import annotations

import uuid

import httpx
import sqlalchemy as sa

from nudge_common.db import SessionMaker, transaction
from nudge_devtools.pipeline import wait_until_idle
from nudge_devtools.seed import SeededWorkspace
from nudge_devtools.services import Fleet
from nudge_devtools.smtp_sink import SmtpSink
from nudge_notifier.store import deliveries
from nudge_scoring.store import events, scores
from tests.conftest import StackHandle


def viewed_pricing(user_id: str, name: str, email: str) -> dict[str, object]:
    return {
        "userId": user_id,
        "event": "Viewed Pricing",
        "messageId": str(uuid.uuid4()),
        "properties": {"plan": "pro"},
        "context": {"traits": {"name": name, "email": email}},
    }


async def test_three_events_make_one_email_and_a_replay_makes_none(
    stack: StackHandle,
    fleet: Fleet,
    smtp_sink: SmtpSink,
    workspace: SeededWorkspace,
    sessionmaker: SessionMaker,
) -> None:
    email = f"ada-{uuid.uuid4().hex[:8]}@example.com"
    calls = [viewed_pricing("ada", "Ada Lovelace", email) for _ in range(3)]

    async with httpx.AsyncClient(
        base_url=fleet["ingest"].url, auth=(workspace.write_key, "")
    ) as client:
        for call in calls:
            response = await client.post("/v1/track", json=call)
            assert response.status_code == 200, response.text
            assert response.json() == {"success": True}

        [message] = await smtp_sink.wait_for(1, to={email})
        assert message["Subject"] == "Welcome, Ada Lovelace!"
        text = message.get_body(preferencelist=("plain",))
        assert text is not None
        assert "Hello Ada Lovelace" in text.get_content()

        for call in calls:  # an SDK retrying every call
            assert (await client.post("/v1/track", json=call)).status_code == 200
    await wait_until_idle(stack.settings)

    assert len(smtp_sink.received(to={email})) == 1
    async with transaction(sessionmaker) as session:
        stored = await session.scalar(
            sa.select(sa.func.count()).where(events.c.workspace_id == workspace.workspace_id)
        )
        lead_score = await session.scalar(
            sa.select(scores.c.points).where(scores.c.workspace_id == workspace.workspace_id)
        )
        sent = (
            (
                await session.execute(
                    sa.select(deliveries.c.status).where(
                        deliveries.c.workspace_id == workspace.workspace_id
                    )
                )
            )
            .scalars()
            .all()
        )
    assert stored == 3
    assert lead_score == 60
    assert sent == ["sent"]

    async with httpx.AsyncClient(base_url=fleet["notifier"].url) as client:
        metrics = (await client.get("/metrics")).text
    latency_count = next(
        line
        for line in metrics.splitlines()
        if line.startswith('nudge_end_to_end_latency_seconds_count{channel="email"}')
    )
    assert float(latency_count.split()[-1]) >= 1
