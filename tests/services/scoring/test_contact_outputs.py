"""What scoring tells the contacts topic, on the real broker and database: one
``contact.activity`` per new track/page/screen event (before that event's
``contact.updated``), ``contact.updated`` carrying the active tags and stages (after tag
changes, stage crossings, merges and decay), and ``score.adjusted`` applied exactly once."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from nudge_common.db import transaction
from nudge_common.events import (
    CONTACT_ACTIVITY,
    CONTACT_STAGE_CHANGED,
    CONTACT_UPDATED,
    EVENT_RECEIVED,
    SCORE_ADJUSTED,
    ContactUpdated,
    Envelope,
    ScoreAdjusted,
    Topic,
)
from nudge_common.kafka import OutgoingMessage, publish
from nudge_devtools.pipeline import read_topic
from nudge_scoring import store
from nudge_scoring.domain.rules import BehaviouralSpec, DecaySpec, Rule, Stage
from nudge_scoring.worker import run_due_timers, run_job_step, start_recompute
from tests.services.scoring.conftest import T0, ScoringHarness, segment


async def lead_model(scoring: ScoringHarness, ws: str, *rules: tuple[int, Any]) -> None:
    """Model ``lead`` (stages lead from 0, mql from 20) with these (points, spec) rules."""
    async with transaction(scoring.sessionmaker) as session:
        await store.put_model(
            session,
            workspace_id=ws,
            name="lead",
            description="",
            stages=[Stage(name="lead", min_score=0), Stage(name="mql", min_score=20)],
        )
        for points, spec in rules:
            rule = Rule(uuid.uuid4(), "lead", None, points, spec)
            await store.create_rule(session, workspace_id=ws, rule=rule)


async def published(scoring: ScoringHarness, ws: str, contact: uuid.UUID) -> list[Envelope]:
    """The contact's messages on the contacts topic, in order (they share a partition)."""
    records = await read_topic(
        scoring.settings, Topic.CONTACTS, where=lambda r: r.key == str(contact).encode()
    )
    envelopes = [Envelope.decode(r.value) for r in records if r.value]
    return [e for e in envelopes if e.workspace_id == ws]


def updates(messages: list[Envelope]) -> list[ContactUpdated]:
    return [CONTACT_UPDATED.parse(e) for e in messages if e.type == CONTACT_UPDATED.name]


async def test_activity_is_published_once_per_new_event_before_its_update(
    scoring: ScoringHarness, ws: str
) -> None:
    await lead_model(scoring, ws, (5, BehaviouralSpec(event="Viewed Pricing")))
    pricing = segment(ws, event="Viewed Pricing", userId="a", properties={"plan": "pro"})
    await scoring.send(
        pricing,
        segment(ws, "page", userId="a", name="Pricing", properties={"url": "https://x/p"}),
        segment(ws, "screen", userId="a", name="Home"),
        segment(ws, "identify", userId="a", traits={"name": "Ada"}),
        segment(ws, event="Order Completed", userId="a", properties={"revenue": 120}),
        segment(ws, event="Order Refunded", userId="a", properties={"revenue": 20}),
    )
    # the same call again (an SDK retry), and re-published under another envelope id
    call = EVENT_RECEIVED.parse(pricing)
    again = EVENT_RECEIVED.envelope(workspace_id=ws, payload=call, occurred_at=T0, id=uuid.uuid4())
    await scoring.send(pricing, again)

    contact = await scoring.contact_of(ws, "user_id", "a")
    messages = await published(scoring, ws, contact)
    activities = [CONTACT_ACTIVITY.parse(e) for e in messages if e.type == CONTACT_ACTIVITY.name]
    assert [(a.kind, a.event, a.revenue) for a in activities] == [
        ("track", "Viewed Pricing", None),
        ("page", "Page Viewed", None),
        ("screen", "Screen Viewed", None),
        ("track", "Order Completed", 120.0),
        ("track", "Order Refunded", -20.0),
    ]
    assert {a.contact_id for a in activities} == {contact}
    assert (activities[0].message_id, activities[0].at) == (call.message_id, T0)
    assert activities[0].properties == {"plan": "pro"}
    assert activities[1].properties == {"name": "Pricing", "url": "https://x/p"}
    # the activity's id derives from its cause; it comes before the update of that event
    flow = [e for e in messages if e.type != CONTACT_STAGE_CHANGED.name]
    assert (
        flow[0].id
        == CONTACT_ACTIVITY.envelope(
            workspace_id=ws, payload=activities[0], occurred_at=T0, caused_by=pricing
        ).id
    )
    assert [e.type for e in flow[:2]] == [CONTACT_ACTIVITY.name, CONTACT_UPDATED.name]
    assert updates(flow[:2])[0].cause_message_id == call.message_id


