"""Contacts: search, the 360 view, tags, workspace settings, CSV import and export, and
GDPR erase."""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from nudge_common.db import transaction
from nudge_common.events import CONTACT_ERASED, CONTACT_UPDATED, ContactErased, Topic
from nudge_common.ids import stable_id
from nudge_common.internal_api import NEXT_AFTER_HEADER, PageLimit, SessionDep, WorkspaceDep
from nudge_common.kafka import OutgoingMessage, publish
from nudge_common.service import RuntimeDep
from nudge_scoring import store
from nudge_scoring.api.models import JobPublic, _job
from nudge_scoring.consumer import contact_updated
from nudge_scoring.domain import imports
from nudge_scoring.domain.profile import is_valid_tag
from nudge_scoring.worker import start_import

MAX_IMPORT_BYTES = 20 * 1024 * 1024
EXPORT_COLUMNS = (
    "id",
    "user_id",
    "email",
    "name",
    "phone",
    "company",
    "job_title",
    "country",
    "city",
    "language",
    "timezone",
    "first_seen_at",
    "last_seen_at",
    "orders_count",
    "revenue_total",
)

router = APIRouter(prefix="/api/v1", tags=["contacts"])


class SettingsPut(BaseModel):
    merge_on_email: bool


class TagsPost(BaseModel):
    add: list[str] = []
    remove: list[str] = []


def _profile(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "user_id": row.user_id,
        "name": row.name,
        "email": row.email,
        "traits": row.traits,
        "trait_sources": row.trait_sources,
        "first_touch": row.first_touch,
        "first_seen_at": row.first_seen_at,
        "last_seen_at": row.last_seen_at,
        "orders_count": row.orders_count,
        "revenue_total": float(row.revenue_total),
    }


@router.put("/settings")
async def put_settings(
    body: SettingsPut, workspace: WorkspaceDep, session: SessionDep
) -> SettingsPut:
    await store.put_workspace_settings(
        session, workspace_id=workspace, merge_on_email=body.merge_on_email
    )
    return body


@router.get(
    "/contacts", responses={200: {"headers": {NEXT_AFTER_HEADER: {"schema": {"type": "string"}}}}}
)
async def search(
    workspace: WorkspaceDep,
    session: SessionDep,
    response: Response,
    q: str | None = Query(default=None, max_length=200),
    tag: str | None = None,
    after: uuid.UUID | None = None,
    limit: PageLimit = 100,
) -> list[dict[str, Any]]:
    """Contacts whose name, email, user id or company contains ``q``, and/or with ``tag``,
    by id, a page at a time: ``after`` the last id seen; the ``X-Next-After`` header names
    it when there may be more."""
    c = store.contacts.c
    query = sa.select(store.contacts).where(c.workspace_id == workspace, c.merged_into.is_(None))
    if after is not None:
        query = query.where(c.id > after)
    if q:
        like = f"%{q}%"
        query = query.where(
            sa.or_(
                c.name.ilike(like),
                c.email.ilike(like),
                c.user_id.ilike(like),
                c.company.ilike(like),
            )
        )
    if tag:
        query = query.where(
            c.id.in_(
                sa.select(store.tags.c.contact_id).where(
                    store.tags.c.tag == tag, store.tags.c.active
                )
            )
        )
    rows = list(await session.execute(query.order_by(c.id).limit(limit)))
    if len(rows) == limit:
        response.headers[NEXT_AFTER_HEADER] = str(rows[-1].id)
    return [_profile(row) for row in rows]


async def _contact_or_404(session: SessionDep, workspace: str, contact_id: uuid.UUID) -> Any:
    row = (
        await session.execute(
            sa.select(store.contacts).where(
                store.contacts.c.id == contact_id, store.contacts.c.workspace_id == workspace
            )
        )
    ).first()
    if row is None:
        raise HTTPException(404, detail=f"no contact {contact_id}")
    if row.merged_into is not None:
        return await _contact_or_404(session, workspace, row.merged_into)
    return row


