"""Segments and static lists: define, preview, follow a backfill, list members and
history, add to or remove from a list."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Query, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.clock import clock_from
from nudge_common.conditions import Condition, condition_adapter
from nudge_common.internal_api import PageLimit, SessionDep, WorkspaceDep
from nudge_common.kafka import OutgoingMessage, publish
from nudge_common.service import RuntimeDep
from nudge_segmenter import store
from nudge_segmenter.consumer import apply_list_change
from nudge_segmenter.domain.segments import problems
from nudge_segmenter.evaluation import Cause
from nudge_segmenter.settings import SegmenterSettings
from nudge_segmenter.sql import compile_condition

router = APIRouter(prefix="/api/v1", tags=["segments"])
internal = APIRouter(prefix="/internal/v1", tags=["segments (service to service)"])

MAX_PAGE = 5000


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SegmentIn(_Body):
    id: uuid.UUID | None = None
    """Optional: a client-chosen id makes creation idempotent."""
    name: str = Field(min_length=1, max_length=200)
    kind: Literal["dynamic", "static"] = "dynamic"
    condition: Condition | None = None


class SegmentPatch(_Body):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    condition: Condition | None = None


class PreviewIn(_Body):
    condition: Condition
    sample: int = Field(default=10, ge=0, le=100)


class ListChangeIn(_Body):
    contact_ids: list[uuid.UUID] = Field(min_length=1, max_length=MAX_PAGE)
    action: Literal["add", "remove"]


class Progress(BaseModel):
    status: str
    version: int
    total: int | None
    done: int


class SegmentOut(BaseModel):
    id: uuid.UUID
    name: str
    kind: str
    condition: dict[str, Any] | None
    status: str
    version: int
    backfill: Progress
    created_at: datetime | None
    updated_at: datetime | None
    members: int | None = None


def _out(segment: store.Segment, members: int | None = None) -> SegmentOut:
    return SegmentOut(
        id=segment.id,
        name=segment.name,
        kind=segment.kind,
        condition=None
        if segment.condition is None
        else condition_adapter.dump_python(segment.condition, mode="json"),
        status=segment.status,
        version=segment.version,
        backfill=Progress(
            status=segment.status,
            version=segment.version,
            total=segment.backfill_total,
            done=segment.backfill_done,
        ),
        created_at=segment.created_at,
        updated_at=segment.updated_at,
        members=members,
    )


def _unprocessable(loc: tuple[str | int, ...], message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ["body", *loc], "msg": message, "type": "value_error"}])


async def _check(
    session: AsyncSession, workspace_id: str, segment_id: uuid.UUID, condition: Condition
) -> None:
    others = {
        s.id: s.condition
        for s in await store.list_segments(session, workspace_id=workspace_id, live_only=False)
        if s.id != segment_id and s.status != "archived"
    }
    found = problems(condition, segment_id=segment_id, others=others)
    if found:
        raise RequestValidationError(
            [{"loc": ["body", *p.loc], "msg": p.message, "type": "value_error"} for p in found]
        )


async def _get(session: AsyncSession, workspace_id: str, segment_id: uuid.UUID) -> store.Segment:
    segment = await store.get_segment(session, workspace_id=workspace_id, segment_id=segment_id)
    if segment is None:
        raise HTTPException(404, detail=f"segment_id: no segment or list {segment_id}")
    return segment


@router.post("/segments", status_code=status.HTTP_201_CREATED)
async def create_segment(
    body: SegmentIn, session: SessionDep, workspace: WorkspaceDep
) -> SegmentOut:
    if body.kind == "dynamic" and body.condition is None:
        raise _unprocessable(("condition",), "a dynamic segment needs a condition")
    if body.kind == "static" and body.condition is not None:
        raise _unprocessable(("condition",), "a static list has no condition")
    segment_id = body.id or uuid.uuid4()
    existing = await store.get_segment(session, workspace_id=workspace, segment_id=segment_id)
    if existing is not None:
        if existing.name == body.name and existing.condition == body.condition:
            return _out(existing)
        raise HTTPException(409, detail=f"id: segment {segment_id} exists with another definition")
    if body.condition is not None:
        await _check(session, workspace, segment_id, body.condition)
    await store.create_segment(
        session,
        workspace_id=workspace,
        segment_id=segment_id,
        name=body.name,
        condition=body.condition,
        kind=body.kind,
        status="backfilling" if body.kind == "dynamic" else "active",
    )
    return _out(await _get(session, workspace, segment_id))


@router.get("/segments")
async def list_segments(
    session: SessionDep,
    workspace: WorkspaceDep,
    kind: Literal["dynamic", "static"] | None = None,
    after: uuid.UUID | None = None,
    limit: PageLimit = 100,
) -> dict[str, Any]:
    """By id, a page at a time: ``after`` the last id seen (``next_after`` when there may
    be more). A workspace's segments are all evaluated in memory, so they are few."""
    found = sorted(
        (
            s
            for s in await store.list_segments(session, workspace_id=workspace, live_only=False)
            if (kind is None or s.kind == kind) and (after is None or s.id > after)
        ),
        key=lambda s: s.id,
    )[:limit]
    return {
        "segments": [_out(s) for s in found],
        "next_after": found[-1].id if len(found) == limit else None,
    }


@router.get("/segments/{segment_id}")
async def get_segment(
    segment_id: uuid.UUID, session: SessionDep, workspace: WorkspaceDep
) -> SegmentOut:
    segment = await _get(session, workspace, segment_id)
    return _out(segment, await store.member_count(session, segment_id=segment_id))


