"""Authentication, pagination and idempotency for the marketers' API.

A secret API key (``Authorization: Bearer nsk_...``) belongs to one workspace and carries
scopes: ``read`` (GET), ``write`` (definitions), ``send`` (starting runs, sending). Missing
or unknown (or revoked) key: 401; a key without the route's scope: 403. Objects of another
workspace are not found (404), never forbidden, so ids cannot be probed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, HTTPException, Query, Request
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.db import transaction
from nudge_common.http import JsonResponse
from nudge_common.service import RuntimeDep
from nudge_orchestrator import store


async def session(runtime: RuntimeDep) -> AsyncIterator[AsyncSession]:
    async with transaction(runtime.sessionmaker) as db:
        yield db


# scope="function": the transaction commits before the response is sent, so a client that
# got 201 finds the object in its next request.
SessionDep = Annotated[AsyncSession, Depends(session, scope="function")]


@dataclass(frozen=True)
class Principal:
    workspace_id: str
    key_id: str
    scopes: frozenset[str]


def requires(scope: str) -> Callable[..., Awaitable[Principal]]:
    async def authenticate(
        db: SessionDep, authorization: Annotated[str | None, Header()] = None
    ) -> Principal:
        scheme, _, secret = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secret:
            raise HTTPException(
                401,
                "authorization: send a secret API key as 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        key = await store.api_key_by_secret(db, secret=secret.strip())
        if key is None:
            raise HTTPException(
                401,
                "authorization: unknown or revoked API key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if scope not in key.scopes:
            raise HTTPException(403, f"authorization: this key lacks the '{scope}' scope")
        return Principal(key.workspace_id, str(key.id), frozenset(key.scopes))

    return authenticate


Reader = Annotated[Principal, Depends(requires("read"))]
Writer = Annotated[Principal, Depends(requires("write"))]
Sender = Annotated[Principal, Depends(requires("send"))]


@dataclass(frozen=True)
class Page:
    limit: int
    offset: int


def page(
    limit: Annotated[int, Query(ge=1, le=200)] = 50, offset: Annotated[int, Query(ge=0)] = 0
) -> Page:
    return Page(limit, offset)


PageDep = Annotated[Page, Depends(page)]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]


def paged(items: list[Any], total: int, p: Page) -> dict[str, Any]:
    return {"items": items, "total": total, "limit": p.limit, "offset": p.offset}


async def idempotently(
    db: AsyncSession,
    request: Request,
    principal: Principal,
    key: str | None,
    create: Callable[[], Awaitable[tuple[int, Any]]],
) -> JsonResponse:
    """Run ``create`` once per (workspace, Idempotency-Key): a retry gets the first
    response again; the same key on another route is a 409."""
    name = f"{request.method} {request.url.path}"
    if key is not None:
        found = await store.idempotent_response(db, workspace_id=principal.workspace_id, key=key)
        if found is not None:
            if found[0] != name:
                raise HTTPException(409, f"Idempotency-Key: already used for {found[0]}")
            return JsonResponse(
                found[2], status_code=found[1], headers={"Idempotent-Replayed": "true"}
            )
    status_code, body = await create()
    if key is not None and not await store.remember_response(
        db,
        workspace_id=principal.workspace_id,
        key=key,
        request=name,
        status_code=status_code,
        body=body,
    ):
        raise HTTPException(409, "Idempotency-Key: a request with this key is in progress")
    return JsonResponse(body, status_code=status_code)
