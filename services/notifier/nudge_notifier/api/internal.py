"""The internal API under ``/api/v1``: the suppression list, consent, double opt-in, list
hygiene. Not authenticated: bind it to the internal network. The orchestrator's
authenticated marketer API (issue 7) fronts it for people."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from nudge_common.events import Channel, ConsentStatus
from nudge_common.service import RuntimeDep
from nudge_common.tracking import sign
from nudge_notifier import feedback, store
from nudge_notifier.api.deps import ApiError, ProvidersDep, SettingsDep, effects
from nudge_notifier.domain.consent import ALL_TOPICS
from nudge_notifier.domain.hygiene import InvalidPhone, check_email, to_e164
from nudge_notifier.domain.templates import Rendered
from nudge_notifier.providers.base import Outbound, PermanentFailure, TransientFailure

router = APIRouter(prefix="/api/v1/workspaces/{workspace_id}", tags=["internal"])
SuppressionReason = Literal["manual", "hard_bounce", "complaint", "unsubscribed", "invalid"]


class SuppressionIn(BaseModel):
    reason: SuppressionReason = "manual"
    detail: str | None = Field(default=None, max_length=2000)


class SuppressionPublic(BaseModel):
    channel: Channel
    address: str
    reason: str
    detail: str | None
    created_at: str


def _address(settings: SettingsDep, channel: Channel, address: str) -> str:
    if channel == "email":
        check = check_email(address)
        if not check.valid or check.normalized is None:
            raise ApiError(400, "address", f"invalid email address: {check.reason}")
        return check.normalized.lower()
    if channel == "sms":
        try:
            return to_e164(address, settings.sms_default_region)
        except InvalidPhone as error:
            raise ApiError(400, "address", str(error)) from error
    return address


@router.get("/suppressions")
async def list_suppressions(
    workspace_id: str,
    runtime: RuntimeDep,
    channel: Channel | None = None,
    after: str | None = None,
    limit: int = Query(default=100, ge=1, le=1000),
) -> dict[str, Any]:
    async with effects(runtime) as (session, _):
        rows = await store.list_suppressions(
            session, workspace_id=workspace_id, channel=channel, limit=limit, after=after
        )
    items = [
        SuppressionPublic(
            channel=r.channel,
            address=r.address,
            reason=r.reason,
            detail=r.detail,
            created_at=r.created_at.isoformat(),
        )
        for r in rows
    ]
    return {"items": items, "next": items[-1].address if len(items) == limit else None}


@router.put("/suppressions/{channel}/{address}", status_code=200)
async def add_suppression(
    workspace_id: str,
    channel: Channel,
    address: str,
    body: SuppressionIn,
    runtime: RuntimeDep,
    settings: SettingsDep,
) -> dict[str, Any]:
    normalized = _address(settings, channel, address)
    async with effects(runtime) as (session, outgoing):
        outgoing += await feedback.suppress(
            session,
            workspace_id,
            channel=channel,
            address=normalized,
            reason=body.reason,
            detail=body.detail,
        )
    return {"channel": channel, "address": normalized, "suppressed": True}


@router.delete("/suppressions/{channel}/{address}")
async def remove_suppression(
    workspace_id: str, channel: Channel, address: str, runtime: RuntimeDep, settings: SettingsDep
) -> dict[str, Any]:
    normalized = _address(settings, channel, address)
    async with effects(runtime) as (session, outgoing):
        removed = await store.unsuppress(
            session, workspace_id=workspace_id, channel=channel, address=normalized
        )
        if not removed:
            raise ApiError(404, "address", "not on the suppression list")
        outgoing.append(
            feedback.consent_event(
                workspace_id,
                channel=channel,
                address=normalized,
                suppressed=False,
                reason="manual",
            )
        )
    return {"channel": channel, "address": normalized, "suppressed": False}


class ConsentIn(BaseModel):
    status: ConsentStatus
    source: str = Field(default="api", max_length=200)


@router.get("/consents/{channel}/{address}")
async def get_consents(
    workspace_id: str, channel: Channel, address: str, runtime: RuntimeDep, settings: SettingsDep
) -> dict[str, Any]:
    normalized = _address(settings, channel, address)
    async with effects(runtime) as (session, _):
        topics = await store.get_consents(
            session, workspace_id=workspace_id, channel=channel, address=normalized
        )
    return {"channel": channel, "address": normalized, "topics": topics}


@router.put("/consents/{channel}/{address}/{topic}")
async def put_consent(
    workspace_id: str,
    channel: Channel,
    address: str,
    topic: str,
    body: ConsentIn,
    runtime: RuntimeDep,
    settings: SettingsDep,
) -> dict[str, Any]:
    normalized = _address(settings, channel, address)
    async with effects(runtime) as (session, outgoing):
        outgoing += await feedback.set_consent(
            session,
            workspace_id,
            channel=channel,
            address=normalized,
            topic=topic,
            status=body.status,
            source=body.source,
        )
    return {"channel": channel, "address": normalized, "topic": topic, "status": body.status}


class OptInIn(BaseModel):
    email: str = Field(min_length=3, max_length=320)
    topic: str = ALL_TOPICS
    contact_id: uuid.UUID | None = None


@router.post("/consents/email/opt-in", status_code=202)
async def email_opt_in(
    workspace_id: str,
    body: OptInIn,
    runtime: RuntimeDep,
    settings: SettingsDep,
    providers: ProvidersDep,
) -> dict[str, Any]:
    """Double opt-in, first step: the subscription is ``pending`` and a confirmation email
    goes out; the link in it makes it ``subscribed``."""
    address = _address(settings, "email", body.email)
    claims = {
        "w": workspace_id,
        "ch": "email",
        "a": address,
        "t": body.topic,
        "p": "confirm",
        "c": str(body.contact_id) if body.contact_id else None,
    }
    url = f"{settings.public_url.rstrip('/')}/consent/confirm/" + sign(
        settings.tracking_secret.get_secret_value(), claims
    )
    async with effects(runtime) as (session, outgoing):
        outgoing += await feedback.set_consent(
            session,
            workspace_id,
            channel="email",
            address=address,
            topic=body.topic,
            status="pending",
            source="double-opt-in requested",
        )
    rendered = Rendered(
        subject="Please confirm your subscription",
        html=f'<p>Please confirm your subscription: <a href="{url}">confirm</a>.</p>',
        text=f"Please confirm your subscription: {url}\n",
    )
    try:
        await providers.providers["smtp"].send(
            Outbound("email", address, rendered, f"opt-in:{uuid.uuid4()}")
        )
    except (TransientFailure, PermanentFailure) as error:
        raise ApiError(502, "email", f"confirmation email not sent: {error}") from error
    return {"address": address, "status": "pending"}


class HygieneCheckIn(BaseModel):
    emails: list[str] = Field(default_factory=list, max_length=1000)
    phones: list[str] = Field(default_factory=list, max_length=1000)


@router.post("/hygiene/check")
async def hygiene_check(body: HygieneCheckIn, settings: SettingsDep) -> dict[str, Any]:
    """On demand: syntax, disposable and role addresses, typo suggestions, E.164."""
    emails = [check_email(e).__dict__ for e in body.emails]
    phones: list[dict[str, Any]] = []
    for phone in body.phones:
        try:
            phones.append(
                {"phone": phone, "valid": True, "e164": to_e164(phone, settings.sms_default_region)}
            )
        except InvalidPhone as error:
            phones.append({"phone": phone, "valid": False, "reason": str(error)})
    return {"emails": emails, "phones": phones}


@router.get("/hygiene/report")
async def hygiene_report(workspace_id: str, runtime: RuntimeDep) -> dict[str, Any]:
    async with effects(runtime) as (session, _):
        return await store.hygiene_report(session, workspace_id=workspace_id)


@router.post("/hygiene/sunset")
async def run_sunset(
    workspace_id: str, runtime: RuntimeDep, settings: SettingsDep
) -> dict[str, int]:
    """Apply the sunset rule now (repeated soft bounces, no engagement): each newly
    sunset address is recorded and published as a ``Contact Sunset`` event."""
    async with effects(runtime) as (session, outgoing):
        count, messages = await feedback.run_sunset(session, settings, workspace_id)
        outgoing += messages
    return {"sunset": count}
