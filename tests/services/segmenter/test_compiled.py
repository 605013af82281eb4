"""The segmenter's fast paths equal the reference ones: a compiled condition gives
:func:`evaluate`'s verdict and recheck, and a transition's envelope is the one
``EventType.envelope`` builds. Pure."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from nudge_common import codec
from nudge_common.conditions import (
    CustomerValue,
    EventFact,
    Profile,
    compile_evaluator,
    condition_adapter,
    evaluate,
)
from nudge_common.events import (
    CONTACT_ACTIVITY,
    SEGMENT_ENTERED,
    SEGMENT_EXITED,
    ContactActivity,
    ContactSnapshot,
    MembershipChanged,
)
from nudge_segmenter.evaluation import Cause, Contact, transition
from tests.services.segmenter.test_property import conditions, traits

NOW = datetime(2031, 3, 10, 22, 30, tzinfo=UTC)

events = st.lists(
    st.builds(
        lambda name, minutes, properties: EventFact(
            name, NOW + timedelta(minutes=minutes), properties
        ),
        st.sampled_from(["A", "B", "Order Completed"]),
        st.integers(-45 * 1440, 2 * 1440),
        st.sampled_from([{}, {"sku": "x"}, {"sku": "y"}]),
    ),
    max_size=6,
)
profiles = st.builds(
    lambda trait_values, score, tags, stages, consents, seen, revenue, orders, found: Profile(
        traits=trait_values,
        scores={"lead": score},
        tags=tags,
        stages=stages,
        consents=frozenset(consents),
        value=CustomerValue(revenue=revenue, orders=orders),
        last_seen_at=None if seen is None else NOW - timedelta(hours=seen),
        events=found,
    ),
    traits,
    st.integers(-5, 20),
    st.dictionaries(st.sampled_from(["vip", "churned"]), st.integers(1, 3), max_size=2),
    st.sampled_from([{}, {"lead": "mql"}, {"lead": "sql"}]),
    st.sets(st.sampled_from(["email", "sms"])),
    st.one_of(st.none(), st.integers(0, 50 * 24)),
    st.sampled_from([0.0, 30.0, 75.5]),
    st.integers(0, 3),
    events,
)


@settings(max_examples=500, deadline=None)
@given(definition=conditions, profile=profiles)
def test_a_compiled_condition_evaluates_as_the_reference(
    definition: dict[str, Any], profile: Profile
) -> None:
    condition = condition_adapter.validate_python(definition)
    compiled = compile_evaluator(condition)
    expected = evaluate(condition, profile, NOW)
    assert compiled(profile, NOW) == expected
    by_name: dict[str, list[EventFact]] = {}
    for event in profile.events:
        by_name.setdefault(event.event, []).append(event)
    assert compiled(replace(profile, events_by_name=by_name), NOW) == expected


property_values = st.sampled_from(["x", "y", 1, 1.0, True, None, ["x"], {"b": "x"}])
property_leaves = (
    st.builds(
        lambda name, op, value: {"kind": "trait", "name": name, "op": op, "value": value},
        st.sampled_from(["sku", "a.b", "n"]),
        st.sampled_from(["eq", "neq"]),
        st.sampled_from(["x", 1, True, 1.0]),
    )
    | st.builds(
        lambda name, value: {"kind": "trait", "name": name, "op": "in", "value": value},
        st.sampled_from(["sku", "a.b", "n"]),
        st.sampled_from([["x"], ["x", "y"], ["x", 1], [True]]),
    )
    | st.builds(
        lambda name: {"kind": "trait", "name": name, "op": "contains", "value": "x"},
        st.sampled_from(["sku", "a"]),
    )
)
wheres = st.recursive(
    property_leaves,
    lambda children: (
        st.builds(
            lambda kind, items: {"kind": kind, "conditions": items},
            st.sampled_from(["all", "any"]),
            st.lists(children, min_size=1, max_size=3),
        )
        | st.builds(lambda child: {"kind": "not", "condition": child}, children)
    ),
    max_leaves=5,
)


@settings(max_examples=300, deadline=None)
@given(
    where=wheres,
    properties=st.lists(
        st.dictionaries(st.sampled_from(["sku", "a", "n"]), property_values, max_size=3),
        max_size=4,
    ),
)
def test_a_compiled_event_filter_counts_as_the_reference(
    where: dict[str, Any], properties: list[dict[str, Any]]
) -> None:
    """The event filter's and the trait conditions' string comparisons (fast paths)."""
    condition = condition_adapter.validate_python(
        {"kind": "event", "event": "A", "op": "gte", "count": 1, "where": where}
    )
    found = [EventFact("A", NOW - timedelta(minutes=n), p) for n, p in enumerate(properties)]
    profile = Profile(events=found, events_by_name={"A": found})
    assert compile_evaluator(condition)(profile, NOW) == evaluate(condition, profile, NOW)
    for values in properties:
        profile = Profile(traits=values)
        as_traits = condition_adapter.validate_python(where)
        assert compile_evaluator(as_traits)(profile, NOW) == evaluate(as_traits, profile, NOW)


@settings(max_examples=200, deadline=None)
@given(
    trait_values=traits,
    scores=st.dictionaries(st.sampled_from(["lead", "engagement"]), st.integers(-5, 500)),
    user_id=st.sampled_from([None, "u-1", "é"]),
)
def test_a_contact_snapshot_in_json_is_the_model_dump(
    trait_values: dict[str, Any], scores: dict[str, int], user_id: str | None
) -> None:
    contact = Contact(
        uuid.uuid4(), exists=True, user_id=user_id, traits=trait_values, scores=scores
    )
    expected = contact.snapshot().model_dump(mode="json", by_alias=True)
    assert contact.snapshot_json() == expected
    assert codec.dumps(contact.snapshot_json()) == codec.dumps(expected)


def test_a_transition_envelope_is_the_one_the_event_type_builds() -> None:
    contact = ContactSnapshot(
        contact_id=uuid.uuid4(),
        user_id="u-1",
        traits={"plan": "pro", "address": {"city": "Roma"}, "n": 2.5, "ok": True},
        scores={"lead": 12},
    )
    activity = ContactActivity(
        contact_id=contact.contact_id,
        message_id="m-1",
        kind="page",
        event="Page Viewed",
        at=NOW,
        properties={"path": "/"},
    )
    caused_by = CONTACT_ACTIVITY.envelope(
        workspace_id="w",
        payload=activity,
        occurred_at=NOW,
        origin_received_at=NOW - timedelta(seconds=1),
    )
    segment_id = uuid.uuid4()
    for cause in (Cause(caused_by), Cause(work="recheck")):
        for entered, at in ((True, NOW), (False, NOW + timedelta(microseconds=1500))):
            built = transition(
                "w", segment_id, "Pros", contact, entered=entered, at=at, cause=cause
            ).envelope
            reference = (SEGMENT_ENTERED if entered else SEGMENT_EXITED).envelope(
                workspace_id="w",
                payload=MembershipChanged(
                    segment_id=segment_id, segment_name="Pros", contact=contact, at=at
                ),
                occurred_at=at,
                id=cause.message_id(segment_id, contact.contact_id),
                caused_by=cause.envelope,
                scope=str(segment_id),
            )
            assert built == reference
            assert built.encode() == reference.encode()
