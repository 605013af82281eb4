"""Workflows: CRUD of drafts, publish (a new immutable version), pause, resume, archive,
simulate for a contact, and start a run by API call.

A definition is checked twice: its shape by pydantic, its graph (unknown step ids, unknown
templates, cycles, unreachable steps) by the domain; both answer 422 naming the field."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.conditions import Profile
from nudge_common.http import JsonResponse
from nudge_common.kafka import publish
from nudge_common.service import RuntimeDep
from nudge_orchestrator import execution, store
from nudge_orchestrator.api.deps import (
    IdempotencyKey,
    PageDep,
    Reader,
    Sender,
    SessionDep,
    Writer,
    idempotently,
    paged,
)
from nudge_orchestrator.domain import analytics
from nudge_orchestrator.domain.workflows import (
    Context,
    Problem,
    WorkflowDefinition,
    problems,
    simulate,
)

router = APIRouter(prefix="/api/v1/workflows", tags=["workflows"])

Status = Literal["draft", "active", "paused", "archived"]


class WorkflowCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    definition: WorkflowDefinition
    publish: bool = False


class WorkflowUpdate(BaseModel):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    definition: WorkflowDefinition | None = None


class SimulationEvent(BaseModel):
    event: str = Field(min_length=1)
    at: datetime


class Simulation(BaseModel):
    contact_id: uuid.UUID | None = None
    traits: dict[str, Any] = Field(default_factory=dict)
    scores: dict[str, int] = Field(default_factory=dict)
    events: list[SimulationEvent] = Field(default_factory=list)
    at: datetime | None = None


class RunCreate(BaseModel):
    contact_id: uuid.UUID
    traits: dict[str, Any] = Field(default_factory=dict)


def public(workflow: store.Workflow) -> dict[str, Any]:
    return {
        "id": str(workflow.id),
        "name": workflow.name,
        "status": workflow.status,
        "version": workflow.version,
        "definition": workflow.definition.model_dump(mode="json", by_alias=True, exclude_none=True),
        "created_at": workflow.created_at.isoformat(),
        "updated_at": workflow.updated_at.isoformat(),
    }


async def check(db: AsyncSession, workspace_id: str, definition: WorkflowDefinition) -> None:
    found = problems(definition, await store.template_ids(db, workspace_id=workspace_id))
    if definition.trigger.kind == "broadcast":
        found.append(Problem(("trigger", "kind"), "broadcasts are made with /api/v1/broadcasts"))
    if found:
        raise RequestValidationError(
            [
                {"loc": ("body", "definition", *p.loc), "msg": p.msg, "type": "value_error"}
                for p in found
            ]
        )


async def get_or_404(db: AsyncSession, workspace_id: str, workflow_id: uuid.UUID) -> store.Workflow:
    """A workflow of the workspace; a broadcast's own is the broadcast's business."""
    workflow = await store.get_workflow(db, workspace_id=workspace_id, workflow_id=workflow_id)
    if workflow is None or workflow.definition.trigger.kind == "broadcast":
        raise HTTPException(404, f"workflow {workflow_id} not found")
    return workflow


@router.get("")
async def list_workflows(
    db: SessionDep, principal: Reader, p: PageDep, status: Annotated[Status | None, Query()] = None
) -> dict[str, Any]:
    items, total = await store.list_workflows(
        db, workspace_id=principal.workspace_id, status=status, limit=p.limit, offset=p.offset
    )
    return paged([public(w) for w in items], total, p)


@router.post("", status_code=201)
async def create_workflow(
    body: WorkflowCreate,
    db: SessionDep,
    principal: Writer,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> JsonResponse:
    await check(db, principal.workspace_id, body.definition)

    async def create() -> tuple[int, Any]:
        workflow_id = uuid.uuid4()
        await store.create_workflow(
            db,
            workspace_id=principal.workspace_id,
            workflow_id=workflow_id,
            name=body.name,
            definition=body.definition,
            publish=body.publish,
        )
        return 201, public(await get_or_404(db, principal.workspace_id, workflow_id))

    return await idempotently(db, request, principal, idempotency_key, create)


@router.get("/{workflow_id}")
async def get_workflow(workflow_id: uuid.UUID, db: SessionDep, principal: Reader) -> dict[str, Any]:
    return public(await get_or_404(db, principal.workspace_id, workflow_id))


@router.patch("/{workflow_id}")
async def update_workflow(
    workflow_id: uuid.UUID, body: WorkflowUpdate, db: SessionDep, principal: Writer
) -> dict[str, Any]:
    workflow = await get_or_404(db, principal.workspace_id, workflow_id)
    if workflow.status == "archived":
        raise HTTPException(409, "status: an archived workflow cannot change")
    if body.definition is not None:
        await check(db, principal.workspace_id, body.definition)
    await store.update_workflow(
        db, workflow_id=workflow_id, name=body.name, definition=body.definition
    )
    return public(await get_or_404(db, principal.workspace_id, workflow_id))


@router.get("/{workflow_id}/analytics")
async def workflow_analytics(
    workflow_id: uuid.UUID,
    db: SessionDep,
    principal: Reader,
    alpha: Annotated[float, Query(gt=0, lt=0.5)] = 0.05,
) -> dict[str, Any]:
    """Entered, completed, converted; messages requested, sent, delivered, opened, clicked,
    unsubscribed, bounced; open rate, CTR, conversion rate: in total, per step (the runs
    that executed it) and per split variant, with the A/B verdict (two-proportion z-test
    on conversions)."""
    await get_or_404(db, principal.workspace_id, workflow_id)
    counts = await store.workflow_counts(db, workflow_id=workflow_id)
    step_runs = await store.step_counts(db, workflow_id=workflow_id)
    return {
        "workflow_id": str(workflow_id),
        **analytics.report(counts.runs, counts.sends, counts.deliveries, alpha, step_runs),
    }


@router.post("/{workflow_id}/publish")
async def publish_workflow(
    workflow_id: uuid.UUID, db: SessionDep, principal: Writer
) -> dict[str, Any]:
    workflow = await get_or_404(db, principal.workspace_id, workflow_id)
    if workflow.status == "archived":
        raise HTTPException(409, "status: an archived workflow cannot be published")
    await check(db, principal.workspace_id, workflow.definition)
    await store.publish_workflow(db, workflow_id=workflow_id)
    return public(await get_or_404(db, principal.workspace_id, workflow_id))


async def _move(
    db: AsyncSession, workspace_id: str, workflow_id: uuid.UUID, to: str, allowed: set[str]
) -> dict[str, Any]:
    workflow = await get_or_404(db, workspace_id, workflow_id)
    if workflow.status not in allowed:
        raise HTTPException(409, f"status: a {workflow.status} workflow cannot become {to}")
    await store.update_workflow(db, workflow_id=workflow_id, status=to)
    if to == "archived":
        await store.cancel_runs(db, workflow_id=workflow_id, at=datetime.now(UTC))
    return public(await get_or_404(db, workspace_id, workflow_id))


@router.post("/{workflow_id}/pause")
async def pause(workflow_id: uuid.UUID, db: SessionDep, principal: Writer) -> dict[str, Any]:
    """No new runs start; runs in flight go on."""
    return await _move(db, principal.workspace_id, workflow_id, "paused", {"active", "paused"})


@router.post("/{workflow_id}/resume")
async def resume(workflow_id: uuid.UUID, db: SessionDep, principal: Writer) -> dict[str, Any]:
    return await _move(db, principal.workspace_id, workflow_id, "active", {"paused", "active"})


@router.post("/{workflow_id}/archive")
async def archive(workflow_id: uuid.UUID, db: SessionDep, principal: Writer) -> dict[str, Any]:
    """No new runs; runs in flight are cancelled (their waits dropped)."""
    return await _move(
        db,
        principal.workspace_id,
        workflow_id,
        "archived",
        {"draft", "active", "paused", "archived"},
    )


@router.post("/{workflow_id}/simulate")
async def simulate_workflow(
    workflow_id: uuid.UUID, body: Simulation, db: SessionDep, principal: Reader
) -> dict[str, Any]:
    """The path a run of the current definition would take for this contact; nothing is
    sent or stored. Waits elapse; ``events`` say what the contact does and when."""
    workflow = await get_or_404(db, principal.workspace_id, workflow_id)
    traits, scores = body.traits, body.scores
    if body.contact_id is not None:
        known = await store.get_contact(db, contact_id=body.contact_id)
        if known is not None:
            traits, scores = {**known["traits"], **traits}, {**known["scores"], **scores}
    contact_id = body.contact_id or uuid.uuid4()
    ctx = Context(
        run_id=uuid.uuid4(),
        contact_id=contact_id,
        workflow_id=workflow_id,
        now=body.at or datetime.now(UTC),
        profile=Profile(traits, scores),
        timezone=traits.get("timezone") if isinstance(traits.get("timezone"), str) else None,
    )
    path = simulate(workflow.definition, ctx, [(e.event, e.at) for e in body.events])
    return {
        "path": [
            {
                "step": v.step,
                "id": v.id,
                "kind": v.kind,
                "outcome": v.outcome,
                "at": v.at.isoformat(),
            }
            for v in path
        ]
    }


@router.post("/{workflow_id}/runs", status_code=201)
async def start_run(
    workflow_id: uuid.UUID,
    body: RunCreate,
    db: SessionDep,
    principal: Sender,
    runtime: RuntimeDep,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> JsonResponse:
    """The API-call trigger: start a run of the published version for one contact."""
    workflow = await get_or_404(db, principal.workspace_id, workflow_id)
    if workflow.status != "active" or workflow.version == 0:
        raise HTTPException(409, f"status: the workflow is {workflow.status}, not active")

    async def create() -> tuple[int, Any]:
        definition = await store.version_definition(
            db, workflow_id=workflow_id, version=workflow.version
        )
        known = await store.get_contact(db, contact_id=body.contact_id)
        contact = known or {"traits": body.traits, "scores": {}}
        out = execution.Outputs()
        run_id = await execution.enter(
            db,
            out,
            workflow=store.Published(
                workflow_id, principal.workspace_id, workflow.version, definition
            ),
            contact_id=body.contact_id,
            contact=contact,
            cause=f"api:{idempotency_key or uuid.uuid4()}",
            now=datetime.now(UTC),
        )
        await publish(runtime.producer, runtime.settings, out.messages)
        if run_id is None:
            return 409, {"detail": "contact_id: the entry rule does not let this contact in now"}
        return 201, {"run_id": str(run_id), "requested": len(out.messages)}

    return await idempotently(db, request, principal, idempotency_key, create)
