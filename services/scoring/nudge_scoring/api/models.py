"""Scoring models (with their lifecycle stages) and their rules."""

from __future__ import annotations

import re
import uuid
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field

from nudge_common.internal_api import NEXT_AFTER_HEADER, PageLimit, SessionDep, WorkspaceDep
from nudge_scoring import store
from nudge_scoring.domain.profile import COMMON_TRAITS
from nudge_scoring.domain.rules import ProfileSpec, Rule, RuleSpec, Stage
from nudge_scoring.worker import start_recompute

router = APIRouter(prefix="/api/v1/models", tags=["scoring models"])
NAME = r"^[a-z0-9][a-z0-9_-]{0,63}$"


class ModelPut(BaseModel):
    description: str = ""
    stages: list[Stage] = Field(default_factory=list)


class ModelPublic(ModelPut):
    name: str


class RuleCreate(BaseModel):
    name: str = ""
    points: int = Field(ge=-10_000, le=10_000)
    spec: RuleSpec


class RulePublic(RuleCreate):
    id: uuid.UUID
    model: str


class JobPublic(BaseModel):
    id: uuid.UUID
    status: str
    total: int
    done: int
    kind: str = "recompute"
    errors: list[dict[str, Any]] = []
    """Import jobs: the refused rows, each with ``row`` (line in the file), ``field``
    and ``message``."""


async def _model_or_404(session: SessionDep, workspace: str, name: str) -> store.Model:
    for model in await store.list_models(session, workspace_id=workspace):
        if model.name == name:
            return model
    raise HTTPException(404, detail=f"no scoring model named {name!r}")


@router.get("", responses={200: {"headers": {NEXT_AFTER_HEADER: {"schema": {"type": "string"}}}}})
async def list_models(
    workspace: WorkspaceDep,
    session: SessionDep,
    response: Response,
    after: str | None = None,
    limit: PageLimit = 100,
) -> list[ModelPublic]:
    """By name, a page at a time: ``after`` the last name seen; the ``X-Next-After``
    header names it when there may be more."""
    m = store.models.c
    query = sa.select(store.models).where(m.workspace_id == workspace)
    if after is not None:
        query = query.where(m.name > after)
    rows = list(await session.execute(query.order_by(m.name).limit(limit)))
    if len(rows) == limit:
        response.headers[NEXT_AFTER_HEADER] = rows[-1].name
    return [ModelPublic(name=r.name, description=r.description, stages=r.stages) for r in rows]


@router.put("/{name}")
async def put_model(
    name: str, body: ModelPut, workspace: WorkspaceDep, session: SessionDep
) -> ModelPublic:
    if not re.match(NAME, name):
        raise RequestValidationError(
            [{"loc": ["path", "name"], "msg": f"must match {NAME}", "type": "value_error"}]
        )
    await store.put_model(
        session, workspace_id=workspace, name=name, description=body.description, stages=body.stages
    )
    return ModelPublic(name=name, **body.model_dump())


@router.delete("/{name}", status_code=204)
async def delete_model(name: str, workspace: WorkspaceDep, session: SessionDep) -> None:
    if not await store.delete_model(session, workspace_id=workspace, name=name):
        raise HTTPException(404, detail=f"no scoring model named {name!r}")


@router.get("/{name}/rules")
async def list_rules(name: str, workspace: WorkspaceDep, session: SessionDep) -> list[RulePublic]:
    await _model_or_404(session, workspace, name)
    rules = await store.list_rules(session, workspace_id=workspace, model=name)
    return [RulePublic(id=r.id, model=r.model, points=r.points, spec=r.definition) for r in rules]


async def _check_fields(session: SessionDep, workspace: str, body: RuleCreate) -> None:
    """A profile rule must name a trait that exists: a common trait or one some contact of
    the workspace has."""
    if not isinstance(body.spec, ProfileSpec):
        return
    trait = body.spec.trait.split(".", 1)[0]
    if trait in COMMON_TRAITS or trait in ("firstName", "lastName", "job_title", "address"):
        return
    known = await session.scalar(
        sa.select(sa.literal(True))
        .where(store.contacts.c.workspace_id == workspace, store.contacts.c.traits.has_key(trait))
        .limit(1)
    )
    if not known:
        raise RequestValidationError(
            [
                {
                    "loc": ["body", "spec", "trait"],
                    "msg": f"no contact of this workspace has a trait {trait!r}",
                    "type": "value_error.missing_field",
                }
            ]
        )


@router.post("/{name}/rules", status_code=201)
async def create_rule(
    name: str, body: RuleCreate, workspace: WorkspaceDep, session: SessionDep
) -> RulePublic:
    await _model_or_404(session, workspace, name)
    await _check_fields(session, workspace, body)
    rule = Rule(uuid.uuid4(), name, getattr(body.spec, "event", None), body.points, body.spec)
    await store.create_rule(session, workspace_id=workspace, rule=rule, name=body.name)
    return RulePublic(id=rule.id, model=name, **body.model_dump())


@router.put("/{name}/rules/{rule_id}")
async def update_rule(
    name: str, rule_id: uuid.UUID, body: RuleCreate, workspace: WorkspaceDep, session: SessionDep
) -> RulePublic:
    """Applies to future events only; POST ``/recompute`` applies it to history."""
    await _check_fields(session, workspace, body)
    rule = Rule(rule_id, name, getattr(body.spec, "event", None), body.points, body.spec)
    if not await store.update_rule(session, workspace_id=workspace, rule=rule, name=body.name):
        raise HTTPException(404, detail=f"no rule {rule_id}")
    return RulePublic(id=rule_id, model=name, **body.model_dump())


@router.delete("/{name}/rules/{rule_id}", status_code=204)
async def delete_rule(
    name: str, rule_id: uuid.UUID, workspace: WorkspaceDep, session: SessionDep
) -> None:
    if not await store.delete_rule(session, workspace_id=workspace, rule_id=rule_id):
        raise HTTPException(404, detail=f"no rule {rule_id}")


@router.post("/{name}/recompute", status_code=202)
async def recompute(name: str, workspace: WorkspaceDep, session: SessionDep) -> JobPublic:
    """Recompute the model's scores over the stored history, in the background."""
    await _model_or_404(session, workspace, name)
    job_id = await start_recompute(session, workspace_id=workspace, model=name)
    return await _job(session, workspace, job_id)


@router.get("/jobs/{job_id}")
async def job(job_id: uuid.UUID, workspace: WorkspaceDep, session: SessionDep) -> JobPublic:
    return await _job(session, workspace, job_id)


async def _job(session: SessionDep, workspace: str, job_id: uuid.UUID) -> JobPublic:
    row: Any = (
        await session.execute(
            sa.select(store.jobs).where(
                store.jobs.c.id == job_id, store.jobs.c.workspace_id == workspace
            )
        )
    ).first()
    if row is None:
        raise HTTPException(404, detail=f"no job {job_id}")
    return JobPublic(
        id=row.id,
        status=row.status,
        total=row.total,
        done=row.done,
        kind=row.kind,
        errors=row.errors,
    )
