"""The pure workflow domain: graph validation, decisions, splits, quiet hours, simulation."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, time, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from nudge_common.conditions import Profile
from nudge_orchestrator.domain.workflows import (
    Context,
    Defer,
    Goto,
    NotifySales,
    QuietHours,
    Schedule,
    Send,
    Split,
    WorkflowDefinition,
    assign_variant,
    decide,
    next_local_time,
    problems,
    simulate,
)

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)  # a Monday
EMAIL = uuid.uuid4()
SMS = uuid.uuid4()


def abandoned_cart() -> WorkflowDefinition:
    return WorkflowDefinition.model_validate(
        {
            "trigger": {"kind": "event", "event": "Product Added"},
            "entry": {"rule": "every_time"},
            "goal": {"event": "Order Completed"},
            "steps": [
                {
                    "kind": "wait_for_event",
                    "event": "Order Completed",
                    "timeout_s": 3 * 3600,
                    "on_event": "done",
                },
                {"kind": "send", "channel": "email", "template_id": str(EMAIL)},
                {"kind": "wait", "seconds": 86400},
                {
                    "kind": "branch",
                    "not_performed": ["Order Completed", "Email Link Clicked"],
                    "else": "done",
                },
                {"kind": "send", "channel": "sms", "template_id": str(SMS)},
                {"id": "done", "kind": "exit"},
            ],
        }
    )


def ctx(**overrides: Any) -> Context:
    base: dict[str, Any] = {
        "run_id": uuid.uuid4(),
        "contact_id": uuid.uuid4(),
        "workflow_id": uuid.uuid4(),
        "now": T0,
    }
    return Context(**{**base, **overrides})


def test_a_valid_graph_has_no_problems() -> None:
    assert problems(abandoned_cart(), {EMAIL, SMS}) == []


def test_unknown_template_and_unknown_target_are_named_by_field() -> None:
    definition = abandoned_cart()
    found = problems(definition, {EMAIL})
    assert [(p.loc, "template" in p.msg) for p in found] == [(("steps", 4, "template_id"), True)]
    broken = WorkflowDefinition.model_validate(
        {
            "trigger": {"kind": "api"},
            "steps": [{"kind": "exit", "next": "nowhere"}],
        }
    )
    assert [p.loc for p in problems(broken, set())] == [("steps", 0, "next")]


def test_cycles_and_unreachable_steps_are_refused() -> None:
    cycle = WorkflowDefinition.model_validate(
        {
            "trigger": {"kind": "api"},
            "steps": [
                {"id": "a", "kind": "wait", "seconds": 60},
                {"id": "b", "kind": "wait", "seconds": 60, "next": "a"},
            ],
        }
    )
    [problem] = problems(cycle, set())
    assert "cycle" in problem.msg
    assert "'a' -> 'b' -> 'a'" in problem.msg
    unreachable = WorkflowDefinition.model_validate(
        {
            "trigger": {"kind": "api"},
            "steps": [
                {"kind": "exit"},
                {"id": "orphan", "kind": "wait", "seconds": 60},
            ],
        }
    )
    [problem] = problems(unreachable, set())
    assert problem.loc == ("steps", 1)
    assert "never be reached" in problem.msg


def test_bad_fields_fail_validation() -> None:
    with pytest.raises(ValidationError, match="cooldown_s"):
        WorkflowDefinition.model_validate(
            {"trigger": {"kind": "api"}, "entry": {"rule": "cooldown"}, "steps": [{"kind": "exit"}]}
        )
    with pytest.raises(ValidationError, match="timeout_s"):
        WorkflowDefinition.model_validate(
            {
                "trigger": {"kind": "api"},
                "steps": [{"kind": "wait_for_event", "event": "X", "timeout_s": 0}],
            }
        )


def test_notify_sales_takes_one_address_or_a_list_and_a_known_template() -> None:
    def sales(**step: Any) -> WorkflowDefinition:
        return WorkflowDefinition.model_validate(
            {"trigger": {"kind": "api"}, "steps": [{"kind": "notify_sales", **step}]}
        )

    [one] = sales(email="sales@example.com").steps
    [many] = sales(email=["a@example.com", "b@example.com"], url="https://crm.example").steps
    assert isinstance(one, NotifySales)
    assert isinstance(many, NotifySales)
    assert (one.email, many.email) == (["sales@example.com"], ["a@example.com", "b@example.com"])
    with pytest.raises(ValidationError, match="email"):
        sales(note="nowhere to go")
    with pytest.raises(ValidationError, match="email"):
        sales(email="not an address")
    with pytest.raises(ValidationError, match="template_id"):
        sales(url="https://crm.example", template_id=str(EMAIL))
    unknown = sales(email="sales@example.com", template_id=str(SMS))
    assert [p.loc for p in problems(unknown, {EMAIL})] == [("steps", 0, "template_id")]


def test_wait_for_event_schedules_a_timeout_with_both_ways_out() -> None:
    decision = decide(abandoned_cart(), 0, ctx())
    assert decision == Schedule(T0 + timedelta(hours=3), 1, "Order Completed", 5)
    already = decide(abandoned_cart(), 0, ctx(performed=frozenset({"Order Completed"})))
    assert already == Goto(5, "event")


def test_branch_on_events_and_on_the_segment_language() -> None:
    assert decide(abandoned_cart(), 3, ctx()) == Goto(4, "then")
    clicked = ctx(performed=frozenset({"Email Link Clicked"}))
    assert decide(abandoned_cart(), 3, clicked) == Goto(5, "else")
    vip = WorkflowDefinition.model_validate(
        {
            "trigger": {"kind": "api"},
            "steps": [
                {
                    "kind": "branch",
                    "condition": {"kind": "score", "model": "lead", "op": "gte", "value": 50},
                    "then": "hot",
                    "else": "cold",
                },
                {
                    "id": "hot",
                    "kind": "send",
                    "channel": "email",
                    "template_id": str(EMAIL),
                    "next": "end",
                },
                {"id": "cold", "kind": "send", "channel": "email", "template_id": str(SMS)},
                {"id": "end", "kind": "exit"},
            ],
        }
    )
    assert decide(vip, 0, ctx(profile=Profile(scores={"lead": 70}))) == Goto(1, "then")
    assert decide(vip, 0, ctx(profile=Profile(scores={"lead": 10}))) == Goto(2, "else")
    assert decide(vip, 1, ctx()) == Send("email", EMAIL, 3)


def test_split_ratios_on_ten_thousand_contacts_are_within_tolerance() -> None:
    split = Split.model_validate(
        {
            "kind": "split",
            "holdout": 0.1,
            "variants": [
                {"name": "a", "weight": 50},
                {"name": "b", "weight": 30},
                {"name": "c", "weight": 20},
            ],
        }
    )
    workflow = uuid.uuid4()
    contacts = [uuid.UUID(int=i) for i in range(10_000)]
    counts: dict[str, int] = {}
    for contact in contacts:
        variant = assign_variant(split, workflow, contact, 0)
        counts[variant] = counts.get(variant, 0) + 1
    # expected: holdout 10 %, then 50/30/20 of the remaining 90 %
    expected = {"holdout": 1000, "a": 4500, "b": 2700, "c": 1800}
    for name, count in expected.items():
        assert abs(counts[name] - count) < 0.05 * 10_000 * 0.5, (name, counts)
    # deterministic per contact
    assert all(
        assign_variant(split, workflow, c, 0) == assign_variant(split, workflow, c, 0)
        for c in contacts[:100]
    )


def test_quiet_hours_defer_a_message_to_their_local_end() -> None:
    quiet = QuietHours(time(21, 0), time(8, 0))
    definition = abandoned_cart()
    # 22:30 in Rome (UTC+1 in March) is 21:30 UTC
    late = ctx(
        now=datetime(2026, 3, 2, 21, 30, tzinfo=UTC), timezone="Europe/Rome", quiet_hours=quiet
    )
    assert decide(definition, 1, late) == Defer(datetime(2026, 3, 3, 7, 0, tzinfo=UTC))
    day = ctx(now=T0, timezone="Europe/Rome", quiet_hours=quiet)
    assert isinstance(decide(definition, 1, day), Send)


def test_wait_until_a_weekday_window_in_the_contacts_timezone() -> None:
    step = WorkflowDefinition.model_validate(
        {
            "trigger": {"kind": "api"},
            "steps": [{"kind": "wait_until", "hour": 9, "weekdays": [4]}],
        }
    ).steps[0]
    due = next_local_time(step, T0, "America/New_York")  # type: ignore[arg-type]
    assert due == datetime(2026, 3, 6, 14, 0, tzinfo=UTC)  # Friday 09:00 EST


def test_simulation_follows_the_path_without_sending() -> None:
    definition = abandoned_cart()
    no_order = simulate(definition, ctx())
    assert [(v.kind, v.outcome) for v in no_order] == [
        ("wait_for_event", "timeout"),
        ("send", "sent"),
        ("wait", "waited"),
        ("branch", "then"),
        ("send", "sent"),
        ("exit", "exit"),
    ]
    in_time = simulate(definition, ctx(), [("Order Completed", T0 + timedelta(hours=1))])
    assert [(v.kind, v.outcome) for v in in_time][:1] == [("wait_for_event", "event")]
    assert all(v.kind != "send" for v in in_time)
    assert in_time[-1].outcome == "converted"
