"""What comes back after sending: unsubscribes, opt-in confirmations, SMS keywords,
bounces, complaints, provider status callbacks, engagement, and the sunset of addresses
that soft-bounce or stay silent. Each updates consent, the suppression list or the
address's health and becomes events: ``consent.changed`` and ``delivery.reported`` on the
deliveries topic, and Segment calls on the events topic so scoring and segments see it.
Used by the routes, the consumers and the sunset job; never commits."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.events import (
    CONSENT_CHANGED,
    DELIVERY_REPORTED,
    EVENT_RECEIVED,
    Channel,
    ConsentChanged,
    ConsentStatus,
    DeliveryReported,
    DeliveryStatus,
    SegmentEvent,
    SegmentType,
    Topic,
    segment_event_id,
)
from nudge_common.kafka import OutgoingMessage
from nudge_common.tracking import engagement_event
from nudge_notifier import metrics, store
from nudge_notifier.domain.hygiene import silence_due, sunset_reason
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
    row = await store.note_soft_bounce(
        session, workspace_id=workspace_id, channel=channel, address=address
    )
    return (await _apply_sunset_rule(session, settings, row, datetime.now(UTC)))[1]


# --- sunset ------------------------------------------------------------------------------


def sunset_tag(channel: str) -> str:
    """The contact's tag while its address on ``channel`` is sunset: the sunset segment is
    ``{"kind": "tag", "tag": "sunset:email"}``."""
    return f"sunset:{channel}"


def tag_event(
    workspace_id: str,
    *,
    contact_id: uuid.UUID,
    user_id: str | None,
    add: list[str] | None = None,
    remove: list[str] | None = None,
    message_id: str,
    at: datetime,
) -> OutgoingMessage:
    """An ``identify`` call that adds (``traits.tags``) or removes (``traits.untags``)
    tags of the contact, which scoring applies; the contact as in :func:`engagement_event`."""
    traits: dict[str, Any] = {"tags": add} if add else {"untags": remove or []}
    segment = SegmentEvent.model_validate(
        {
            "type": SegmentType.IDENTIFY,
            "messageId": message_id,
            "userId": user_id,
            "anonymousId": None if user_id else f"nudge-contact:{contact_id}",
            "traits": traits,
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


def _sunset_events(row: Any, reason: str, now: datetime) -> list[OutgoingMessage]:
    """``Contact Sunset`` and the contact's sunset tag, for the contact of the address's
    last send (none when no send was recorded: nobody to tell). Their ids derive from the
    engagement (or first send) the silence is counted from, so a replay publishes the
    same messages, and a sunset after a later engagement new ones."""
    if row.contact_id is None:
        return []
    since = row.last_engaged_at or row.first_sent_at
    dedupe = f"{row.channel}:{row.address}:{since.isoformat() if since else '-'}"
    return [
        segment_event(
            row.workspace_id,
            "sunset",
            channel=row.channel,
            contact_id=str(row.contact_id),
            user_id=row.user_id,
            properties={"address": row.address, "reason": reason},
            dedupe=dedupe,
        ),
        tag_event(
            row.workspace_id,
            contact_id=row.contact_id,
            user_id=row.user_id,
            add=[sunset_tag(row.channel)],
            message_id=f"nudge:sunset-tag:{dedupe}",
            at=now,
        ),
    ]


async def _apply_sunset_rule(
    session: AsyncSession, settings: NotifierSettings, row: Any, now: datetime
) -> tuple[bool, list[OutgoingMessage]]:
    """Sunset the address if the rule selects it now (True, and the events); otherwise
    move its silence due time to what the current settings say (a changed period applies
    from here)."""
    reason = sunset_reason(
        store.health_of(row),
        now=now,
        soft_bounces=settings.soft_bounce_sunset_threshold,
        unengaged_days=settings.unengaged_sunset_days,
        min_sends=settings.unengaged_sunset_min_sends,
    )
    if reason is not None:
        if not await store.mark_sunset(
            session,
            workspace_id=row.workspace_id,
            channel=row.channel,
            address=row.address,
            reason=reason,
        ):
            return False, []
        metrics.ENGAGEMENT.labels(row.channel, "sunset").inc()
        return True, _sunset_events(row, reason, now)
    due = silence_due(
        store.health_of(row),
        unengaged_days=settings.unengaged_sunset_days,
        min_sends=settings.unengaged_sunset_min_sends,
    )
    due = due if due is not None and due > now else None
    if due != row.silence_due_at:
        await store.reschedule_silence(session, row=row, due_at=due)
    return False, []


async def sunset_due(
    session: AsyncSession, settings: NotifierSettings, now: datetime, limit: int
) -> tuple[int, list[OutgoingMessage]]:
    """The sunset job's round: the addresses whose silence rule is due (by index, oldest
    first, skipping those another replica holds). Returns how many were looked at."""
    rows = await store.due_silences(session, now=now, limit=limit)
    out: list[OutgoingMessage] = []
    for row in rows:
        out += (await _apply_sunset_rule(session, settings, row, now))[1]
    return len(rows), out


async def run_sunset(
    session: AsyncSession, settings: NotifierSettings, workspace_id: str
) -> tuple[int, list[OutgoingMessage]]:
    """On demand: apply the rule to every address of the workspace now, and reschedule
    the others with the current settings. Returns how many were sunset."""
    now = datetime.now(UTC)
    sunset, out = 0, []
    for row in await store.health_rows(session, workspace_id=workspace_id):
        done, messages = await _apply_sunset_rule(session, settings, row, now)
        sunset += done
        out += messages
    return sunset, out


async def engaged(session: AsyncSession, engagements: list[store.Engaged]) -> list[OutgoingMessage]:
    """Opens and clicks: the addresses' silence restarts, and a sunset address comes back
    (its contact loses the sunset tag)."""
    out: list[OutgoingMessage] = []
    at = {(e.workspace_id, e.channel, e.address): e.at for e in engagements}
    for row in await store.note_engagements(session, engagements):
        metrics.ENGAGEMENT.labels(row.channel, "sunset_lifted").inc()
        if row.contact_id is None:
            continue
        when = at[(row.workspace_id, row.channel, row.address)]
        out.append(
            tag_event(
                row.workspace_id,
                contact_id=row.contact_id,
                user_id=row.user_id,
                remove=[sunset_tag(row.channel)],
                message_id=f"nudge:unsunset-tag:{row.channel}:{row.address}:{when.isoformat()}",
                at=when,
            )
        )
    return out
