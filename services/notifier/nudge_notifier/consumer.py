"""Notifier's Kafka wiring: each notification request is rendered, claimed, sent at most
once, and reported on the deliveries topic.

The at-most-once rule: a key is claimed (status ``sending``) and committed before the
provider is called, and its outcome is committed right after. A key found still
``sending`` belongs to a process that died mid-send; whether the provider took the message
cannot be known, so it is recorded as ``unknown`` and never sent again.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import structlog
from pydantic import TypeAdapter
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.consumer import ConsumerRunner
from nudge_common.db import SessionMaker, transaction
from nudge_common.errors import InvalidMessage, RetryLater
from nudge_common.events import (
    DELIVERY_REPORTED,
    NOTIFICATION_REQUESTED,
    DeliveryReported,
    DeliveryStatus,
    Envelope,
    NotificationRequested,
    Topic,
)
from nudge_common.kafka import OutgoingMessage
from nudge_common.service import Runtime
from nudge_notifier import metrics, store
from nudge_notifier.domain.templates import TemplateRenderError, render
from nudge_notifier.providers.email import PermanentFailure, SmtpEmailProvider, TransientFailure
from nudge_notifier.settings import NotifierSettings

log = structlog.get_logger(__name__)
DELIVERY_STATUS: TypeAdapter[DeliveryStatus] = TypeAdapter(DeliveryStatus)
INTERRUPTED = "interrupted while sending; not resent"


class NotificationHandler:
    def __init__(self, sessionmaker: SessionMaker, email: SmtpEmailProvider) -> None:
        self.sessionmaker = sessionmaker
        self.email = email

    async def __call__(
        self, session: AsyncSession, envelope: Envelope
    ) -> Sequence[OutgoingMessage]:
        if envelope.type != NOTIFICATION_REQUESTED.name:
            return []
        request = NOTIFICATION_REQUESTED.parse(envelope)
        if request.channel != "email":
            raise InvalidMessage(f"channel {request.channel!r} is not supported yet")
        template = await store.get_template(
            session, workspace_id=envelope.workspace_id, template_id=request.template_id
        )
        if template is None:
            raise InvalidMessage(f"template {request.template_id} does not exist")
        recipient = request.contact.traits.get("email")
        if not isinstance(recipient, str) or not recipient:
            await store.record_skipped(
                session,
                idempotency_key=request.idempotency_key,
                workspace_id=envelope.workspace_id,
                channel=request.channel,
                contact_id=request.contact.contact_id,
                reason="no email address",
            )
            return [self._report(envelope, request, "skipped", reason="no email address")]
        try:
            rendered = render(template, {"contact": request.contact.model_dump(mode="json")})
        except TemplateRenderError as error:
            raise InvalidMessage(str(error)) from error

        async with transaction(self.sessionmaker) as claim_session:
            claimed = await store.claim(
                claim_session,
                idempotency_key=request.idempotency_key,
                workspace_id=envelope.workspace_id,
                channel=request.channel,
                contact_id=request.contact.contact_id,
                recipient=recipient,
            )
        if not claimed:
            return [await self._settle_earlier_claim(envelope, request)]

        try:
            message_id = await self.email.send(
                to=recipient, rendered=rendered, idempotency_key=request.idempotency_key
            )
        except TransientFailure as error:
            await self._record(request.idempotency_key, store.RETRY, reason=str(error))
            raise RetryLater(str(error)) from error
        except PermanentFailure as error:
            await self._record(request.idempotency_key, "failed", reason=str(error))
            return [self._report(envelope, request, "failed", recipient, reason=str(error))]
        except Exception as error:
            await self._record(request.idempotency_key, "unknown", reason=repr(error))
            log.exception("send outcome unknown", idempotency_key=request.idempotency_key)
            return [self._report(envelope, request, "unknown", recipient, reason=repr(error))]

        await self._record(request.idempotency_key, "sent", provider_message_id=message_id)
        if envelope.origin_received_at:
            latency = datetime.now(UTC) - envelope.origin_received_at
            metrics.END_TO_END_LATENCY.labels(request.channel).observe(latency.total_seconds())
        return [self._report(envelope, request, "sent", recipient, message_id=message_id)]

    async def _settle_earlier_claim(
        self, envelope: Envelope, request: NotificationRequested
    ) -> OutgoingMessage:
        """The key was claimed before. Report its recorded outcome again (the report of
        the first attempt may not have been published); a claim still ``sending`` is a
        send interrupted by a crash and becomes ``unknown``."""
        async with transaction(self.sessionmaker) as session:
            delivery = await store.get_delivery(session, idempotency_key=request.idempotency_key)
            status: DeliveryStatus
            reason: str | None
            if delivery.status == store.SENDING:
                status, reason = "unknown", INTERRUPTED
                await store.record_outcome(
                    session, idempotency_key=request.idempotency_key, status=status, reason=reason
                )
            else:
                status, reason = DELIVERY_STATUS.validate_python(delivery.status), delivery.reason
        metrics.MESSAGES.labels(request.channel, "duplicate").inc()
        return self._report(
            envelope,
            request,
            status,
            delivery.recipient,
            message_id=delivery.provider_message_id,
            reason=reason,
        )

    async def _record(
        self,
        key: str,
        status: str,
        *,
        provider_message_id: str | None = None,
        reason: str | None = None,
    ) -> None:
        async with transaction(self.sessionmaker) as session:
            await store.record_outcome(
                session,
                idempotency_key=key,
                status=status,
                provider_message_id=provider_message_id,
                reason=reason,
            )

    def _report(
        self,
        envelope: Envelope,
        request: NotificationRequested,
        status: DeliveryStatus,
        recipient: str | None = None,
        *,
        message_id: str | None = None,
        reason: str | None = None,
    ) -> OutgoingMessage:
        metrics.MESSAGES.labels(request.channel, status).inc()
        report = DeliveryReported(
            idempotency_key=request.idempotency_key,
            channel=request.channel,
            status=status,
            contact_id=request.contact.contact_id,
            recipient=recipient,
            provider_message_id=message_id,
            reason=reason,
        )
        return OutgoingMessage(
            Topic.DELIVERIES,
            key=str(request.contact.contact_id),
            envelope=DELIVERY_REPORTED.envelope(
                workspace_id=envelope.workspace_id,
                payload=report,
                occurred_at=datetime.now(UTC),
                caused_by=envelope,
            ),
        )


def consumers(runtime: Runtime) -> list[ConsumerRunner]:
    settings = runtime.settings
    assert isinstance(settings, NotifierSettings)
    return [
        ConsumerRunner(
            name="notifier",
            topics=[Topic.NOTIFICATIONS],
            handler=NotificationHandler(runtime.sessionmaker, SmtpEmailProvider(settings)),
            settings=settings,
            sessionmaker=runtime.sessionmaker,
            producer=runtime.producer,
            processed_messages=store.processed_messages,
        )
    ]
