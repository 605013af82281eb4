"""Signed tokens for links in messages: the open pixel and click redirects (verified by
ingest) and unsubscribe links (verified by the notifier). The notifier signs them.

A token is ``base64url(json claims) "." base64url(HMAC-SHA256(secret, claims))``. A token
whose signature does not match (a tampered URL, another secret) is refused, so the click
redirect only ever sends a reader to a URL that the notifier put in a message: never an
open redirect.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime
from typing import Any, Literal, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from nudge_common import codec
from nudge_common.events import (
    EVENT_RECEIVED,
    SegmentEvent,
    SegmentType,
    Topic,
    segment_event_id,
)
from nudge_common.kafka import OutgoingMessage

DEVELOPMENT_SECRET = "nudge-development-tracking-secret"  # noqa: S105 - refused in production


class TrackingSettings(BaseSettings):
    """Read by the notifier, which signs, and by whoever verifies (ingest): one secret."""

    model_config = SettingsConfigDict(env_prefix="NUDGE_", extra="ignore", frozen=True)

    environment: Literal["development", "test", "production"] = "development"
    tracking_secret: SecretStr = SecretStr(DEVELOPMENT_SECRET)
    tracking_max_token_bytes: int = Field(default=4096, ge=64)

    @model_validator(mode="after")
    def secret_set_in_production(self) -> Self:
        refuse_development_secret(self.environment, self.tracking_secret)
        return self


def refuse_development_secret(environment: str, secret: SecretStr) -> None:
    """Anyone can forge a token signed with the published development secret."""
    if environment == "production" and secret.get_secret_value() == DEVELOPMENT_SECRET:
        raise ValueError("NUDGE_TRACKING_SECRET must be set in production")


class InvalidToken(ValueError):
    pass


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(secret: str, claims: dict[str, Any]) -> str:
    body = _b64(codec.dumps(claims))
    mac = hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}"


def verify(secret: str, token: str, *, max_bytes: int = 4096) -> dict[str, Any]:
    """The claims of a token signed with ``secret``; :class:`InvalidToken` otherwise."""
    if len(token) > max_bytes or token.count(".") != 1:
        raise InvalidToken("malformed token")
    body, signature = token.split(".")
    expected = hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()
    try:
        given = _unb64(signature)
    except ValueError as error:
        raise InvalidToken("malformed signature") from error
    if not hmac.compare_digest(expected, given):
        raise InvalidToken("bad signature")
    try:
        claims = codec.loads(_unb64(body))
    except ValueError as error:
        raise InvalidToken("malformed claims") from error
    if not isinstance(claims, dict):
        raise InvalidToken("malformed claims")
    return claims


def engagement_event(
    *,
    workspace_id: str,
    event: str,
    contact_id: str | None,
    user_id: str | None,
    properties: dict[str, Any],
    message_id: str,
    at: datetime,
) -> OutgoingMessage:
    """An engagement (``Email Opened``, ``Email Link Clicked``, ``Unsubscribed``,
    ``Email Bounced``...) as an ordinary Segment ``track`` event on the events topic, so
    scoring and segments see it like any behaviour. The contact is its ``userId`` when
    known, else the anonymous id ``nudge-contact:<contact id>``."""
    anonymous = None if user_id else f"nudge-contact:{contact_id}"
    segment = SegmentEvent.model_validate(
        {
            "type": SegmentType.TRACK,
            "messageId": message_id,
            "userId": user_id,
            "anonymousId": anonymous,
            "event": event,
            "properties": {**properties, "contact_id": contact_id},
            "context": {"library": {"name": "nudge-notifier"}},
            "timestamp": at,
            "receivedAt": at,
        }
    )
    return OutgoingMessage(
        Topic.EVENTS,
        key=segment.identity,
        envelope=EVENT_RECEIVED.envelope(
            workspace_id=workspace_id,
            payload=segment,
            occurred_at=at,
            id=segment_event_id(workspace_id, message_id),
        ),
    )
