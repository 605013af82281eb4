"""Customer value per workspace: RFM scores and CLV, refreshed in bulk and kept current as
orders arrive.

A refresh (the value worker, per workspace, every ``value_refresh_s``):

1. scores RFM set-based in PostgreSQL: quintiles as ``ceil(5 * cume_dist)`` over the
   customers with an order in the window (``domain/rfm.py`` is the same rule in Python),
   and keeps each axis's cut points (the lowest value of each score);
2. fits BG/NBD and Gamma-Gamma (``domain/clv.py``) on every customer's purchase history,
   summarised in SQL from their ``Order Completed`` events exactly as ``clv.summarise``
   does (purchases on one day are one purchase), and writes each customer's expected
   purchases over ``clv_horizon_days``, probability of being alive and CLV;
3. re-backfills the segments that depend on value, so memberships follow the new scores
   with one transition per real change.

Between refreshes, an order re-scores its contact against the stored cut points
(``evaluation.ContactBatch``), and the segments depending on value are re-evaluated for
that contact in real time.
"""

from __future__ import annotations

import math
import random
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.db import SessionMaker, transaction
from nudge_common.rfm import Axis
from nudge_segmenter import store
from nudge_segmenter.domain import clv
from nudge_segmenter.domain.segments import facts_of
from nudge_segmenter.store import value_models

ORDER_COMPLETED = "Order Completed"
FIT_SAMPLE = 50_000
WRITE_CHUNK = 5_000
AXES: dict[Axis, str] = {
    "recency": "extract(epoch FROM last_order_at)",
    "frequency": "orders",
    "monetary": "revenue",
}


async def ensure_model(session: AsyncSession, *, workspace_id: str) -> None:
    """The workspace's first order: its first refresh is due now."""
    await session.execute(
        pg_insert(value_models).values(workspace_id=workspace_id).on_conflict_do_nothing()
    )


async def refresh(
    sessionmaker: SessionMaker,
    *,
    workspace_id: str,
    now: datetime,
    window_days: int,
    horizon_days: int,
) -> int:
    """Refresh the workspace's RFM scores and CLV; returns the number of customers.

    Reads in one transaction, fits outside any, and writes a chunk of contacts per
    transaction (their rows locked in id order, as the consumer locks them), so a refresh
    over a million customers never holds the contacts the consumer needs for long."""
    params = {"ws": workspace_id, "since": now - timedelta(days=window_days)}
    scored = ", ".join(
        f"greatest(1, ceil(5 * cume_dist() OVER (ORDER BY {expression})))::smallint AS {axis}"
        for axis, expression in AXES.items()
    )
    customers = f"""
        SELECT contact_id, {", ".join(f"{e} AS v_{a}" for a, e in AXES.items())}, {scored}
        FROM segmenter.contacts
        WHERE workspace_id = :ws AND orders > 0 AND last_order_at > :since
    """
    async with transaction(sessionmaker) as session:
        rfm: dict[uuid.UUID, tuple[int | None, int | None, int | None]] = {
            row.contact_id: (row.recency, row.frequency, row.monetary)
            for row in await session.execute(
                sa.text(f"""
                    WITH scored AS ({customers})
                    SELECT s.contact_id, s.recency, s.frequency, s.monetary
                    FROM scored s JOIN segmenter.contacts c USING (contact_id)
                    WHERE (c.rfm_recency, c.rfm_frequency, c.rfm_monetary)
                          IS DISTINCT FROM (s.recency, s.frequency, s.monetary)
                """),
                params,
            )
        }
        lapsed = await session.scalars(
            sa.text("""
                SELECT contact_id FROM segmenter.contacts
                WHERE workspace_id = :ws AND rfm_recency IS NOT NULL
                  AND NOT (orders > 0 AND last_order_at > :since)
            """),
            params,
        )
        rfm.update(dict.fromkeys(lapsed, (None, None, None)))
        cuts: dict[str, list[float]] = {}
        for axis in AXES:
            rows = await session.execute(
                sa.text(f"""
                    WITH scored AS ({customers})
                    SELECT {axis} AS score, min(v_{axis}) AS lowest FROM scored
                    GROUP BY {axis} ORDER BY {axis}
                """),
                params,
            )
            cuts[axis] = _cut_points({int(r.score): float(r.lowest) for r in rows})
        histories = await _histories(session, workspace_id, now)
    fit = _fit_clv(histories, horizon_days)
    ids = sorted(set(rfm) | set(fit.values))
    for start in range(0, len(ids), WRITE_CHUNK):
        async with transaction(sessionmaker) as session:
            await _write(session, ids[start : start + WRITE_CHUNK], rfm, fit.values)
    async with transaction(sessionmaker) as session:
        statement = pg_insert(value_models).values(
            workspace_id=workspace_id,
            rfm_cuts=cuts,
            bg_nbd=fit.bg_nbd,
            gamma_gamma=fit.gamma_gamma,
            customers=len(histories),
            refreshed_at=now,
            error=fit.error,
        )
        await session.execute(
            statement.on_conflict_do_update(
                index_elements=[value_models.c.workspace_id],
                set_={
                    k: statement.excluded[k]
                    for k in (
                        "rfm_cuts",
                        "bg_nbd",
                        "gamma_gamma",
                        "customers",
                        "refreshed_at",
                        "error",
                    )
                },
            )
        )
        for segment in await store.list_segments(session, workspace_id=workspace_id):
            if segment.condition is not None and "value" in facts_of(segment.condition):
                await store.update_segment(
                    session, segment_id=segment.id, status="backfilling", new_version=True
                )
    return len(histories)


