"""Write keys: public keys that sit in web pages and can only send events. They arrive in
the body (``writeKey``), as HTTP Basic (key as user name) or as a Bearer token."""

from __future__ import annotations

import base64
import binascii
import math
import time

from fastapi import Request

from nudge_common.db import SessionMaker, transaction
from nudge_ingest import store
from nudge_ingest.api.errors import IngestError
from nudge_ingest.domain.ratelimit import RateLimiter
from nudge_ingest.metrics import REQUESTS_REJECTED


class WriteKeyCache:
    """Write keys change rarely and are read on every request: keep each answer, found or
    not, for ``ttl_s`` seconds."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, store.WriteKey | None]] = {}

    async def get(self, key: str, sessionmaker: SessionMaker) -> store.WriteKey | None:
        now = time.monotonic()
        cached = self._entries.get(key)
        if cached and now - cached[0] < self.ttl_s:
            return cached[1]
        async with transaction(sessionmaker) as session:
            found = await store.get_write_key(session, key=key)
        self._entries[key] = (now, found)
        return found


def write_key_from_headers(request: Request) -> str | None:
    authorization = request.headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials:
        return credentials.strip()
    if scheme.lower() == "basic" and credentials:
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[0] or None
    return None


async def authenticate(
    request: Request,
    body_key: str | None,
    cache: WriteKeyCache,
    sessionmaker: SessionMaker,
    rate_limiter: RateLimiter | None = None,
) -> str:
    """The workspace the request writes to; 401 for a missing, unknown or disabled key, 429
    with ``Retry-After`` when the key is over its rate limit."""
    key = write_key_from_headers(request) or body_key
    if not key:
        REQUESTS_REJECTED.labels("unauthorized").inc()
        raise IngestError(401, "a write key is required", reason="unauthorized", field="writeKey")
    found = await cache.get(key, sessionmaker)
    if found is None or not found.enabled:
        REQUESTS_REJECTED.labels("unauthorized").inc()
        raise IngestError(
            401, "unknown or disabled write key", reason="unauthorized", field="writeKey"
        )
    if rate_limiter is not None:
        wait_s = rate_limiter.acquire(key, time.monotonic())
        if wait_s > 0:
            REQUESTS_REJECTED.labels("rate_limited").inc()
            raise IngestError(
                429,
                f"rate limit of {rate_limiter.rate:g} requests/s for this write key exceeded",
                reason="rate_limited",
                field="writeKey",
                headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
            )
    return found.workspace_id
