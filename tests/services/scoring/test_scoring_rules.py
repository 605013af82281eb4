"""Every rule kind on the real broker and database: behavioural with filters and caps,
profile by value and by presence, transactional, negative points, decay by durable timers
with a clock moved by hand, lifecycle stages, tag scores, replays and dead letters."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa

from nudge_common.db import transaction
from nudge_common.events import CONTACT_STAGE_CHANGED, CONTACT_UPDATED, Topic
from nudge_devtools.pipeline import read_topic
from nudge_scoring import store
from nudge_scoring.domain.rules import (
    BehaviouralSpec,
    DecaySpec,
    Filter,
    ProfileSpec,
    Rule,
    Stage,
    TransactionalSpec,
)
from nudge_scoring.worker import run_due_timers
from tests.services.scoring.conftest import T0, ScoringHarness, segment


async def add_rules(
    scoring: ScoringHarness, ws: str, *rules: tuple[str, int, Any]
) -> list[uuid.UUID]:
    ids = []
    async with transaction(scoring.sessionmaker) as session:
        for model, points, spec in rules:
            rule_id = uuid.uuid4()
            await store.create_rule(
                session, workspace_id=ws, rule=Rule(rule_id, model, None, points, spec)
            )
            ids.append(rule_id)
    return ids


async def test_behavioural_rules_with_filters_caps_and_negative_points(
    scoring: ScoringHarness, ws: str
) -> None:
    await add_rules(
        scoring,
        ws,
        (
            "engagement",
            5,
            BehaviouralSpec(
                type="page",
                filters=[Filter(field="properties.url", op="contains", value="/pricing")],
                cap_per_day=10,
            ),
        ),
        (
            "engagement",
            20,
            BehaviouralSpec(
                event="Downloaded",
                filters=[Filter(field="properties.name", op="eq", value="whitepaper")],
                cap_ever=20,
            ),
        ),
        (
            "engagement",
            -15,
            BehaviouralSpec(
                type="page",
                filters=[Filter(field="properties.path", op="starts_with", value="/careers")],
            ),
        ),
        ("engagement", -30, BehaviouralSpec(event="Unsubscribed")),
    )
    pricing = {"url": "https://x.test/pricing"}
    await scoring.send(
        *[segment(ws, "page", userId="p", properties=pricing) for _ in range(3)],  # cap 10/day
        segment(ws, "page", userId="p", properties=pricing, at=T0 + timedelta(days=1)),
        segment(ws, "page", userId="p", properties={"url": "https://x.test/blog"}),
        segment(ws, event="Downloaded", userId="p", properties={"name": "whitepaper"}),
        segment(ws, event="Downloaded", userId="p", properties={"name": "whitepaper"}),
        segment(ws, event="Downloaded", userId="p", properties={"name": "ebook"}),
    )
    contact = await scoring.contact_of(ws, "user_id", "p")
    assert await scoring.scores(contact) == {"engagement": 10 + 5 + 20}
    await scoring.send(
        segment(ws, "page", userId="p", properties={"path": "/careers/jobs"}),
        segment(ws, event="Unsubscribed", userId="p"),
    )
    assert await scoring.scores(contact) == {"engagement": 35 - 15 - 30}
    breakdown = await scoring.rows(
        sa.select(store.score_changes.c.points)
        .where(store.score_changes.c.contact_id == contact)
        .order_by(store.score_changes.c.id)
    )
    assert [r.points for r in breakdown] == [5, 5, 5, 20, -15, -30]


async def test_a_per_day_cap_counts_utc_days_whatever_the_offset_of_the_timestamp(
    scoring: ScoringHarness, ws: str
) -> None:
    """Ingest keeps a client's offset when the call has no ``sentAt``: 01:15 at +02:00 is
    23:15 UTC the day before, the same UTC day as the first view."""
    await add_rules(scoring, ws, ("engagement", 5, BehaviouralSpec(type="page", cap_per_day=5)))
    evening = datetime(2026, 11, 23, 23, 0, tzinfo=UTC)
    past_local_midnight = datetime(2026, 11, 24, 1, 15, tzinfo=timezone(timedelta(hours=2)))
    await scoring.send(
        segment(ws, "page", userId="tz", at=evening),
        segment(ws, "page", userId="tz", at=past_local_midnight),
    )
    contact = await scoring.contact_of(ws, "user_id", "tz")
    assert await scoring.scores(contact) == {"engagement": 5}
    spent = await scoring.rows(
        sa.select(store.rule_spending.c.period).where(store.rule_spending.c.contact_id == contact)
    )
    assert [r.period for r in spent] == ["day:2026-11-23"]


async def test_profile_rules_by_value_and_by_presence(scoring: ScoringHarness, ws: str) -> None:
    await add_rules(
        scoring,
        ws,
        ("fit", 15, ProfileSpec(trait="title", op="in", value=["CTO", "VP Engineering"])),
        ("fit", 10, ProfileSpec(trait="employees", op="gte", value=100)),
        ("fit", 5, ProfileSpec(trait="phone")),
        ("fit", 5, ProfileSpec(trait="company")),
        ("fit", -50, ProfileSpec(trait="email", op="email_domain_in", value=["rival.test"])),
    )
    await scoring.send(
        segment(ws, "identify", userId="f", traits={"title": "CTO", "employees": 250}),
        segment(ws, "identify", userId="f", traits={"phone": "+33 1 23", "company": "Acme"}),
    )
    contact = await scoring.contact_of(ws, "user_id", "f")
    assert await scoring.scores(contact) == {"fit": 35}
    # a condition that stops holding gives its points back; repeating a trait changes nothing
    await scoring.send(
        segment(ws, "identify", userId="f", traits={"title": "Intern", "phone": "+33 1 23"}),
        segment(ws, "identify", userId="f", traits={"email": "f@rival.test"}),
    )
    assert await scoring.scores(contact) == {"fit": 20 - 50}
    row = (await scoring.rows(sa.select(store.contacts).where(store.contacts.c.id == contact)))[0]
    assert (row.job_title, row.phone, row.company, row.email) == (
        "Intern",
        "+33 1 23",
        "Acme",
        "f@rival.test",
    )
    assert row.trait_sources["title"]["party"] == "first"
    assert row.trait_sources["title"]["source"] == "identify"


async def test_transactional_rules_and_the_transactions_kept_for_rfm(
    scoring: ScoringHarness, ws: str
) -> None:
    await add_rules(
        scoring,
        ws,
        ("value", 10, TransactionalSpec(max_value=100)),
        ("value", 30, TransactionalSpec(min_value=100)),
        ("value", 25, TransactionalSpec(repeat=True)),
        ("value", 5, TransactionalSpec(payment_methods=["invoice"])),
    )
    order = "Order Completed"
    await scoring.send(
        segment(
            ws,
            event=order,
            userId="o",
            properties={
                "order_id": "1",
                "revenue": 40,
                "currency": "EUR",
                "payment_method": "card",
                "products": [{"sku": "A", "price": 40}],
            },
        ),
        segment(
            ws,
            event=order,
            userId="o",
            properties={
                "order_id": "2",
                "revenue": 250,
                "currency": "EUR",
                "payment_method": "invoice",
            },
            at=T0 + timedelta(hours=1),
        ),
    )
    contact = await scoring.contact_of(ws, "user_id", "o")
    assert await scoring.scores(contact) == {"value": 10 + (30 + 25 + 5)}
    row = (await scoring.rows(sa.select(store.contacts).where(store.contacts.c.id == contact)))[0]
    assert (row.orders_count, float(row.revenue_total)) == (2, 290.0)
    orders = await scoring.rows(
        sa.select(store.transactions).where(store.transactions.c.contact_id == contact)
    )
    assert sorted((o.order_id, float(o.revenue), o.currency) for o in orders) == [
        ("1", 40.0, "EUR"),
        ("2", 250.0, "EUR"),
    ]


async def test_decay_by_durable_timers_with_a_controllable_clock(
    scoring: ScoringHarness, ws: str
) -> None:
    await add_rules(
        scoring,
        ws,
        ("lead", 100, BehaviouralSpec(event="Demo Requested")),
        ("lead", 0, DecaySpec(after_days=7, percent=10)),
        ("other", 20, BehaviouralSpec(event="Demo Requested")),
        ("other", 0, DecaySpec(after_days=30, points=15)),
    )
    await scoring.send(segment(ws, event="Demo Requested", userId="d"))
    contact = await scoring.contact_of(ws, "user_id", "d")

    async def tick(days: float) -> int:
        return await run_due_timers(
            scoring.sessionmaker, scoring.producer, scoring.settings, now=T0 + timedelta(days=days)
        )

    assert await tick(6.9) == 0  # not due yet: nothing changes
    assert await scoring.scores(contact) == {"lead": 100, "other": 20}
    assert await tick(7) >= 1
    assert await scoring.scores(contact) == {"lead": 90, "other": 20}
    assert await tick(7) == 0  # the same period never decays twice
    await tick(14)
    assert (await scoring.scores(contact))["lead"] == 81
    # activity pushes the next decay back a full period
    await scoring.send(segment(ws, event="Page Viewed", userId="d", at=T0 + timedelta(days=20)))
    await tick(26.9)
    assert await scoring.scores(contact) == {"lead": 81, "other": 20}
    await tick(27.5)
    assert await scoring.scores(contact) == {"lead": 73, "other": 20}
    await tick(50.5)
    scores = await scoring.scores(contact)
    assert scores["other"] == 5
    decays = await scoring.rows(
        sa.select(store.score_changes.c.points).where(
            store.score_changes.c.contact_id == contact, store.score_changes.c.reason == "decay"
        )
    )
    assert len(decays) >= 3
    updates = await scoring.messages(ws, CONTACT_UPDATED.name)
    assert any(u.payload["scores"].get("lead") == 90 for u in updates)


async def test_lifecycle_stages_move_with_thresholds_and_publish_changes(
    scoring: ScoringHarness, ws: str
) -> None:
    async with transaction(scoring.sessionmaker) as session:
        await store.put_model(
            session,
            workspace_id=ws,
            name="lead",
            description="",
            stages=[
                Stage(name="subscriber", min_score=0),
                Stage(name="lead", min_score=20),
                Stage(name="mql", min_score=50),
            ],
        )
    await add_rules(
        scoring,
        ws,
        ("lead", 25, BehaviouralSpec(event="Viewed Pricing")),
        ("lead", -40, BehaviouralSpec(event="Unsubscribed")),
    )
    await scoring.send(
        segment(ws, event="Viewed Pricing", userId="s"),
        segment(ws, event="Viewed Pricing", userId="s"),
        segment(ws, event="Unsubscribed", userId="s"),
    )
    contact = await scoring.contact_of(ws, "user_id", "s")
    history = await scoring.rows(
        sa.select(store.stage_history.c.from_stage, store.stage_history.c.to_stage)
        .where(store.stage_history.c.contact_id == contact)
        .order_by(store.stage_history.c.id)
    )
    assert [tuple(h) for h in history] == [
        (None, "lead"),
        ("lead", "mql"),
        ("mql", "subscriber"),
    ]
    published = await scoring.messages(ws, CONTACT_STAGE_CHANGED.name)
    assert [(m.payload["previous_stage"], m.payload["stage"]) for m in published] == [
        (None, "lead"),
        ("lead", "mql"),
        ("mql", "subscriber"),
    ]


async def test_score_changed_is_published_only_on_real_change(
    scoring: ScoringHarness, ws: str
) -> None:
    await add_rules(
        scoring,
        ws,
        ("lead", 10, BehaviouralSpec(event="Clicked")),
        (
            "lead",
            -10,
            BehaviouralSpec(
                event="Clicked", filters=[Filter(field="properties.spam", op="eq", value=True)]
            ),
        ),
    )
    await scoring.send(segment(ws, event="Clicked", userId="n", properties={"spam": True}))
    await scoring.send(segment(ws, event="Clicked", userId="n"))
    updates = await scoring.messages(ws, CONTACT_UPDATED.name)
    assert [u.payload["scores"] for u in updates] == [{"lead": 10}]


async def test_tag_scores_count_assignments(scoring: ScoringHarness, ws: str) -> None:
    await scoring.send(
        segment(ws, "identify", userId="t", traits={"tags": ["interest:shoes"]}),
        segment(ws, "identify", userId="t", traits={"tags": ["interest:shoes", "interest:hats"]}),
        segment(ws, "identify", userId="t", traits={"tags": ["interest:shoes"]}),
        segment(ws, "identify", userId="t", traits={"untags": ["interest:hats"]}),
    )
    contact = await scoring.contact_of(ws, "user_id", "t")
    async with transaction(scoring.sessionmaker) as session:
        assert await store.tags_of(session, contact_id=contact) == {"interest:shoes": 3}
        row = (
            await session.execute(
                sa.select(store.contacts.c.traits).where(store.contacts.c.id == contact)
            )
        ).scalar_one()
    assert "tags" not in row


async def test_replaying_the_same_events_changes_nothing(scoring: ScoringHarness, ws: str) -> None:
    await add_rules(scoring, ws, ("lead", 7, BehaviouralSpec(event="Viewed Pricing")))
    batch = [
        segment(ws, event="Viewed Pricing", anonymousId="r"),
        segment(ws, "identify", userId="ru", anonymousId="r", traits={"tags": ["interest:x"]}),
        segment(ws, event="Viewed Pricing", userId="ru"),
    ]
    await scoring.send(*batch)
    contact = await scoring.contact_of(ws, "user_id", "ru")

    async def snapshot() -> tuple[Any, ...]:
        changes = await scoring.rows(
            sa.select(sa.func.count())
            .select_from(store.score_changes)
            .where(store.score_changes.c.workspace_id == ws)
        )
        stored = await scoring.rows(
            sa.select(sa.func.count())
            .select_from(store.event_ids)
            .where(store.event_ids.c.workspace_id == ws)
        )
        async with transaction(scoring.sessionmaker) as session:
            tag_scores = await store.tags_of(session, contact_id=contact)
        return (await scoring.scores(contact), changes[0][0], stored[0][0], tag_scores)

    before = await snapshot()
    updates_before = len(await scoring.messages(ws, CONTACT_UPDATED.name))
    await scoring.send(*batch)  # the same envelopes again, as after a crash
    assert await snapshot() == before == ({"lead": 14}, 2, 3, {"interest:x": 1})
    assert len(await scoring.messages(ws, CONTACT_UPDATED.name)) == updates_before


async def test_bad_events_go_to_the_dead_letter_topic_with_a_reason(
    scoring: ScoringHarness, ws: str
) -> None:
    nobody = segment(ws, event="Viewed Pricing", userId="x")
    nobody = nobody.model_copy(update={"payload": {**nobody.payload, "userId": None}})
    bad_tag = segment(ws, "identify", userId="x", traits={"tags": ["Not A Tag"]})
    broken = segment(ws, event="Viewed Pricing", userId="x")
    broken = broken.model_copy(update={"payload": {**broken.payload, "timestamp": "yesterday"}})
    await scoring.send(nobody, bad_tag, broken)
    dead = [
        {k: v.decode() for k, v in record.headers}
        for record in await read_topic(scoring.settings, Topic.DEAD_LETTER)
        if record.value and ws.encode() in record.value
    ]
    reasons = sorted(d["nudge.reason"] for d in dead)
    assert len(reasons) == 3
    assert any("neither userId nor anonymousId" in r for r in reasons)
    assert any("traits.tags: 'Not A Tag'" in r for r in reasons)
    assert any("timestamp" in r for r in reasons)
    assert all(d["nudge.consumer"] == "scoring" for d in dead)