async def _write(
    session: AsyncSession,
    ids: list[uuid.UUID],
    rfm: dict[uuid.UUID, tuple[int | None, int | None, int | None]],
    clv_values: dict[uuid.UUID, tuple[float, float, float]],
) -> None:
    await session.execute(
        sa.text("""
            SELECT contact_id FROM segmenter.contacts
            WHERE contact_id = ANY(CAST(:ids AS uuid[])) ORDER BY contact_id FOR UPDATE
        """),
        {"ids": ids},
    )
    scored = [i for i in ids if i in rfm]
    if scored:
        await session.execute(
            sa.text("""
                UPDATE segmenter.contacts c
                SET rfm_recency = u.r, rfm_frequency = u.f, rfm_monetary = u.m
                FROM unnest(CAST(:ids AS uuid[]), CAST(:r AS smallint[]),
                            CAST(:f AS smallint[]), CAST(:m AS smallint[])) AS u(id, r, f, m)
                WHERE c.contact_id = u.id
            """),
            {
                "ids": scored,
                "r": [rfm[i][0] for i in scored],
                "f": [rfm[i][1] for i in scored],
                "m": [rfm[i][2] for i in scored],
            },
        )
    valued = [i for i in ids if i in clv_values]
    if valued:
        await session.execute(
            sa.text("""
                UPDATE segmenter.contacts c
                SET expected_purchases = u.expected, p_alive = u.alive, clv = u.clv
                FROM unnest(CAST(:ids AS uuid[]), CAST(:expected AS float8[]),
                            CAST(:alive AS float8[]), CAST(:clv AS float8[]))
                     AS u(id, expected, alive, clv)
                WHERE c.contact_id = u.id
            """),
            {
                "ids": valued,
                "expected": [clv_values[i][0] for i in valued],
                "alive": [clv_values[i][1] for i in valued],
                "clv": [clv_values[i][2] for i in valued],
            },
        )


def _cut_points(lowest: dict[int, float]) -> list[float]:
    """Scores 1 to 5 -> the lowest value scoring at least each (a score no customer got
    starts where the next one does)."""
    if not lowest:
        return []
    points: list[float] = []
    following = math.inf
    for value in (lowest.get(s, math.nan) for s in range(5, 0, -1)):
        following = following if math.isnan(value) else value
        points.append(following)
    return points[::-1]


