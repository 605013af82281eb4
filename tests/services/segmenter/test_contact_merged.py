"""The segmenter follows scoring's merges: the merged contact's memberships move to the
survivor (or close where the survivor is already a member) and its state goes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.conditions import ScoreAtLeast
from nudge_common.db import SessionMaker, transaction
from nudge_common.events import CONTACT_MERGED, ContactMerged
from nudge_segmenter import store
from nudge_segmenter.consumer import handle_contact_updated

NOW = datetime(2026, 11, 23, tzinfo=UTC)


async def _enter(
    session: AsyncSession,
    *,
    workspace_id: str,
    segment_id: uuid.UUID,
    contact_id: uuid.UUID,
    at: datetime,
) -> None:
    """A membership as the real-time path writes it: the row and its open history."""
    key = {"segment_id": segment_id, "contact_id": contact_id, "workspace_id": workspace_id}
    await session.execute(sa.insert(store.memberships).values(**key, entered_at=at))
    await session.execute(sa.insert(store.membership_history).values(**key, entered_at=at))


async def test_contact_merged_moves_memberships_to_the_survivor(
    sessionmaker: SessionMaker,
) -> None:
    ws = f"ws-{uuid.uuid4().hex[:8]}"
    survivor, merged = uuid.uuid4(), uuid.uuid4()
    shared, only_merged = uuid.uuid4(), uuid.uuid4()
    async with transaction(sessionmaker) as session:
        for segment_id in (shared, only_merged):
            await store.create_segment(
                session,
                workspace_id=ws,
                segment_id=segment_id,
                name=str(segment_id),
                condition=ScoreAtLeast(kind="score", model="lead", op="gte", value=1),
            )
        await _enter(session, workspace_id=ws, segment_id=shared, contact_id=survivor, at=NOW)
        for segment_id in (shared, only_merged):
            await _enter(session, workspace_id=ws, segment_id=segment_id, contact_id=merged, at=NOW)
        envelope = CONTACT_MERGED.envelope(
            workspace_id=ws,
            payload=ContactMerged(
                survivor_id=survivor,
                merged_id=merged,
                reason="identify",
                identity="anonymous_id:a",
                at=NOW,
            ),
            occurred_at=NOW,
        )
        assert await handle_contact_updated(session, envelope) == []
        assert await store.segment_ids_of(session, contact_id=survivor) == {shared, only_merged}
        assert await store.segment_ids_of(session, contact_id=merged) == set()
        open_history = await session.execute(
            sa.select(store.membership_history.c.contact_id).where(
                store.membership_history.c.workspace_id == ws,
                store.membership_history.c.exited_at.is_(None),
            )
        )
        assert sorted(map(str, open_history.scalars())) == sorted([str(survivor)] * 2)
