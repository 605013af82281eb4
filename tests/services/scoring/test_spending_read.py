"""The batch reads only the cap spending its events can need: a contact active for a year
has a row per per-day-capped rule per day, and reading them all made every batch it appears
in cost more without end. Today's events read today's periods; a late event, timestamped
on a past day, the days since. Caps stay exact for both."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from nudge_common.db import SessionMaker, transaction
from nudge_scoring import store
from nudge_scoring.consumer import ScoringHandler
from nudge_scoring.domain.rules import BehaviouralSpec, ProfileSpec, Rule, day_period
from tests.services.scoring.conftest import segment


async def test_a_batch_reads_only_the_spending_of_its_periods_and_caps_hold(
    sessionmaker: SessionMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = f"ws-{uuid.uuid4().hex[:10]}"
    daily, ever, held, other = (uuid.uuid4() for _ in range(4))
    async with transaction(sessionmaker) as session:
        for rule in (
            Rule(daily, "m", None, 5, BehaviouralSpec(event="Viewed", cap_per_day=10)),
            Rule(ever, "m", None, 1, BehaviouralSpec(event="Viewed", cap_ever=3)),
            Rule(held, "m", None, 8, ProfileSpec(trait="plan", op="eq", value="pro")),
            Rule(other, "m", None, 1, BehaviouralSpec(event="Other", cap_per_day=2)),
        ):
            await store.create_rule(session, workspace_id=ws, rule=rule)
    handler = ScoringHandler()
    now = datetime.now(UTC).replace(microsecond=0)
    past = now - timedelta(days=30)
    yesterday = now - timedelta(days=1)
    async with transaction(sessionmaker) as session:
        await handler.handle_batch(
            session, [segment(ws, "identify", userId="p", traits={"plan": "pro"}, at=now)]
        )
        contact_id = (await store.identities_of(session, workspace_id=ws, keys=[("user_id", "p")]))[
            ("user_id", "p")
        ]
        # a year of per-day spending (today's and the past day's half spent), the cap for
        # ever one point spent, and another rule's spending of today (a period the batch
        # reads: its rows of every rule come with it)
        await session.execute(
            sa.insert(store.rule_spending),
            [
                {
                    "contact_id": contact_id,
                    "rule_id": daily,
                    "period": day_period(now - timedelta(days=days)),
                    "points": 5,
                }
                for days in range(400)
            ]
            + [
                {"contact_id": contact_id, "rule_id": ever, "period": "ever", "points": 1},
                {
                    "contact_id": contact_id,
                    "rule_id": other,
                    "period": day_period(now),
                    "points": 2,
                },
            ],
        )

    read: list[dict[tuple[uuid.UUID, str], int]] = []
    lock_states_claiming = store.lock_states_claiming

    async def spy(*args: Any, **kwargs: Any) -> Any:
        states, new = await lock_states_claiming(*args, **kwargs)
        read.extend(dict(state.spent) for state in states.values())
        return states, new

    monkeypatch.setattr(store, "lock_states_claiming", spy)
    views = [segment(ws, event="Viewed", userId="p", at=now) for _ in range(3)]
    async with transaction(sessionmaker) as session:
        await handler.handle_batch(session, views)
    # today's events read today's spending, ever's and held's: not the year before
    assert read == [
        {
            (daily, day_period(now)): 5,
            (ever, "ever"): 1,
            (held, "held"): 8,
            (other, day_period(now)): 2,
        }
    ]

    read.clear()
    late = [segment(ws, event="Viewed", userId="p", at=at) for at in (past, now, past)]
    async with transaction(sessionmaker) as session:
        await handler.handle_batch(session, late)
    # a late event reads from its day on (the periods between come with the range)
    assert read == [
        {
            **{(daily, day_period(now - timedelta(days=days))): 5 for days in range(1, 31)},
            (daily, day_period(now)): 10,
            (ever, "ever"): 3,
            (held, "held"): 8,
            (other, day_period(now)): 2,
        }
    ]
    async with transaction(sessionmaker) as session:
        # held 8, then per day 5 today and 5 on the past day (each cap 10 half spent
        # before), 2 of the cap for ever (1 of 3 spent before); the late batch's event of
        # today found today's and the cap for ever spent
        assert await store.scores_of(session, contact_id=contact_id) == {"m": 8 + 5 + 5 + 2}
        rows = await session.execute(
            sa.select(store.rule_spending.c.period, store.rule_spending.c.points).where(
                store.rule_spending.c.contact_id == contact_id,
                store.rule_spending.c.rule_id.in_([daily, ever]),
                store.rule_spending.c.period.in_(
                    [day_period(now), day_period(past), day_period(yesterday), "ever"]
                ),
            )
        )
        spent = dict(rows.all())
    assert spent == {
        day_period(now): 10,
        day_period(past): 10,
        "ever": 3,
        day_period(yesterday): 5,
    }
