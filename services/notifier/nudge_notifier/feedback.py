"""What comes back after sending: unsubscribes, opt-in confirmations, SMS keywords,
bounces, complaints, provider status callbacks, and the sunset of unengaged addresses.
Each updates consent or the suppression list and becomes events: ``consent.changed`` and
``delivery.reported`` on the deliveries topic, and a Segment ``track`` event on the
events topic so scoring and segments see it. Used by the routes; never commits."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.events import (
    CONSENT_CHANGED,
    DELIVERY_REPORTED,
    Channel,
    ConsentChanged,
    ConsentStatus,
    DeliveryReported,
    DeliveryStatus,
    Topic,
)
from nudge_common.kafka import OutgoingMessage
from nudge_common.tracking import engagement_event
from nudge_notifier import metrics, store
from nudge_notifier.domain.hygiene import Health, sunset_reason
from nudge_notifier.settings import NotifierSettings

SEGMENT_NAMES: dict[str, str] = {
    "unsubscribed": "Unsubscribed",
    "subscribed": "Subscribed",
    "bounced": "Email Bounced",
    "complained": "Email Marked as Spam",
    "delivered": "Email Delivered",
    "sunset": "Contact Sunset",
}


def _contact_uuid(contact_id: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(contact_id) if contact_id else None
    except ValueError:
        return None


def consent_event(
    workspace_id: str,
    *,
    channel: Channel,
    address: str,
    reason: str,
    topic: str | None = None,
    status: ConsentStatus | None = None,
    suppressed: bool | None = None,
    contact_id: str | None = None,
) -> OutgoingMessage:
    now = datetime.now(UTC)
    payload = ConsentChanged(
        channel=channel,
        address=address,
        topic=topic,
        status=status,
        suppressed=suppressed,
        reason=reason,
        contact_id=_contact_uuid(contact_id),
        at=now,
    )
    return OutgoingMessage(
        Topic.DELIVERIES,
        key=contact_id or address,
        envelope=CONSENT_CHANGED.envelope(
            workspace_id=workspace_id, payload=payload, occurred_at=now
        ),
    )


def delivery_event(
    workspace_id: str,
    *,
    delivery: Any,
    status: DeliveryStatus,
    reason: str | None = None,
    detail: dict[str, Any] | None = None,
) -> OutgoingMessage:
    now = datetime.now(UTC)
    report = DeliveryReported(
        idempotency_key=delivery.idempotency_key,
        channel=delivery.channel,
        status=status,
        contact_id=delivery.contact_id,
        recipient=delivery.recipient,
        provider_message_id=delivery.provider_message_id,
        reason=reason,
        detail=detail or {},
    )
    return OutgoingMessage(
        Topic.DELIVERIES,
        key=str(delivery.contact_id),
        envelope=DELIVERY_REPORTED.envelope(
            workspace_id=workspace_id, payload=report, occurred_at=now
        ),
    )


def segment_event(
    workspace_id: str,
    kind: str,
    *,
    channel: str,
    contact_id: str | None,
    user_id: str | None,
    properties: dict[str, Any],
    dedupe: str,
) -> OutgoingMessage:
    name = SEGMENT_NAMES[kind]
    if channel != "email" and name.startswith("Email "):
        name = name.replace("Email ", f"{channel.upper()} " if channel == "sms" else "Push ", 1)
    return engagement_event(
        workspace_id=workspace_id,
        event=name,
        contact_id=contact_id,
        user_id=user_id,
        properties={"channel": channel, **properties},
        message_id=f"nudge:{kind}:{dedupe}",
        at=datetime.now(UTC),
    )


async def set_consent(
    session: AsyncSession,
    workspace_id: str,
    *,
    channel: Channel,
    address: str,
    topic: str,
    status: ConsentStatus,
    source: str,
    contact_id: str | None = None,
    user_id: str | None = None,
) -> list[OutgoingMessage]:
    await store.set_consent(
        session,
        workspace_id=workspace_id,
        channel=channel,
        address=address,
        topic=topic,
        status=status,
        source=source,
    )
    metrics.ENGAGEMENT.labels(channel, status).inc()
    out = [
        consent_event(
            workspace_id,
            channel=channel,
            address=address,
            topic=topic,
            status=status,
            reason=source,
            contact_id=contact_id,
        )
    ]
    if status in ("unsubscribed", "subscribed"):
        out.append(
            segment_event(
                workspace_id,
                status,
                channel=channel,
                contact_id=contact_id,
                user_id=user_id,
                properties={"topic": topic, "source": source},
                dedupe=f"{channel}:{address}:{topic}:{uuid.uuid4()}",
            )
        )
    return out


async def suppress(
    session: AsyncSession,
    workspace_id: str,
    *,
    channel: Channel,
    address: str,
    reason: str,
    detail: str | None = None,
    idempotency_key: str | None = None,
) -> list[OutgoingMessage]:
    """Suppress the address; with the delivery that caused it (a bounce, a complaint),
    report it on that delivery and as the contact's event."""
    out: list[OutgoingMessage] = []
    added = await store.suppress(
        session,
        workspace_id=workspace_id,
        channel=channel,
        address=address,
        reason=reason,
        detail=detail,
    )
    metrics.ENGAGEMENT.labels(channel, reason).inc()
    delivery = None
    if idempotency_key:
        delivery = await store.find_delivery(
            session, workspace_id=workspace_id, idempotency_key=idempotency_key
        )
    contact_id = str(delivery.contact_id) if delivery is not None else None
    if added:
        out.append(
            consent_event(
                workspace_id,
                channel=channel,
                address=address,
                suppressed=True,
                reason=reason,
                contact_id=contact_id,
            )
        )
    kind = {"hard_bounce": "bounced", "complaint": "complained"}.get(reason)
    if delivery is not None and kind is not None:
        status: DeliveryStatus = "bounced" if kind == "bounced" else "complained"
        out.append(delivery_event(workspace_id, delivery=delivery, status=status, reason=detail))
        out.append(
            segment_event(
                workspace_id,
                kind,
                channel=channel,
                contact_id=contact_id,
                user_id=None,
                properties={"idempotency_key": delivery.idempotency_key, "reason": detail},
                dedupe=f"{delivery.idempotency_key}:{kind}",
            )
        )
    return out


