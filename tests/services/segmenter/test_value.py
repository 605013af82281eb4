"""Customer value wired to contacts: the refresh scores RFM set-based exactly as the pure
rule does, fits BG/NBD on histories summarised in SQL (the CDNOW sample through the
segmenter's tables gives the published parameters), re-backfills value segments, and an
order re-scores its contact in real time."""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from nudge_common.db import transaction
from nudge_segmenter import store, value
from nudge_segmenter.domain.rfm import CustomerValue, score_customers
from tests.services.segmenter.conftest import Segmenter

DATA = Path(__file__).parent / "data"


async def _refresh(segmenter: Segmenter) -> None:
    await value.refresh(
        segmenter.sessionmaker,
        workspace_id=segmenter.workspace_id,
        now=segmenter.now,
        window_days=365,
        horizon_days=365,
    )


async def test_rfm_refresh_matches_the_pure_rule_and_feeds_segments_and_orders(
    segmenter: Segmenter,
) -> None:
    champions = await segmenter.segment({"kind": "rfm_cell", "matrix": "rf", "cell": "champions"})
    customers: dict[uuid.UUID, list[tuple[int, float]]] = {}
    for index in range(40):
        orders = [(days, 10.0 + index) for days in range(index % 5 + 1)]
        customers[uuid.uuid4()] = [(index + d, v) for d, v in orders]
    start = segmenter.now
    for contact_id, orders in customers.items():
        for days_ago, amount in orders:
            await segmenter.activity(
                contact_id,
                "Order Completed",
                at=start - timedelta(days=days_ago),
                properties={"total": amount},
                revenue=amount,
            )
    # The workspace's first order made its first refresh due: the value worker's claim.
    refreshed = []
    while (
        claimed := await value.refresh_due(
            segmenter.sessionmaker,
            now=segmenter.now,
            every=timedelta(days=1),
            window_days=365,
            horizon_days=365,
        )
    ) is not None:
        refreshed.append(claimed)
    assert segmenter.workspace_id in refreshed
    async with transaction(segmenter.sessionmaker) as session:
        rows = (
            await session.execute(
                sa.select(store.contacts).where(
                    store.contacts.c.workspace_id == segmenter.workspace_id
                )
            )
        ).all()
    expected = score_customers(
        {r.contact_id: CustomerValue(r.last_order_at, r.orders, r.revenue) for r in rows}
    )
    for row in rows:
        scores = expected[row.contact_id]
        assert (row.rfm_recency, row.rfm_frequency, row.rfm_monetary) == (
            scores.recency,
            scores.frequency,
            scores.monetary,
        )
    champion_ids = {r.contact_id for r in rows if r.rfm_recency >= 4 and r.rfm_frequency >= 4}
    assert champion_ids
    await segmenter.backfill()  # the refresh re-backfills the value segments
    assert await segmenter.members(champions) == champion_ids

    # A lapsed one-order customer orders again, four times: re-scored at once.
    lapsed = min(rows, key=lambda r: (r.rfm_recency, r.rfm_frequency)).contact_id
    for _ in range(4):
        await segmenter.activity(lapsed, "Order Completed", revenue=20.0)
    assert lapsed in await segmenter.members(champions)


async def test_cdnow_through_the_segmenter_gives_the_published_bg_nbd_parameters(
    segmenter: Segmenter,
) -> None:
    purchases: dict[int, list[tuple[date, float]]] = defaultdict(list)
    for line in (DATA / "cdnow_sample.txt").read_text().splitlines():
        _, customer, day, _, amount = line.split()
        purchases[int(customer)].append((datetime.strptime(day, "%Y%m%d").date(), float(amount)))
    workspace = segmenter.workspace_id
    ids = {customer: uuid.uuid4() for customer in purchases}
    async with transaction(segmenter.sessionmaker) as session:
        await session.execute(
            sa.insert(store.contacts),
            [
                {"contact_id": ids[c], "workspace_id": workspace, "updated_at": segmenter.now}
                for c in purchases
            ],
        )
        await session.execute(
            sa.insert(store.contact_events),
            [
                {
                    "workspace_id": workspace,
                    "contact_id": ids[c],
                    "event": "Order Completed",
                    "at": datetime.combine(day, time(12), UTC),
                    "revenue": amount,
                }
                for c, bought in purchases.items()
                for day, amount in bought
            ],
        )
    segmenter.now = datetime(1997, 9, 30, 12, tzinfo=UTC)  # the 39-week calibration end
    await _refresh(segmenter)
    async with transaction(segmenter.sessionmaker) as session:
        model = (
            await session.execute(
                sa.select(store.value_models).where(store.value_models.c.workspace_id == workspace)
            )
        ).one()
        alive = await session.scalar(
            sa.select(sa.func.count()).where(
                store.contacts.c.workspace_id == workspace, store.contacts.c.p_alive.is_not(None)
            )
        )
    assert model.customers == 2357
    assert alive == 2357
    published = {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426}
    for name, expected in published.items():
        assert model.bg_nbd[name] == pytest.approx(expected, rel=0.01), name