async def test_contact_updated_carries_tags_and_stages(scoring: ScoringHarness, ws: str) -> None:
    await lead_model(
        scoring,
        ws,
        (15, BehaviouralSpec(event="Viewed Pricing")),
        (0, DecaySpec(after_days=7, percent=50)),
    )
    await scoring.send(
        segment(ws, "identify", userId="t", traits={"tags": ["interest:shoes", "interest:bags"]}),
        segment(ws, event="Viewed Pricing", userId="t"),
        segment(ws, event="Viewed Pricing", userId="t"),
        segment(ws, event="Ignored", userId="t"),
        segment(
            ws,
            "identify",
            userId="t",
            traits={"tags": ["interest:shoes"], "untags": ["interest:bags"]},
        ),
        segment(ws, "identify", userId="t", traits={"untags": ["interest:hats"]}),  # no change
    )
    contact = await scoring.contact_of(ws, "user_id", "t")
    both = {"interest:bags": 1, "interest:shoes": 1}
    assert [
        (u.changed, u.tags, u.stages, u.scores)
        for u in updates(await published(scoring, ws, contact))
    ] == [
        (["tags"], both, {}, {}),
        (["scores", "stages"], both, {"lead": "lead"}, {"lead": 15}),
        (["scores", "stages"], both, {"lead": "mql"}, {"lead": 30}),
        (["tags"], {"interest:shoes": 2}, {"lead": "mql"}, {"lead": 30}),
    ]

    # a merge: the survivor's update carries both contacts' tags
    await scoring.send(
        segment(ws, "identify", anonymousId="anon-t", traits={"tags": ["interest:socks"]})
    )
    await scoring.send(segment(ws, "identify", userId="t", anonymousId="anon-t"))
    merged = updates(await published(scoring, ws, contact))[-1]
    assert merged.tags == {"interest:shoes": 2, "interest:socks": 1}
    assert merged.stages == {"lead": "mql"}
    assert set(merged.changed) == {"traits", "scores", "tags", "stages"}

    # decay: 30 -> 15 moves the stage back to lead
    fired = await run_due_timers(
        scoring.sessionmaker, scoring.producer, scoring.settings, now=T0 + timedelta(days=8)
    )
    assert fired >= 1
    decayed = updates(await published(scoring, ws, contact))[-1]
    assert (decayed.changed, decayed.scores) == (["scores", "stages"], {"lead": 15})
    assert (decayed.tags, decayed.stages) == (merged.tags, {"lead": "lead"})


async def adjust(scoring: ScoringHarness, ws: str, *envelopes: Envelope) -> None:
    await publish(
        scoring.producer,
        scoring.settings,
        [OutgoingMessage(Topic.EVENTS, e.payload["contact_id"], e) for e in envelopes],
    )
    await scoring.idle()


async def test_score_adjusted_applies_once_and_moves_a_stage(
    scoring: ScoringHarness, ws: str
) -> None:
    await lead_model(scoring, ws)
    await scoring.send(segment(ws, "identify", anonymousId="s", traits={"tags": ["x:y"]}))
    contact = await scoring.contact_of(ws, "anonymous_id", "s")

    def adjustment(points: int, adjustment_id: str) -> Envelope:
        payload = ScoreAdjusted(
            contact_id=contact,
            model="lead",
            points=points,
            reason="workflow",
            adjustment_id=adjustment_id,
            at=T0,
        )
        return SCORE_ADJUSTED.envelope(workspace_id=ws, payload=payload, occurred_at=T0)

    plus = adjustment(25, "run-1:0")
    await adjust(scoring, ws, plus, adjustment(-5, "run-1:1"))
    # a replay, and the same adjustment re-published under another envelope id
    await adjust(scoring, ws, plus, adjustment(25, "run-1:0"))
    assert await scoring.scores(contact) == {"lead": 20}
    changes = await scoring.rows(
        sa.select(store.score_changes).where(store.score_changes.c.contact_id == contact)
    )
    assert sorted((c.points, c.rule_id, c.reason, c.message_id) for c in changes) == [
        (-5, None, "workflow", "adjustment:run-1:1"),
        (25, None, "workflow", "adjustment:run-1:0"),
    ]
    messages = await published(scoring, ws, contact)
    stages = [
        CONTACT_STAGE_CHANGED.parse(e) for e in messages if e.type == CONTACT_STAGE_CHANGED.name
    ]
    assert [(s.previous_stage, s.stage, s.score) for s in stages] == [(None, "mql", 25)]
    assert [(u.changed, u.scores, u.stages, u.tags) for u in updates(messages)] == [
        (["tags"], {}, {}, {"x:y": 1}),
        (["scores", "stages"], {"lead": 25}, {"lead": "mql"}, {"x:y": 1}),
        (["scores"], {"lead": 20}, {"lead": "mql"}, {"x:y": 1}),
    ]

    # a recompute over history keeps adjustments (they have no rule to replay)
    async with transaction(scoring.sessionmaker) as session:
        await start_recompute(session, workspace_id=ws, model="lead")
    while await run_job_step(
        scoring.sessionmaker, scoring.producer, scoring.settings, now=T0 + timedelta(hours=1)
    ):
        pass
    assert await scoring.scores(contact) == {"lead": 20}
