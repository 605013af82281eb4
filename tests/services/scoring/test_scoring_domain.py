from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from nudge_common.events import SegmentEvent
from nudge_scoring.domain.rules import RuleIndex, spec_adapter
from nudge_scoring.domain.scoring import Rule, incoming_traits, merge_traits, score_event

NOW = datetime(2026, 11, 23, tzinfo=UTC)


def event(**fields: Any) -> SegmentEvent:
    return SegmentEvent.model_validate(
        {"messageId": "m", "userId": "u", "timestamp": NOW, "receivedAt": NOW, **fields}
    )


PRICING = Rule(uuid.uuid4(), "lead", "Viewed Pricing", 20)
CAREERS = Rule(uuid.uuid4(), "fit", "Viewed Careers", -15)


def test_each_matching_rule_gives_its_points() -> None:
    deltas = score_event([PRICING, CAREERS], event(type="track", event="Viewed Pricing"))
    assert [(d.model, d.points, d.rule_id) for d in deltas] == [("lead", 20, PRICING.id)]


def test_negative_rules_take_points() -> None:
    [delta] = score_event([PRICING, CAREERS], event(type="track", event="Viewed Careers"))
    assert delta.points == -15


def test_only_track_calls_score() -> None:
    assert score_event([PRICING], event(type="page", name="Viewed Pricing")) == []


def test_identify_traits_and_context_traits_are_learned() -> None:
    identify = event(type="identify", traits={"email": "a@b.c"}, context={"traits": {"name": "A"}})
    assert incoming_traits(identify) == {"name": "A", "email": "a@b.c"}
    track = event(
        type="track", event="x", traits={"ignored": True}, context={"traits": {"name": "A"}}
    )
    assert incoming_traits(track) == {"name": "A"}


def test_merge_reports_no_change_when_nothing_is_new() -> None:
    assert merge_traits({"name": "A", "plan": "pro"}, {"name": "A"}) is None
    assert merge_traits({"name": "A"}, {"name": "B"}) == {"name": "B"}


def test_the_rule_index_gives_what_scoring_every_rule_gives() -> None:
    specs: list[dict[str, Any]] = [
        {"kind": "behavioural", "event": "Viewed Pricing"},
        {"kind": "behavioural", "type": "page"},
        {"kind": "behavioural", "type": "page", "event": "Pricing"},
        {"kind": "behavioural", "type": "screen", "event": "Home"},
        {"kind": "behavioural", "event": "Order Completed", "cap_ever": 5},
        {"kind": "transactional", "min_value": 50},
        {"kind": "transactional", "event": "Order Refunded"},
        {"kind": "profile", "trait": "phone"},
        {"kind": "decay", "after_days": 7, "percent": 10},
    ]
    rules = [
        Rule(uuid.uuid4(), "m", None, 3 + i, spec_adapter.validate_python(spec))
        for i, spec in enumerate(specs)
    ] + [PRICING]
    index = RuleIndex(rules)
    events = [
        event(type="track", event="Viewed Pricing"),
        event(type="track", event="Order Completed", properties={"revenue": 80}),
        event(type="track", event="Order Refunded", properties={"revenue": 80}),
        event(type="track", event="Other"),
        event(type="page", name="Pricing"),
        event(type="page", name="Docs"),
        event(type="page"),
        event(type="screen", name="Home"),
        event(type="identify", traits={"phone": "+331"}),
    ]
    for each in events:
        expected = score_event(rules, each)
        assert score_event(index.candidates(each), each) == expected
    assert [r.id for r in index.candidates(events[4])] == [rules[1].id, rules[2].id]
