"""Broadcasts: a one-off send of a template on a channel to a segment or static list, now
or at ``send_at``, paced by ``rate_per_s``; or an A/B broadcast (``ab_test``): its variants
to a test fraction of the members, then the winner to the rest.

A broadcast runs as a hidden workflow (same id) per member, started by the broadcast
worker as it pages through the members the segmenter serves: the frequency caps and quiet
hours of the workspace, the notifier's suppression and consent, sends, deliveries and
analytics are those of any workflow. States: ``scheduled`` -> ``sending`` -> ``sent``
(A/B: ``scheduled`` -> ``testing`` -> ``deciding`` -> ``sending`` -> ``sent``);
``cancelled`` (by ``POST .../cancel``); ``failed`` (the segment no longer exists).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

import httpx
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import AwareDatetime, BaseModel, Field

from nudge_common.clock import clock_from
from nudge_common.events import Channel
from nudge_common.http import JsonResponse
from nudge_common.service import RuntimeDep
from nudge_orchestrator import segmenter, store
from nudge_orchestrator.api.deps import (
    IdempotencyKey,
    PageDep,
    Reader,
    Sender,
    SessionDep,
    idempotently,
    paged,
)
from nudge_orchestrator.domain import analytics, broadcasts
from nudge_orchestrator.domain.broadcasts import ABTest, BroadcastGoal
from nudge_orchestrator.settings import OrchestratorSettings

router = APIRouter(prefix="/api/v1/broadcasts", tags=["broadcasts"])

Status = Literal["scheduled", "testing", "deciding", "sending", "sent", "cancelled", "failed"]
RUNNING = ("scheduled", "testing", "deciding", "sending")


class BroadcastCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    channel: Channel
    template_id: uuid.UUID | None = None
    """The message; absent for an A/B broadcast (its variants name theirs)."""
    ab_test: ABTest | None = None
    """Variants for a test fraction of the members, then the winner for the rest."""
    goal: BroadcastGoal | None = None
    """A conversion: performing the event within ``window_s`` of the message."""
    segment_id: uuid.UUID
    """A segment or a static list (the segmenter serves the members of both)."""
    send_at: AwareDatetime | None = None
    """When to start; now when absent or past."""
    rate_per_s: float | None = Field(default=None, gt=0, le=100_000)
    """At most this many members a second (none: as fast as it goes)."""


class BroadcastUpdate(BaseModel):
    """What may change before a broadcast is over: its name; ``send_at`` while it is
    scheduled; ``rate_per_s`` (null: as fast as it goes). The audience, the message and
    the A/B test stay what they were."""

    name: str | None = Field(default=None, min_length=1, max_length=200)
    send_at: AwareDatetime | None = None
    rate_per_s: float | None = Field(default=None, gt=0, le=100_000)


def public(broadcast: store.Broadcast) -> dict[str, Any]:
    def at(value: Any) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "id": str(broadcast.id),
        "name": broadcast.name,
        "channel": broadcast.channel,
        "template_id": str(broadcast.template_id) if broadcast.template_id else None,
        "segment_id": str(broadcast.segment_id),
        "send_at": at(broadcast.send_at),
        "rate_per_s": broadcast.rate_per_s,
        "goal": broadcast.goal,
        "ab_test": broadcast.ab_test,
        "status": broadcast.status,
        "members": broadcast.members,
        "test_members": broadcast.test_members,
        "tested_at": at(broadcast.tested_at),
        "winner": broadcast.decision["winner"] if broadcast.decision else None,
        "decision": broadcast.decision,
        "last_error": broadcast.last_error,
        "created_at": at(broadcast.created_at),
        "started_at": at(broadcast.started_at),
        "finished_at": at(broadcast.finished_at),
    }


def _settings(runtime: RuntimeDep) -> OrchestratorSettings:
    settings = runtime.settings
    assert isinstance(settings, OrchestratorSettings)
    return settings


def _invalid(loc: str | tuple[str | int, ...], msg: str) -> RequestValidationError:
    path = (loc,) if isinstance(loc, str) else loc
    return RequestValidationError([{"loc": ("body", *path), "msg": msg, "type": "value_error"}])


async def _check_template(
    db: SessionDep,
    workspace_id: str,
    template_id: uuid.UUID,
    channel: str,
    loc: tuple[str | int, ...],
) -> None:
    template = await store.get_template(db, workspace_id=workspace_id, template_id=template_id)
    if template is None:
        raise _invalid(loc, f"unknown template {template_id}")
    if template.channel != channel:
        raise _invalid(loc, f"the template is for {template.channel}, not {channel}")


async def get_or_404(
    db: SessionDep, workspace_id: str, broadcast_id: uuid.UUID, *, lock: bool = False
) -> store.Broadcast:
    broadcast = await store.get_broadcast(
        db, workspace_id=workspace_id, broadcast_id=broadcast_id, lock=lock
    )
    if broadcast is None:
        raise HTTPException(404, f"broadcast {broadcast_id} not found")
    return broadcast


@router.get("")
async def list_broadcasts(
    db: SessionDep, principal: Reader, p: PageDep, status: Annotated[Status | None, Query()] = None
) -> dict[str, Any]:
    items, total = await store.list_broadcasts(
        db, workspace_id=principal.workspace_id, status=status, limit=p.limit, offset=p.offset
    )
    return paged([public(b) for b in items], total, p)


@router.post("", status_code=201)
async def create_broadcast(
    body: BroadcastCreate,
    db: SessionDep,
    principal: Sender,
    runtime: RuntimeDep,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> JsonResponse:
    """Schedule a broadcast (``send`` scope): ``template_id``, or ``ab_test``. Templates
    must exist for the channel and the segment or list in the workspace (asked of the
    segmenter: 503 when ``NUDGE_SEGMENTER_URL`` is unset, 502 when it does not answer);
    the metric ``converted`` needs a ``goal``."""
    settings = _settings(runtime)
    workspace_id = principal.workspace_id
    if (body.template_id is None) == (body.ab_test is None):
        raise _invalid("template_id", "give template_id, or ab_test with its variants (not both)")
    if body.template_id is not None:
        await _check_template(db, workspace_id, body.template_id, body.channel, ("template_id",))
    if body.ab_test is not None:
        for i, variant in enumerate(body.ab_test.variants):
            loc = ("ab_test", "variants", i, "template_id")
            await _check_template(db, workspace_id, variant.template_id, body.channel, loc)
        if body.ab_test.metric == "converted" and body.goal is None:
            raise _invalid("goal", "the metric 'converted' needs a goal (event, window_s)")

    async def create() -> tuple[int, Any]:
        if not settings.segmenter_url:
            raise HTTPException(503, "segmenter_url: NUDGE_SEGMENTER_URL is not set")
        try:
            async with httpx.AsyncClient() as client:
                await segmenter.members(
                    client,
                    settings.segmenter_url,
                    workspace_id=principal.workspace_id,
                    segment_id=body.segment_id,
                    after=None,
                    limit=1,
                )
        except segmenter.SegmentNotFound as error:
            raise _invalid("segment_id", str(error).removeprefix("segment_id: ")) from error
        except segmenter.SegmenterUnavailable as error:
            raise HTTPException(502, str(error)) from error
        now = clock_from(settings.clock_file)()
        broadcast = await store.create_broadcast(
            db,
            broadcast_id=uuid.uuid4(),
            workspace_id=principal.workspace_id,
            name=body.name,
            channel=body.channel,
            template_id=body.template_id,
            segment_id=body.segment_id,
            send_at=max(body.send_at or now, now),
            rate_per_s=body.rate_per_s,
            goal=body.goal,
            ab_test=body.ab_test,
        )
        return 201, public(broadcast)

    return await idempotently(db, request, principal, idempotency_key, create)


@router.get("/{broadcast_id}")
async def get_broadcast(
    broadcast_id: uuid.UUID, db: SessionDep, principal: Reader
) -> dict[str, Any]:
    return public(await get_or_404(db, principal.workspace_id, broadcast_id))


@router.patch("/{broadcast_id}")
async def update_broadcast(
    broadcast_id: uuid.UUID,
    body: BroadcastUpdate,
    db: SessionDep,
    principal: Sender,
    runtime: RuntimeDep,
) -> dict[str, Any]:
    """Rename, reschedule (while ``scheduled``) or re-pace a broadcast that is not over
    (409 otherwise)."""
    broadcast = await get_or_404(db, principal.workspace_id, broadcast_id, lock=True)
    if broadcast.status not in RUNNING:
        raise HTTPException(409, f"status: a {broadcast.status} broadcast cannot change")
    if body.send_at is not None and broadcast.status != "scheduled":
        raise HTTPException(409, f"send_at: a {broadcast.status} broadcast has started")
    now = clock_from(_settings(runtime).clock_file)()
    await store.update_broadcast(
        db,
        broadcast_id=broadcast_id,
        name=body.name,
        send_at=max(body.send_at, now) if body.send_at is not None else None,
        rate_per_s=body.rate_per_s,
        pace="rate_per_s" in body.model_fields_set,
    )
    return public(await get_or_404(db, principal.workspace_id, broadcast_id))


@router.post("/{broadcast_id}/cancel")
async def cancel_broadcast(
    broadcast_id: uuid.UUID, db: SessionDep, principal: Sender, runtime: RuntimeDep
) -> dict[str, Any]:
    """Stop a broadcast not over yet: no more members (an A/B broadcast not decided yet
    gets no winner), and messages still waiting for the end of quiet hours are dropped.
    Messages already requested go on."""
    broadcast = await get_or_404(db, principal.workspace_id, broadcast_id, lock=True)
    if broadcast.status not in RUNNING:
        raise HTTPException(409, f"status: a {broadcast.status} broadcast cannot be cancelled")
    await store.cancel_broadcast(
        db, broadcast_id=broadcast_id, at=clock_from(_settings(runtime).clock_file)()
    )
    return public(await get_or_404(db, principal.workspace_id, broadcast_id))


@router.get("/{broadcast_id}/analytics")
async def broadcast_analytics(
    broadcast_id: uuid.UUID, db: SessionDep, principal: Reader
) -> dict[str, Any]:
    """As a workflow's: members (entered), completed, converted (with a goal), messages
    requested, sent, delivered, opened, clicked, unsubscribed, bounced, complained; open
    rate, CTR and conversion rate. An A/B broadcast adds ``ab_test`` (per variant of the
    test, the live z-test, the winner once chosen) and ``remainder`` (the members who got
    the winner)."""
    broadcast = await get_or_404(db, principal.workspace_id, broadcast_id)
    counts = await store.workflow_counts(db, workflow_id=broadcast_id)
    head = {"broadcast_id": str(broadcast_id), "status": broadcast.status}
    ab = broadcast.ab()
    if ab is None:
        report = analytics.report(counts.runs, counts.sends, counts.deliveries)
        for key in ("steps", "variants", "ab_test"):
            report.pop(key)
        return {**head, **report}
    total, per_variant = broadcasts.results(counts.runs, counts.sends, counts.deliveries)
    winner = broadcast.decision["winner"] if broadcast.decision else None
    return {
        **head,
        **total,
        "ab_test": broadcasts.ab_report(ab, per_variant, broadcast.decision),
        "remainder": {"variant": winner, **per_variant[None]} if None in per_variant else None,
    }
