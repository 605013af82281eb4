"""The one event schema module: the envelope every internal message travels in, the
Segment-spec event that ingest publishes, and the payload of every internal event type.

An internal message on Kafka is an :class:`Envelope` encoded as JSON. Its ``type`` names an
:class:`EventType`, which knows the payload model and the topic it travels on. Producers
build envelopes with ``EVENT_TYPE.envelope(...)``; consumers read payloads with
``EVENT_TYPE.parse(envelope)``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from nudge_common import codec
from nudge_common.ids import stable_id, stable_id_str


class Topic(StrEnum):
    """Logical topic names; the settings' prefix turns them into real topic names."""

    EVENTS = "events"
    CONTACTS = "contacts"
    MEMBERSHIPS = "memberships"
    NOTIFICATIONS = "notifications"
    DELIVERIES = "deliveries"
    CONFIG = "config"
    DEAD_LETTER = "deadletter"


TYPE_HEADER = "nudge.type"
"""The record header that repeats the envelope's ``type``: a consumer passes over the types
it does not read without decoding them (``ConsumerRunner``)."""


class Envelope(BaseModel):
    """Versioned wrapper of every internal event."""

    model_config = ConfigDict(frozen=True)

    type: str
    version: int = 1
    id: uuid.UUID
    occurred_at: datetime
    workspace_id: str = Field(min_length=1)
    origin_received_at: datetime | None = None
    """When ingest received the outside event that caused this one: carried down the
    pipeline so the end-to-end latency can be measured where the chain ends."""
    payload: dict[str, Any]

    def encode(self) -> bytes:
        """What ``codec.dumps(self)`` gives, byte for byte, without pydantic walking the
        payload (already JSON-ready, from a model's dump or a derived envelope): orjson
        writes the UUIDs and datetimes as pydantic does, and a value it does not know (a
        Decimal, a set) takes the model's way."""
        fields: dict[str, Any] = {
            "type": self.type,
            "version": self.version,
            "id": self.id,
            "occurred_at": self.occurred_at,
            "workspace_id": self.workspace_id,
        }
        if self.origin_received_at is not None:
            fields["origin_received_at"] = self.origin_received_at
        fields["payload"] = self.payload
        try:
            return codec.dumps(fields)
        except TypeError:
            return codec.dumps(self)

    @classmethod
    def decode(cls, data: bytes) -> Envelope:
        return cls.model_validate_json(data)


PayloadT = TypeVar("PayloadT", bound=BaseModel)


@dataclass(frozen=True)
class EventType(Generic[PayloadT]):
    name: str
    payload_model: type[PayloadT]
    topic: Topic
    version: int = 1

    def envelope(
        self,
        *,
        workspace_id: str,
        payload: PayloadT,
        occurred_at: datetime,
        id: uuid.UUID | None = None,
        caused_by: Envelope | None = None,
        scope: str = "",
        origin_received_at: datetime | None = None,
    ) -> Envelope:
        """Build an envelope. With ``caused_by`` and no ``id``, the id is derived from the
        cause (and ``scope``, when one cause has several outputs of this type), so
        re-processing the same input yields the same output id."""
        if id is None:
            id = stable_id(str(caused_by.id), self.name, scope) if caused_by else uuid.uuid4()
        return Envelope(
            type=self.name,
            version=self.version,
            id=id,
            occurred_at=occurred_at,
            workspace_id=workspace_id,
            origin_received_at=origin_received_at
            or (caused_by.origin_received_at if caused_by else None),
            payload=payload.model_dump(mode="json", by_alias=True),
        )

    def parse(self, envelope: Envelope) -> PayloadT:
        return self.payload_model.model_validate(envelope.payload)


# --- Segment spec -------------------------------------------------------------------------


class SegmentType(StrEnum):
    TRACK = "track"
    IDENTIFY = "identify"
    PAGE = "page"
    SCREEN = "screen"
    GROUP = "group"
    ALIAS = "alias"


