"""The segmenter forgets erased contacts and ignores a merged contact's stale update: the
handler runs on the real database, as the consumer runner would call it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.conditions import ScoreAtLeast
from nudge_common.db import SessionMaker, transaction
from nudge_common.events import (
    CONTACT_ERASED,
    CONTACT_MERGED,
    CONTACT_UPDATED,
    SEGMENT_ENTERED,
    ContactErased,
    ContactMerged,
    ContactUpdated,
    Envelope,
)
from nudge_segmenter import store
from nudge_segmenter.consumer import handle_contact_updated

NOW = datetime(2026, 11, 23, tzinfo=UTC)


def updated(ws: str, contact_id: uuid.UUID, points: int, at: datetime) -> Envelope:
    return CONTACT_UPDATED.envelope(
        workspace_id=ws,
        payload=ContactUpdated(
            contact_id=contact_id,
            user_id=None,
            traits={"email": f"{contact_id}@example.com"},
            scores={"lead": points},
            changed=["scores"],
            cause_message_id=f"m-{uuid.uuid4().hex[:8]}",
        ),
        occurred_at=at,
    )


async def _segment(session: AsyncSession, ws: str) -> uuid.UUID:
    segment_id = uuid.uuid4()
    await store.create_segment(
        session,
        workspace_id=ws,
        segment_id=segment_id,
        name="hot",
        condition=ScoreAtLeast(kind="score", model="lead", op="gte", value=10),
    )
    return segment_id


async def _rows(session: AsyncSession, table: sa.Table, ws: str) -> int:
    return int(
        await session.scalar(
            sa.select(sa.func.count()).select_from(table).where(table.c.workspace_id == ws)
        )
        or 0
    )


async def test_contact_erased_deletes_state_memberships_and_history(
    sessionmaker: SessionMaker,
) -> None:
    ws = f"ws-{uuid.uuid4().hex[:8]}"
    erased, merged_into_erased, kept = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    async with transaction(sessionmaker) as session:
        segment_id = await _segment(session, ws)
        for contact_id in (erased, merged_into_erased, kept):
            out = await handle_contact_updated(session, updated(ws, contact_id, 20, NOW))
            assert [m.envelope.type for m in out] == [SEGMENT_ENTERED.name]
        await handle_contact_updated(
            session,
            CONTACT_MERGED.envelope(
                workspace_id=ws,
                payload=ContactMerged(
                    survivor_id=erased,
                    merged_id=merged_into_erased,
                    reason="identify",
                    identity="anonymous_id:a",
                    at=NOW,
                ),
                occurred_at=NOW,
            ),
        )
        erase = CONTACT_ERASED.envelope(
            workspace_id=ws,
            payload=ContactErased(
                contact_id=erased, contact_ids=[erased, merged_into_erased], at=NOW
            ),
            occurred_at=NOW,
        )
        assert await handle_contact_updated(session, erase) == []

        for table in (store.contacts, store.memberships, store.membership_history):
            ids = set(
                (
                    await session.execute(
                        sa.select(table.c.contact_id).where(table.c.workspace_id == ws)
                    )
                ).scalars()
            )
            assert ids == {kept}, table.name
        assert await store.segment_ids_of(session, contact_id=kept) == {segment_id}
        tombstones = await session.scalar(
            sa.select(sa.func.count()).where(
                store.merged_contacts.c.contact_id.in_([erased, merged_into_erased])
            )
        )
        assert tombstones == 0


async def test_stale_update_of_a_merged_contact_changes_nothing(
    sessionmaker: SessionMaker,
) -> None:
    ws = f"ws-{uuid.uuid4().hex[:8]}"
    survivor, merged = uuid.uuid4(), uuid.uuid4()
    async with transaction(sessionmaker) as session:
        segment_id = await _segment(session, ws)
        await handle_contact_updated(session, updated(ws, merged, 20, NOW))
        merge = CONTACT_MERGED.envelope(
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
        await handle_contact_updated(session, merge)
        assert await store.segment_ids_of(session, contact_id=survivor) == {segment_id}
        history_before = await _rows(session, store.membership_history, ws)

        # an update of the merged id, sent before the merge, arrives after it
        stale = updated(ws, merged, 30, NOW - timedelta(seconds=1))
        assert await handle_contact_updated(session, stale) == []
        assert await store.segment_ids_of(session, contact_id=merged) == set()
        state = await session.scalar(
            sa.select(sa.func.count()).where(store.contacts.c.contact_id == merged)
        )
        assert state == 0
        assert await _rows(session, store.membership_history, ws) == history_before
        # the survivor keeps being evaluated
        assert await handle_contact_updated(session, updated(ws, survivor, 25, NOW)) == []
        assert await store.segment_ids_of(session, contact_id=survivor) == {segment_id}
