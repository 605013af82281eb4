"""API keys of the workspace: list, create (the secret is shown once), revoke."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

from nudge_common.http import JsonResponse
from nudge_orchestrator import store
from nudge_orchestrator.api.deps import IdempotencyKey, Reader, SessionDep, Writer, idempotently

router = APIRouter(prefix="/api/v1/api-keys", tags=["api keys"])


class ApiKeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    scopes: list[Literal["read", "write", "send"]] = Field(min_length=1)


def public(key: store.ApiKey) -> dict[str, Any]:
    return {
        "id": str(key.id),
        "name": key.name,
        "prefix": key.prefix,
        "scopes": key.scopes,
        "created_at": key.created_at.isoformat(),
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
    }


@router.get("")
async def list_keys(db: SessionDep, principal: Reader) -> dict[str, Any]:
    keys = await store.list_api_keys(db, workspace_id=principal.workspace_id)
    return {"items": [public(k) for k in keys]}


@router.post("", status_code=201)
async def create_key(
    body: ApiKeyCreate,
    db: SessionDep,
    principal: Writer,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> JsonResponse:
    async def create() -> tuple[int, Any]:
        key, secret = await store.create_api_key(
            db, workspace_id=principal.workspace_id, name=body.name, scopes=sorted(set(body.scopes))
        )
        return 201, {**public(key), "secret": secret}

    return await idempotently(db, request, principal, idempotency_key, create)


@router.delete("/{key_id}", status_code=204)
async def revoke_key(key_id: uuid.UUID, db: SessionDep, principal: Writer) -> None:
    if not await store.revoke_api_key(
        db, workspace_id=principal.workspace_id, key_id=key_id, at=datetime.now(UTC)
    ):
        raise HTTPException(404, f"api key {key_id} not found")
