"""Scoring's internal API in-process on the real database and broker: models and rules with
422s naming the field, the contact 360 view, tags (a change published as
``contact.updated``), recompute over history with progress, and GDPR erase publishing
``contact.erased``."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from nudge_common.db import SessionMaker, transaction
from nudge_common.events import CONTACT_ERASED, CONTACT_UPDATED, Envelope, Topic
from nudge_common.internal_api import NEXT_AFTER_HEADER
from nudge_common.kafka import create_producer
from nudge_common.service import create_service_app
from nudge_devtools.pipeline import read_topic
from nudge_scoring import store
from nudge_scoring.api import routers
from nudge_scoring.consumer import handle_event
from nudge_scoring.settings import ScoringSettings
from nudge_scoring.worker import run_job_step
from tests.conftest import StackHandle
from tests.services.scoring.conftest import segment


@pytest.fixture
async def api(
    stack: StackHandle, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[httpx.AsyncClient]:
    for name, value in stack.env.items():
        monkeypatch.setenv(name, value)
    app = create_service_app(settings=ScoringSettings(), routers=routers)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://scoring") as client:
            yield client


async def apply(sessionmaker: SessionMaker, *envelopes: Envelope) -> None:
    for envelope in envelopes:
        async with transaction(sessionmaker) as session:
            await handle_event(session, envelope)


def h(ws: str) -> dict[str, str]:
    return {"X-Nudge-Workspace": ws}


async def test_rules_are_validated_naming_the_field(api: httpx.AsyncClient, ws: str) -> None:
    assert (await api.put("/api/v1/models/fit", json={}, headers=h(ws))).status_code == 200

    async def rule(body: dict[str, Any]) -> httpx.Response:
        return await api.post("/api/v1/models/fit/rules", json=body, headers=h(ws))

    missing_trait = await rule({"points": 5, "spec": {"kind": "profile", "trait": "shoe_size"}})
    assert missing_trait.status_code == 422
    assert ["body", "spec", "trait"] in [e["loc"] for e in missing_trait.json()["detail"]]
    bad_field = await rule(
        {
            "points": 5,
            "spec": {
                "kind": "behavioural",
                "event": "X",
                "filters": [{"field": "url", "op": "eq", "value": 1}],
            },
        }
    )
    assert bad_field.status_code == 422
    assert "filters" in str(bad_field.json()["detail"][0]["loc"])
    no_event = await rule({"points": 5, "spec": {"kind": "behavioural"}})
    assert no_event.status_code == 422
    decay = await rule({"points": 0, "spec": {"kind": "decay", "after_days": 7}})
    assert decay.status_code == 422
    assert "percent" in decay.text
    unknown_model = await api.post(
        "/api/v1/models/nope/rules",
        json={"points": 1, "spec": {"kind": "behavioural", "event": "X"}},
        headers=h(ws),
    )
    assert unknown_model.status_code == 404
    ok = await rule({"points": 5, "spec": {"kind": "profile", "trait": "title", "op": "exists"}})
    assert ok.status_code == 201
    listed = await api.get("/api/v1/models/fit/rules", headers=h(ws))
    assert [r["spec"]["trait"] for r in listed.json()] == ["title"]


async def test_contact_360_tags_recompute_and_erase(
    api: httpx.AsyncClient, ws: str, sessionmaker: SessionMaker, stack: StackHandle
) -> None:
    await api.put(
        "/api/v1/models/lead",
        json={"stages": [{"name": "lead", "min_score": 0}, {"name": "mql", "min_score": 30}]},
        headers=h(ws),
    )
    created = await api.post(
        "/api/v1/models/lead/rules",
        json={
            "name": "pricing",
            "points": 10,
            "spec": {"kind": "behavioural", "event": "Viewed Pricing"},
        },
        headers=h(ws),
    )
    rule_id = created.json()["id"]
    await apply(
        sessionmaker,
        segment(ws, event="Viewed Pricing", anonymousId="v"),
        segment(
            ws,
            "identify",
            userId="c1",
            anonymousId="v",
            traits={"name": "Cleo", "email": "cleo@example.com", "tags": ["interest:shoes"]},
        ),
        segment(ws, event="Viewed Pricing", userId="c1"),
    )
    found = await api.get("/api/v1/contacts", params={"q": "cleo"}, headers=h(ws))
    [contact] = found.json()
    cid = contact["id"]
    tags = await api.post(
        f"/api/v1/contacts/{cid}/tags", json={"add": ["interest:shoes"]}, headers=h(ws)
    )
    assert tags.json() == {"interest:shoes": 2}
    bad_tag = await api.post(
        f"/api/v1/contacts/{cid}/tags", json={"add": ["Shoes!"]}, headers=h(ws)
    )
    assert bad_tag.status_code == 422
    view = (await api.get(f"/api/v1/contacts/{cid}", headers=h(ws))).json()
    assert view["scores"] == {"lead": 20}
    assert {(b["rule_name"], b["points"]) for b in view["score_breakdown"]} == {("pricing", 10)}
    assert view["tags"][0]["tag"] == "interest:shoes"
    assert view["tags"][0]["tag_score"] == 2
    assert {i["kind"] for i in view["identities"]} >= {"user_id", "anonymous_id", "email"}
    assert [s["to_stage"] for s in view["stage_history"]] == ["lead"]
    assert len(view["timeline"]) == 3

    # a rule change applies to the future; recompute applies it to history, with progress
    await api.put(
        f"/api/v1/models/lead/rules/{rule_id}",
        json={
            "name": "pricing",
            "points": 20,
            "spec": {"kind": "behavioural", "event": "Viewed Pricing"},
        },
        headers=h(ws),
    )
    job = (await api.post("/api/v1/models/lead/recompute", headers=h(ws))).json()
    assert job["status"] == "pending"
    assert job["total"] == 1
    producer_settings = stack.settings
    producer = create_producer(producer_settings)
    await producer.start()
    try:
        while (await api.get(f"/api/v1/models/jobs/{job['id']}", headers=h(ws))).json()[
            "status"
        ] != "done":
            await run_job_step(
                sessionmaker,
                producer,
                producer_settings,
                now=datetime.fromisoformat(view["profile"]["last_seen_at"]),
            )
    finally:
        await producer.stop()
    done = (await api.get(f"/api/v1/models/jobs/{job['id']}", headers=h(ws))).json()
    assert (done["done"], done["total"]) == (1, 1)
    view = (await api.get(f"/api/v1/contacts/{cid}", headers=h(ws))).json()
    assert view["scores"] == {"lead": 40}
    assert view["stages"] == {"lead": "mql"}

    erased = await api.delete(f"/api/v1/contacts/{cid}", headers=h(ws))
    assert erased.status_code == 202
    assert (await api.get(f"/api/v1/contacts/{cid}", headers=h(ws))).status_code == 404
    async with transaction(sessionmaker) as session:
        left = await session.scalar(
            sa.select(sa.func.count())
            .select_from(store.events)
            .where(store.events.c.workspace_id == ws)
        )
    assert left == 0
    records = await read_topic(stack.settings, Topic.CONTACTS)
    erase_messages = [
        Envelope.decode(r.value) for r in records if r.value and ws.encode() in r.value
    ]
    assert [e.type for e in erase_messages if e.type == CONTACT_ERASED.name] == [
        CONTACT_ERASED.name
    ]
    # the tag endpoint published the change (the handler's outputs are not published here)
    tagged, recomputed = [
        CONTACT_UPDATED.parse(e) for e in erase_messages if e.type == CONTACT_UPDATED.name
    ]
    assert (tagged.changed, tagged.tags) == (["tags"], {"interest:shoes": 2})
    assert tagged.stages == {"lead": "lead"}
    assert (recomputed.changed, recomputed.tags) == (["scores", "stages"], tagged.tags)


async def _pages(api: httpx.AsyncClient, ws: str, path: str, **params: Any) -> list[list[Any]]:
    pages: list[list[Any]] = []
    after: str | None = None
    while True:
        answer = await api.get(
            path, params={**params, **({"after": after} if after else {})}, headers=h(ws)
        )
        assert answer.status_code == 200, answer.text
        pages.append(answer.json())
        after = answer.headers.get(NEXT_AFTER_HEADER)
        if after is None:
            return pages


async def test_models_and_contacts_are_listed_a_page_at_a_time(
    api: httpx.AsyncClient, ws: str, sessionmaker: SessionMaker
) -> None:
    for name in ("c", "a", "e", "b", "d"):
        assert (await api.put(f"/api/v1/models/{name}", json={}, headers=h(ws))).status_code == 200
    pages = await _pages(api, ws, "/api/v1/models", limit=2)
    assert [[m["name"] for m in page] for page in pages] == [["a", "b"], ["c", "d"], ["e"]]
    await apply(
        sessionmaker,
        *(
            segment(
                ws, "identify", userId=f"u{n}", traits={"company": "Acme" if n % 2 else "Other"}
            )
            for n in range(5)
        ),
    )
    acme = await _pages(api, ws, "/api/v1/contacts", q="acme", limit=1)
    ids = [contact["id"] for page in acme for contact in page]
    assert len(ids) == 2
    assert ids == sorted(ids, key=uuid.UUID)
    everyone = [
        c["id"] for page in await _pages(api, ws, "/api/v1/contacts", limit=2) for c in page
    ]
    assert len(everyone) == len(set(everyone)) == 5
    assert everyone == sorted(everyone, key=uuid.UUID)
    for path in ("/api/v1/models", "/api/v1/contacts"):
        bad = await api.get(path, params={"limit": 501}, headers=h(ws))
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["loc"] == ["query", "limit"]
