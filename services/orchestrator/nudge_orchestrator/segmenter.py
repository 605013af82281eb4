"""The segmenter's internal API, as the orchestrator reads it: the members of a segment or
static list, a page at a time, ordered by contact id.

``GET {NUDGE_SEGMENTER_URL}/internal/v1/segments/{id}/members?workspace_id=&after=&limit=``
answers ``{"members": [contact ids], "next_after": id | null}`` (null: no more pages), or
404 when the workspace has no such segment or list.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import httpx

MAX_PAGE = 5000
TIMEOUT_S = 30.0


class SegmentNotFound(Exception):
    """The workspace has no such segment or list."""


class SegmenterUnavailable(Exception):
    """Unset, unreachable, or answering something else than the contract: try later."""


@dataclass(frozen=True)
class Page:
    members: list[uuid.UUID]
    next_after: uuid.UUID | None


async def members(
    client: httpx.AsyncClient,
    base_url: str | None,
    *,
    workspace_id: str,
    segment_id: uuid.UUID,
    after: uuid.UUID | None,
    limit: int,
) -> Page:
    if not base_url:
        raise SegmenterUnavailable("segmenter_url: NUDGE_SEGMENTER_URL is not set")
    params: dict[str, str | int] = {"workspace_id": workspace_id, "limit": min(limit, MAX_PAGE)}
    if after is not None:
        params["after"] = str(after)
    url = f"{base_url.rstrip('/')}/internal/v1/segments/{segment_id}/members"
    try:
        answer = await client.get(url, params=params, timeout=TIMEOUT_S)
    except httpx.HTTPError as error:
        raise SegmenterUnavailable(f"segmenter: unreachable ({type(error).__name__})") from error
    if answer.status_code == 404:
        raise SegmentNotFound(f"segment_id: no segment or list {segment_id} in this workspace")
    if not answer.is_success:
        raise SegmenterUnavailable(f"segmenter: HTTP {answer.status_code}")
    try:
        body = answer.json()
        following = body.get("next_after")
        return Page(
            [uuid.UUID(member) for member in body["members"]],
            uuid.UUID(following) if following else None,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise SegmenterUnavailable(f"segmenter: unexpected answer ({error!r})") from error
