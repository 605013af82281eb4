"""Providers' webhooks, per workspace: inbound SMS (STOP/START keywords), SMS status
callbacks, delivery status notifications (bounces), and complaints (an ESP's JSON, or a
mailbox provider's abuse report in ARF).

Inbound Twilio requests are checked against ``X-Twilio-Signature`` (HMAC-SHA1 of the URL
and the sorted form fields with the auth token) when the header is present... and required
outside development."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from nudge_common.service import RuntimeDep
from nudge_notifier import feedback, store
from nudge_notifier.api.deps import ApiError, SettingsDep, effects
from nudge_notifier.domain.bounces import NotADsn, parse_dsn
from nudge_notifier.domain.complaints import NotAnArf, parse_arf
from nudge_notifier.domain.consent import ALL_TOPICS, sms_keyword
from nudge_notifier.domain.hygiene import InvalidPhone, to_e164

router = APIRouter(prefix="/webhooks/{workspace_id}", tags=["webhooks"])
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'


async def _twilio_form(request: Request, settings: SettingsDep) -> dict[str, str]:
    form = dict(parse_qsl((await request.body()).decode(errors="replace")))
    signature = request.headers.get("X-Twilio-Signature")
    if signature is None:
        if settings.environment == "production":
            raise ApiError(401, "X-Twilio-Signature", "missing signature")
        return form
    signed = str(request.url) + "".join(f"{k}{form[k]}" for k in sorted(form))
    expected = base64.b64encode(
        hmac.new(
            settings.sms_auth_token.get_secret_value().encode(), signed.encode(), hashlib.sha1
        ).digest()
    ).decode()
    if not hmac.compare_digest(expected, signature):
        raise ApiError(401, "X-Twilio-Signature", "signature does not match")
    return form


@router.post("/sms/inbound")
async def sms_inbound(
    workspace_id: str, request: Request, runtime: RuntimeDep, settings: SettingsDep
) -> Response:
    """A reply to our number: STOP-like keywords unsubscribe the sender from SMS, START
    subscribes again; other texts are ignored."""
    form = await _twilio_form(request, settings)
    sender, body = form.get("From"), form.get("Body")
    if not sender:
        raise ApiError(400, "From", "missing sender")
    if body is None:
        raise ApiError(400, "Body", "missing body")
    try:
        address = to_e164(sender, settings.sms_default_region)
    except InvalidPhone as error:
        raise ApiError(400, "From", str(error)) from error
    status = sms_keyword(body)
    if status is not None:
        async with effects(runtime) as (session, outgoing):
            outgoing += await feedback.set_consent(
                session,
                workspace_id,
                channel="sms",
                address=address,
                topic=ALL_TOPICS,
                status=status,
                source=f"sms keyword {body.strip().upper()}",
            )
    return Response(EMPTY_TWIML, media_type="application/xml")


@router.post("/sms/status")
async def sms_status(
    workspace_id: str, request: Request, runtime: RuntimeDep, settings: SettingsDep
) -> dict[str, bool]:
    """The provider's status callback: ``delivered`` and ``undelivered``/``failed``."""
    form = await _twilio_form(request, settings)
    sid, status = form.get("MessageSid"), form.get("MessageStatus")
    if not sid:
        raise ApiError(400, "MessageSid", "missing message sid")
    mapped = {"delivered": "delivered", "undelivered": "failed", "failed": "failed"}.get(
        status or ""
    )
    if mapped is None:
        return {"recorded": False}
    async with effects(runtime) as (session, outgoing):
        delivery = await store.find_delivery(
            session, workspace_id=workspace_id, provider_message_id=sid
        )
        if delivery is None:
            raise ApiError(404, "MessageSid", "no such message")
        outgoing.append(
            feedback.delivery_event(
                workspace_id,
                delivery=delivery,
                status="delivered" if mapped == "delivered" else "failed",
                reason=form.get("ErrorCode"),
            )
        )
    return {"recorded": True}


@router.post("/email/dsn")
async def email_dsn(
    workspace_id: str, request: Request, runtime: RuntimeDep, settings: SettingsDep
) -> dict[str, Any]:
    """A delivery status notification (RFC 3464), as the raw message: hard bounces
    suppress the address, soft ones count towards its sunset."""
    raw = await request.body()
    try:
        bounces = parse_dsn(raw)
    except NotADsn as error:
        raise ApiError(400, "body", str(error)) from error
    async with effects(runtime) as (session, outgoing):
        for bounce in bounces:
            address = bounce.recipient.lower()
            if bounce.kind == "hard":
                outgoing += await feedback.suppress(
                    session,
                    workspace_id,
                    channel="email",
                    address=address,
                    reason="hard_bounce",
                    detail=f"{bounce.status} {bounce.diagnostic or ''}".strip(),
                    idempotency_key=bounce.idempotency_key,
                )
            else:
                outgoing += await feedback.soft_bounce(
                    session,
                    settings,
                    workspace_id,
                    channel="email",
                    address=address,
                )
    return {"bounces": [{"recipient": b.recipient, "kind": b.kind} for b in bounces]}


class ComplaintIn(BaseModel):
    email: str = Field(min_length=3, max_length=320)
    idempotency_key: str | None = None
    feedback_type: str = "abuse"


@router.post("/email/complaint")
async def email_complaint(
    workspace_id: str, complaint: ComplaintIn, runtime: RuntimeDep
) -> dict[str, bool]:
    """A spam complaint (a feedback loop report): the address is suppressed."""
    async with effects(runtime) as (session, outgoing):
        outgoing += await feedback.suppress(
            session,
            workspace_id,
            channel="email",
            address=complaint.email.lower(),
            reason="complaint",
            detail=complaint.feedback_type,
            idempotency_key=complaint.idempotency_key,
        )
    return {"suppressed": True}


@router.post("/email/arf")
async def email_arf(workspace_id: str, request: Request, runtime: RuntimeDep) -> dict[str, Any]:
    """An abuse feedback report (ARF, RFC 5965), as the raw message a feedback loop
    sends: the recipient is suppressed and the complaint reported on the delivery. The
    delivery is found by the original's ``X-Nudge-Idempotency-Key`` or ``Message-ID``
    (its recipient is then the one suppressed, as providers often redact the address in
    the report), else the report's ``Original-Rcpt-To`` or the original's ``To`` is used.
    ``not-spam`` feedback changes nothing."""
    try:
        complaint = parse_arf(await request.body())
    except NotAnArf as error:
        raise ApiError(400, "body", str(error)) from error
    if not complaint.is_complaint:
        return {"feedback_type": complaint.feedback_type, "suppressed": []}
    async with effects(runtime) as (session, outgoing):
        delivery = None
        if complaint.idempotency_key or complaint.message_id:
            delivery = await store.find_delivery(
                session,
                workspace_id=workspace_id,
                idempotency_key=complaint.idempotency_key,
                provider_message_id=complaint.message_id,
            )
        if delivery is not None and delivery.channel == "email" and delivery.recipient:
            targets = [(delivery.recipient, delivery.idempotency_key)]
        else:
            targets = [(address, None) for address in complaint.recipients]
        if not targets:
            raise ApiError(
                400, "body", "the report names neither a message of ours nor a recipient"
            )
        for address, key in targets:
            outgoing += await feedback.suppress(
                session,
                workspace_id,
                channel="email",
                address=address,
                reason="complaint",
                detail=complaint.feedback_type,
                idempotency_key=key,
            )
    return {"feedback_type": complaint.feedback_type, "suppressed": [a for a, _ in targets]}
