"""What the HTTP providers (SMS, push) share: one httpx client and how an answer maps to
the two kinds of failure."""

from __future__ import annotations

import httpx

from nudge_notifier.providers.base import PermanentFailure, TransientFailure

GONE = frozenset({404, 410})


async def post(client: httpx.AsyncClient, url: str, **kwargs: object) -> httpx.Response:
    """POST, mapping failures that certainly left the request unprocessed: connection
    refused or a 429/5xx answer are transient, any other 4xx is permanent. A timeout or a
    connection lost after the request went out propagates: the outcome is unknown."""
    try:
        response = await client.post(url, **kwargs)  # type: ignore[arg-type]
    except (httpx.ConnectError, httpx.ConnectTimeout) as error:
        raise TransientFailure(f"cannot connect: {error!r}") from error
    if response.status_code == 429 or response.status_code >= 500:
        raise TransientFailure(f"HTTP {response.status_code}: {response.text[:300]}")
    if response.status_code >= 400:
        raise PermanentFailure(
            f"HTTP {response.status_code}: {response.text[:300]}",
            hard_bounce=response.status_code in GONE,
            status=response.status_code,
        )
    return response
