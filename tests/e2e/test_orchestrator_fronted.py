"""The orchestrator fronts scoring's and the notifier's internal APIs under its public
/api/v1: real scoring, notifier and orchestrator processes; the workspace comes from the
API key only, scopes are enforced, the owners' answers (422s included) pass unchanged, and
a POST with an Idempotency-Key reaches its owner once."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from nudge_common.db import SessionMaker, transaction
from nudge_devtools.pipeline import eventually
from nudge_devtools.services import ServiceProcess, free_port
from nudge_orchestrator import store
from tests.conftest import StackHandle


@pytest.fixture(scope="module")
async def front(stack: StackHandle) -> AsyncIterator[ServiceProcess]:
    owners = {
        name: ServiceProcess(name, free_port(), dict(stack.env), stack.log_dir / f"{name}-f.log")
        for name in ("scoring", "notifier")
    }
    orchestrator = ServiceProcess(
        "orchestrator",
        free_port(),
        {
            **stack.env,
            "NUDGE_SCORING_URL": owners["scoring"].url,
            "NUDGE_NOTIFIER_URL": owners["notifier"].url,
        },
        stack.log_dir / "orchestrator-fronted.log",
    )
    processes = [*owners.values(), orchestrator]
    try:
        for process in processes:
            process.start()
        for process in processes:
            await process.wait_ready()
        yield orchestrator
    finally:
        for process in processes:
            await process.stop()


async def key(sessionmaker: SessionMaker, workspace_id: str, *scopes: str) -> str:
    async with transaction(sessionmaker) as session:
        _, secret = await store.create_api_key(
            session, workspace_id=workspace_id, name="test", scopes=list(scopes)
        )
    return secret


def client(process: ServiceProcess, secret: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return httpx.AsyncClient(base_url=process.url, headers=headers, timeout=30)


async def test_scoring_models_through_the_front(
    front: ServiceProcess, sessionmaker: SessionMaker
) -> None:
    mine, theirs = f"ws-{uuid.uuid4().hex[:10]}", f"ws-{uuid.uuid4().hex[:10]}"
    writer = await key(sessionmaker, mine, "read", "write")
    reader = await key(sessionmaker, mine, "read")
    stranger = await key(sessionmaker, theirs, "read", "write")
    async with client(front, None) as anonymous:
        assert (await anonymous.get("/api/v1/models")).status_code == 401
    async with client(front, reader) as c:
        refused = await c.put("/api/v1/models/fit", json={"description": "x"})
        assert refused.status_code == 403
        assert "'write' scope" in refused.json()["detail"]
    async with client(front, writer) as c:
        put = await c.put("/api/v1/models/fit", json={"description": "ICP fit"})
        assert put.status_code == 200, put.text
        assert put.json()["name"] == "fit"
        # scoring's own 422, naming the field, unchanged
        bad = await c.put("/api/v1/models/fit", json={"stages": "nope"})
        assert bad.status_code == 422
        assert any("stages" in error["loc"] for error in bad.json()["detail"])
        # a client cannot choose the workspace: its header is dropped
        listed = await c.get("/api/v1/models", headers={"X-Nudge-Workspace": theirs})
        assert "fit" in [m["name"] for m in listed.json()]
        contacts = await c.get("/api/v1/contacts", params={"limit": 5})
        assert contacts.status_code == 200, contacts.text
        # the owner's cursor of a bare list comes through
        assert (await c.put("/api/v1/models/gtm", json={})).status_code == 200
        first = await c.get("/api/v1/models", params={"limit": 1})
        assert [m["name"] for m in first.json()] == ["fit"]
        after = first.headers["X-Next-After"]
        second = await c.get("/api/v1/models", params={"limit": 1, "after": after})
        assert [m["name"] for m in second.json()] == ["gtm"]
    async with client(front, stranger) as c:
        assert "fit" not in [m["name"] for m in (await c.get("/api/v1/models")).json()]
        assert (await c.delete("/api/v1/models/fit")).status_code == 404


async def test_suppressions_through_the_front(
    front: ServiceProcess, sessionmaker: SessionMaker
) -> None:
    mine, theirs = f"ws-{uuid.uuid4().hex[:10]}", f"ws-{uuid.uuid4().hex[:10]}"
    writer = await key(sessionmaker, mine, "read", "write")
    stranger = await key(sessionmaker, theirs, "read")
    async with client(front, writer) as c:
        put = await c.put(
            "/api/v1/suppressions/email/Someone@Example.com", json={"reason": "manual"}
        )
        assert put.status_code == 200, put.text
        listed = (await c.get("/api/v1/suppressions")).json()
        assert "someone@example.com" in str(listed)
        bad = await c.put("/api/v1/suppressions/email/not-an-address", json={})
        assert bad.status_code == 400
        assert "address" in bad.text
    async with client(front, stranger) as c:
        assert "someone@example.com" not in str((await c.get("/api/v1/suppressions")).json())
        refused = await c.delete("/api/v1/suppressions/email/someone@example.com")
        assert refused.status_code == 403


async def test_contacts_through_the_front_and_a_post_once_per_idempotency_key(
    front: ServiceProcess, sessionmaker: SessionMaker
) -> None:
    """Import, search, the 360 view, tags and erase are scoring's; the front adds nothing
    but the key's workspace, and keeps the first answer to a POST for its retries."""
    writer = await key(sessionmaker, f"ws-{uuid.uuid4().hex[:10]}", "read", "write")
    csv_headers = {"Content-Type": "text/csv"}
    async with client(front, writer) as c:
        started = await c.post(
            "/api/v1/contacts/import",
            content="user_id,email,name\nfront-1,fay@example.com,Fay Front\n",
            headers=csv_headers,
        )
        assert started.status_code == 202, started.text
        job = started.json()["id"]

        async def imported() -> bool:
            progress = await c.get(f"/api/v1/contacts/imports/{job}")
            return bool(progress.json()["status"] == "done")

        await eventually(imported, deadline_s=60, what="the import")
        [found] = (await c.get("/api/v1/contacts", params={"q": "Fay"})).json()
        contact = found["id"]
        view = await c.get(f"/api/v1/contacts/{contact}")
        assert view.status_code == 200, view.text
        assert view.json()["profile"]["email"] == "fay@example.com"
        tagged = await c.post(f"/api/v1/contacts/{contact}/tags", json={"add": ["vip:gold"]})
        assert tagged.status_code == 200, tagged.text
        assert "vip:gold" in tagged.json()

        assert (await c.put("/api/v1/models/fit", json={})).status_code == 200
        rule = {"points": 5, "spec": {"kind": "profile", "trait": "title", "op": "exists"}}
        once = {"Idempotency-Key": f"rule-{uuid.uuid4()}"}
        first = await c.post("/api/v1/models/fit/rules", json=rule, headers=once)
        again = await c.post("/api/v1/models/fit/rules", json=rule, headers=once)
        assert first.status_code == again.status_code == 201, first.text
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.json() == first.json()
        assert len((await c.get("/api/v1/models/fit/rules")).json()) == 1, "created once"
        elsewhere = await c.post(
            "/api/v1/contacts/import", content="user_id\nx\n", headers={**csv_headers, **once}
        )
        assert elsewhere.status_code == 409
        assert "already used" in elsewhere.json()["detail"]
        # a refusal is not kept: the same key may go again once the request is right
        fixed = {"Idempotency-Key": f"rule-{uuid.uuid4()}"}
        bad = await c.post("/api/v1/models/fit/rules", json={"points": 5}, headers=fixed)
        assert bad.status_code == 422
        good = await c.post("/api/v1/models/fit/rules", json=rule, headers=fixed)
        assert good.status_code == 201, good.text

        assert (await c.delete(f"/api/v1/contacts/{contact}")).status_code == 202
        assert (await c.get(f"/api/v1/contacts/{contact}")).status_code == 404