class SegmentEvent(BaseModel):
    """A Segment-spec call after ingest validated and enriched it: ``messageId``,
    ``receivedAt`` and a skew-corrected ``timestamp`` are always present."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True, extra="allow")

    type: SegmentType
    message_id: str = Field(alias="messageId", min_length=1, max_length=255)
    user_id: str | None = Field(default=None, alias="userId")
    anonymous_id: str | None = Field(default=None, alias="anonymousId")
    event: str | None = None
    name: str | None = None
    category: str | None = None
    properties: dict[str, Any] = Field(default_factory=dict)
    traits: dict[str, Any] = Field(default_factory=dict)
    context: dict[str, Any] = Field(default_factory=dict)
    integrations: dict[str, Any] = Field(default_factory=dict)
    group_id: str | None = Field(default=None, alias="groupId")
    previous_id: str | None = Field(default=None, alias="previousId")
    timestamp: datetime
    sent_at: datetime | None = Field(default=None, alias="sentAt")
    received_at: datetime = Field(alias="receivedAt")
    original_timestamp: datetime | None = Field(default=None, alias="originalTimestamp")

    @property
    def identity(self) -> str:
        """The partition key: one contact's events stay in order on one partition."""
        identity = self.user_id or self.anonymous_id
        if identity is None:  # ingest refuses such calls; a hand-made event may not
            raise ValueError("a Segment event needs userId or anonymousId")
        return identity


# --- Internal payloads --------------------------------------------------------------------


class ContactUpdated(BaseModel):
    contact_id: uuid.UUID
    user_id: str | None = None
    traits: dict[str, Any] = Field(default_factory=dict)
    scores: dict[str, int] = Field(default_factory=dict)
    tags: dict[str, int] = Field(default_factory=dict)
    """The contact's active tags and their tag scores (how many times each was assigned)."""
    stages: dict[str, str] = Field(default_factory=dict)
    """The lifecycle stage per scoring model."""
    changed: list[Literal["traits", "scores", "tags", "stages"]]
    cause_message_id: str | None = None


class ContactActivity(BaseModel):
    """An event a contact performed, once identity is resolved: published by scoring for
    every new track, page and screen call it stores, keyed by the contact, so consumers of
    the contacts topic see a contact's events in order with its updates."""

    contact_id: uuid.UUID
    message_id: str
    kind: Literal["track", "page", "screen"]
    event: str
    """The track event's name; for page and screen calls, ``Page Viewed`` and
    ``Screen Viewed``."""
    properties: dict[str, Any] = Field(default_factory=dict)
    revenue: float | None = None
    """Set on ``Order Completed`` (the order value) and ``Order Refunded`` (negative)."""
    at: datetime


class ListChanged(BaseModel):
    """A request to add a contact to a static list or remove it (by a workflow step);
    the segmenter, which owns lists, applies it and publishes the membership change."""

    list_id: uuid.UUID
    contact_id: uuid.UUID
    action: Literal["add", "remove"]
    reason: str = "workflow"
    at: datetime


class ContactSnapshot(BaseModel):
    contact_id: uuid.UUID
    user_id: str | None = None
    traits: dict[str, Any] = Field(default_factory=dict)
    scores: dict[str, int] = Field(default_factory=dict)
    segments: list[str] = Field(default_factory=list)
    """Names of the segments the contact is in, as the orchestrator knows them when it
    requests a notification (templates test them); empty elsewhere."""


class MembershipChanged(BaseModel):
    segment_id: uuid.UUID
    segment_name: str
    contact: ContactSnapshot
    at: datetime


Channel = Literal["email", "sms", "push"]


class NotificationRequested(BaseModel):
    idempotency_key: str = Field(min_length=1, max_length=200)
    channel: Channel
    template_id: uuid.UUID
    contact: ContactSnapshot
    workflow_id: uuid.UUID | None = None
    run_id: uuid.UUID | None = None
    step: int | None = None
    recipient: str | None = Field(default=None, min_length=3, max_length=320)
    """Internal mail (e.g. notify sales): send to this address instead of the contact's.
    The contact's consent, suppression and frequency caps do not apply (nor tracking or
    unsubscribe links); the idempotency key does. Email only."""
    data: dict[str, Any] = Field(default_factory=dict)
    """More template variables, seen as ``data`` (e.g. the contact's 360 summary)."""


