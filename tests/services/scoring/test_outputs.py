"""Scoring builds the payloads of the messages every event produces (``contact.activity``,
``contact.stage_changed``, ``contact.updated``) in their JSON form, without the payload
models (``consumer.Outputs``): each envelope must be the one the models give, byte for
byte once encoded, so every consumer of the contacts topic reads the same messages."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nudge_common.events import (
    CONTACT_ACTIVITY,
    CONTACT_STAGE_CHANGED,
    CONTACT_UPDATED,
    EVENT_RECEIVED,
    ContactActivity,
    ContactStageChanged,
    Envelope,
    SegmentEvent,
    derived_envelope,
)
from nudge_scoring import store
from nudge_scoring.consumer import ACTIVITY_NAMES, Outputs, contact_updated

AT = datetime(2026, 11, 23, 10, 0, 0, 500000, tzinfo=UTC)
RECEIVED = datetime(2026, 11, 23, 10, 0, 1, tzinfo=UTC)
CONTACT = uuid.UUID("8a1c5f46-3f2e-4a8e-9d0b-6f1d2c3b4a59")


def event(**fields: Any) -> SegmentEvent:
    return SegmentEvent.model_validate(
        {"messageId": "m-1", "userId": "u-1", "timestamp": AT, "receivedAt": RECEIVED, **fields}
    )


def cause_of(segment: SegmentEvent, origin: datetime | None = RECEIVED) -> Envelope:
    return EVENT_RECEIVED.envelope(
        workspace_id="ws-1",
        payload=segment,
        occurred_at=segment.timestamp,
        id=uuid.UUID("00000000-0000-4000-8000-000000000001"),
        origin_received_at=origin,
    )


def same(built: Envelope, expected: Envelope) -> None:
    assert built == expected
    assert built.encode() == expected.encode()


ACTIVITY_CASES: list[tuple[dict[str, Any], float | None]] = [
    ({"type": "track", "event": "Feature Used", "properties": {"plan": "pro", "n": 2}}, None),
    ({"type": "track", "event": "Order Completed", "properties": {"revenue": 49}}, 49),
    ({"type": "track", "event": "Order Refunded", "properties": {"total": "12.5"}}, -12.5),
    ({"type": "track", "event": "Empty"}, 0.0),
    ({"type": "page", "name": "Pricing", "properties": {"path": "/pricing"}}, None),
    ({"type": "page", "name": "Pricing", "properties": {"name": "own name"}}, None),
    ({"type": "page", "properties": {"nested": {"a": [1, None, "é"]}}}, None),
    ({"type": "screen", "name": "Home"}, None),
    (
        {
            "type": "track",
            "event": "Shifted",
            "timestamp": datetime(2026, 11, 23, 10, 0, tzinfo=timezone(timedelta(hours=2))),
        },
        None,
    ),
]


@pytest.mark.parametrize(("fields", "revenue"), ACTIVITY_CASES)
@pytest.mark.parametrize("origin", [RECEIVED, None])
def test_activity_is_the_models_message(
    fields: dict[str, Any], revenue: float | None, origin: datetime | None
) -> None:
    segment = event(**fields)
    cause = cause_of(segment, origin)
    out = Outputs("ws-1", cause, segment.timestamp)
    name = segment.event or "" if segment.type.value == "track" else ACTIVITY_NAMES[segment.type]
    out.activity(CONTACT, segment, name, revenue)

    properties = segment.properties
    if segment.type.value != "track" and segment.name and "name" not in properties:
        properties = {"name": segment.name, **properties}
    expected = CONTACT_ACTIVITY.envelope(
        workspace_id="ws-1",
        payload=ContactActivity(
            contact_id=CONTACT,
            message_id=segment.message_id,
            kind=segment.type.value,
            event=name,
            properties=properties,
            revenue=revenue,
            at=segment.timestamp,
        ),
        occurred_at=segment.timestamp,
        caused_by=cause,
    )
    [message] = out.messages
    assert message.key == str(CONTACT)
    same(message.envelope, expected)


@pytest.mark.parametrize("previous", [None, "lead"])
def test_stage_change_is_the_models_message(previous: str | None) -> None:
    segment = event(type="track", event="E")
    cause = cause_of(segment)
    out = Outputs("ws-1", cause, segment.timestamp)
    at = AT + timedelta(microseconds=1)
    out.stage_changed(CONTACT, "engagement", previous, "mql", 42, at)
    expected = CONTACT_STAGE_CHANGED.envelope(
        workspace_id="ws-1",
        payload=ContactStageChanged(
            contact_id=CONTACT,
            model="engagement",
            previous_stage=previous,
            stage="mql",
            score=42,
            at=at,
        ),
        occurred_at=segment.timestamp,
        caused_by=cause,
        scope="engagement",
    )
    same(out.messages[0].envelope, expected)


texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=8)
json_values = st.recursive(  # what JSON can carry: traits come from events and jsonb
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
names = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=8)


@given(
    traits=st.dictionaries(texts, json_values, max_size=5),
    scores=st.dictionaries(names, st.integers(-(2**31), 2**31 - 1), max_size=3),
    stages=st.dictionaries(names, names, max_size=3),
    tag_scores=st.dictionaries(names, st.integers(1, 2**31 - 1), max_size=3),
    user_id=st.none() | names,
    changed=st.lists(st.sampled_from(["traits", "scores", "tags", "stages"]), unique=True),
    cause_message_id=st.none() | names,
)
def test_update_is_the_models_message(
    traits: dict[str, Any],
    scores: dict[str, int],
    stages: dict[str, str],
    tag_scores: dict[str, int],
    user_id: str | None,
    changed: list[Any],
    cause_message_id: str | None,
) -> None:
    contact = store.ContactState(
        CONTACT, user_id, traits, {}, True, 0, None, scores, stages, {}, tag_scores
    )
    contact.active_tags = set(list(tag_scores)[::2])
    segment = event(type="identify")
    cause = cause_of(segment)
    out = Outputs("ws-1", cause, segment.timestamp)
    out.updated_state(contact, changed, cause_message_id)
    expected = CONTACT_UPDATED.envelope(
        workspace_id="ws-1",
        payload=contact_updated(contact, changed, cause_message_id),
        occurred_at=segment.timestamp,
        caused_by=cause,
        scope=str(CONTACT),
    )
    same(out.messages[0].envelope, expected)


def test_derived_envelope_is_the_event_types() -> None:
    segment = event(type="track", event="E")
    cause = cause_of(segment)
    payload = ContactStageChanged(
        contact_id=CONTACT, model="m", stage="s", score=1, at=AT
    ).model_dump(mode="json", by_alias=True)
    built = derived_envelope(
        CONTACT_STAGE_CHANGED,
        workspace_id="ws-1",
        payload=payload,
        occurred_at=AT,
        caused_by=cause,
        scope="m",
    )
    expected = CONTACT_STAGE_CHANGED.envelope(
        workspace_id="ws-1",
        payload=ContactStageChanged.model_validate(payload),
        occurred_at=AT,
        caused_by=cause,
        scope="m",
    )
    same(built, expected)