async def soft_bounce(
    session: AsyncSession,
    settings: NotifierSettings,
    workspace_id: str,
    *,
    channel: Channel,
    address: str,
) -> list[OutgoingMessage]:
    health = await store.note_soft_bounce(
        session, workspace_id=workspace_id, channel=channel, address=address
    )
    return await _maybe_sunset(session, settings, workspace_id, channel, address, health)


async def _maybe_sunset(
    session: AsyncSession,
    settings: NotifierSettings,
    workspace_id: str,
    channel: str,
    address: str,
    health: Health,
) -> list[OutgoingMessage]:
    reason = sunset_reason(
        health,
        now=datetime.now(UTC),
        soft_bounces=settings.soft_bounce_sunset_threshold,
        unengaged_days=settings.unengaged_sunset_days,
        min_sends=settings.unengaged_sunset_min_sends,
    )
    if reason is None or not await store.mark_sunset(
        session, workspace_id=workspace_id, channel=channel, address=address, reason=reason
    ):
        return []
    metrics.ENGAGEMENT.labels(channel, "sunset").inc()
    return [
        segment_event(
            workspace_id,
            "sunset",
            channel=channel,
            contact_id=None,
            user_id=None,
            properties={"address": address, "reason": reason},
            dedupe=f"{channel}:{address}",
        )
    ]


async def run_sunset(
    session: AsyncSession, settings: NotifierSettings, workspace_id: str
) -> list[OutgoingMessage]:
    """Sunset every address of the workspace that the rule now selects."""
    out: list[OutgoingMessage] = []
    for row in await store.health_rows(session, workspace_id=workspace_id):
        health = Health(
            row.soft_bounces_in_a_row,
            row.sends_since_engaged,
            row.last_engaged_at,
            row.first_sent_at,
        )
        out += await _maybe_sunset(
            session, settings, workspace_id, row.channel, row.address, health
        )
    return out
