"""What the real-time batch's reads rely on: statistics that know the rows a backfill wrote,
and the contacts' state read after their lock is held."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import sqlalchemy as sa

from nudge_common.db import transaction
from nudge_devtools.pipeline import eventually
from nudge_segmenter import store, worker
from nudge_segmenter.evaluation import ContactBatch
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


async def test_the_batch_reads_the_state_a_transaction_it_waited_for_committed(
    segmenter: Segmenter,
) -> None:
    """The batch reads its contacts' memberships after it holds their locks, not as of
    before: what the transaction it waited for committed is part of the state."""
    vip = await segmenter.segment({"kind": "trait", "name": "vip", "op": "eq", "value": True})
    contact = uuid.uuid4()
    await segmenter.update(contact, traits={"vip": False})  # known, and the index cached
    async with transaction(segmenter.sessionmaker) as holder:
        await holder.execute(
            sa.select(store.contacts.c.contact_id)
            .where(store.contacts.c.contact_id == contact)
            .with_for_update()
        )
        await holder.execute(
            sa.insert(store.memberships).values(
                segment_id=vip,
                contact_id=contact,
                workspace_id=segmenter.workspace_id,
                entered_at=segmenter.now,
            )
        )

        async def load() -> ContactBatch:
            async with transaction(segmenter.sessionmaker) as session:
                return await ContactBatch.load(
                    session, segmenter.workspace_id, [contact], facts=["traits"]
                )

        loading = asyncio.create_task(load())

        async def waiting() -> bool:
            return bool(
                await holder.scalar(
                    sa.text(
                        "SELECT count(*) FROM pg_locks WHERE NOT granted"
                        " AND pid <> pg_backend_pid()"
                        " AND transactionid = txid_current()::text::xid"
                    )
                )
            )

        await eventually(waiting, deadline_s=10, what="the batch waiting for the lock")
    batch = await asyncio.wait_for(loading, 10)
    assert vip in batch.contacts[contact].segments
