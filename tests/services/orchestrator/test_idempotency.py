"""Idempotency keys reserved for requests whose effect is elsewhere (the fronted owners'):
in flight, a twin is told so; a reservation whose holder died is taken over; a failure
frees the key; a success is replayed."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from nudge_common.db import SessionMaker, transaction
from nudge_orchestrator import store


async def test_a_reserved_key_is_in_flight_then_replayed_freed_or_taken_over(
    sessionmaker: SessionMaker,
) -> None:
    workspace, now = f"ws-{uuid.uuid4().hex[:8]}", datetime.now(UTC)
    request = "POST /api/v1/segments"

    async def reserve(key: str, at: datetime, what: str = request) -> object:
        async with transaction(sessionmaker) as session:
            return await store.reserve_idempotency_key(
                session, workspace_id=workspace, key=key, request=what, now=at, stale_s=60
            )

    async def settle(key: str, status_code: int | None, body: object) -> None:
        async with transaction(sessionmaker) as session:
            await store.settle_idempotency_key(
                session, workspace_id=workspace, key=key, status_code=status_code, body=body
            )

    assert await reserve("k1", now) is None
    assert await reserve("k1", now + timedelta(seconds=1)) == (request, store.IN_PROGRESS, {})
    await settle("k1", 201, {"id": "s-1"})
    assert await reserve("k1", now + timedelta(hours=1)) == (request, 201, {"id": "s-1"})
    assert await reserve("k1", now, "POST /api/v1/models/x/rules") == (request, 201, {"id": "s-1"})

    assert await reserve("k2", now) is None
    await settle("k2", None, None)  # the owner failed: nothing kept
    assert await reserve("k2", now) is None, "free again"

    assert await reserve("k3", now) is None  # its holder dies without settling
    assert await reserve("k3", now + timedelta(seconds=30)) is not None, "still in flight"
    assert await reserve("k3", now + timedelta(seconds=61)) is None, "taken over"
    other = "POST /api/v1/contacts/import"
    assert await reserve("k3", now + timedelta(hours=1), other) is not None, "not by another"
