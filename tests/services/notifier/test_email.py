"""Email end to end on the real broker and database: a request on the notifications topic
becomes one message at a real SMTP server, with its headers, retries and bounces."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime

import sqlalchemy as sa

from nudge_common.db import create_engine, create_sessionmaker, transaction
from nudge_common.events import (
    CONSENT_CHANGED,
    DELIVERY_REPORTED,
    NOTIFICATION_REQUESTED,
    TEMPLATE_DEFINED,
    ContactSnapshot,
    Envelope,
    NotificationRequested,
    TemplateDefined,
    Topic,
)
from nudge_common.kafka import OutgoingMessage, publish
from nudge_common.tracking import verify
from nudge_devtools.pipeline import eventually, read_topic
from nudge_notifier import store
from nudge_notifier.consumer import NotificationHandler, Providers
from tests.services.notifier.conftest import Notifier, topic_envelopes
from tests.services.notifier.fakes import ScriptedSmtp


def workspace() -> str:
    return f"ws-{uuid.uuid4().hex[:10]}"


def address(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}@example.com"


async def test_an_email_is_sent_once_with_its_headers_and_tracked_links(
    notifier: Notifier, smtp: ScriptedSmtp
) -> None:
    ws, to = workspace(), address("ada")
    template = await notifier.template(ws)
    key = await notifier.request(ws, template, {"email": to, "name": "Ada"}, user_id="ada")
    rows = await notifier.settled([key])
    assert rows[key].status == "sent"
    (message,) = smtp.received(to)
    assert message["Subject"] == "Hello Ada"
    assert message["Message-ID"] == rows[key].provider_message_id
    assert message["X-Nudge-Idempotency-Key"] == key
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    https, mailto = (part.strip(" <>") for part in message["List-Unsubscribe"].split(","))
    assert https.startswith("http://notifier.test/u/")
    assert mailto.startswith("mailto:unsubscribe@")
    html = message.get_body(("html",)).get_content()  # type: ignore[union-attr]
    (click,) = re.findall(r'href="(http://ingest\.test/t/c/[^"]+)"', html)
    claims = verify(notifier.settings.tracking_secret.get_secret_value(), click.rsplit("/", 1)[1])
    assert claims["url"] == "https://example.com/pricing?a=1&b=2"
    assert claims["k"] == key
    assert claims["u"] == "ada"
    assert re.search(r'<img src="http://ingest\.test/t/o/[^"]+\.gif"', html)

    (report,) = await topic_envelopes(notifier.settings, Topic.DELIVERIES, ws, expected=1)
    payload = DELIVERY_REPORTED.parse(report)
    assert (payload.status, payload.idempotency_key, payload.recipient) == ("sent", key, to)

    again = await notifier.request(ws, template, {"email": to, "name": "Ada"}, key=key)
    await notifier.settled([again])
    reports = await topic_envelopes(notifier.settings, Topic.DELIVERIES, ws, expected=2)
    assert [DELIVERY_REPORTED.parse(r).status for r in reports] == ["sent", "sent"]
    assert len(smtp.received(to)) == 1, "the same idempotency key is never sent twice"


async def test_a_server_that_refuses_for_now_then_recovers_gets_the_message_once(
    notifier: Notifier, smtp: ScriptedSmtp
) -> None:
    ws, to = workspace(), address("flaky")
    smtp.rcpt_replies[to] = ["451 4.3.0 try again later", "421 4.7.0 busy"]
    key = await notifier.request(ws, await notifier.template(ws), {"email": to})
    rows = await notifier.settled([key])
    assert rows[key].status == "sent"
    assert len(smtp.received(to)) == 1


async def test_a_recipient_refused_for_now_in_every_batch_is_given_up_as_a_soft_bounce(
    notifier: Notifier, smtp: ScriptedSmtp
) -> None:
    ws, to = workspace(), address("full")
    smtp.rcpt_replies[to] = ["452 4.2.2 mailbox full"] * 20
    key = await notifier.request(ws, await notifier.template(ws), {"email": to})
    rows = await notifier.settled([key])
    assert rows[key].status == "failed"
    assert "soft bounce" in (rows[key].reason or "")
    assert rows[key].attempts == notifier.settings.max_batch_attempts
    assert smtp.received(to) == []
    async with transaction(notifier.sessionmaker) as session:
        health = (
            await session.execute(
                sa.select(store.address_health).where(store.address_health.c.address == to)
            )
        ).one()
    assert health.soft_bounces_in_a_row == 1


async def test_a_hard_bounce_suppresses_the_address_and_later_requests_are_skipped(
    notifier: Notifier, smtp: ScriptedSmtp
) -> None:
    ws, to = workspace(), address("gone")
    smtp.rcpt_replies[to] = ["550 5.1.1 no such user"]
    template = await notifier.template(ws)
    first = await notifier.request(ws, template, {"email": to})
    rows = await notifier.settled([first])
    assert rows[first].status == "bounced"
    second = await notifier.request(ws, template, {"email": to})
    rows = await notifier.settled([second])
    assert rows[second].status == "skipped"
    assert rows[second].reason == "suppressed: hard_bounce"
    assert smtp.received(to) == []

    deliveries = await topic_envelopes(notifier.settings, Topic.DELIVERIES, ws, expected=3)
    consent = [CONSENT_CHANGED.parse(e) for e in deliveries if e.type == CONSENT_CHANGED.name]
    assert [(c.address, c.suppressed, c.reason) for c in consent] == [(to, True, "hard_bounce")]
    bounced = await read_topic(
        notifier.settings,
        Topic.EVENTS,
        where=lambda r: (
            (r.value is not None and b"Email Bounced" in r.value and to.encode() in r.value)
            or (r.value is not None and first.encode() in r.value)
        ),
        expected=1,
    )
    assert len(bounced) == 1


async def test_a_template_that_fails_to_render_is_dead_lettered_with_the_reason_and_not_sent(
    notifier: Notifier, smtp: ScriptedSmtp
) -> None:
    ws, to = workspace(), address("broken")
    template = await notifier.template(ws, subject="Hi {{ contact.traits.missing }}")
    key = await notifier.request(ws, template, {"email": to})
    dead = await read_topic(
        notifier.settings,
        Topic.DEAD_LETTER,
        where=lambda r: r.value is not None and key.encode() in r.value,
        expected=1,
    )
    headers = dict(dead[0].headers)
    assert headers["nudge.error"] == b"InvalidMessage"
    assert b"failed to render" in headers["nudge.reason"]
    assert b"missing" in headers["nudge.reason"]
    assert await notifier.ledger([key]) == {}
    assert smtp.received(to) == []


async def test_invalid_and_missing_addresses_are_skipped_with_the_reason(
    notifier: Notifier, smtp: ScriptedSmtp
) -> None:
    ws = workspace()
    template = await notifier.template(ws)
    no_email = await notifier.request(ws, template, {"name": "x"})
    bad = await notifier.request(ws, template, {"email": "ada@@example"})
    rows = await notifier.settled([no_email, bad])
    assert (rows[no_email].status, rows[no_email].reason) == ("skipped", "no email address")
    assert rows[bad].status == "skipped"
    assert (rows[bad].reason or "").startswith("invalid email address")


async def test_a_key_requested_twice_in_one_batch_is_sent_once_and_reported_twice(
    notifier: Notifier, smtp: ScriptedSmtp
) -> None:
    ws, to = workspace(), address("twice")
    template = await notifier.template(ws)
    contact = ContactSnapshot(contact_id=uuid.uuid4(), traits={"email": to})
    key = f"k-{uuid.uuid4().hex}"
    request = NotificationRequested(
        idempotency_key=key, channel="email", template_id=template, contact=contact
    )
    await notifier.publish_requests(ws, [request, request])
    reports = await topic_envelopes(notifier.settings, Topic.DELIVERIES, ws, expected=2)
    assert [DELIVERY_REPORTED.parse(r).status for r in reports] == ["sent", "sent"]
    assert (await notifier.ledger([key]))[key].status == "sent"
    assert len(smtp.received(to)) == 1


async def test_a_bad_request_in_a_large_batch_is_dead_lettered_alone_and_nothing_is_resent(
    notifier: Notifier, smtp: ScriptedSmtp
) -> None:
    ws = workspace()
    template = await notifier.template(ws)
    requests = [
        NotificationRequested(
            idempotency_key=f"k-{uuid.uuid4().hex}",
            channel="email",
            template_id=template if i != 7 else uuid.uuid4(),
            contact=ContactSnapshot(contact_id=uuid.uuid4(), traits={"email": address(f"b{i}")}),
        )
        for i in range(40)
    ]
    await notifier.publish_requests(ws, requests)
    good = [r.idempotency_key for i, r in enumerate(requests) if i != 7]
    rows = await notifier.settled(good)
    assert {row.status for row in rows.values()} == {"sent"}
    dead = await read_topic(
        notifier.settings,
        Topic.DEAD_LETTER,
        where=lambda r: r.value is not None and requests[7].idempotency_key.encode() in r.value,
        expected=1,
    )
    assert b"does not exist" in dict(dead[0].headers)["nudge.reason"]
    reports = await topic_envelopes(notifier.settings, Topic.DELIVERIES, ws, expected=39)
    assert sorted(DELIVERY_REPORTED.parse(r).idempotency_key for r in reports) == sorted(good)
    for r in requests:
        assert len(smtp.received(str(r.contact.traits["email"]))) == (0 if r is requests[7] else 1)


async def test_templates_announced_on_the_config_topic_are_created_replaced_and_deleted(
    notifier: Notifier, smtp: ScriptedSmtp
) -> None:
    ws, to = workspace(), address("announced")
    template_id = uuid.uuid4()

    async def announce(subject: str, *, deleted: bool = False) -> None:
        defined = TemplateDefined(
            template_id=template_id,
            name="welcome",
            channel="email",
            subject=subject,
            html="<p>Hi</p>",
            text="Hi",
            topic="onboarding",
            deleted=deleted,
        )
        envelope = TEMPLATE_DEFINED.envelope(
            workspace_id=ws, payload=defined, occurred_at=datetime.now(UTC)
        )
        await publish(
            notifier.producer,
            notifier.settings,
            [OutgoingMessage(Topic.CONFIG, key=str(template_id), envelope=envelope)],
        )

    async def stored_subject() -> str | None:
        async with transaction(notifier.sessionmaker) as session:
            found = await store.get_template(session, workspace_id=ws, template_id=template_id)
        return None if found is None else found.subject

    async def subject_is(expected: str | None) -> None:
        async def probe() -> bool:
            return await stored_subject() == expected

        await eventually(probe, what=f"template subject {expected!r}")

    await announce("Welcome {{ contact.traits.name | default('friend') }}")
    await subject_is("Welcome {{ contact.traits.name | default('friend') }}")
    first = await notifier.request(ws, template_id, {"email": to, "name": "Ada"})
    await notifier.settled([first])
    await announce("Welcome back")
    await subject_is("Welcome back")
    second = await notifier.request(ws, template_id, {"email": to})
    await notifier.settled([second])
    assert [m["Subject"] for m in smtp.received(to)] == ["Welcome Ada", "Welcome back"]

    await announce("", deleted=True)
    await subject_is(None)
    third = await notifier.request(ws, template_id, {"email": to})
    dead = await read_topic(
        notifier.settings,
        Topic.DEAD_LETTER,
        where=lambda r: r.value is not None and third.encode() in r.value,
        expected=1,
    )
    assert b"does not exist" in dict(dead[0].headers)["nudge.reason"]


async def test_a_mixed_batch_is_planned_claimed_and_recorded_in_three_statements(
    notifier: Notifier, smtp: ScriptedSmtp
) -> None:
    """The handler on its own (no Kafka): one read for the batch's templates, suppressions
    and consents across workspaces, one statement claiming the keys with the skipped
    requests and the hygiene notes (an address noted twice included), one recording the
    outcomes with the sends; no transaction around any of them."""
    ws, other = workspace(), workspace()
    template, other_template = await notifier.template(ws), await notifier.template(other)
    suppressed, unsubscribed = address("sup"), address("unsub")
    role = f"info@d{uuid.uuid4().hex[:8]}.example.com"
    async with transaction(notifier.sessionmaker) as session:
        await store.suppress(
            session, workspace_id=ws, channel="email", address=suppressed, reason="manual"
        )
        await store.set_consent(
            session,
            workspace_id=ws,
            channel="email",
            address=unsubscribed,
            topic="marketing",
            status="unsubscribed",
            source="test",
        )

    def envelope(workspace_id: str, template_id: uuid.UUID, email: str) -> Envelope:
        payload = NotificationRequested(
            idempotency_key=f"k-{uuid.uuid4().hex}",
            channel="email",
            template_id=template_id,
            contact=ContactSnapshot(contact_id=uuid.uuid4(), traits={"email": email}),
        )
        return NOTIFICATION_REQUESTED.envelope(
            workspace_id=workspace_id, payload=payload, occurred_at=datetime.now(UTC)
        )

    envelopes = [
        envelope(ws, template, suppressed),
        envelope(ws, template, unsubscribed),
        envelope(ws, template, role),
        envelope(ws, template, role),
        envelope(ws, template, "broken@"),
        envelope(other, other_template, suppressed),  # suppressed in the other workspace only
    ]
    engine = create_engine(notifier.settings)
    statements: list[tuple[str, bool]] = []

    def executed(connection: sa.Connection, _: object, statement: str, *__: object) -> None:
        adapted = connection.connection.dbapi_connection
        statements.append((statement.split(None, 1)[0], getattr(adapted, "autocommit", False)))

    sa.event.listen(engine.sync_engine, "before_cursor_execute", executed)
    providers = Providers(notifier.settings)
    handler = NotificationHandler(notifier.settings, create_sessionmaker(engine), providers)
    try:
        await handler.prepare(envelopes)
    finally:
        await providers.close()
        await engine.dispose()
    # autocommit: no BEGIN and COMMIT round trips around the statements
    assert statements == [("SELECT", True), ("WITH", True), ("WITH", True)]
    keys = [NOTIFICATION_REQUESTED.parse(e).idempotency_key for e in envelopes]
    rows = await notifier.ledger(keys)
    assert [(rows[k].status, rows[k].reason) for k in keys] == [
        ("skipped", "suppressed: manual"),
        ("skipped", "unsubscribed from marketing"),
        ("sent", None),
        ("sent", None),
        ("skipped", rows[keys[4]].reason),
        ("sent", None),
    ]
    assert (rows[keys[4]].reason or "").startswith("invalid email address")
    assert len(smtp.received(role)) == 2
    assert len(smtp.received(suppressed)) == 1
    async with transaction(notifier.sessionmaker) as session:
        health = {
            (row.workspace_id, row.address): row
            for row in await session.execute(
                sa.select(store.address_health).where(
                    store.address_health.c.workspace_id.in_([ws, other])
                )
            )
        }
    assert health[(ws, role)].role
    assert health[(ws, role)].sends_since_engaged == 2
    assert health[(ws, "broken@")].invalid
    assert health[(other, suppressed)].sends_since_engaged == 1
