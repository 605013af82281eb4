from __future__ import annotations

from fastapi import Request

from nudge_common.http import JsonResponse


class IngestError(Exception):
    """Refuse a request with a Segment-style JSON body naming what was wrong."""

    def __init__(
        self,
        status_code: int,
        error: str,
        *,
        reason: str,
        field: str | None = None,
        details: list[dict[str, str | int]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(error)
        self.status_code = status_code
        self.error = error
        self.reason = reason
        self.field = field
        self.details = details
        self.headers = headers


async def ingest_error_handler(_: Request, exc: Exception) -> JsonResponse:
    assert isinstance(exc, IngestError)
    body: dict[str, object] = {"success": False, "error": exc.error}
    if exc.field:
        body["field"] = exc.field
    if exc.details:
        body["errors"] = exc.details
    return JsonResponse(body, status_code=exc.status_code, headers=exc.headers)