CONTACT_SUMMARY_TEMPLATE_ID = uuid.UUID("00000000-0000-4000-8000-000000000360")
"""An email template every notifier has without being told: the contact's 360 summary
(``data`` of a notify-sales request) for internal mail."""


DeliveryStatus = Literal[
    "sent",
    "failed",
    "skipped",
    "unknown",
    # Later news about a sent message, from providers' webhooks and tracking:
    "delivered",
    "bounced",
    "complained",
    "opened",
    "clicked",
    "unsubscribed",
]


class DeliveryReported(BaseModel):
    idempotency_key: str
    channel: Channel
    status: DeliveryStatus
    contact_id: uuid.UUID
    recipient: str | None = None
    provider_message_id: str | None = None
    reason: str | None = None
    detail: dict[str, Any] = Field(default_factory=dict)
    """What the status carries: the clicked URL, ``bot: true`` for a prefetch open, the
    bounce's SMTP status, the unsubscribed topic."""


ConsentStatus = Literal["pending", "subscribed", "unsubscribed"]


class ConsentChanged(BaseModel):
    """A recipient's consent to a channel (and subscription topic) changed, or an address
    was suppressed or released (``suppressed`` set): published by the notifier, which owns
    consent and the suppression list."""

    channel: Channel
    address: str
    topic: str | None = None
    status: ConsentStatus | None = None
    suppressed: bool | None = None
    reason: str
    contact_id: uuid.UUID | None = None
    at: datetime


class ContactMerged(BaseModel):
    """Two contacts turned out to be one person: everything of ``merged_id`` now belongs to
    ``survivor_id``, and ``merged_id`` will not appear again. Downstream services move what
    they keep for the merged contact to the survivor."""

    survivor_id: uuid.UUID
    merged_id: uuid.UUID
    reason: Literal["identify", "alias", "email"]
    identity: str
    """The identity that joined them, e.g. ``anonymous_id:abc`` or ``email:a@b.c``."""
    at: datetime


class ContactStageChanged(BaseModel):
    contact_id: uuid.UUID
    model: str
    previous_stage: str | None = None
    stage: str
    score: int
    at: datetime


class ScoreAdjusted(BaseModel):
    """Points given to or taken from a contact's score in a model without a rule (a
    workflow's ``adjust_score`` step). Scoring applies each ``adjustment_id`` once, moves
    lifecycle stages and publishes ``contact.updated``. Keyed by the contact id."""

    contact_id: uuid.UUID
    model: str = Field(min_length=1, max_length=100)
    points: int
    reason: str = Field(default="adjustment", min_length=1, max_length=100)
    """Kept in the score breakdown (``score_changes.reason``), e.g. ``workflow``."""
    adjustment_id: str = Field(min_length=1, max_length=200)
    """What makes a replay count once, e.g. ``<run id>:<step>``."""
    at: datetime


class ContactErased(BaseModel):
    """GDPR erasure: every service deletes or anonymises what it holds about these contacts
    (the contact and the contacts merged into it)."""

    contact_id: uuid.UUID
    contact_ids: list[uuid.UUID]
    at: datetime


