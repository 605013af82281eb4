"""Broadcasts on the real database and broker: the API (in this process, through ASGI) and
the broadcast worker driven by the hand clock, reading members from the segmenter's
contract (served here by a local HTTP server)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from nudge_common.db import transaction
from nudge_common.events import NOTIFICATION_REQUESTED
from nudge_common.kafka import publish as real_publish
from nudge_devtools.services import ServiceProcess, free_port
from nudge_orchestrator import store, worker
from tests.conftest import StackHandle
from tests.services.orchestrator.conftest import (
    Broadcasts,
    Engine,
    FakeSegmenter,
    notifications,
    serve,
)


async def test_a_broadcast_reaches_every_member_once_paced_capped_and_after_quiet_hours(
    engine: Engine, segments: FakeSegmenter, broadcasts: Broadcasts
) -> None:
    headers = await broadcasts.key("read", "write", "send")
    api = broadcasts.api
    settings = await api.put(
        "/api/v1/messaging-settings",
        json={"caps": {"email": {"per_day": 1}}, "quiet_hours": {"start": "21:00", "end": "08:00"}},
        headers=headers,
    )
    assert settings.status_code == 200, settings.text
    template = await broadcasts.template()
    members = [await engine.contact(f"bc-{i}") for i in range(24)]
    # 21:00 in Tokyo at the engine's noon UTC: this member's message waits for 08:00 there
    night = await engine.contact("bc-night", timezone="Asia/Tokyo")
    # this member had an email today from a workflow: the cap of one a day holds it back
    welcome = await engine.workflow(
        {
            "trigger": {"kind": "event", "event": "Signed Up"},
            "steps": [{"kind": "send", "channel": "email", "template_id": str(template)}],
        }
    )
    await engine.track("bc-0", "Signed Up")
    assert len(await engine.sent(welcome)) == 1
    segment = uuid.uuid4()
    segments.segments[(engine.workspace_id, segment)] = [*members, night]

    created = await api.post(
        "/api/v1/broadcasts",
        json={
            "name": "March news",
            "channel": "email",
            "template_id": str(template),
            "segment_id": str(segment),
            "send_at": (engine.now + timedelta(hours=1)).isoformat(),
            "rate_per_s": 10,
        },
        headers=headers,
    )
    assert created.status_code == 201, created.text
    broadcast = uuid.UUID(created.json()["id"])
    assert created.json()["status"] == "scheduled"

    assert await broadcasts.round() == 0, "not before send_at"
    engine.advance(hours=1)
    assert await broadcasts.drain() == 10, "ten members a second"
    assert (await api.get(f"/api/v1/broadcasts/{broadcast}", headers=headers)).json()[
        "status"
    ] == "sending"
    engine.advance(seconds=1)
    assert await broadcasts.drain() == 10
    engine.advance(seconds=1)
    assert await broadcasts.drain() == 5
    engine.advance(seconds=1)
    assert await broadcasts.drain() == 0
    shown = (await api.get(f"/api/v1/broadcasts/{broadcast}", headers=headers)).json()
    assert (shown["status"], shown["members"]) == ("sent", 25)

    runs = await engine.runs(broadcast)
    assert sorted(run.contact_id for run in runs) == sorted([*members, night])
    sent = await engine.sent(broadcast)
    assert len(sent) == 23, "one capped, one waiting for the end of quiet hours"
    async with transaction(engine.sessionmaker) as session:
        outcomes = dict(
            (
                await session.execute(
                    sa.select(store.runs.c.contact_id, store.step_executions.c.outcome)
                    .join(store.step_executions, store.step_executions.c.run_id == store.runs.c.id)
                    .where(store.runs.c.workflow_id == broadcast)
                )
            ).all()
        )
    assert outcomes[members[0]] == "capped"
    assert night not in outcomes
    engine.advance(hours=11)  # 08:00 in Tokyo
    await engine.fire()
    assert len(await engine.sent(broadcast)) == 24

    messages = await notifications(engine, broadcast)
    keys = [NOTIFICATION_REQUESTED.parse(m).idempotency_key for m in messages]
    assert len(keys) == len(set(keys)) == 24, "each member's message requested once"
    report = (await api.get(f"/api/v1/broadcasts/{broadcast}/analytics", headers=headers)).json()
    assert (report["entered"], report["requested"]) == (25, 24)
    # per segment: the broadcast's runs count for the segment it went to
    by_segment = (await api.get(f"/api/v1/analytics/segments/{segment}", headers=headers)).json()
    assert (by_segment["entered"], by_segment["requested"]) == (25, 24)
    [row] = by_segment["workflows"]
    assert (row["kind"], row["broadcast_id"], row["name"]) == (
        "broadcast",
        str(broadcast),
        "March news",
    )
    nothing = (await api.get(f"/api/v1/analytics/segments/{uuid.uuid4()}", headers=headers)).json()
    assert (nothing["entered"], nothing["workflows"]) == (0, [])


async def test_replicas_share_broadcasts_and_a_crash_replays_the_page_with_the_same_ids(
    engine: Engine,
    segments: FakeSegmenter,
    broadcasts: Broadcasts,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    headers = await broadcasts.key("read", "send")
    template = await broadcasts.template()
    members = [await engine.contact(f"rp-{i}") for i in range(30)]
    segment = uuid.uuid4()
    segments.segments[(engine.workspace_id, segment)] = members
    ids = []
    for name in ("a", "b"):
        created = await broadcasts.api.post(
            "/api/v1/broadcasts",
            json={
                "name": name,
                "channel": "email",
                "template_id": str(template),
                "segment_id": str(segment),
                "send_at": engine.now.isoformat(),
                "rate_per_s": 7,
            },
            headers=headers,
        )
        ids.append(uuid.UUID(created.json()["id"]))

    crashes: list[int] = []

    async def publish_then_crash(*args: Any, **kwargs: Any) -> None:
        await real_publish(*args, **kwargs)
        if not crashes:
            crashes.append(1)
            raise ConnectionResetError("the replica died before its commit")

    monkeypatch.setattr(worker, "publish", publish_then_crash)
    with pytest.raises(ConnectionResetError):
        await broadcasts.round()
    # two replicas, rounds at once: SKIP LOCKED gives each its own broadcast
    for _ in range(20):
        if not any(await asyncio.gather(*(broadcasts.round() for _ in range(2)))):
            engine.advance(seconds=1)
    published = 0
    for broadcast in ids:
        assert len(await engine.sent(broadcast)) == 30
        messages = await notifications(engine, broadcast)
        published += len(messages)
        keys = {NOTIFICATION_REQUESTED.parse(m).idempotency_key for m in messages}
        assert len(keys) == 30, "the crashed page went again with the same keys"
        assert len({m.id for m in messages}) == 30
        shown = (
            await broadcasts.api.get(f"/api/v1/broadcasts/{broadcast}", headers=headers)
        ).json()
        assert (shown["status"], shown["members"]) == ("sent", 30)
    assert published == 60 + 7, "the crashed page of 7 was published twice, same ids"


async def test_the_broadcast_api_validates_pages_replays_and_cancels(
    engine: Engine, segments: FakeSegmenter, broadcasts: Broadcasts
) -> None:
    api = broadcasts.api
    headers = await broadcasts.key("read", "write", "send")
    email, sms = await broadcasts.template(), await broadcasts.template("sms")
    segment = uuid.uuid4()
    segments.segments[(engine.workspace_id, segment)] = [await engine.contact("api-1")]
    later = (engine.now + timedelta(days=1)).isoformat()
    body = {
        "name": "Spring sale",
        "channel": "email",
        "template_id": str(email),
        "segment_id": str(segment),
        "send_at": later,
    }

    async def refused(change: dict[str, Any], field: str) -> None:
        answer = await api.post("/api/v1/broadcasts", json={**body, **change}, headers=headers)
        assert answer.status_code == 422, answer.text
        assert any(error["loc"][-1] == field for error in answer.json()["detail"]), answer.text

    await refused({"template_id": str(uuid.uuid4())}, "template_id")
    await refused({"template_id": str(sms)}, "template_id")  # an SMS template on email
    await refused({"segment_id": str(uuid.uuid4())}, "segment_id")  # the segmenter's 404
    await refused({"send_at": "2030-03-05T09:00:00"}, "send_at")  # no timezone
    await refused({"rate_per_s": 0}, "rate_per_s")
    reader = await broadcasts.key("read", "write")
    answer = await api.post("/api/v1/broadcasts", json=body, headers=reader)
    assert answer.status_code == 403
    assert "send" in answer.json()["detail"]

    first = await api.post(
        "/api/v1/broadcasts", json=body, headers={**headers, "Idempotency-Key": "b-1"}
    )
    again = await api.post(
        "/api/v1/broadcasts", json=body, headers={**headers, "Idempotency-Key": "b-1"}
    )
    assert first.status_code == again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    other = await api.post("/api/v1/broadcasts", json={**body, "name": "Other"}, headers=headers)
    broadcast, second = first.json()["id"], other.json()["id"]

    sooner = engine.now + timedelta(hours=2)
    patched = await api.patch(
        f"/api/v1/broadcasts/{second}",
        json={"name": "Other II", "send_at": sooner.isoformat(), "rate_per_s": 50},
        headers=headers,
    )
    assert patched.status_code == 200, patched.text
    assert (patched.json()["name"], patched.json()["send_at"], patched.json()["rate_per_s"]) == (
        "Other II",
        sooner.isoformat(),
        50,
    )
    unpaced = await api.patch(
        f"/api/v1/broadcasts/{second}", json={"rate_per_s": None}, headers=headers
    )
    assert (unpaced.json()["rate_per_s"], unpaced.json()["name"]) == (None, "Other II")
    naive = await api.patch(
        f"/api/v1/broadcasts/{second}", json={"send_at": "2030-03-05T09:00:00"}, headers=headers
    )
    assert naive.status_code == 422
    assert naive.json()["detail"][0]["loc"] == ["body", "send_at"]

    page = (await api.get("/api/v1/broadcasts?limit=1&offset=1", headers=headers)).json()
    assert (page["total"], [b["id"] for b in page["items"]]) == (2, [second])
    # a broadcast's own workflow is not one of the workspace's workflows
    assert (await api.get("/api/v1/workflows", headers=headers)).json()["total"] == 0
    assert (await api.get(f"/api/v1/workflows/{broadcast}", headers=headers)).status_code == 404
    stranger = await broadcasts.key("read", "send", workspace_id=f"ws-{uuid.uuid4().hex[:8]}")
    assert (await api.get(f"/api/v1/broadcasts/{broadcast}", headers=stranger)).status_code == 404
    renamed = await api.patch(
        f"/api/v1/broadcasts/{broadcast}", json={"name": "x"}, headers=stranger
    )
    assert renamed.status_code == 404
    forbidden = await api.patch(
        f"/api/v1/broadcasts/{broadcast}", json={"name": "x"}, headers=reader
    )
    assert forbidden.status_code == 403

    cancelled = await api.post(f"/api/v1/broadcasts/{broadcast}/cancel", headers=headers)
    assert cancelled.json()["status"] == "cancelled"
    again = await api.post(f"/api/v1/broadcasts/{broadcast}/cancel", headers=headers)
    assert again.status_code == 409
    assert "cancelled" in again.json()["detail"]
    late = await api.patch(f"/api/v1/broadcasts/{broadcast}", json={"name": "x"}, headers=headers)
    assert late.status_code == 409
    filtered = (await api.get("/api/v1/broadcasts?status=cancelled", headers=headers)).json()
    assert [b["id"] for b in filtered["items"]] == [broadcast]

    # the segment disappears before the other one is due: it fails, with the reason
    del segments.segments[(engine.workspace_id, segment)]
    engine.advance(days=1)
    await broadcasts.drain()
    shown = (await api.get(f"/api/v1/broadcasts/{second}", headers=headers)).json()
    assert shown["status"] == "failed"
    assert "segment_id" in shown["last_error"]
    assert await engine.runs(uuid.UUID(broadcast)) == []


async def test_a_broadcast_to_a_static_list_of_the_real_segmenter(
    stack: StackHandle, engine: Engine
) -> None:
    """The list is made through the orchestrator's public API, which fronts the segmenter's
    (the key's workspace in ``X-Nudge-Workspace``)."""
    segmenter = ServiceProcess(
        "segmenter", free_port(), dict(stack.env), stack.log_dir / "segmenter-broadcasts.log"
    )
    segmenter.start()
    try:
        await segmenter.wait_ready()
        members = [await engine.contact(f"vip-{i}") for i in range(12)]
        async with serve(engine, segmenter.url, page=5) as broadcasts:
            api = broadcasts.api
            headers = await broadcasts.key("read", "write", "send")
            reader = await broadcasts.key("read")
            body = {"name": "VIP", "kind": "static"}
            refused = await api.post("/api/v1/segments", json=body, headers=reader)
            assert refused.status_code == 403
            created = await api.post("/api/v1/segments", json=body, headers=headers)
            assert created.status_code == 201, created.text
            vip = created.json()["id"]
            added = await api.post(
                f"/api/v1/segments/{vip}/members",
                json={"contact_ids": [str(m) for m in members], "action": "add"},
                headers=headers,
            )
            assert added.status_code == 200, added.text
            listed = await api.get("/api/v1/segments", headers=reader)
            assert vip in listed.text

            body = {"name": "VIP preview", "channel": "email", "send_at": engine.now.isoformat()}
            body["template_id"] = str(await broadcasts.template())
            unknown = await api.post(
                "/api/v1/broadcasts",
                json={**body, "segment_id": str(uuid.uuid4())},
                headers=headers,
            )
            assert unknown.status_code == 422, unknown.text
            assert unknown.json()["detail"][0]["loc"] == ["body", "segment_id"]
            created = await api.post(
                "/api/v1/broadcasts", json={**body, "segment_id": vip}, headers=headers
            )
            assert created.status_code == 201, created.text
            assert await broadcasts.drain() == 12  # three pages of at most five
            broadcast = uuid.UUID(created.json()["id"])
            shown = (await api.get(f"/api/v1/broadcasts/{broadcast}", headers=headers)).json()
            assert (shown["status"], shown["members"]) == ("sent", 12)
        assert sorted(run.contact_id for run in await engine.runs(broadcast)) == sorted(members)
        assert len(await engine.sent(broadcast)) == 12
    finally:
        await segmenter.stop()