@router.patch("/segments/{segment_id}")
async def edit_segment(
    segment_id: uuid.UUID, body: SegmentPatch, session: SessionDep, workspace: WorkspaceDep
) -> SegmentOut:
    segment = await _get(session, workspace, segment_id)
    if segment.status == "archived":
        raise HTTPException(409, detail="segment_id: an archived segment cannot be edited")
    if body.condition is not None:
        if segment.kind == "static":
            raise _unprocessable(("condition",), "a static list has no condition")
        await _check(session, workspace, segment_id, body.condition)
    redefined = body.condition is not None and body.condition != segment.condition
    await store.update_segment(
        session,
        segment_id=segment_id,
        name=body.name,
        condition=body.condition if redefined else None,
        status="backfilling" if redefined else None,
        new_version=redefined,
    )
    return _out(await _get(session, workspace, segment_id))


@router.delete("/segments/{segment_id}")
async def archive_segment(
    segment_id: uuid.UUID, session: SessionDep, workspace: WorkspaceDep
) -> SegmentOut:
    """Archive: no longer evaluated; its memberships and history stay for analytics."""
    await _get(session, workspace, segment_id)
    await store.update_segment(session, segment_id=segment_id, status="archived")
    await session.execute(
        sa.delete(store.rechecks).where(store.rechecks.c.segment_id == segment_id)
    )
    return _out(await _get(session, workspace, segment_id))


@router.post("/segments/preview")
async def preview(
    body: PreviewIn, session: SessionDep, workspace: WorkspaceDep, runtime: RuntimeDep
) -> dict[str, Any]:
    """How many contacts match a condition now, and a sample of them, without saving."""
    await _check(session, workspace, uuid.uuid4(), body.condition)
    settings = runtime.settings
    assert isinstance(settings, SegmenterSettings)
    compiled = compile_condition(body.condition, clock_from(settings.clock_file)())
    where = sa.and_(store.contacts.c.workspace_id == workspace, compiled.matches)
    count = await session.scalar(sa.select(sa.func.count()).where(where))
    sample = await session.execute(
        sa.select(store.contacts.c.contact_id, store.contacts.c.user_id, store.contacts.c.traits)
        .where(where)
        .order_by(store.contacts.c.contact_id)
        .limit(body.sample)
    )
    return {
        "count": count or 0,
        "sample": [
            {"contact_id": row.contact_id, "user_id": row.user_id, "traits": row.traits}
            for row in sample
        ],
    }


async def _members(
    session: AsyncSession,
    workspace: str,
    segment_id: uuid.UUID,
    after: uuid.UUID | None,
    limit: int,
) -> dict[str, Any]:
    await _get(session, workspace, segment_id)
    members = await store.members_page(session, segment_id=segment_id, after=after, limit=limit)
    return {"members": members, "next_after": members[-1] if len(members) == limit else None}


Limit = Annotated[int, Query(ge=1, le=MAX_PAGE)]


@router.get("/segments/{segment_id}/members")
async def members(
    segment_id: uuid.UUID,
    session: SessionDep,
    workspace: WorkspaceDep,
    after: uuid.UUID | None = None,
    limit: Limit = 1000,
) -> dict[str, Any]:
    """Current members by contact id, a page at a time (``after`` the last one seen)."""
    return await _members(session, workspace, segment_id, after, limit)


@internal.get("/segments/{segment_id}/members")
async def members_for_services(
    segment_id: uuid.UUID,
    session: SessionDep,
    workspace_id: Annotated[str, Query(min_length=1, max_length=200)],
    after: uuid.UUID | None = None,
    limit: Limit = 1000,
) -> dict[str, Any]:
    """The same pages, for the orchestrator's broadcasts (workspace in the query)."""
    return await _members(session, workspace_id, segment_id, after, limit)


@router.get("/segments/{segment_id}/history")
async def history(
    segment_id: uuid.UUID,
    session: SessionDep,
    workspace: WorkspaceDep,
    contact_id: uuid.UUID | None = None,
    limit: Limit = 100,
) -> dict[str, Any]:
    """Entries and exits, newest first."""
    await _get(session, workspace, segment_id)
    rows = await store.history_of(
        session, segment_id=segment_id, contact_id=contact_id, limit=limit
    )
    return {
        "history": [
            {"contact_id": r.contact_id, "entered_at": r.entered_at, "exited_at": r.exited_at}
            for r in rows
        ]
    }


@router.post("/segments/{segment_id}/members")
async def change_list(
    segment_id: uuid.UUID,
    body: ListChangeIn,
    session: SessionDep,
    workspace: WorkspaceDep,
    runtime: RuntimeDep,
) -> dict[str, int]:
    """Add contacts to a static list or remove them (by hand or an import); each real
    change is published like a segment's transition."""
    segment = await _get(session, workspace, segment_id)
    if segment.kind != "static" or segment.status == "archived":
        raise HTTPException(409, detail="segment_id: only a live static list takes members by hand")
    settings = runtime.settings
    assert isinstance(settings, SegmenterSettings)
    now = clock_from(settings.clock_file)()
    messages: list[OutgoingMessage] = []
    request = uuid.uuid4()
    for contact_id in dict.fromkeys(body.contact_ids):
        messages += await apply_list_change(
            session,
            segment,
            contact_id=contact_id,
            add=body.action == "add",
            now=now,
            cause=Cause(work=f"list:{request}"),
        )
    await publish(runtime.producer, settings, messages)
    changed = sum(1 for m in messages if m.envelope.payload["segment_id"] == str(segment_id))
    return {"changed": changed}