EVENT_RECEIVED = EventType("event.received", SegmentEvent, Topic.EVENTS)
SCORE_ADJUSTED = EventType("score.adjusted", ScoreAdjusted, Topic.EVENTS)
CONTACT_UPDATED = EventType("contact.updated", ContactUpdated, Topic.CONTACTS)
CONTACT_MERGED = EventType("contact.merged", ContactMerged, Topic.CONTACTS)
CONTACT_STAGE_CHANGED = EventType("contact.stage_changed", ContactStageChanged, Topic.CONTACTS)
CONTACT_ERASED = EventType("contact.erased", ContactErased, Topic.CONTACTS)
CONTACT_ACTIVITY = EventType("contact.activity", ContactActivity, Topic.CONTACTS)
LIST_CHANGED = EventType("list.changed", ListChanged, Topic.CONTACTS)
SEGMENT_ENTERED = EventType("segment.entered", MembershipChanged, Topic.MEMBERSHIPS)
SEGMENT_EXITED = EventType("segment.exited", MembershipChanged, Topic.MEMBERSHIPS)
NOTIFICATION_REQUESTED = EventType(
    "notification.requested", NotificationRequested, Topic.NOTIFICATIONS
)
DELIVERY_REPORTED = EventType("delivery.reported", DeliveryReported, Topic.DELIVERIES)
CONSENT_CHANGED = EventType("consent.changed", ConsentChanged, Topic.DELIVERIES)


def segment_event_id(workspace_id: str, message_id: str) -> uuid.UUID:
    """The envelope id of an inbound event: an SDK retry of the same ``messageId`` maps to
    the same id, so every consumer counts it once."""
    return stable_id(workspace_id, "message", message_id)


def encode_segment_event(workspace_id: str, payload: dict[str, Any]) -> bytes:
    """The encoded ``event.received`` envelope of an inbound event, built without the
    models (ingest's hot path): byte for byte what ``EVENT_RECEIVED.envelope(...).encode()``
    gives with the id from :func:`segment_event_id`, ``occurred_at`` the event's
    ``timestamp`` and ``origin_received_at`` its ``receivedAt``.

    ``payload`` must be what ``SegmentEvent.model_dump(by_alias=True)`` gives for a valid
    event: every field in declaration order (``None`` included, aware datetimes), then the
    extra keys. Nothing here validates it."""
    return codec.dumps(
        {
            "type": EVENT_RECEIVED.name,
            "version": EVENT_RECEIVED.version,
            "id": stable_id_str(workspace_id, "message", payload["messageId"]),
            "occurred_at": payload["timestamp"],
            "workspace_id": workspace_id,
            "origin_received_at": payload["receivedAt"],
            "payload": payload,
        }
    )


_DATETIME: TypeAdapter[datetime] = TypeAdapter(datetime)


def json_datetime(value: datetime) -> str:
    """A datetime as payload models dump it in JSON mode (UTC as ``Z``)."""
    return _DATETIME.dump_python(value, mode="json")  # type: ignore[no-any-return]


def derived_envelope(
    event_type: EventType[Any],
    *,
    workspace_id: str,
    payload: dict[str, Any],
    occurred_at: datetime,
    caused_by: Envelope,
    scope: str = "",
) -> Envelope:
    """``event_type.envelope(...)`` caused by ``caused_by`` for a payload already in its JSON
    form, built without the payload model (hot paths): the same envelope when ``payload``
    is what ``model_dump(mode="json", by_alias=True)`` gives for the payload, key order
    included. Nothing here validates it; a test holds each hand-built payload equal to
    its model's."""
    return Envelope(
        type=event_type.name,
        version=event_type.version,
        id=stable_id_str(str(caused_by.id), event_type.name, scope),  # validated to a UUID
        occurred_at=occurred_at,
        workspace_id=workspace_id,
        origin_received_at=caused_by.origin_received_at,
        payload=payload,
    )


# --- definitions announced on the config topic --------------------------------------------


class TemplateDefined(BaseModel):
    """A message template created, changed or deleted through the marketers' API (served
    by the orchestrator); the notifier, which renders and sends, stores it. Keyed by the
    template id on the compacted config topic, so the latest definition is kept."""

    template_id: uuid.UUID
    name: str
    channel: Channel
    subject: str = ""
    html: str = ""
    text: str = ""
    topic: str = "marketing"
    deleted: bool = False


TEMPLATE_DEFINED = EventType("template.defined", TemplateDefined, Topic.CONFIG)
