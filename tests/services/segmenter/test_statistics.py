"""A large backfill leaves the tables it wrote analyzed: the real-time batch's statements are
not planned on statistics that never saw those rows."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from nudge_common.db import transaction
from nudge_segmenter import store, worker
from tests.services.segmenter.conftest import Segmenter

CONTACTS = 20_000


async def test_a_large_backfill_leaves_statistics_that_know_its_rows(
    segmenter: Segmenter,
) -> None:
    async with transaction(segmenter.sessionmaker) as session:
        await session.execute(
            sa.text(
                f"INSERT INTO {store.SCHEMA}.contacts (contact_id, workspace_id, last_seen_at,"
                " updated_at) SELECT gen_random_uuid(), :ws, :seen, :seen"
                " FROM generate_series(1, :n)"
            ),
            {
                "ws": segmenter.workspace_id,
                "seen": segmenter.now - timedelta(days=1),
                "n": CONTACTS,
            },
        )
    # everyone enters, with a recheck when the 30 days run out
    segment = await segmenter.segment(
        {"kind": "last_seen", "op": "less_than", "days": 30}, backfill=True
    )
    while await worker.backfill_next(segmenter.runtime, segmenter.clock, 5_000):
        pass
    assert len(await segmenter.members(segment)) == CONTACTS

    async with transaction(segmenter.sessionmaker) as session:
        statistics = (
            await session.execute(
                sa.text(
                    "SELECT c.relname, c.reltuples, s.null_frac FROM pg_class AS c"
                    " LEFT JOIN pg_stats AS s ON s.schemaname = :schema"
                    " AND s.tablename = c.relname AND s.attname = 'exited_at'"
                    " WHERE c.oid = ANY(CAST(:tables AS regclass[]))"
                ),
                {
                    "schema": store.SCHEMA,
                    "tables": [f"{store.SCHEMA}.{t.name}" for t in store.BULK_WRITTEN],
                },
            )
        ).all()
    # The batch's `contact_id = ANY(:ids)` is planned on the rows the backfill wrote, and the
    # exits' `exited_at IS NULL` on their open history rows (not the default 0.5%).
    assert {name for name, _, _ in statistics} == {"memberships", "membership_history", "rechecks"}
    for name, rows, open_share in statistics:
        assert rows >= CONTACTS, name
        if name == "membership_history":
            assert open_share is not None
            assert open_share > 0.9
