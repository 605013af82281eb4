"""Internal mail (notify sales): a request naming a ``recipient`` goes to that address with
the built-in contact summary, whatever the contact's own consent and suppression, without
tracking or unsubscribe links, and once per idempotency key."""

from __future__ import annotations

import uuid

from nudge_common.db import transaction
from nudge_common.events import CONTACT_SUMMARY_TEMPLATE_ID, ContactSnapshot, NotificationRequested
from nudge_notifier import store
from tests.services.notifier.conftest import Notifier
from tests.services.notifier.fakes import ScriptedSmtp


def internal(key: str, recipient: str, contact_email: str) -> NotificationRequested:
    return NotificationRequested(
        idempotency_key=key,
        channel="email",
        template_id=CONTACT_SUMMARY_TEMPLATE_ID,
        contact=ContactSnapshot(
            contact_id=uuid.uuid4(), user_id="lead-1", traits={"email": contact_email}
        ),
        recipient=recipient,
        data={
            "summary": "Ada Lovelace - at Acme",
            "name": "Ada Lovelace",
            "email": contact_email,
            "company": "Acme",
            "scores": {"default": 80},
            "stages": {"default": "sql"},
            "tags": ["intent:demo"],
            "note": "call today",
            "workflow": {"id": "w-1", "name": "Demo requests"},
        },
    )


async def test_internal_mail_goes_to_the_recipient_whatever_the_contacts_consent(
    notifier: Notifier, smtp: ScriptedSmtp
) -> None:
    ws = f"ws-{uuid.uuid4().hex[:10]}"
    sales, lead = (
        f"sales-{uuid.uuid4().hex[:8]}@example.com",
        f"ada-{uuid.uuid4().hex[:8]}@example.org",
    )
    async with transaction(notifier.sessionmaker) as session:
        # the contact said no to everything: internal mail about them still goes
        await store.suppress(
            session, workspace_id=ws, channel="email", address=lead, reason="manual", detail=None
        )
        await store.set_consent(
            session,
            workspace_id=ws,
            channel="email",
            address=lead,
            topic="all",
            status="unsubscribed",
            source="test",
        )
    key = f"k-{uuid.uuid4().hex}"
    await notifier.publish_requests(ws, [internal(key, sales, lead)])
    rows = await notifier.settled([key])
    assert (rows[key].status, rows[key].recipient) == ("sent", sales)
    (message,) = smtp.received(sales)
    assert message["Subject"] == "Lead: Ada Lovelace (Acme)"
    assert message["List-Unsubscribe"] is None
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    for shown in (lead, "Company: Acme", "Score default: 80 (sql)", "Tags: intent:demo"):
        assert shown in text
    assert "Note: call today" in text
    assert "Workflow: Demo requests (w-1)" in text
    html = message.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "/t/o/" not in html, "no open pixel: a salesperson's open is not the contact's"
    assert smtp.received(lead) == []

    await notifier.publish_requests(ws, [internal(key, sales, lead)])
    await notifier.settled([key])
    assert len(smtp.received(sales)) == 1, "the same idempotency key is sent once"


async def test_an_invalid_recipient_is_skipped_with_the_reason(
    notifier: Notifier, smtp: ScriptedSmtp
) -> None:
    ws = f"ws-{uuid.uuid4().hex[:10]}"
    key = f"k-{uuid.uuid4().hex}"
    await notifier.publish_requests(ws, [internal(key, "sales@@acme", "ada@example.org")])
    rows = await notifier.settled([key])
    assert rows[key].status == "skipped"
    assert (rows[key].reason or "").startswith("invalid recipient address")
