from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from nudge_common.events import SegmentType
from nudge_ingest.domain.calls import SegmentCall, check_call, normalise
from nudge_ingest.domain.payload import unstorable

RECEIVED = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)


def test_timestamp_is_corrected_for_the_device_clock_skew() -> None:
    # The device clock is 1 hour fast; the event happened 5 s before the device sent it.
    sent_at = RECEIVED + timedelta(hours=1)
    call = SegmentCall.model_validate(
        {
            "userId": "u1",
            "event": "Signed Up",
            "timestamp": (sent_at - timedelta(seconds=5)).isoformat(),
            "sentAt": sent_at.isoformat(),
        }
    )
    event = normalise(
        call, SegmentType.TRACK, received_at=RECEIVED, client_ip=None, user_agent=None
    )
    assert event.timestamp == RECEIVED - timedelta(seconds=5)
    assert event.original_timestamp == sent_at - timedelta(seconds=5)
    assert event.received_at == RECEIVED


def test_missing_message_id_is_generated_and_request_data_enriches_context() -> None:
    call = SegmentCall.model_validate({"anonymousId": "a1", "event": "Clicked"})
    event = normalise(
        call, SegmentType.TRACK, received_at=RECEIVED, client_ip="127.0.0.9", user_agent="UA/1"
    )
    assert event.message_id.startswith("nudge-")
    assert event.timestamp == RECEIVED
    assert event.context == {"ip": "127.0.0.9", "userAgent": "UA/1"}
    assert event.identity == "a1"


def test_numeric_user_ids_become_strings() -> None:
    assert SegmentCall.model_validate({"userId": 42}).user_id == "42"


@pytest.mark.parametrize(
    ("body", "call_type", "field"),
    [
        ({"event": "x"}, SegmentType.TRACK, "userId"),
        ({"userId": "u"}, SegmentType.TRACK, "event"),
        ({"userId": "u"}, SegmentType.GROUP, "groupId"),
        ({"userId": "u"}, SegmentType.ALIAS, "previousId"),
    ],
)
def test_spec_rules_name_the_missing_field(
    body: dict[str, str], call_type: SegmentType, field: str
) -> None:
    [error] = check_call(SegmentCall.model_validate(body), call_type)
    assert error.field == field


def test_a_complete_identify_passes() -> None:
    call = SegmentCall.model_validate({"userId": "u", "traits": {"email": "a@b.c"}})
    assert check_call(call, SegmentType.IDENTIFY) == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"event": "a\x00b"}, "event"),
        ({"properties": {"list": [1, {"x": "\x00"}]}}, "properties.list.1.x"),
        ({"properties": {"k\x00": 1}}, "properties.k\x00"),
        ({"properties": {"n": 2**64}}, "properties.n"),
        ({"properties": {"n": -(2**63) - 1}}, "properties.n"),
    ],
)
def test_values_the_stores_cannot_hold_are_named(body: dict[str, object], field: str) -> None:
    raw = json.dumps(body).encode()
    problem = unstorable(raw, json.loads(raw))
    assert problem is not None
    assert problem.field == field


def test_ordinary_bodies_are_storable() -> None:
    body = {"properties": {"n": 2**63 - 1, "m": -(2**63), "s": "\\u0000 as text", "f": 1e300}}
    raw = json.dumps(body).encode()
    assert unstorable(raw, json.loads(raw)) is None


def test_a_gap_too_wide_to_correct_is_refused_naming_sent_at() -> None:
    call = SegmentCall.model_validate(
        {"userId": "u", "event": "E", "timestamp": "0001-01-01T00:00:00", "sentAt": "9999-01-01"}
    )
    assert [e.field for e in check_call(call, SegmentType.TRACK)] == ["sentAt"]


def test_a_sender_cannot_set_what_ingest_sets_through_extra_keys() -> None:
    call = SegmentCall.model_validate(
        {
            "userId": "u",
            "event": "E",
            "received_at": "1999-01-01T00:00:00Z",
            "receivedAt": "1999-01-01T00:00:00Z",
            "workspaceId": "someone-else",
            "custom": {"kept": True},
        }
    )
    event = normalise(
        call, SegmentType.TRACK, received_at=RECEIVED, client_ip=None, user_agent=None
    )
    assert event.received_at == RECEIVED
    dumped = event.model_dump(mode="json", by_alias=True)
    assert "workspaceId" not in dumped
    assert "received_at" not in dumped
    assert dumped["custom"] == {"kept": True}
    assert event.type is SegmentType.TRACK
