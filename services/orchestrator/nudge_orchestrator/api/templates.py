"""Message templates (create, list by channel, read, replace, delete). The notifier owns
them (it renders and sends): the API validates a template, keeps what it announced (so
workflows can refer to it) and announces each change on the compacted config topic as
``template.defined``, which the notifier applies."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, model_validator

from nudge_common.events import TEMPLATE_DEFINED, Channel, TemplateDefined, Topic
from nudge_common.http import JsonResponse
from nudge_common.kafka import OutgoingMessage, publish
from nudge_common.service import RuntimeDep
from nudge_orchestrator import store
from nudge_orchestrator.api.deps import (
    IdempotencyKey,
    PageDep,
    Reader,
    SessionDep,
    Writer,
    idempotently,
    paged,
)

router = APIRouter(prefix="/api/v1/templates", tags=["templates"])


class TemplateCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    channel: Channel
    subject: str = Field(default="", max_length=998)
    html: str = Field(default="", max_length=500_000)
    text: str = Field(default="", max_length=100_000)
    topic: str = Field(default="marketing", min_length=1, max_length=100)

    @model_validator(mode="after")
    def has_content(self) -> TemplateCreate:
        if self.channel == "email" and not self.subject:
            raise ValueError("subject: an email template needs a subject")
        if not self.text and not self.html:
            raise ValueError("text: a template needs text (or html for email)")
        return self


def public(row: Any) -> dict[str, Any]:
    return {
        "id": str(row.id),
        "name": row.name,
        "channel": row.channel,
        **row.definition,
        "created_at": row.created_at.isoformat(),
        "updated_at": row.updated_at.isoformat(),
    }


async def announce(runtime: RuntimeDep, workspace_id: str, event: TemplateDefined) -> None:
    envelope = TEMPLATE_DEFINED.envelope(
        workspace_id=workspace_id, payload=event, occurred_at=datetime.now(UTC)
    )
    await publish(
        runtime.producer,
        runtime.settings,
        [OutgoingMessage(Topic.CONFIG, key=str(event.template_id), envelope=envelope)],
    )


@router.get("")
async def list_templates(
    db: SessionDep,
    principal: Reader,
    p: PageDep,
    channel: Annotated[Channel | None, Query()] = None,
) -> dict[str, Any]:
    rows, total = await store.list_templates(
        db, workspace_id=principal.workspace_id, channel=channel, limit=p.limit, offset=p.offset
    )
    return paged([public(r) for r in rows], total, p)


@router.post("", status_code=201)
async def create_template(
    body: TemplateCreate,
    db: SessionDep,
    principal: Writer,
    runtime: RuntimeDep,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> JsonResponse:
    async def create() -> tuple[int, Any]:
        template_id = uuid.uuid4()
        definition = body.model_dump(exclude={"name", "channel"})
        await store.put_template(
            db,
            workspace_id=principal.workspace_id,
            template_id=template_id,
            name=body.name,
            channel=body.channel,
            definition=definition,
        )
        await announce(
            runtime,
            principal.workspace_id,
            TemplateDefined(template_id=template_id, **body.model_dump()),
        )
        row = await store.get_template(
            db, workspace_id=principal.workspace_id, template_id=template_id
        )
        return 201, public(row)

    return await idempotently(db, request, principal, idempotency_key, create)


@router.get("/{template_id}")
async def get_template(template_id: uuid.UUID, db: SessionDep, principal: Reader) -> dict[str, Any]:
    row = await store.get_template(db, workspace_id=principal.workspace_id, template_id=template_id)
    if row is None:
        raise HTTPException(404, f"template {template_id} not found")
    return public(row)


@router.put("/{template_id}")
async def replace_template(
    template_id: uuid.UUID,
    body: TemplateCreate,
    db: SessionDep,
    principal: Writer,
    runtime: RuntimeDep,
) -> dict[str, Any]:
    """Change a template (the whole of it): messages rendered from now on use the new
    definition. Its channel stays (workflows and broadcasts send it on that channel)."""
    row = await store.get_template(db, workspace_id=principal.workspace_id, template_id=template_id)
    if row is None:
        raise HTTPException(404, f"template {template_id} not found")
    if body.channel != row.channel:
        raise RequestValidationError(
            [
                {
                    "loc": ("body", "channel"),
                    "msg": f"a template keeps its channel ({row.channel})",
                    "type": "value_error",
                }
            ]
        )
    await store.put_template(
        db,
        workspace_id=principal.workspace_id,
        template_id=template_id,
        name=body.name,
        channel=body.channel,
        definition=body.model_dump(exclude={"name", "channel"}),
    )
    await announce(
        runtime,
        principal.workspace_id,
        TemplateDefined(template_id=template_id, **body.model_dump()),
    )
    return public(
        await store.get_template(db, workspace_id=principal.workspace_id, template_id=template_id)
    )


@router.delete("/{template_id}", status_code=204)
async def delete_template(
    template_id: uuid.UUID, db: SessionDep, principal: Writer, runtime: RuntimeDep
) -> None:
    row = await store.get_template(db, workspace_id=principal.workspace_id, template_id=template_id)
    if row is None:
        raise HTTPException(404, f"template {template_id} not found")
    await store.delete_template(db, template_id=template_id, at=datetime.now(UTC))
    await announce(
        runtime,
        principal.workspace_id,
        TemplateDefined(template_id=template_id, name=row.name, channel=row.channel, deleted=True),
    )
