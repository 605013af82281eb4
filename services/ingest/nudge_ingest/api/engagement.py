"""Engagement tracking for the notifier's messages: the open pixel (``/t/o/{token}.gif``)
and signed click redirects (``/t/c/{token}``).

Tokens are signed by the notifier with the shared ``NUDGE_TRACKING_SECRET``
(:mod:`nudge_common.tracking`). A token that does not verify gets 400 with a JSON body
naming ``token``: the redirect only ever goes to a URL the notifier signed, so it is never
an open redirect. Opens and clicks become ordinary Segment events for the contact
(``Email Opened``, ``Email Link Clicked``) on the events topic, and ``delivery.reported``
(``opened``, ``clicked``) on the deliveries topic. Requests recognisable as bots, link
scanners or prefetches are still recorded, with ``bot: true``, so scoring can ignore them.
The reader is never kept waiting on Kafka: if the broker does not answer in time the
engagement is dropped (and counted), the pixel or redirect is served anyway.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import re
import uuid
from datetime import UTC, datetime
from typing import Any

import structlog
from aiokafka.errors import KafkaError
from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from prometheus_client import Counter

from nudge_common.events import DELIVERY_REPORTED, DeliveryReported, DeliveryStatus, Topic
from nudge_common.http import JsonResponse
from nudge_common.kafka import OutgoingMessage, publish
from nudge_common.service import RuntimeDep
from nudge_common.tracking import InvalidToken, TrackingSettings, engagement_event, verify

log = structlog.get_logger(__name__)
router = APIRouter(tags=["engagement"])

PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
NO_CACHE = {"Cache-Control": "no-store, no-cache, must-revalidate, private", "Pragma": "no-cache"}
PUBLISH_TIMEOUT_S = 2.0
BOT_AGENTS = re.compile(
    r"bot|crawler|spider|preview|scanner|barracuda|mimecast|proofpoint|symantec|"
    r"python-requests|curl|wget|go-http-client|headlesschrome|slackbot|"
    r"facebookexternalhit|linkpreview|microsoft office existence discovery|"
    r"googleimageproxy|yahoomailproxy",
    re.IGNORECASE,
)
ENGAGEMENT_DROPPED = Counter(
    "nudge_ingest_engagement_dropped_total",
    "Opens and clicks not recorded because Kafka did not acknowledge in time.",
)
ENGAGEMENTS = Counter(
    "nudge_ingest_engagements_total",
    "Opens and clicks recorded, by kind and whether they look like a bot or prefetch.",
    ["kind", "bot"],
)


@functools.cache
def _settings() -> TrackingSettings:
    return TrackingSettings()


def _claims(token: str) -> dict[str, Any]:
    settings = _settings()
    claims = verify(
        settings.tracking_secret.get_secret_value(),
        token,
        max_bytes=settings.tracking_max_token_bytes,
    )
    if not isinstance(claims.get("w"), str) or not isinstance(claims.get("k"), str):
        raise InvalidToken("not a tracking token")
    return claims


def _invalid(error: InvalidToken) -> JsonResponse:
    return JsonResponse(
        {"success": False, "error": f"invalid tracking link: {error}", "field": "token"},
        status_code=400,
    )


def looks_automated(request: Request) -> bool:
    """A bot, a security scanner, or a prefetch (HEAD, ``Purpose: prefetch``)."""
    if request.method == "HEAD":
        return True
    purpose = " ".join(
        request.headers.get(name, "") for name in ("purpose", "sec-purpose", "x-purpose", "x-moz")
    ).lower()
    if "prefetch" in purpose or "preview" in purpose:
        return True
    return bool(BOT_AGENTS.search(request.headers.get("user-agent", "")))


async def _record(
    runtime: RuntimeDep,
    request: Request,
    claims: dict[str, Any],
    kind: DeliveryStatus,
    event: str,
    extra: dict[str, Any],
) -> None:
    bot = looks_automated(request)
    now = datetime.now(UTC)
    workspace_id, key = str(claims["w"]), str(claims["k"])
    detail = {**extra, "bot": bot, "user_agent": request.headers.get("user-agent")}
    messages: list[OutgoingMessage] = [
        engagement_event(
            workspace_id=workspace_id,
            event=event,
            contact_id=claims.get("c"),
            user_id=claims.get("u"),
            properties={"idempotency_key": key, "channel": claims.get("ch", "email"), **detail},
            message_id=f"nudge:{kind}:{key}:{uuid.uuid4()}",
            at=now,
        )
    ]
    try:
        contact_id = uuid.UUID(str(claims.get("c")))
    except ValueError:
        contact_id = None
    if contact_id is not None and claims.get("ch") in ("email", "sms", "push"):
        report = DeliveryReported(
            idempotency_key=key,
            channel=claims["ch"],
            status=kind,
            contact_id=contact_id,
            detail=detail,
        )
        messages.append(
            OutgoingMessage(
                Topic.DELIVERIES,
                key=str(contact_id),
                envelope=DELIVERY_REPORTED.envelope(
                    workspace_id=workspace_id, payload=report, occurred_at=now
                ),
            )
        )
    try:
        await asyncio.wait_for(
            publish(runtime.producer, runtime.settings, messages), PUBLISH_TIMEOUT_S
        )
    except (TimeoutError, KafkaError) as error:
        ENGAGEMENT_DROPPED.inc()
        log.warning("engagement not recorded", kind=kind, error=repr(error))
        return
    ENGAGEMENTS.labels(kind, str(bot).lower()).inc()


@router.get("/t/o/{token}.gif", response_model=None)
@router.head("/t/o/{token}.gif", response_model=None, include_in_schema=False)
async def open_pixel(token: str, request: Request, runtime: RuntimeDep) -> Response:
    try:
        claims = _claims(token)
    except InvalidToken as error:
        return _invalid(error)
    await _record(runtime, request, claims, "opened", "Email Opened", {})
    return Response(PIXEL, media_type="image/gif", headers=NO_CACHE)


@router.get("/t/c/{token}", response_model=None)
@router.head("/t/c/{token}", response_model=None, include_in_schema=False)
async def click(token: str, request: Request, runtime: RuntimeDep) -> Response:
    try:
        claims = _claims(token)
    except InvalidToken as error:
        return _invalid(error)
    url = claims.get("url")
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        return _invalid(InvalidToken("not a click token"))
    await _record(runtime, request, claims, "clicked", "Email Link Clicked", {"url": url})
    return RedirectResponse(url, status_code=302, headers=NO_CACHE)
