from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from nudge_common.events import SegmentEvent
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
