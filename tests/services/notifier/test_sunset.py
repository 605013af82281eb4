"""Sunset and engagement on the real broker and database: the scheduled job sunsets an
address whose silence rule fell due (by its indexed due time), soft bounces sunset at
once, the contact is tagged ``sunset:email`` and gets ``Contact Sunset``; an open (not a
bot's) reported on the deliveries topic restarts the silence and lifts the sunset."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from nudge_common.db import transaction
from nudge_common.events import (
    DELIVERY_REPORTED,
    EVENT_RECEIVED,
    DeliveryReported,
    DeliveryStatus,
    Topic,
)
from nudge_common.kafka import OutgoingMessage, publish
from nudge_devtools.pipeline import eventually
from nudge_notifier import store
from tests.services.notifier.conftest import Notifier, topic_envelopes

H = store.address_health.c


def workspace() -> str:
    return f"ws-{uuid.uuid4().hex[:10]}"


def address(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}@example.com"


async def health(notifier: Notifier, ws: str, to: str) -> sa.Row[Any]:
    async with transaction(notifier.sessionmaker) as session:
        return (
            await session.execute(
                sa.select(store.address_health).where(H.workspace_id == ws, H.address == to)
            )
        ).one()


async def report(
    notifier: Notifier, ws: str, key: str, contact_id: uuid.UUID, status: DeliveryStatus, bot: bool
) -> None:
    """An open or click as ingest's tracking routes report it."""
    payload = DeliveryReported(
        idempotency_key=key,
        channel="email",
        status=status,
        contact_id=contact_id,
        detail={"bot": bot},
    )
    envelope = DELIVERY_REPORTED.envelope(
        workspace_id=ws, payload=payload, occurred_at=datetime.now(UTC)
    )
    await publish(
        notifier.producer,
        notifier.settings,
        [OutgoingMessage(Topic.DELIVERIES, key=str(contact_id), envelope=envelope)],
    )


async def test_the_job_sunsets_a_silent_address_and_an_open_brings_it_back(
    notifier: Notifier,
) -> None:
    ws, quiet, other = workspace(), address("quiet"), address("other")
    template = await notifier.template(ws)
    keys = [
        await notifier.request(ws, template, {"email": quiet}, user_id="u-quiet") for _ in range(2)
    ]
    other_key = await notifier.request(ws, template, {"email": other}, user_id="u-other")
    await notifier.settled([*keys, other_key])
    row = await health(notifier, ws, quiet)
    assert (row.sends_since_engaged, row.user_id) == (2, "u-quiet")
    assert row.silence_due_at == row.first_sent_at + timedelta(days=180)
    assert (await health(notifier, ws, other)).silence_due_at is None, "one send is not enough"

    # 200 days pass for this address without an open or a click
    async with transaction(notifier.sessionmaker) as session:
        await session.execute(
            sa.update(store.address_health)
            .where(H.workspace_id == ws, H.address == quiet)
            .values(
                first_sent_at=H.first_sent_at - timedelta(days=200),
                silence_due_at=H.silence_due_at - timedelta(days=200),
            )
        )

    async def sunset() -> bool:
        return (await health(notifier, ws, quiet)).sunset_at is not None

    await eventually(sunset, what="the sunset job ran")
    row = await health(notifier, ws, quiet)
    assert row.sunset_reason == "no engagement for 180 days over 2 sends"
    assert row.silence_due_at is None
    assert (await health(notifier, ws, other)).sunset_at is None

    events = [
        EVENT_RECEIVED.parse(e)
        for e in await topic_envelopes(notifier.settings, Topic.EVENTS, ws, expected=2)
    ]
    assert [(e.type, e.event, e.user_id, e.traits) for e in events] == [
        ("track", "Contact Sunset", "u-quiet", {}),
        ("identify", None, "u-quiet", {"tags": ["sunset:email"]}),
    ]

    # a link scanner's open does not count; the reader's does (same contact: in order)
    row = await health(notifier, ws, quiet)
    await report(notifier, ws, other_key, row.contact_id, "opened", bot=True)
    await report(notifier, ws, keys[0], row.contact_id, "clicked", bot=False)

    async def back() -> bool:
        return (await health(notifier, ws, quiet)).sunset_at is None

    await eventually(back, what="the open lifted the sunset")
    row = await health(notifier, ws, quiet)
    assert row.last_engaged_at is not None
    assert (row.sends_since_engaged, row.silence_due_at, row.sunset_reason) == (0, None, None)
    assert (await health(notifier, ws, other)).last_engaged_at is None
    events = [
        EVENT_RECEIVED.parse(e)
        for e in await topic_envelopes(notifier.settings, Topic.EVENTS, ws, expected=3)
    ]
    assert (events[-1].type, events[-1].traits) == ("identify", {"untags": ["sunset:email"]})

    # the silence is counted again from the open
    await notifier.settled(
        [await notifier.request(ws, template, {"email": quiet}, user_id="u-quiet")]
    )
    row = await health(notifier, ws, quiet)
    assert (row.sends_since_engaged, row.silence_due_at) == (1, None)


async def test_soft_bounces_in_a_row_sunset_the_address_and_tag_its_contact(
    notifier: Notifier,
) -> None:
    ws, to = workspace(), address("soft")
    key = await notifier.request(ws, await notifier.template(ws), {"email": to}, user_id="u-soft")
    await notifier.settled([key])
    dsn = (
        "From: MAILER-DAEMON@mx.example.com\r\nTo: bounces@nudge.localhost\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; "
        'boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.com\r\n\r\n"
        f"Final-Recipient: rfc822; {to}\r\nAction: delayed\r\nStatus: 4.2.2\r\n\r\n--B--\r\n"
    )
    for _ in range(3):
        answer = await notifier.client.post(f"/webhooks/{ws}/email/dsn", content=dsn)
        assert answer.json()["bounces"] == [{"recipient": to, "kind": "soft"}]
    row = await health(notifier, ws, to)
    assert row.sunset_reason == "3 soft bounces in a row"
    events = [
        EVENT_RECEIVED.parse(e)
        for e in await topic_envelopes(notifier.settings, Topic.EVENTS, ws, expected=2)
    ]
    assert [(e.event, e.user_id, e.traits) for e in events] == [
        ("Contact Sunset", "u-soft", {}),
        (None, "u-soft", {"tags": ["sunset:email"]}),
    ]
    assert events[0].properties["reason"] == "3 soft bounces in a row"


async def test_the_on_demand_rule_applies_the_current_settings(notifier: Notifier) -> None:
    ws, to = workspace(), address("demand")
    template = await notifier.template(ws)
    await notifier.settled([await notifier.request(ws, template, {"email": to}) for _ in range(2)])
    async with transaction(notifier.sessionmaker) as session:
        await session.execute(
            sa.update(store.address_health)
            .where(H.workspace_id == ws, H.address == to)
            .values(first_sent_at=H.first_sent_at - timedelta(days=190), silence_due_at=None)
        )
    answer = await notifier.client.post(f"/api/v1/workspaces/{ws}/hygiene/sunset")
    assert answer.json() == {"sunset": 1}
    assert (await health(notifier, ws, to)).sunset_at is not None
