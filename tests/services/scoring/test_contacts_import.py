"""CSV import and export on the real database and broker: bad rows are reported with their
line and field while good rows are imported (through scoring's consumer, as identify calls),
progress is readable, importing the same file again changes nothing, export lists them."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from nudge_common.service import create_service_app
from nudge_scoring import store
from nudge_scoring.api import routers
from nudge_scoring.settings import ScoringSettings
from nudge_scoring.worker import run_job_step
from tests.conftest import StackHandle
from tests.services.scoring.conftest import ScoringHarness

CSV = """user_id,email,name,title,birthday,tags
u1,Ann@Example.com,Ann,CEO,1990-01-02,interest:shoes|vip:gold
u2,not-an-email,Bob,,,
,,Carl,,,
u4,dan@example.com,Dan,,1990-13-45,
u5,eve@example.com,Eve,,,Bad Tag
,frank@example.com,Frank,,,
"""


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


async def run_import(
    api: httpx.AsyncClient, scoring: ScoringHarness, ws: str, text: str
) -> dict[str, Any]:
    headers = {"X-Nudge-Workspace": ws, "Content-Type": "text/csv"}
    response = await api.post("/api/v1/contacts/import", content=text, headers=headers)
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["status"], job["total"], job["done"], job["kind"]) == ("pending", 6, 0, "import")
    for _ in range(50):  # other tests' jobs may come first; each step is one chunk
        progress = await api.get(f"/api/v1/contacts/imports/{job['id']}", headers=headers)
        if progress.json()["status"] == "done":
            break
        await run_job_step(
            scoring.sessionmaker, scoring.producer, scoring.settings, now=datetime.now(UTC)
        )
    await scoring.idle()
    result: dict[str, Any] = progress.json()
    return result


async def test_csv_import_reports_bad_rows_imports_good_ones_once_and_exports(
    api: httpx.AsyncClient, scoring: ScoringHarness, ws: str
) -> None:
    job = await run_import(api, scoring, ws, CSV)
    assert (job["status"], job["done"], job["total"]) == ("done", 6, 6)
    assert [(e["row"], e["field"]) for e in job["errors"]] == [
        (3, "email"),
        (4, "user_id"),
        (5, "birthday"),
        (6, "tags"),
    ]

    ann = await scoring.contact_of(ws, "user_id", "u1")
    frank = await scoring.contact_of(ws, "anonymous_id", "email:frank@example.com")
    (row,) = await scoring.rows(sa.select(store.contacts).where(store.contacts.c.id == ann))
    assert (row.name, row.email, row.job_title, str(row.birthday)) == (
        "Ann",
        "ann@example.com",
        "CEO",
        "1990-01-02",
    )
    assert row.first_touch["kind"] == "import"
    assert row.trait_sources["name"]["party"] == "first"

    async def state() -> tuple[Any, ...]:
        events = await scoring.rows(
            sa.select(sa.func.count()).where(store.event_ids.c.workspace_id == ws)
        )
        contacts = await scoring.rows(
            sa.select(sa.func.count()).where(store.contacts.c.workspace_id == ws)
        )
        tags = await scoring.rows(
            sa.select(store.tags.c.tag, store.tags.c.assignments).where(
                store.tags.c.contact_id == ann
            )
        )
        return events[0][0], contacts[0][0], sorted(tuple(t) for t in tags)

    assert await state() == (2, 2, [("interest:shoes", 1), ("vip:gold", 1)])
    again = await run_import(api, scoring, ws, CSV)
    assert len(again["errors"]) == 4
    assert await state() == (2, 2, [("interest:shoes", 1), ("vip:gold", 1)])

    export = await api.get("/api/v1/contacts/export", headers={"X-Nudge-Workspace": ws})
    assert export.status_code == 200
    assert export.headers["content-type"].startswith("text/csv")
    exported = {r["id"]: r for r in csv.DictReader(io.StringIO(export.text))}
    assert set(exported) == {str(ann), str(frank)}
    assert exported[str(ann)]["tags"] == "interest:shoes|vip:gold"
    assert exported[str(frank)]["email"] == "frank@example.com"


async def test_csv_import_refuses_a_file_it_cannot_read_naming_the_field(
    api: httpx.AsyncClient, ws: str
) -> None:
    headers = {"X-Nudge-Workspace": ws, "Content-Type": "text/csv"}
    no_identity = await api.post("/api/v1/contacts/import", content="name\nAnn\n", headers=headers)
    assert no_identity.status_code == 422
    assert no_identity.json()["detail"][0]["loc"] == ["body", "csv"]
    empty = await api.post("/api/v1/contacts/import", content="", headers=headers)
    assert empty.status_code == 422
    not_utf8 = await api.post("/api/v1/contacts/import", content=b"email\n\xff\n", headers=headers)
    assert not_utf8.status_code == 422
    bad_party = await api.post(
        "/api/v1/contacts/import?party=fourth", content="email\na@b.co\n", headers=headers
    )
    assert bad_party.status_code == 422
    assert bad_party.json()["detail"][0]["loc"] == ["query", "party"]
