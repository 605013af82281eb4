"""The segmenter's internal API: definitions validated with the path of the bad node,
preview, backfill progress, members and history, static lists."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from nudge_common.service import create_service_app
from nudge_segmenter.api import routers
from nudge_segmenter.settings import SegmenterSettings
from tests.conftest import StackHandle
from tests.services.segmenter.conftest import Segmenter


@pytest.fixture
async def api(
    stack: StackHandle, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[httpx.AsyncClient]:
    for name, value in stack.env.items():
        monkeypatch.setenv(name, value)
    app = create_service_app(settings=SegmenterSettings(), routers=routers)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://segmenter") as client:
            yield client


def h(segmenter: Segmenter) -> dict[str, str]:
    return {"X-Nudge-Workspace": segmenter.workspace_id}


HOT = {"kind": "score", "model": "lead", "op": "gte", "value": 10}


@pytest.mark.parametrize(
    ("condition", "loc", "message"),
    [
        (
            {"kind": "all", "conditions": [HOT, {"kind": "score", "model": "lead", "op": "about"}]},
            ["body", "condition", "all", "conditions", 1, "score", "op"],
            "Input should be",
        ),
        (
            {"kind": "not", "condition": {"kind": "segment", "segment_id": str(uuid.uuid4())}},
            ["body", "condition", "condition", "segment_id"],
            "no such segment or list",
        ),
        (
            {
                "kind": "event",
                "event": "A",
                "where": {"kind": "score", "model": "x", "op": "eq", "value": 1},
            },
            ["body", "condition", "event", "where"],
            "may only hold",
        ),
        (
            {"kind": "rfm_cell", "matrix": "rf", "cell": "kings"},
            ["body", "condition", "rfm_cell"],
            "unknown cell",
        ),
        (
            {"kind": "any", "conditions": [HOT] * 65},
            ["body", "condition"],
            "at most 64",
        ),
    ],
)
async def test_bad_definitions_get_a_422_naming_the_node(
    api: httpx.AsyncClient,
    segmenter: Segmenter,
    condition: dict[str, object],
    loc: list[object],
    message: str,
) -> None:
    answer = await api.post(
        "/api/v1/segments", json={"name": "bad", "condition": condition}, headers=h(segmenter)
    )
    assert answer.status_code == 422, answer.text
    errors = answer.json()["detail"]
    assert any(e["loc"][: len(loc)] == loc and message in e["msg"] for e in errors), errors


async def test_a_cycle_of_references_is_refused(
    api: httpx.AsyncClient, segmenter: Segmenter
) -> None:
    first = (
        await api.post(
            "/api/v1/segments", json={"name": "a", "condition": HOT}, headers=h(segmenter)
        )
    ).json()
    refers = {"kind": "segment", "segment_id": first["id"]}
    second = (
        await api.post(
            "/api/v1/segments", json={"name": "b", "condition": refers}, headers=h(segmenter)
        )
    ).json()
    answer = await api.patch(
        f"/api/v1/segments/{first['id']}",
        json={"condition": {"kind": "segment", "segment_id": second["id"]}},
        headers=h(segmenter),
    )
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["msg"] == "segment references form a cycle"


async def test_preview_create_backfill_progress_members_and_history(
    api: httpx.AsyncClient, segmenter: Segmenter
) -> None:
    contacts = sorted(uuid.uuid4() for _ in range(12))
    for index, contact_id in enumerate(contacts):
        await segmenter.update(contact_id, scores={"lead": index})
    preview = await api.post(
        "/api/v1/segments/preview", json={"condition": HOT, "sample": 3}, headers=h(segmenter)
    )
    assert preview.status_code == 200
    assert preview.json()["count"] == 2
    assert len(preview.json()["sample"]) == 2

    created = await api.post(
        "/api/v1/segments", json={"name": "hot", "condition": HOT}, headers=h(segmenter)
    )
    assert created.status_code == 201
    segment = created.json()
    assert segment["status"] == "backfilling"
    assert await segmenter.backfill() >= 1
    shown = (await api.get(f"/api/v1/segments/{segment['id']}", headers=h(segmenter))).json()
    assert shown["status"] == "active"
    assert shown["backfill"] == {"status": "active", "version": 1, "total": 2, "done": 2}
    assert shown["members"] == 2

    page = await api.get(
        f"/api/v1/segments/{segment['id']}/members", params={"limit": 1}, headers=h(segmenter)
    )
    first = page.json()
    assert len(first["members"]) == 1
    rest = await api.get(
        f"/api/v1/segments/{segment['id']}/members",
        params={"after": first["next_after"]},
        headers=h(segmenter),
    )
    assert sorted(first["members"] + rest.json()["members"]) == sorted(
        str(c) for c in contacts[10:]
    )
    internal = await api.get(
        f"/internal/v1/segments/{segment['id']}/members",
        params={"workspace_id": segmenter.workspace_id},
    )
    assert len(internal.json()["members"]) == 2

    # Editing redefines it: a new version, backfilled; the leaver's history closes.
    edited = await api.patch(
        f"/api/v1/segments/{segment['id']}",
        json={"condition": {**HOT, "value": 11}},
        headers=h(segmenter),
    )
    assert edited.json()["version"] == 2
    await segmenter.backfill()
    history = await api.get(
        f"/api/v1/segments/{segment['id']}/history",
        params={"contact_id": str(contacts[10])},
        headers=h(segmenter),
    )
    [stay] = history.json()["history"]
    assert stay["exited_at"] is not None

    other = await api.get(
        f"/api/v1/segments/{segment['id']}", headers={"X-Nudge-Workspace": "other"}
    )
    assert other.status_code == 404


async def test_static_list_members_by_hand(api: httpx.AsyncClient, segmenter: Segmenter) -> None:
    created = await api.post(
        "/api/v1/segments", json={"name": "press", "kind": "static"}, headers=h(segmenter)
    )
    assert created.json()["status"] == "active"
    list_id = created.json()["id"]
    people = [str(uuid.uuid4()) for _ in range(3)]
    added = await api.post(
        f"/api/v1/segments/{list_id}/members",
        json={"contact_ids": people, "action": "add"},
        headers=h(segmenter),
    )
    assert added.json() == {"changed": 3}
    again = await api.post(
        f"/api/v1/segments/{list_id}/members",
        json={"contact_ids": people[:1], "action": "add"},
        headers=h(segmenter),
    )
    assert again.json() == {"changed": 0}
    removed = await api.post(
        f"/api/v1/segments/{list_id}/members",
        json={"contact_ids": people[:1], "action": "remove"},
        headers=h(segmenter),
    )
    assert removed.json() == {"changed": 1}
    published = await segmenter.transitions(uuid.UUID(list_id), 4)
    assert sorted(published) == sorted(
        [*(("entered", uuid.UUID(p)) for p in people), ("exited", uuid.UUID(people[0]))]
    )
    bad = await api.post(
        f"/api/v1/segments/{list_id}/members",
        json={"contact_ids": ["nope"], "action": "add"},
        headers=h(segmenter),
    )
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["body", "contact_ids", 0]


async def test_segments_are_listed_a_page_at_a_time(
    api: httpx.AsyncClient, segmenter: Segmenter
) -> None:
    ids = sorted(uuid.uuid4() for _ in range(5))
    for n, segment_id in enumerate(ids):
        kind = "static" if n % 2 else "dynamic"
        body: dict[str, Any] = {"id": str(segment_id), "name": f"s{n}", "kind": kind}
        if kind == "dynamic":
            body["condition"] = HOT
        created = await api.post("/api/v1/segments", json=body, headers=h(segmenter))
        assert created.status_code == 201, created.text
    seen: list[str] = []
    after: str | None = None
    while True:
        params = {"limit": 2} | ({"after": after} if after else {})
        page = (await api.get("/api/v1/segments", params=params, headers=h(segmenter))).json()
        seen += [s["id"] for s in page["segments"]]
        after = page["next_after"]
        if after is None:
            break
    assert seen == [str(i) for i in ids]
    lists = await api.get(
        "/api/v1/segments", params={"kind": "static", "limit": 1}, headers=h(segmenter)
    )
    assert [s["id"] for s in lists.json()["segments"]] == [str(ids[1])]
    assert lists.json()["next_after"] == str(ids[1])
    everything = (await api.get("/api/v1/segments", headers=h(segmenter))).json()
    assert (len(everything["segments"]), everything["next_after"]) == (5, None)
    for limit in (0, 501):
        bad = await api.get("/api/v1/segments", params={"limit": limit}, headers=h(segmenter))
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["loc"] == ["query", "limit"]