async def _histories(
    session: AsyncSession, workspace_id: str, now: datetime
) -> dict[uuid.UUID, clv.PurchaseHistory]:
    """Every customer's purchase history, summarised as ``clv.summarise`` does."""
    rows = await session.execute(
        sa.text("""
            WITH days AS (
                SELECT contact_id, (at AT TIME ZONE 'UTC')::date AS day, sum(revenue) AS value
                FROM segmenter.contact_events
                WHERE workspace_id = :ws AND event = :order
                  AND revenue IS NOT NULL AND at <= :now
                GROUP BY contact_id, day
            ), ranked AS (
                SELECT *, row_number() OVER (PARTITION BY contact_id ORDER BY day) AS n
                FROM days
            )
            SELECT contact_id, count(*) - 1 AS frequency,
                   max(day) - min(day) AS recency_days,
                   (:now AT TIME ZONE 'UTC')::date - min(day) AS age_days,
                   coalesce(avg(value) FILTER (WHERE n > 1), 0) AS monetary
            FROM ranked GROUP BY contact_id
        """),
        {"ws": workspace_id, "order": ORDER_COMPLETED, "now": now},
    )
    return {
        r.contact_id: clv.PurchaseHistory(
            frequency=int(r.frequency),
            recency=r.recency_days / 7.0,
            age=r.age_days / 7.0,
            monetary=float(r.monetary),
        )
        for r in rows
    }


@dataclass
class _Fit:
    values: dict[uuid.UUID, tuple[float, float, float]] = field(default_factory=dict)
    """Per customer: expected purchases over the horizon, probability alive, CLV."""
    bg_nbd: dict[str, float] | None = None
    gamma_gamma: dict[str, float] | None = None
    error: str | None = None


def _fit_clv(histories: dict[uuid.UUID, clv.PurchaseHistory], horizon_days: int) -> _Fit:
    """Fit on at most ``FIT_SAMPLE`` customers (a fixed-seed sample: the maximum-likelihood
    parameters of a large cohort barely move, and the fit stays seconds long), then score
    every customer."""
    if len(histories) < 10:
        return _Fit(error="fewer than 10 customers: no CLV fit")
    cohort = list(histories.values())
    if len(cohort) > FIT_SAMPLE:
        cohort = random.Random(0).sample(cohort, FIT_SAMPLE)  # noqa: S311 - not a secret
    try:
        bg_nbd = clv.fit_bg_nbd(cohort)
        gamma_gamma = clv.fit_gamma_gamma(cohort)
    except clv.FitError as error:
        return _Fit(error=str(error))
    periods = horizon_days / 7.0
    values = {}
    for contact_id, history in histories.items():
        expected = clv.expected_purchases(bg_nbd, history, periods)
        value = expected * clv.expected_value_per_purchase(gamma_gamma, history)
        values[contact_id] = (expected, clv.probability_alive(bg_nbd, history), value)
    return _Fit(
        values,
        {"r": bg_nbd.r, "alpha": bg_nbd.alpha, "a": bg_nbd.a, "b": bg_nbd.b},
        {"p": gamma_gamma.p, "q": gamma_gamma.q, "gamma": gamma_gamma.gamma},
    )


async def refresh_due(
    sessionmaker: SessionMaker,
    *,
    now: datetime,
    every: timedelta,
    window_days: int,
    horizon_days: int,
) -> str | None:
    """Refresh one workspace whose models are due; returns it. The claim (SKIP LOCKED,
    so replicas share the work) marks it refreshed at once: a crash mid-way leaves the
    previous scores in place until the next period."""
    async with transaction(sessionmaker) as session:
        workspace_id: str | None = await session.scalar(
            sa.select(value_models.c.workspace_id)
            .where(
                sa.or_(
                    value_models.c.refreshed_at.is_(None),
                    value_models.c.refreshed_at <= now - every,
                )
            )
            .order_by(value_models.c.refreshed_at.nulls_first())
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        if workspace_id is None:
            return None
        await session.execute(
            sa.update(value_models)
            .where(value_models.c.workspace_id == workspace_id)
            .values(refreshed_at=now)
        )
    await refresh(
        sessionmaker,
        workspace_id=workspace_id,
        now=now,
        window_days=window_days,
        horizon_days=horizon_days,
    )
    return workspace_id
