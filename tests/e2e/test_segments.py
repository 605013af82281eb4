"""A behavioural segment defined through the marketers' API (the orchestrator fronts the
segmenter) fills in real time from events sent to ingest: scoring resolves the contact and
publishes its activity, the segmenter counts it and publishes the entry."""

from __future__ import annotations

import uuid

import httpx

from nudge_common.db import SessionMaker, transaction
from nudge_common.events import SEGMENT_ENTERED, Envelope, Topic
from nudge_devtools.pipeline import read_topic
from nudge_devtools.seed import SeededWorkspace
from nudge_devtools.services import Fleet
from nudge_orchestrator import store
from tests.conftest import StackHandle

PRICING_TWICE = {
    "kind": "event",
    "event": "Viewed Pricing",
    "where": {"kind": "trait", "name": "plan", "op": "eq", "value": "pro"},
    "op": "gte",
    "count": 2,
    "within_days": 7,
}


async def test_segment_from_the_api_fills_in_real_time_from_ingested_events(
    stack: StackHandle, fleet: Fleet, workspace: SeededWorkspace, sessionmaker: SessionMaker
) -> None:
    async with transaction(sessionmaker) as session:
        _, secret = await store.create_api_key(
            session, workspace_id=workspace.workspace_id, name="e2e", scopes=["read", "write"]
        )
    api = httpx.AsyncClient(
        base_url=fleet["orchestrator"].url,
        headers={"Authorization": f"Bearer {secret}"},
        timeout=10,
    )
    ingest = httpx.AsyncClient(base_url=fleet["ingest"].url, auth=(workspace.write_key, ""))
    async with api, ingest:
        bad = await api.post(
            "/api/v1/segments",
            json={"name": "bad", "condition": {**PRICING_TWICE, "within_days": 0}},
        )
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["loc"][:3] == ["body", "condition", "event"]

        created = await api.post(
            "/api/v1/segments", json={"name": "Pricing twice", "condition": PRICING_TWICE}
        )
        assert created.status_code == 201, created.text
        segment_id = created.json()["id"]

        user_id = f"grace-{uuid.uuid4().hex[:8]}"
        for plan in ("pro", "free", "pro"):
            answer = await ingest.post(
                "/v1/track",
                json={
                    "userId": user_id,
                    "event": "Viewed Pricing",
                    "messageId": str(uuid.uuid4()),
                    "properties": {"plan": plan},
                },
            )
            assert answer.status_code == 200

        [entered] = await read_topic(
            stack.settings,
            Topic.MEMBERSHIPS,
            where=lambda r: segment_id.encode() in (r.value or b""),
            expected=1,
        )
        envelope = Envelope.decode(entered.value or b"")
        assert envelope.type == SEGMENT_ENTERED.name
        assert envelope.payload["contact"]["user_id"] == user_id

        shown = await api.get(f"/api/v1/segments/{segment_id}")
        assert shown.json()["status"] == "active"
        assert shown.json()["members"] == 1

        contact_id = envelope.payload["contact"]["contact_id"]
        view = await api.get(f"/api/v1/contacts/{contact_id}")
        assert view.status_code == 200, view.text
        names = {s["name"] for s in view.json()["segments"]}
        assert names == {"Pricing twice", "Qualified leads"}  # the seeded score segment too
        assert view.json()["value"]["orders"] == 0
