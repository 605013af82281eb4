"""The public face of what scoring and the notifier own: an authenticated pass-through.

The orchestrator checks the key and its scope (``read`` for GET, ``write`` otherwise),
then forwards the request to the owner's internal ``/api/v1`` with the key's workspace (a
client's own ``X-Nudge-Workspace`` header is dropped: the workspace comes from the key
only), and answers with the owner's status and body unchanged, so a 422 still names the
field. The owners stay the only writers of their tables. A POST with an ``Idempotency-Key``
is forwarded once per (workspace, key): the key is reserved first, and the owner's 2xx
answer is kept and replayed to a retry (``Idempotent-Replayed: true``), as for the
orchestrator's own POSTs.

* scoring (``NUDGE_SCORING_URL``, workspace in the ``X-Nudge-Workspace`` header):
  ``/api/v1/contacts...`` (search, 360 view, tags, import, erase) and
  ``/api/v1/models...`` (scoring models and rules);
* segmenter (``NUDGE_SEGMENTER_URL``, workspace in the ``X-Nudge-Workspace`` header):
  ``/api/v1/segments...`` (segments and static lists, preview, members, history) and
  ``/api/v1/contacts/{id}/segments``; the 360 view ``GET /api/v1/contacts/{id}`` is
  scoring's with ``segments`` and ``value`` (RFM, CLV) from the segmenter added;
* notifier (``NUDGE_NOTIFIER_URL``, workspace in the path
  ``/api/v1/workspaces/{workspace}/...``): ``/api/v1/suppressions...``,
  ``/api/v1/consents...``, ``/api/v1/hygiene...``.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import quote

import httpx
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError

from nudge_common import codec
from nudge_common.db import transaction
from nudge_common.http import JsonResponse
from nudge_common.internal_api import NEXT_AFTER_HEADER
from nudge_common.service import RuntimeDep
from nudge_orchestrator import store
from nudge_orchestrator.api.deps import Principal, requires
from nudge_orchestrator.settings import OrchestratorSettings

router = APIRouter(prefix="/api/v1", tags=["contacts, scoring, segments and suppression (fronted)"])
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
FORWARDED_HEADERS = ("content-type", "accept", "idempotency-key")
RETURNED_HEADERS = ("content-type", "location", NEXT_AFTER_HEADER.lower())
TIMEOUT_S = 30.0
STALE_S = 2 * TIMEOUT_S
"""A key reserved longer ago than this belongs to a request that died: a retry takes it."""

Authenticated = Annotated[Principal, Depends(requires("read"))]


def _scope(request: Request, principal: Principal) -> None:
    if request.method != "GET" and "write" not in principal.scopes:
        raise HTTPException(403, "authorization: this key lacks the 'write' scope")


async def _forward(
    request: Request, base: str | None, owner: str, path: str, headers: dict[str, str]
) -> Response:
    if not base:
        raise HTTPException(
            503, f"{owner}_url: NUDGE_{owner.upper()}_URL is not set on the orchestrator"
        )
    for name in FORWARDED_HEADERS:
        if name in request.headers:
            headers[name] = request.headers[name]
    try:
        async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S) as client:
            answer = await client.request(
                request.method,
                path,
                params=list(request.query_params.multi_items()),
                content=await request.body(),
                headers=headers,
            )
    except httpx.TransportError as error:
        raise HTTPException(502, f"{owner}: unreachable ({type(error).__name__})") from error
    kept = {k: v for k, v in answer.headers.items() if k.lower() in RETURNED_HEADERS}
    return Response(answer.content, status_code=answer.status_code, headers=kept)


async def _once(
    request: Request,
    principal: Principal,
    runtime: RuntimeDep,
    forward: Callable[[], Awaitable[Response]],
) -> Response:
    """``forward``, at most once per Idempotency-Key of a POST: a retry gets the first 2xx
    answer again; the same key on another route, or while the first is in flight, is a
    409; an answer other than 2xx frees the key (nothing to replay)."""
    key = request.headers.get("idempotency-key")
    if request.method != "POST" or key is None:
        return await forward()
    if not 0 < len(key) <= 200:
        raise RequestValidationError(
            [
                {
                    "loc": ("header", "Idempotency-Key"),
                    "msg": "1 to 200 characters",
                    "type": "value_error",
                }
            ]
        )
    name = f"POST {request.url.path}"
    workspace_id = principal.workspace_id
    async with transaction(runtime.sessionmaker) as db:
        found = await store.reserve_idempotency_key(
            db,
            workspace_id=workspace_id,
            key=key,
            request=name,
            now=datetime.now(UTC),
            stale_s=STALE_S,
        )
    if found is not None:
        used_for, status_code, body = found
        if used_for != name:
            raise HTTPException(409, f"Idempotency-Key: already used for {used_for}")
        if status_code == store.IN_PROGRESS:
            raise HTTPException(409, "Idempotency-Key: a request with this key is in progress")
        return JsonResponse(body, status_code=status_code, headers={"Idempotent-Replayed": "true"})
    kept: tuple[int, Any] | None = None
    try:
        answer = await forward()
        if 200 <= answer.status_code < 300:
            try:
                kept = (answer.status_code, codec.loads(bytes(answer.body)))
            except ValueError:
                kept = None  # not JSON: nothing to replay
        return answer
    finally:
        async with transaction(runtime.sessionmaker) as db:
            await store.settle_idempotency_key(
                db,
                workspace_id=workspace_id,
                key=key,
                status_code=kept[0] if kept else None,
                body=kept[1] if kept else None,
            )


def _settings(runtime: RuntimeDep) -> OrchestratorSettings:
    settings = runtime.settings
    assert isinstance(settings, OrchestratorSettings)
    return settings


@router.get("/contacts/{contact_id}", include_in_schema=False)
async def contact_360(
    contact_id: uuid.UUID, request: Request, principal: Authenticated, runtime: RuntimeDep
) -> Response:
    """Scoring's 360 view, with the segments the contact is in and its customer value
    (RFM, CLV) from the segmenter when it knows the contact."""
    settings = _settings(runtime)
    workspace = {"X-Nudge-Workspace": principal.workspace_id}
    answer = await _forward(request, settings.scoring_url, "scoring", request.url.path, workspace)
    if answer.status_code != 200 or not settings.segmenter_url:
        return answer
    view = codec.loads(bytes(answer.body))
    try:
        async with httpx.AsyncClient(base_url=settings.segmenter_url, timeout=TIMEOUT_S) as client:
            extra = await client.get(f"/api/v1/contacts/{contact_id}/segments", headers=workspace)
    except httpx.TransportError:
        view["segments"] = None  # the segmenter is unreachable: the view without it
        return JsonResponse(view)
    known = extra.json() if extra.status_code == 200 else {}
    view["segments"] = known.get("segments", [])
    view["value"] = known.get("value")
    return JsonResponse(view)


@router.get("/contacts/{contact_id}/segments", include_in_schema=False)
async def contact_segments(
    request: Request, principal: Authenticated, runtime: RuntimeDep
) -> Response:
    return await _forward(
        request,
        _settings(runtime).segmenter_url,
        "segmenter",
        request.url.path,
        {"X-Nudge-Workspace": principal.workspace_id},
    )


@router.api_route("/contacts{rest:path}", methods=METHODS, include_in_schema=False)
@router.api_route("/models{rest:path}", methods=METHODS, include_in_schema=False)
async def scoring(request: Request, principal: Authenticated, runtime: RuntimeDep) -> Response:
    _scope(request, principal)
    return await _once(
        request,
        principal,
        runtime,
        lambda: _forward(
            request,
            _settings(runtime).scoring_url,
            "scoring",
            request.url.path,
            {"X-Nudge-Workspace": principal.workspace_id},
        ),
    )


@router.api_route("/segments{rest:path}", methods=METHODS, include_in_schema=False)
async def segmenter(request: Request, principal: Authenticated, runtime: RuntimeDep) -> Response:
    _scope(request, principal)
    return await _once(
        request,
        principal,
        runtime,
        lambda: _forward(
            request,
            _settings(runtime).segmenter_url,
            "segmenter",
            request.url.path,
            {"X-Nudge-Workspace": principal.workspace_id},
        ),
    )


@router.api_route("/suppressions{rest:path}", methods=METHODS, include_in_schema=False)
@router.api_route("/consents{rest:path}", methods=METHODS, include_in_schema=False)
@router.api_route("/hygiene{rest:path}", methods=METHODS, include_in_schema=False)
async def notifier(request: Request, principal: Authenticated, runtime: RuntimeDep) -> Response:
    _scope(request, principal)
    rest = request.url.path.removeprefix("/api/v1")
    workspace = quote(principal.workspace_id, safe="")
    return await _once(
        request,
        principal,
        runtime,
        lambda: _forward(
            request,
            _settings(runtime).notifier_url,
            "notifier",
            f"/api/v1/workspaces/{workspace}{rest}",
            {},
        ),
    )
