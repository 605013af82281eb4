"""Ingest encodes each event's envelope straight from its payload
(``encode_segment_event``), without the models: the bytes must be the ones the models give,
so every consumer decodes them as before."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from nudge_common.events import (
    EVENT_RECEIVED,
    Envelope,
    SegmentEvent,
    SegmentType,
    encode_segment_event,
    segment_event_id,
)
from nudge_common.ids import stable_id, stable_id_str
from nudge_ingest.domain.calls import SegmentCall, check_call, normalise, normalised_payload

RECEIVED = datetime(2026, 11, 23, 12, 0, 0, 123456, tzinfo=UTC)

CALLS: list[tuple[SegmentType, dict[str, Any]]] = [
    (
        SegmentType.TRACK,
        {
            "userId": "u1",
            "event": "Order Completed",
            "messageId": "m-1",
            "properties": {"revenue": 49.5, "items": [{"sku": "a", "qty": 2}], "coupon": None},
            "context": {"page": {"url": "https://shop.example/"}, "locale": "en-GB"},
            "integrations": {"All": False, "Mixpanel": True},
            "timestamp": "2026-11-23T10:00:00.5+02:00",
            "sentAt": "2026-11-23T10:00:01+02:00",
        },
    ),
    (
        SegmentType.IDENTIFY,
        {
            "userId": 42,
            "anonymousId": "a1",
            "traits": {"email": "ada@example.com", "name": "Ada", "age": 36, "vip": True},
            "context": {"ip": "10.1.2.3", "location": {"city": "Paris"}},
            "timestamp": "2026-11-23T10:00:00",
        },
    ),
    (
        SegmentType.PAGE,
        {
            "anonymousId": "a2",
            "name": "Pricing",
            "category": "Docs",
            "properties": {"path": "/pricing", "title": "Prix — ünïcødé ✓"},
            "context": {"userAgent": "Their UA", "campaign": {"source": "news"}},
            "sentAt": "2026-11-23T11:59:59.999999Z",
        },
    ),
    (SegmentType.SCREEN, {"userId": "u3", "name": "Home", "messageId": "ios-7"}),
    (
        SegmentType.GROUP,
        {
            "userId": "u4",
            "groupId": 7,
            "traits": {"plan": "enterprise", "employees": 120},
            "version": 2,
            "channel": "server",
        },
    ),
    (
        SegmentType.ALIAS,
        {
            "userId": "u5",
            "previousId": "a5",
            "timestamp": "2026-11-23T10:00:00-05:30",
            "sentAt": "2026-11-23T10:00:00Z",
            "receivedAt": "1999-01-01T00:00:00Z",
            "workspaceId": "someone-else",
        },
    ),
]


@pytest.mark.parametrize(("call_type", "body"), CALLS, ids=[c.value for c, _ in CALLS])
@pytest.mark.parametrize("country", [None, "FR"])
def test_encoded_envelope_is_the_models_bytes(
    call_type: SegmentType, body: dict[str, Any], country: str | None
) -> None:
    call = SegmentCall.model_validate(body)
    assert check_call(call, call_type) == []
    payload = normalised_payload(
        call,
        call_type,
        received_at=RECEIVED,
        client_ip="127.0.0.9",
        user_agent="UA/1",
        country=country,
    )
    event = SegmentEvent.model_validate(payload)
    by_models = EVENT_RECEIVED.envelope(
        id=segment_event_id("ws-1", event.message_id),
        workspace_id="ws-1",
        payload=event,
        occurred_at=event.timestamp,
        origin_received_at=event.received_at,
    ).encode()

    encoded = encode_segment_event("ws-1", payload)

    assert encoded == by_models
    decoded = Envelope.decode(encoded)
    assert decoded.id == segment_event_id("ws-1", event.message_id)
    assert EVENT_RECEIVED.parse(decoded) == normalise(
        call,
        call_type,
        received_at=RECEIVED,
        client_ip="127.0.0.9",
        user_agent="UA/1",
        country=country,
    ).model_copy(update={"message_id": event.message_id})


@pytest.mark.parametrize(
    "parts",
    [("ws-1", "message", "m-1"), ("", "message", ""), ("wsé", "message", "日本 ✓"), ("a",)],
)
def test_stable_id_str_is_the_uuid5(parts: tuple[str, ...]) -> None:
    assert stable_id_str(*parts) == str(stable_id(*parts))
