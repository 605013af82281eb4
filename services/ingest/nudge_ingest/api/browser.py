"""What browsers load from ingest: the settings document analytics.js asks for, and Nudge's
own first-party tracker, ``/js/nudge.js``."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response

from nudge_common.service import RuntimeDep
from nudge_ingest.api.deps import IngestStateDep
from nudge_ingest.api.errors import IngestError
from nudge_ingest.domain.network import forwarded_scheme
from nudge_ingest.domain.project_settings import settings_document

TRACKER = Path(__file__).resolve().parents[1] / "static" / "nudge.js"

router = APIRouter(tags=["browser"])


@router.get("/v1/projects/{write_key}/settings", responses={404: {"description": "unknown key"}})
async def project_settings(
    write_key: str, request: Request, runtime: RuntimeDep, state: IngestStateDep
) -> dict[str, Any]:
    """The settings document analytics.js loads at start (Segment's CDN settings), naming
    this ingest as the API host: load analytics.js with ``cdnURL`` pointing here."""
    found = await state.write_keys.get(write_key, runtime.sessionmaker)
    if found is None or not found.enabled:
        raise IngestError(
            404, "unknown or disabled write key", reason="unauthorized", field="writeKey"
        )
    peer = request.client.host if request.client else None
    scheme = (
        forwarded_scheme(
            peer,
            forwarded_proto=request.headers.get("x-forwarded-proto"),
            trusted_proxies=state.settings.trusted_proxies,
        )
        or request.url.scheme
    )
    api_host = state.settings.public_api_host or f"{request.headers.get('host', 'localhost')}/v1"
    return settings_document(write_key=write_key, api_host=api_host, protocol=scheme)


@cache
def _tracker_source() -> bytes:
    return TRACKER.read_bytes()


@router.get("/js/nudge.js", include_in_schema=False)
async def tracker() -> Response:
    """The first-party browser tracker (plain JavaScript, no build step)."""
    return Response(
        _tracker_source(),
        media_type="application/javascript",
        headers={"Cache-Control": "public, max-age=300"},
    )
