"""The links the notifier puts in an email, followed on ingest (in this process, on the
real broker): the open pixel and the click redirect record ordinary events for the
contact, bots and prefetches are flagged, and a tampered link gets 400, never a redirect."""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from nudge_common.codec import loads
from nudge_common.events import DELIVERY_REPORTED, EVENT_RECEIVED, Envelope, Topic
from nudge_common.tracking import DEVELOPMENT_SECRET, sign
from nudge_devtools.pipeline import read_topic
from nudge_ingest.app import create_app
from nudge_notifier.domain.links import LinkContext, track_html
from tests.conftest import StackHandle


@pytest.fixture(scope="module")
async def ingest(stack: StackHandle) -> AsyncIterator[httpx.AsyncClient]:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in stack.env.items():
            patch.setenv(name, value)
        app = create_app()
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://ingest") as client:
                yield client


def links(workspace_id: str, contact_id: uuid.UUID) -> tuple[str, str]:
    ctx = LinkContext(
        secret=DEVELOPMENT_SECRET,
        tracking_url="http://ingest",
        public_url="http://notifier",
        email_domain="nudge.localhost",
        workspace_id=workspace_id,
        contact_id=str(contact_id),
        user_id="ada",
        idempotency_key=f"run:{uuid.uuid4()}",
        channel="email",
        address="ada@example.com",
        topic="marketing",
    )
    html = track_html(
        '<html><body><a href="https://shop.example.com/cart?x=1">cart</a></body></html>',
        ctx,
        opens=True,
        clicks=True,
    )
    (click,) = re.findall(r'href="http://ingest(/t/c/[^"]+)"', html)
    (pixel,) = re.findall(r'src="http://ingest(/t/o/[^"]+)"', html)
    return pixel, click


async def events_for(stack: StackHandle, topic: Topic, workspace_id: str, n: int) -> list[Envelope]:
    records = await read_topic(
        stack.settings,
        topic,
        where=lambda r: r.value is not None and loads(r.value)["workspace_id"] == workspace_id,
        expected=n,
    )
    return [Envelope.decode(r.value) for r in records if r.value]


async def test_opens_and_clicks_become_events_and_bots_are_flagged(
    ingest: httpx.AsyncClient, stack: StackHandle
) -> None:
    ws, contact = f"ws-{uuid.uuid4().hex[:10]}", uuid.uuid4()
    pixel, click = links(ws, contact)
    opened = await ingest.get(pixel, headers={"User-Agent": "Mozilla/5.0 (Macintosh)"})
    assert opened.status_code == 200
    assert opened.headers["content-type"] == "image/gif"
    assert "no-store" in opened.headers["cache-control"]
    scanned = await ingest.get(pixel, headers={"User-Agent": "Barracuda Sentinel"})
    assert scanned.status_code == 200
    clicked = await ingest.get(click, headers={"User-Agent": "Mozilla/5.0"})
    assert clicked.status_code == 302
    assert clicked.headers["location"] == "https://shop.example.com/cart?x=1"

    events = [EVENT_RECEIVED.parse(e) for e in await events_for(stack, Topic.EVENTS, ws, 3)]
    assert [(e.event, e.user_id, e.properties["bot"]) for e in events] == [
        ("Email Opened", "ada", False),
        ("Email Opened", "ada", True),
        ("Email Link Clicked", "ada", False),
    ]
    assert events[2].properties["url"] == "https://shop.example.com/cart?x=1"
    reports = [DELIVERY_REPORTED.parse(e) for e in await events_for(stack, Topic.DELIVERIES, ws, 3)]
    assert [r.status for r in reports] == ["opened", "opened", "clicked"]
    assert {r.contact_id for r in reports} == {contact}


async def test_a_tampered_or_foreign_link_gets_400_and_no_redirect(
    ingest: httpx.AsyncClient,
) -> None:
    _, click = links("ws-tamper", uuid.uuid4())
    body, signature = click.removeprefix("/t/c/").split(".")
    claims = loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    evil = sign("another-secret", {**claims, "url": "https://evil.example.com"})
    forged_body = evil.split(".")[0]
    for path in (
        f"/t/c/{forged_body}.{signature}",  # the claims changed, the signature did not
        f"/t/c/{evil}",  # signed with another secret
        f"/t/c/{body}.{signature[:-2]}AA",
        "/t/c/garbage",
        "/t/o/garbage.gif",
    ):
        answer = await ingest.get(path)
        assert answer.status_code == 400, path
        assert answer.json()["field"] == "token"
        assert "location" not in answer.headers
    javascript = sign(DEVELOPMENT_SECRET, {**claims, "url": "javascript:alert(1)"})
    assert (await ingest.get(f"/t/c/{javascript}")).status_code == 400
