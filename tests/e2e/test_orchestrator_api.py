"""The marketers' API served by a real orchestrator process on the real stack: keys and
scopes, templates announced on the config topic, workflow CRUD with 422s naming the field,
idempotency keys, pagination, filtering, simulation and the API-call trigger."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from nudge_common.db import SessionMaker, transaction
from nudge_common.events import TEMPLATE_DEFINED, Envelope, Topic
from nudge_devtools.pipeline import read_topic
from nudge_devtools.services import ServiceProcess, free_port
from nudge_orchestrator import store
from tests.conftest import StackHandle


@pytest.fixture(scope="module")
async def orchestrator(stack: StackHandle) -> AsyncIterator[ServiceProcess]:
    process = ServiceProcess(
        "orchestrator", free_port(), dict(stack.env), stack.log_dir / "orchestrator-api.log"
    )
    process.start()
    try:
        await process.wait_ready()
        yield process
    finally:
        await process.stop()


async def key(sessionmaker: SessionMaker, workspace_id: str, *scopes: str) -> str:
    async with transaction(sessionmaker) as session:
        _, secret = await store.create_api_key(
            session, workspace_id=workspace_id, name="test", scopes=list(scopes)
        )
    return secret


def client(process: ServiceProcess, secret: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return httpx.AsyncClient(base_url=process.url, headers=headers, timeout=10)


def welcome(template_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "trigger": {"kind": "api"},
        "steps": [
            {"kind": "send", "channel": "email", "template_id": template_id},
            {"kind": "wait", "seconds": 3600},
            {"kind": "exit"},
        ],
        **extra,
    }


async def test_keys_scopes_and_workspaces(
    orchestrator: ServiceProcess, sessionmaker: SessionMaker
) -> None:
    workspace = f"ws-{uuid.uuid4().hex[:10]}"
    writer = await key(sessionmaker, workspace, "read", "write")
    reader = await key(sessionmaker, workspace, "read")
    stranger = await key(sessionmaker, f"ws-{uuid.uuid4().hex[:10]}", "read", "write")
    async with client(orchestrator, None) as anonymous:
        response = await anonymous.get("/api/v1/workflows")
        assert response.status_code == 401
        assert "authorization" in response.json()["detail"]
    async with client(orchestrator, "nsk_wrong") as wrong:
        assert (await wrong.get("/api/v1/workflows")).status_code == 401
    async with client(orchestrator, reader) as api:
        assert (await api.get("/api/v1/workflows")).status_code == 200
        response = await api.post("/api/v1/templates", json={})
        assert response.status_code == 403
        assert "write" in response.json()["detail"]
    async with client(orchestrator, writer) as api:
        created = await api.post(
            "/api/v1/templates",
            json={"name": "hi", "channel": "email", "subject": "Hi", "text": "Hello"},
        )
        assert created.status_code == 201, created.text
        template_id = created.json()["id"]
        flow = await api.post(
            "/api/v1/workflows", json={"name": "w", "definition": welcome(template_id)}
        )
        assert flow.status_code == 201, flow.text
        workflow_id = flow.json()["id"]
        # revoking a key: it stops working at once
        listed = (await api.get("/api/v1/api-keys")).json()["items"]
        reader_id = next(k["id"] for k in listed if k["scopes"] == ["read"])
        assert (await api.delete(f"/api/v1/api-keys/{reader_id}")).status_code == 204
    async with client(orchestrator, reader) as api:
        assert (await api.get("/api/v1/workflows")).status_code == 401
    async with client(orchestrator, stranger) as api:
        assert (await api.get(f"/api/v1/workflows/{workflow_id}")).status_code == 404
        assert (await api.get(f"/api/v1/templates/{template_id}")).status_code == 404
    async with transaction(sessionmaker) as session:
        stored = (await session.execute(sa.select(store.api_keys.c.hash))).scalars().all()
    assert writer not in stored  # only hashes are kept


async def test_workflow_crud_validation_idempotency_and_simulation(
    stack: StackHandle, orchestrator: ServiceProcess, sessionmaker: SessionMaker
) -> None:
    workspace = f"ws-{uuid.uuid4().hex[:10]}"
    secret = await key(sessionmaker, workspace, "read", "write", "send")
    async with client(orchestrator, secret) as api:
        bad_template = await api.post(
            "/api/v1/templates", json={"name": "x", "channel": "email", "text": "no subject"}
        )
        assert bad_template.status_code == 422
        assert "subject" in bad_template.text
        template = await api.post(
            "/api/v1/templates",
            json={"name": "cart", "channel": "email", "subject": "Your cart", "text": "Come back"},
        )
        template_id = template.json()["id"]

        unknown = str(uuid.uuid4())
        response = await api.post(
            "/api/v1/workflows", json={"name": "w", "definition": welcome(unknown)}
        )
        assert response.status_code == 422
        [error] = response.json()["detail"]
        assert error["loc"] == ["body", "definition", "steps", 0, "template_id"]
        assert "unknown template" in error["msg"]

        cycle = {
            "trigger": {"kind": "api"},
            "steps": [
                {"id": "a", "kind": "wait", "seconds": 60},
                {"id": "b", "kind": "wait", "seconds": 60, "next": "a"},
            ],
        }
        response = await api.post("/api/v1/workflows", json={"name": "c", "definition": cycle})
        assert response.status_code == 422
        assert "cycle" in response.json()["detail"][0]["msg"]

        unreachable = welcome(template_id)
        unreachable["steps"].append({"id": "lost", "kind": "exit"})
        response = await api.post(
            "/api/v1/workflows", json={"name": "u", "definition": unreachable}
        )
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["body", "definition", "steps", 3]

        response = await api.post(
            "/api/v1/workflows",
            json={
                "name": "w",
                "definition": {
                    "trigger": {"kind": "api"},
                    "steps": [{"kind": "wait", "seconds": -1}],
                },
            },
        )
        assert response.status_code == 422
        assert "seconds" in str(response.json()["detail"][0]["loc"])

        headers = {"Idempotency-Key": f"create-{uuid.uuid4()}"}
        body = {"name": "Welcome", "definition": welcome(template_id), "publish": True}
        first = await api.post("/api/v1/workflows", json=body, headers=headers)
        again = await api.post("/api/v1/workflows", json=body, headers=headers)
        assert first.status_code == again.status_code == 201
        assert first.json()["id"] == again.json()["id"]
        assert again.headers["Idempotent-Replayed"] == "true"
        workflow_id = first.json()["id"]
        assert first.json()["status"] == "active"
        assert first.json()["version"] == 1

        for i in range(3):
            await api.post(
                "/api/v1/workflows", json={"name": f"draft {i}", "definition": welcome(template_id)}
            )
        page = (await api.get("/api/v1/workflows", params={"status": "draft", "limit": 2})).json()
        assert page["total"] == 3
        assert len(page["items"]) == 2
        rest = await api.get(
            "/api/v1/workflows", params={"status": "draft", "limit": 2, "offset": 2}
        )
        assert len(rest.json()["items"]) == 1
        assert (await api.get("/api/v1/workflows", params={"limit": 0})).status_code == 422

        simulated = await api.post(
            f"/api/v1/workflows/{workflow_id}/simulate", json={"traits": {"email": "s@example.com"}}
        )
        assert simulated.status_code == 200, simulated.text
        assert [s["outcome"] for s in simulated.json()["path"]] == ["sent", "waited", "exit"]

        contact = uuid.uuid4()
        run = await api.post(
            f"/api/v1/workflows/{workflow_id}/runs",
            json={"contact_id": str(contact), "traits": {"email": "run@example.com"}},
        )
        assert run.status_code == 201, run.text
        assert run.json()["requested"] == 1
        again = await api.post(
            f"/api/v1/workflows/{workflow_id}/runs", json={"contact_id": str(contact)}
        )
        assert again.status_code == 409  # once per contact, and the first run is waiting

        paused = await api.post(f"/api/v1/workflows/{workflow_id}/pause")
        assert paused.json()["status"] == "paused"
        archived = await api.post(f"/api/v1/workflows/{workflow_id}/archive")
        assert archived.json()["status"] == "archived"
        assert (await api.post(f"/api/v1/workflows/{workflow_id}/resume")).status_code == 409
    async with transaction(sessionmaker) as session:
        statuses = (
            (
                await session.execute(
                    sa.select(store.runs.c.status).where(
                        store.runs.c.workflow_id == uuid.UUID(workflow_id)
                    )
                )
            )
            .scalars()
            .all()
        )
    assert statuses == ["cancelled"]

    found = await read_topic(
        stack.settings,
        Topic.CONFIG,
        where=lambda r: r.key == template_id.encode(),
        expected=1,
    )
    announced = TEMPLATE_DEFINED.parse(Envelope.decode(found[0].value or b""))
    assert announced.subject == "Your cart"


async def test_templates_crud_pagination_filter_and_messaging_settings(
    stack: StackHandle, orchestrator: ServiceProcess, sessionmaker: SessionMaker
) -> None:
    workspace = f"ws-{uuid.uuid4().hex[:10]}"
    secret = await key(sessionmaker, workspace, "read", "write")
    stranger = await key(sessionmaker, f"ws-{uuid.uuid4().hex[:10]}", "read", "write")
    async with client(orchestrator, secret) as api:
        email = {"name": "news", "channel": "email", "subject": "News", "html": "<p>Hi</p>"}
        headers = {"Idempotency-Key": f"t-{uuid.uuid4()}"}
        first = await api.post("/api/v1/templates", json=email, headers=headers)
        again = await api.post("/api/v1/templates", json=email, headers=headers)
        assert first.status_code == again.status_code == 201, first.text
        assert again.json()["id"] == first.json()["id"]
        assert again.headers["Idempotent-Replayed"] == "true"
        template_id = first.json()["id"]
        for channel in ("sms", "push", "push"):
            made = await api.post(
                "/api/v1/templates", json={"name": channel, "channel": channel, "text": "Hi"}
            )
            assert made.status_code == 201, made.text
        empty = await api.post(
            "/api/v1/templates", json={"name": "x", "channel": "push", "text": ""}
        )
        assert empty.status_code == 422
        fax = await api.post("/api/v1/templates", json={"name": "x", "channel": "fax", "text": "x"})
        assert fax.status_code == 422
        assert fax.json()["detail"][0]["loc"] == ["body", "channel"]

        pushes = (await api.get("/api/v1/templates", params={"channel": "push"})).json()
        assert (pushes["total"], {t["channel"] for t in pushes["items"]}) == (2, {"push"})
        page = (await api.get("/api/v1/templates", params={"limit": 3, "offset": 3})).json()
        assert (page["total"], len(page["items"])) == (4, 1)

        changed = await api.put(
            f"/api/v1/templates/{template_id}", json={**email, "subject": "Spring news"}
        )
        assert changed.status_code == 200, changed.text
        assert changed.json()["subject"] == "Spring news"
        moved = await api.put(
            f"/api/v1/templates/{template_id}", json={**email, "channel": "sms", "text": "x"}
        )
        assert moved.status_code == 422
        assert moved.json()["detail"][0]["loc"] == ["body", "channel"]
        async with client(orchestrator, stranger) as other:
            theirs = await other.put(f"/api/v1/templates/{template_id}", json=email)
            assert theirs.status_code == 404
        assert (await api.delete(f"/api/v1/templates/{template_id}")).status_code == 204
        assert (await api.get(f"/api/v1/templates/{template_id}")).status_code == 404

        for bad, loc in (
            ({"caps": {"email": {"per_day": -1}}}, ["body", "caps", "email", "per_day"]),
            (
                {"caps": {"email": {"per_month": 3}}},
                ["body", "caps", "email", "per_month", "[key]"],
            ),
            ({"quiet_hours": {"start": "25:00", "end": "08:00"}}, ["body", "quiet_hours", "start"]),
        ):
            refused = await api.put("/api/v1/messaging-settings", json=bad)
            assert refused.status_code == 422, refused.text
            assert refused.json()["detail"][0]["loc"] == loc
        good = {"caps": {"sms": {"per_week": 2}}, "quiet_hours": {"start": "21:00", "end": "08:00"}}
        assert (await api.put("/api/v1/messaging-settings", json=good)).status_code == 200
        assert (await api.get("/api/v1/messaging-settings")).json() == good

    # the notifier learns each version: created, changed, deleted (the compacted topic's
    # latest is the deletion)
    found = await read_topic(
        stack.settings,
        Topic.CONFIG,
        where=lambda r: r.key == template_id.encode(),
        expected=3,
    )
    versions = [TEMPLATE_DEFINED.parse(Envelope.decode(r.value or b"")) for r in found]
    assert [(v.subject, v.deleted) for v in versions] == [
        ("News", False),
        ("Spring news", False),
        ("", True),
    ]


async def test_one_openapi_document(orchestrator: ServiceProcess) -> None:
    async with httpx.AsyncClient(base_url=orchestrator.url) as api:
        document = (await api.get("/openapi.json")).json()
    paths = document["paths"]
    for path in (
        "/api/v1/workflows",
        "/api/v1/templates",
        "/api/v1/api-keys",
        "/api/v1/workflows/{workflow_id}/simulate",
        "/api/v1/segments",
        "/api/v1/contacts/{contact_id}",
        "/api/v1/models/{name}/rules",
        "/api/v1/suppressions",
    ):
        assert path in paths


async def test_workflow_analytics_route(
    orchestrator: ServiceProcess, sessionmaker: SessionMaker
) -> None:
    workspace = f"ws-{uuid.uuid4().hex[:10]}"
    writer = await key(sessionmaker, workspace, "read", "write")
    stranger = await key(sessionmaker, f"ws-{uuid.uuid4().hex[:10]}", "read")
    async with client(orchestrator, writer) as api:
        template = await api.post(
            "/api/v1/templates",
            json={"name": "hi", "channel": "email", "subject": "Hi", "text": "Hello"},
        )
        created = await api.post(
            "/api/v1/workflows", json={"name": "w", "definition": welcome(template.json()["id"])}
        )
        assert created.status_code == 201, created.text
        workflow_id = created.json()["id"]
        stats = await api.get(f"/api/v1/workflows/{workflow_id}/analytics")
        assert stats.status_code == 200, stats.text
        body = stats.json()
        assert (body["entered"], body["requested"], body["open_rate"]) == (0, 0, None)
        assert body["ab_test"] is None
        bad = await api.get(f"/api/v1/workflows/{workflow_id}/analytics", params={"alpha": 2})
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["loc"] == ["query", "alpha"]
    async with client(orchestrator, stranger) as api:
        assert (await api.get(f"/api/v1/workflows/{workflow_id}/analytics")).status_code == 404