@router.get(
    "/contacts/export",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}}}},
)
async def export_contacts(workspace: WorkspaceDep, runtime: RuntimeDep) -> StreamingResponse:
    """Every contact of the workspace (merged ones are part of their survivor) as CSV: the
    profile columns, ``scores`` (JSON, per model) and ``tags`` (``|``-separated, active
    ones). Read a thousand contacts per query, streamed."""
    return StreamingResponse(
        _export_lines(runtime.sessionmaker, workspace),
        media_type="text/csv",
        headers={"Content-Disposition": 'attachment; filename="contacts.csv"'},
    )


@router.get("/contacts/{contact_id}")
async def contact_360(
    contact_id: uuid.UUID, workspace: WorkspaceDep, session: SessionDep
) -> dict[str, Any]:
    """Profile, identities, scores with their breakdown, tags with tag scores, lifecycle
    stages and their history, merges and the recent events timeline."""
    row = await _contact_or_404(session, workspace, contact_id)
    cid = row.id

    async def rows(query: sa.Select[Any]) -> list[dict[str, Any]]:
        return [dict(r._mapping) for r in await session.execute(query)]

    sc, t, sh, ev = store.score_changes, store.tags, store.stage_history, store.events
    return {
        "profile": _profile(row),
        "identities": await rows(
            sa.select(store.identities.c.kind, store.identities.c.value).where(
                store.identities.c.contact_id == cid
            )
        ),
        "scores": await store.scores_of(session, contact_id=cid),
        "score_breakdown": await rows(
            sa.select(
                sc.c.model,
                sc.c.rule_id,
                store.rules.c.name.label("rule_name"),
                sc.c.points,
                sc.c.reason,
                sc.c.message_id,
                sc.c.at,
            )
            .outerjoin(store.rules, store.rules.c.id == sc.c.rule_id)
            .where(sc.c.contact_id == cid)
            .order_by(sc.c.at.desc(), sc.c.id.desc())
            .limit(200)
        ),
        "tags": await rows(
            sa.select(t.c.tag, t.c.assignments.label("tag_score"), t.c.last_assigned_at)
            .where(t.c.contact_id == cid, t.c.active)
            .order_by(t.c.assignments.desc())
        ),
        "stages": await store.stages_of(session, contact_id=cid),
        "stage_history": await rows(
            sa.select(sh.c.model, sh.c.from_stage, sh.c.to_stage, sh.c.score, sh.c.at)
            .where(sh.c.contact_id == cid)
            .order_by(sh.c.id)
        ),
        "merged": await rows(
            sa.select(store.merges.c.merged_id, store.merges.c.reason, store.merges.c.at).where(
                store.merges.c.survivor_id == cid
            )
        ),
        "timeline": await rows(
            sa.select(ev.c.type, ev.c.name, ev.c.properties, ev.c.occurred_at, ev.c.message_id)
            .where(store.family(cid))
            .order_by(ev.c.occurred_at.desc())
            .limit(50)
        ),
    }


@router.post("/contacts/{contact_id}/tags")
async def tag(
    contact_id: uuid.UUID,
    body: TagsPost,
    workspace: WorkspaceDep,
    session: SessionDep,
    runtime: RuntimeDep,
) -> dict[str, int]:
    """Add and remove tags; returns the active tags with their tag scores. A change is
    published as ``contact.updated`` (``changed`` = ``tags``)."""
    for field, names in (("add", body.add), ("remove", body.remove)):
        for index, name in enumerate(names):
            if not is_valid_tag(name):
                raise RequestValidationError(
                    [
                        {
                            "loc": ["body", field, index],
                            "msg": f"{name!r} is not a tag name "
                            "(lower-case namespace:value, e.g. interest:shoes)",
                            "type": "value_error",
                        }
                    ]
                )
    row = await _contact_or_404(session, workspace, contact_id)
    at = datetime.now(UTC)
    # locked as the consumer locks it, so the published tags are the committed ones
    contact = (await store.lock_states(session, [row.id]))[row.id]
    await store.assign_tags(
        session, workspace_id=workspace, contact_id=row.id, add=body.add, remove=body.remove, at=at
    )
    if contact.tag(body.add, body.remove):
        envelope = CONTACT_UPDATED.envelope(
            workspace_id=workspace,
            payload=contact_updated(contact, ["tags"], None),
            occurred_at=at,
        )
        await publish(
            runtime.producer,
            runtime.settings,
            [OutgoingMessage(Topic.CONTACTS, str(row.id), envelope)],
        )
    return contact.tags


