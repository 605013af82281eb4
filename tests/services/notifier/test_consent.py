"""Consent and suppression through the notifier's routes: one-click unsubscribe, the
plain page, double opt-in, complaint and DSN webhooks, the suppression-list API and the
hygiene report; every change is published and honoured by the next send."""

from __future__ import annotations

import re
import uuid
from email.message import EmailMessage
from urllib.parse import urlsplit

from nudge_common.events import CONSENT_CHANGED, DELIVERY_REPORTED, EVENT_RECEIVED, Topic
from tests.services.notifier.conftest import Notifier, topic_envelopes
from tests.services.notifier.fakes import ScriptedSmtp


def workspace() -> str:
    return f"ws-{uuid.uuid4().hex[:10]}"


def address(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}@example.com"


def unsubscribe_path(message: EmailMessage) -> str:
    url = str(message["List-Unsubscribe"]).split(",")[0].strip(" <>")
    return urlsplit(url).path


async def test_one_click_unsubscribe_stops_the_topic_and_becomes_an_event(
    notifier: Notifier, smtp: ScriptedSmtp
) -> None:
    ws, to = workspace(), address("bye")
    news = await notifier.template(ws, topic="newsletter")
    receipts = await notifier.template(ws, topic="receipts")
    first = await notifier.request(ws, news, {"email": to}, user_id="u-bye")
    await notifier.settled([first])
    (message,) = smtp.received(to)
    path = unsubscribe_path(message)

    page = await notifier.client.get(path)
    assert page.status_code == 200
    assert "<form method='post'>" in page.text  # a GET changes nothing (mail scanners)

    answer = await notifier.client.post(
        path,
        content="List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert answer.status_code == 200

    later_news = await notifier.request(ws, news, {"email": to})
    later_receipt = await notifier.request(ws, receipts, {"email": to})
    rows = await notifier.settled([later_news, later_receipt])
    assert (rows[later_news].status, rows[later_news].reason) == (
        "skipped",
        "unsubscribed from newsletter",
    )
    assert rows[later_receipt].status == "sent"
    assert len(smtp.received(to)) == 2

    changes = [
        CONSENT_CHANGED.parse(e)
        for e in await topic_envelopes(notifier.settings, Topic.DELIVERIES, ws, expected=4)
        if e.type == CONSENT_CHANGED.name
    ]
    assert [(c.address, c.topic, c.status, c.reason) for c in changes] == [
        (to, "newsletter", "unsubscribed", "one-click")
    ]
    (event,) = await topic_envelopes(notifier.settings, Topic.EVENTS, ws, expected=1)
    segment = EVENT_RECEIVED.parse(event)
    assert segment.event == "Unsubscribed"
    assert segment.properties["topic"] == "newsletter"


async def test_a_tampered_unsubscribe_link_gets_400_naming_the_token(
    notifier: Notifier, smtp: ScriptedSmtp
) -> None:
    ws, to = workspace(), address("tamper")
    key = await notifier.request(ws, await notifier.template(ws), {"email": to})
    await notifier.settled([key])
    path = unsubscribe_path(smtp.received(to)[0])
    body, signature = path.removeprefix("/u/").split(".")
    tampered = f"/u/{body[:-2]}xx.{signature}"
    for method in ("GET", "POST"):
        answer = await notifier.client.request(method, tampered)
        assert answer.status_code == 400
        assert answer.json()["field"] == "token"
    assert (await notifier.client.get("/u/not-a-token")).status_code == 400


async def test_the_unsubscribe_page_can_unsubscribe_from_everything(
    notifier: Notifier, smtp: ScriptedSmtp
) -> None:
    ws, to = workspace(), address("all")
    template = await notifier.template(ws, topic="tips")
    await notifier.settled([await notifier.request(ws, template, {"email": to})])
    answer = await notifier.client.post(
        unsubscribe_path(smtp.received(to)[0]),
        content="scope=all",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert answer.status_code == 200
    other = await notifier.template(ws, topic="receipts")
    key = await notifier.request(ws, other, {"email": to})
    rows = await notifier.settled([key])
    assert rows[key].reason == "unsubscribed from all"


async def test_complaints_and_dsn_hard_bounces_suppress_the_address(
    notifier: Notifier, smtp: ScriptedSmtp
) -> None:
    ws, spammy, bouncy = workspace(), address("spam"), address("dsn")
    template = await notifier.template(ws)
    sent = await notifier.request(ws, template, {"email": bouncy})
    await notifier.settled([sent])
    original = smtp.received(bouncy)[0]

    complaint = await notifier.client.post(
        f"/webhooks/{ws}/email/complaint", json={"email": spammy.upper()}
    )
    assert complaint.status_code == 200
    dsn = (
        "From: MAILER-DAEMON@mx.example.com\r\n"
        f"To: bounces@nudge.localhost\r\nSubject: Undelivered\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nDelivery failed.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.com\r\n\r\n"
        f"Final-Recipient: rfc822; {bouncy}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n\r\n"
        "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"Message-ID: {original['Message-ID']}\r\n"
        f"X-Nudge-Idempotency-Key: {sent}\r\n\r\n"
        "--B--\r\n"
    )
    answer = await notifier.client.post(
        f"/webhooks/{ws}/email/dsn", content=dsn, headers={"Content-Type": "message/rfc822"}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["bounces"] == [{"recipient": bouncy, "kind": "hard"}]
    bad = await notifier.client.post(f"/webhooks/{ws}/email/dsn", content=b"Subject: hi\r\n\r\nx")
    assert bad.status_code == 400
    assert bad.json()["field"] == "body"

    listed = await notifier.client.get(f"/api/v1/workspaces/{ws}/suppressions?channel=email")
    reasons = {item["address"]: item["reason"] for item in listed.json()["items"]}
    assert reasons == {spammy: "complaint", bouncy: "hard_bounce"}

    keys = [
        await notifier.request(ws, template, {"email": spammy}),
        await notifier.request(ws, template, {"email": bouncy}),
    ]
    rows = await notifier.settled(keys)
    assert [rows[k].reason for k in keys] == ["suppressed: complaint", "suppressed: hard_bounce"]
    assert smtp.received(spammy) == []

    events = await topic_envelopes(notifier.settings, Topic.EVENTS, ws, expected=1)
    assert [EVENT_RECEIVED.parse(e).event for e in events] == ["Email Bounced"]


async def test_the_suppression_api_adds_lists_and_removes_with_clear_errors(
    notifier: Notifier,
) -> None:
    ws = workspace()
    base = f"/api/v1/workspaces/{ws}/suppressions"
    added = await notifier.client.put(f"{base}/email/Ada@Example.COM", json={"reason": "manual"})
    assert added.json() == {"channel": "email", "address": "ada@example.com", "suppressed": True}
    assert [i["address"] for i in (await notifier.client.get(base)).json()["items"]] == [
        "ada@example.com"
    ]
    invalid = await notifier.client.put(f"{base}/email/not-an-address", json={})
    assert invalid.status_code == 400
    assert invalid.json()["field"] == "address"
    bad_reason = await notifier.client.put(f"{base}/email/a@example.com", json={"reason": "x"})
    assert bad_reason.status_code == 422
    assert (await notifier.client.delete(f"{base}/email/ada@example.com")).status_code == 200
    missing = await notifier.client.delete(f"{base}/email/ada@example.com")
    assert missing.status_code == 404
    assert (await notifier.client.get(base)).json()["items"] == []


async def test_double_opt_in_sends_a_confirmation_whose_link_subscribes(
    notifier: Notifier, smtp: ScriptedSmtp
) -> None:
    ws, to = workspace(), address("optin")
    base = f"/api/v1/workspaces/{ws}/consents"
    answer = await notifier.client.post(f"{base}/email/opt-in", json={"email": to})
    assert answer.status_code == 202
    assert (await notifier.client.get(f"{base}/email/{to}")).json()["topics"] == {"all": "pending"}
    (confirmation,) = smtp.received(to)
    text = confirmation.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    (link,) = re.findall(r"http://notifier\.test(/consent/confirm/\S+)", text)
    assert (await notifier.client.get(link)).status_code == 200
    assert (await notifier.client.get(f"{base}/email/{to}")).json()["topics"] == {
        "all": "subscribed"
    }


async def test_the_hygiene_report_counts_flagged_addresses(notifier: Notifier) -> None:
    ws = workspace()
    template = await notifier.template(ws)
    keys = [
        await notifier.request(ws, template, {"email": "ada@gmial.com"}),
        await notifier.request(ws, template, {"email": "x@mailinator.com"}),
        await notifier.request(ws, template, {"email": "info@example.com"}),
        await notifier.request(ws, template, {"email": "broken@"}),
    ]
    await notifier.settled(keys)
    report = (await notifier.client.get(f"/api/v1/workspaces/{ws}/hygiene/report")).json()
    assert report["disposable"] == 1
    assert report["role"] == 1
    assert report["invalid"] == 1
    assert {"channel": "email", "address": "ada@gmial.com", "suggestion": "ada@gmail.com"} in (
        report["suggestions"]
    )
    check = await notifier.client.post(
        f"/api/v1/workspaces/{ws}/hygiene/check",
        json={"emails": ["bob@hotmial.com"], "phones": ["020 7946 0958", "12"]},
    )
    assert check.json()["emails"][0]["suggestion"] == "bob@hotmail.com"
    assert [p["valid"] for p in check.json()["phones"]] == [False, False]


def arf(feedback_type: str, original: str, *, rcpt_to: str | None = None) -> bytes:
    """An abuse report as a mailbox provider's feedback loop sends it (RFC 5965)."""
    rcpt = f"Original-Rcpt-To: {rcpt_to}\r\n" if rcpt_to else ""
    return (
        "From: fbl@mailbox.example\r\nTo: fbl@nudge.localhost\r\nSubject: FW: report\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=feedback-report; "
        'boundary="A"\r\n\r\n'
        "--A\r\nContent-Type: text/plain\r\n\r\nThis is an email abuse report.\r\n"
        "--A\r\nContent-Type: message/feedback-report\r\n\r\n"
        f"Feedback-Type: {feedback_type}\r\nUser-Agent: ExampleFBL/1.0\r\nVersion: 1\r\n"
        f"{rcpt}\r\n"
        f"--A\r\nContent-Type: message/rfc822\r\n\r\n{original}\r\n--A--\r\n"
    ).encode()


async def test_arf_abuse_reports_suppress_the_recipient_even_when_redacted(
    notifier: Notifier, smtp: ScriptedSmtp
) -> None:
    ws, reader, named = workspace(), address("arf"), address("named")
    template = await notifier.template(ws)
    key = await notifier.request(ws, template, {"email": reader})
    await notifier.settled([key])
    original = smtp.received(reader)[0]
    redacted = (
        f"From: {original['From']}\r\nTo: redacted@example.com\r\n"
        f"Message-ID: {original['Message-ID']}\r\nX-Nudge-Idempotency-Key: {key}\r\n"
        "Subject: Hello\r\n\r\nbody\r\n"
    )
    answer = await notifier.client.post(
        f"/webhooks/{ws}/email/arf",
        content=arf("abuse", redacted, rcpt_to="redacted@example.com"),
        headers={"Content-Type": "message/rfc822"},
    )
    assert answer.json() == {"feedback_type": "abuse", "suppressed": [reader]}

    headers_only = f"To: {named}\r\nSubject: Hello\r\n"
    answer = await notifier.client.post(
        f"/webhooks/{ws}/email/arf", content=arf("fraud", headers_only, rcpt_to=named.upper())
    )
    assert answer.json()["suppressed"] == [named]
    not_spam = await notifier.client.post(
        f"/webhooks/{ws}/email/arf", content=arf("not-spam", headers_only)
    )
    assert not_spam.json() == {"feedback_type": "not-spam", "suppressed": []}
    nobody = await notifier.client.post(
        f"/webhooks/{ws}/email/arf", content=arf("abuse", "Subject: x\r\n")
    )
    assert (nobody.status_code, nobody.json()["field"]) == (400, "body")
    bad = await notifier.client.post(f"/webhooks/{ws}/email/arf", content=b"Subject: hi\r\n\r\nx")
    assert (bad.status_code, bad.json()["field"]) == (400, "body")

    listed = await notifier.client.get(f"/api/v1/workspaces/{ws}/suppressions?channel=email")
    assert {i["address"]: i["detail"] for i in listed.json()["items"]} == {
        reader: "abuse",
        named: "fraud",
    }
    reports = await topic_envelopes(notifier.settings, Topic.DELIVERIES, ws, expected=4)
    complained = [DELIVERY_REPORTED.parse(e) for e in reports if e.type == DELIVERY_REPORTED.name][
        -1
    ]
    assert (complained.status, complained.idempotency_key) == ("complained", key)
    (event,) = await topic_envelopes(notifier.settings, Topic.EVENTS, ws, expected=1)
    assert EVENT_RECEIVED.parse(event).event == "Email Marked as Spam"
    again = await notifier.request(ws, template, {"email": reader})
    assert (await notifier.settled([again]))[again].reason == "suppressed: complaint"
