"""Segment-spec calls as SDKs send them, how they are checked, and how they become the
normalised :class:`~nudge_common.events.SegmentEvent` that ingest publishes. Pure: no I/O."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nudge_common.events import SegmentEvent, SegmentType

MAX_ID_LENGTH = 255
MAX_CLOCK_SKEW = timedelta(days=36525)
"""Beyond this gap between ``sentAt`` and ``timestamp`` the correction is meaningless (and
could leave the calendar)."""


class SegmentCall(BaseModel):
    """One call of the Segment HTTP tracking API, before enrichment."""

    model_config = ConfigDict(populate_by_name=True, extra="allow")

    type: SegmentType | None = None
    message_id: str | None = Field(default=None, alias="messageId", min_length=1, max_length=255)
    user_id: str | None = Field(default=None, alias="userId", max_length=MAX_ID_LENGTH)
    anonymous_id: str | None = Field(default=None, alias="anonymousId", max_length=MAX_ID_LENGTH)
    event: str | None = Field(default=None, max_length=MAX_ID_LENGTH)
    name: str | None = Field(default=None, max_length=MAX_ID_LENGTH)
    category: str | None = Field(default=None, max_length=MAX_ID_LENGTH)
    properties: dict[str, Any] = Field(default_factory=dict)
    traits: dict[str, Any] = Field(default_factory=dict)
    context: dict[str, Any] = Field(default_factory=dict)
    integrations: dict[str, Any] = Field(default_factory=dict)
    group_id: str | None = Field(default=None, alias="groupId", max_length=MAX_ID_LENGTH)
    previous_id: str | None = Field(default=None, alias="previousId", max_length=MAX_ID_LENGTH)
    timestamp: datetime | None = None
    sent_at: datetime | None = Field(default=None, alias="sentAt")
    write_key: str | None = Field(default=None, alias="writeKey")

    @field_validator("user_id", "anonymous_id", "group_id", "previous_id", mode="before")
    @classmethod
    def numbers_are_ids_too(cls, value: Any) -> Any:
        # Some SDKs send numeric ids; Segment stores them as strings.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return value


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str


def check_call(call: SegmentCall, call_type: SegmentType) -> list[FieldError]:
    """The Segment spec's per-type rules that a schema alone cannot say."""
    errors: list[FieldError] = []
    if not call.user_id and not call.anonymous_id:
        errors.append(FieldError("userId", "userId or anonymousId is required"))
    if call_type is SegmentType.TRACK and not call.event:
        errors.append(FieldError("event", "event is required on track"))
    if call_type is SegmentType.GROUP and not call.group_id:
        errors.append(FieldError("groupId", "groupId is required on group"))
    if call_type is SegmentType.ALIAS and not call.previous_id:
        errors.append(FieldError("previousId", "previousId is required on alias"))
    original, sent_at = _aware(call.timestamp), _aware(call.sent_at)
    if original and sent_at and abs(sent_at - original) > MAX_CLOCK_SKEW:
        errors.append(FieldError("sentAt", "sentAt and timestamp are more than 100 years apart"))
    return errors


def normalise(
    call: SegmentCall,
    call_type: SegmentType,
    *,
    received_at: datetime,
    client_ip: str | None,
    user_agent: str | None,
    country: str | None = None,
) -> SegmentEvent:
    """The enriched event of a checked call, as a model (see :func:`normalised_payload`)."""
    return SegmentEvent.model_validate(
        normalised_payload(
            call,
            call_type,
            received_at=received_at,
            client_ip=client_ip,
            user_agent=user_agent,
            country=country,
        )
    )


def normalised_payload(
    call: SegmentCall,
    call_type: SegmentType,
    *,
    received_at: datetime,
    client_ip: str | None,
    user_agent: str | None,
    country: str | None = None,
) -> dict[str, Any]:
    """Enrich a checked call: ``messageId`` when absent, ``receivedAt``, and the
    ``timestamp`` corrected for the device clock's skew, as Segment does:
    ``timestamp = receivedAt - (sentAt - timestamp)``. The client's ``ip``, ``userAgent``
    and ``location.country`` are added to ``context`` unless the sender set them.

    The result is what ``SegmentEvent.model_dump(by_alias=True)`` gives for the event
    (fields in order, then extra keys), so it can be encoded without building the model
    (:func:`nudge_common.events.encode_segment_event`): a checked call is a valid event."""
    original = _aware(call.timestamp)
    sent_at = _aware(call.sent_at)
    if original and sent_at:
        timestamp = received_at - (sent_at - original)
    else:
        timestamp = original or received_at
    context = dict(call.context)
    if client_ip and "ip" not in context:
        context["ip"] = client_ip
    if user_agent and "userAgent" not in context:
        context["userAgent"] = user_agent
    location = context.get("location")
    if country and not (isinstance(location, dict) and location.get("country")):
        context["location"] = {
            **(location if isinstance(location, dict) else {}),
            "country": country,
        }
    payload: dict[str, Any] = {
        "type": call_type,
        "messageId": call.message_id or f"nudge-{uuid.uuid4()}",
        "userId": call.user_id,
        "anonymousId": call.anonymous_id,
        "event": call.event,
        "name": call.name,
        "category": call.category,
        "properties": call.properties,
        "traits": call.traits,
        "context": context,
        "integrations": call.integrations,
        "groupId": call.group_id,
        "previousId": call.previous_id,
        "timestamp": timestamp,
        "sentAt": sent_at,
        "receivedAt": received_at,
        "originalTimestamp": original,
    }
    if call.model_extra:
        payload.update((k, v) for k, v in call.model_extra.items() if k not in _RESERVED)
    return payload


_RESERVED = frozenset(
    {"workspaceId"}
    | set(SegmentEvent.model_fields)
    | {field.alias for field in SegmentEvent.model_fields.values() if field.alias}
)
"""Extra keys that must never reach the event: Nudge's own, and every field's name or alias
(a sender's ``received_at`` cannot replace ingest's ``receivedAt``)."""


def _aware(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)