@router.delete("/contacts/{contact_id}", status_code=202)
async def erase(
    contact_id: uuid.UUID, workspace: WorkspaceDep, session: SessionDep, runtime: RuntimeDep
) -> dict[str, Any]:
    """GDPR erase: the contact, the contacts merged into it, their events and everything
    derived from them are deleted here, and ``contact.erased`` tells downstream services."""
    row = await _contact_or_404(session, workspace, contact_id)
    ids = [
        row.id,
        *(
            await session.execute(
                sa.select(store.contacts.c.id).where(store.contacts.c.merged_into == row.id)
            )
        ).scalars(),
    ]
    await store.erase_contacts(session, workspace_id=workspace, contact_ids=ids)
    at = datetime.now(UTC)
    erased = ContactErased(contact_id=row.id, contact_ids=ids, at=at)
    envelope = CONTACT_ERASED.envelope(
        workspace_id=workspace,
        payload=erased,
        occurred_at=at,
        id=stable_id(workspace, "erase", str(row.id)),
    )
    await publish(
        runtime.producer, runtime.settings, [OutgoingMessage(Topic.CONTACTS, str(row.id), envelope)]
    )
    return {"erased": [str(i) for i in ids]}


def _unprocessable(field: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ["body", field], "msg": message, "type": "value_error"}])


@router.post(
    "/contacts/import",
    status_code=202,
    openapi_extra={
        "requestBody": {"content": {"text/csv": {"schema": {"type": "string"}}}, "required": True}
    },
)
async def import_contacts(
    request: Request,
    workspace: WorkspaceDep,
    session: SessionDep,
    party: str = Query("first", description="data party of the imported traits"),
) -> JobPublic:
    """Import contacts from a CSV file (UTF-8, header line first; see
    ``nudge_scoring.domain.imports``). Returns a job: ``done``/``total`` are the progress,
    ``errors`` the refused rows with their line number and field. Re-importing a file
    changes nothing."""
    if not imports.valid_party(party):
        raise RequestValidationError(
            [{"loc": ["query", "party"], "msg": "zero, first, second or third", "type": "enum"}]
        )
    body = await request.body()
    if len(body) > MAX_IMPORT_BYTES:
        raise HTTPException(413, detail=f"at most {MAX_IMPORT_BYTES} bytes per import")
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise _unprocessable("csv", f"not UTF-8: {error}") from None
    try:
        imports.header(text)
    except (imports.CsvError, csv.Error) as error:
        raise _unprocessable("csv", str(error)) from None
    job_id = await start_import(session, workspace_id=workspace, text=text, party=party)
    return await _job(session, workspace, job_id)


@router.get("/contacts/imports/{job_id}")
async def import_progress(
    job_id: uuid.UUID, workspace: WorkspaceDep, session: SessionDep
) -> JobPublic:
    return await _job(session, workspace, job_id)


async def _export_lines(sessionmaker: Any, workspace: str) -> AsyncIterator[str]:
    yield _csv_line([*EXPORT_COLUMNS, "scores", "tags"])
    after: uuid.UUID | None = None
    while True:
        async with transaction(sessionmaker) as session:
            page = await store.export_page(session, workspace_id=workspace, after=after)
        if not page:
            return
        for row, scores, tags in page:
            values = [row[column] for column in EXPORT_COLUMNS]
            yield _csv_line([*values, json.dumps(scores, sort_keys=True), "|".join(sorted(tags))])
        after = page[-1][0]["id"]


def _csv_line(values: list[Any]) -> str:
    out = io.StringIO()
    csv.writer(out).writerow(["" if v is None else str(v) for v in values])
    return out.getvalue()
