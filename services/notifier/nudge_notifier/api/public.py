"""Public pages a reader reaches from a message: one-click unsubscribe (RFC 8058 POST, and
a plain page for people) and the double opt-in confirmation. Served by the notifier,
which owns consent, so an unsubscribe takes effect before the answer."""

from __future__ import annotations

from html import escape
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from nudge_common.service import RuntimeDep
from nudge_common.tracking import InvalidToken, verify
from nudge_notifier import feedback
from nudge_notifier.api.deps import ApiError, SettingsDep, effects
from nudge_notifier.domain.consent import ALL_TOPICS

router = APIRouter(tags=["public"])
CHANNELS = ("email", "sms", "push")


def _claims(settings: SettingsDep, token: str, kind: str) -> dict[str, Any]:
    try:
        claims = verify(settings.tracking_secret.get_secret_value(), token)
    except InvalidToken as error:
        raise ApiError(400, "token", f"invalid link: {error}") from error
    if claims.get("ch") not in CHANNELS or not claims.get("a") or not claims.get("w"):
        raise ApiError(400, "token", f"not a {kind} link")
    return claims


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"</head><body><h1>{escape(title)}</h1>{body}</body></html>",
        status_code=status,
    )


@router.get("/u/{token}", response_class=HTMLResponse)
async def unsubscribe_page(token: str, settings: SettingsDep) -> HTMLResponse:
    """The plain page: it changes nothing by itself (mail scanners follow GET links); its
    buttons POST."""
    claims = _claims(settings, token, "unsubscribe")
    address, topic = escape(str(claims["a"])), escape(str(claims.get("t") or ALL_TOPICS))
    return _page(
        "Unsubscribe",
        f"<p>Stop messages about <b>{topic}</b> to {address}?</p>"
        f"<form method='post'><button name='scope' value='topic'>Unsubscribe from {topic}"
        "</button> <button name='scope' value='all'>Unsubscribe from everything</button></form>",
    )


@router.post("/u/{token}", response_class=HTMLResponse)
async def unsubscribe(
    token: str, request: Request, runtime: RuntimeDep, settings: SettingsDep
) -> HTMLResponse:
    """RFC 8058 one-click (body ``List-Unsubscribe=One-Click``) or the page's form."""
    claims = _claims(settings, token, "unsubscribe")
    form = {k: v[0] for k, v in parse_qs((await request.body()).decode(errors="replace")).items()}
    topic = str(claims.get("t") or ALL_TOPICS)
    if form.get("scope") == "all":
        topic = ALL_TOPICS
    async with effects(runtime) as (session, outgoing):
        outgoing += await feedback.set_consent(
            session,
            str(claims["w"]),
            channel=claims["ch"],
            address=str(claims["a"]),
            topic=topic,
            status="unsubscribed",
            source="one-click" if form.get("List-Unsubscribe") == "One-Click" else "page",
            contact_id=claims.get("c"),
        )
    return _page("Unsubscribed", f"<p>You will no longer receive {escape(topic)} messages.</p>")


@router.get("/consent/confirm/{token}", response_class=HTMLResponse)
async def confirm_opt_in(token: str, runtime: RuntimeDep, settings: SettingsDep) -> HTMLResponse:
    """The link in a double opt-in email: the subscription becomes ``subscribed``."""
    claims = _claims(settings, token, "confirmation")
    if claims.get("p") != "confirm":
        raise ApiError(400, "token", "not a confirmation link")
    async with effects(runtime) as (session, outgoing):
        outgoing += await feedback.set_consent(
            session,
            str(claims["w"]),
            channel=claims["ch"],
            address=str(claims["a"]),
            topic=str(claims.get("t") or ALL_TOPICS),
            status="subscribed",
            source="double-opt-in",
            contact_id=claims.get("c"),
        )
    return _page("Subscription confirmed", "<p>Thank you: your subscription is confirmed.</p>")
