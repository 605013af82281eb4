"""The notifier's pure logic: consent decisions, hygiene, DSN parsing, tokens, backoff."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nudge_common.events import (
    ContactSnapshot,
    DeliveryReported,
    DeliveryStatus,
    NotificationRequested,
)
from nudge_common.tracking import InvalidToken, sign, verify
from nudge_notifier.consumer import report_payload
from nudge_notifier.domain.bounces import NotADsn, parse_dsn
from nudge_notifier.domain.complaints import NotAnArf, parse_arf
from nudge_notifier.domain.consent import decide, sms_keyword
from nudge_notifier.domain.hygiene import (
    Health,
    InvalidPhone,
    check_email,
    check_email_fully,
    silence_due,
    sunset_reason,
    to_e164,
)
from nudge_notifier.domain.templates import Template, render
from nudge_notifier.providers.base import backoff_delays


def test_suppression_beats_consent_and_opt_in_channels_need_a_subscription() -> None:
    allowed = decide(
        channel="email", topic="news", suppression_reason=None, consents={}, opt_in_channels=["sms"]
    )
    assert allowed.allowed
    suppressed = decide(
        channel="email",
        topic="news",
        suppression_reason="complaint",
        consents={"all": "subscribed"},
        opt_in_channels=[],
    )
    assert suppressed.reason == "suppressed: complaint"
    assert (
        decide(
            channel="email",
            topic="news",
            suppression_reason=None,
            consents={"news": "unsubscribed"},
            opt_in_channels=[],
        ).reason
        == "unsubscribed from news"
    )
    pending = decide(
        channel="sms",
        topic="news",
        suppression_reason=None,
        consents={"all": "pending"},
        opt_in_channels=["sms"],
    )
    assert pending.reason == "no sms consent for news"
    assert decide(
        channel="sms",
        topic="news",
        suppression_reason=None,
        consents={"news": "subscribed"},
        opt_in_channels=["sms"],
    ).allowed


def test_sms_keywords() -> None:
    assert sms_keyword(" stop ") == "unsubscribed"
    assert sms_keyword("UNSUBSCRIBE") == "unsubscribed"
    assert sms_keyword("start") == "subscribed"
    assert sms_keyword("stop sending me deals please") is None


def test_email_hygiene_flags_and_suggestions() -> None:
    assert check_email("ada@gmial.com").suggestion == "ada@gmail.com"
    assert check_email("ada@gmail.com").suggestion is None
    assert check_email("x@mailinator.com").disposable
    assert check_email("Support@acme.io").role
    invalid = check_email("ada@@example.com")
    assert not invalid.valid
    assert invalid.reason


_LOCAL = st.one_of(
    st.text("abcXYZ019.-_+!#$%&'*/=?^`{|}~", min_size=0, max_size=70),
    st.sampled_from(
        ["Postmaster", "ABUSE", "info", "Support", '"quoted"', "a b", "ü", "a..b", ".a"]
    ),
)
_LABEL = st.text("abcXYZ019-", min_size=0, max_size=66)
_DOMAIN = st.one_of(
    st.lists(_LABEL, min_size=1, max_size=4).map(".".join),
    st.sampled_from(
        [
            "example.com",
            "Example.COM",
            "gmial.com",
            "mailinator.com",
            "localhost",
            "x.test",
            "x.invalid",
            "x.local",
            "x.onion",
            "1.2.3.4",
            "[127.0.0.1]",
            "bücher.de",
            "x.123",
            "a" * 250 + ".com",
            "example.com ",
            "-a.com",
        ]
    ),
)


@settings(max_examples=1500, deadline=None)
@given(local=_LOCAL, domain=_DOMAIN, extra=st.sampled_from(["", "@", " ", "<"]))
def test_the_shortcut_for_plain_addresses_agrees_with_the_full_check(
    local: str, domain: str, extra: str
) -> None:
    address = f"{local}{extra}@{domain}"
    assert check_email(address) == check_email_fully(address)


def test_phone_numbers_become_e164() -> None:
    assert to_e164("(415) 555-2671", "US") == "+14155552671"
    assert to_e164("020 7946 0018", "GB") == "+442079460018"
    with pytest.raises(InvalidPhone):
        to_e164("12", "US")


def test_sunset_after_soft_bounces_or_a_long_silence() -> None:
    now = datetime(2026, 6, 1, tzinfo=UTC)

    def rule(health: Health) -> str | None:
        return sunset_reason(health, now=now, soft_bounces=3, unengaged_days=180, min_sends=5)

    assert rule(Health(3, 0, None, None)) == "3 soft bounces in a row"
    assert rule(Health(0, 6, now - timedelta(days=200), None)) is not None
    assert rule(Health(0, 4, now - timedelta(days=200), None)) is None
    assert rule(Health(0, 9, now - timedelta(days=10), None)) is None


def test_score_dependent_blocks_and_fallbacks() -> None:
    template = Template(
        uuid.uuid4(),
        "t",
        "email",
        "Hi {{ contact.traits.name | default('there') }}",
        "{% if contact.scores.lead | default(0) >= 50 %}advanced{% else %}intro{% endif %}",
        "x",
    )
    hot = render(template, {"contact": {"traits": {"name": "Ada"}, "scores": {"lead": 80}}})
    cold = render(template, {"contact": {"traits": {}, "scores": {}}})
    assert (hot.subject, hot.html) == ("Hi Ada", "advanced")
    assert (cold.subject, cold.html) == ("Hi there", "intro")


def test_a_dsn_names_the_bounced_recipient_and_the_message() -> None:
    dsn = (
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        b"--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; mx\r\n\r\n"
        b"Final-Recipient: rfc822; a@example.com\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
        b"Final-Recipient: rfc822; b@example.com\r\nAction: delayed\r\nStatus: 4.2.2\r\n\r\n"
        b"--B\r\nContent-Type: text/rfc822-headers\r\n\r\nX-Nudge-Idempotency-Key: k1\r\n\r\n"
        b"--B--\r\n"
    )
    bounces = parse_dsn(dsn)
    assert [(b.recipient, b.kind, b.idempotency_key) for b in bounces] == [
        ("a@example.com", "hard", "k1"),
        ("b@example.com", "soft", "k1"),
    ]
    with pytest.raises(NotADsn):
        parse_dsn(b"Subject: hi\r\n\r\nhello")


def test_tokens_refuse_any_change() -> None:
    token = sign("s", {"url": "https://a.example"})
    assert verify("s", token) == {"url": "https://a.example"}
    for bad in (token + "x", token.replace(".", "x.", 1), "a.b.c", "", "x" * 5000):
        with pytest.raises(InvalidToken):
            verify("s", bad)
    with pytest.raises(InvalidToken):
        verify("other", token)


def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    for _ in range(100):
        delays = backoff_delays(5, base_s=0.1, max_s=0.5)
        assert len(delays) == 4
        assert all(0 <= d <= cap for d, cap in zip(delays, [0.1, 0.2, 0.4, 0.5], strict=True))


def test_an_arf_report_names_its_feedback_type_recipients_and_original_message() -> None:
    raw = (
        b'Content-Type: multipart/report; report-type=feedback-report; boundary="A"\r\n\r\n'
        b"--A\r\nContent-Type: text/plain\r\n\r\nabuse report\r\n"
        b"--A\r\nContent-Type: message/feedback-report\r\n\r\n"
        b"Feedback-Type: Abuse\r\nUser-Agent: FBL/2\r\nVersion: 1\r\n"
        b"Original-Rcpt-To: <One@Example.com>\r\nOriginal-Rcpt-To: rfc822; two@example.com\r\n"
        b"\r\n--A\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        b"To: three@example.com\r\nMessage-ID: <m1@nudge.localhost>\r\n"
        b"X-Nudge-Idempotency-Key: key-1\r\n\r\n--A--\r\n"
    )
    complaint = parse_arf(raw)
    assert complaint.is_complaint
    assert (complaint.feedback_type, complaint.user_agent) == ("abuse", "FBL/2")
    assert complaint.recipients == ["one@example.com", "two@example.com"]
    assert (complaint.idempotency_key, complaint.message_id) == ("key-1", "<m1@nudge.localhost>")
    without_rcpt = raw.replace(b"Original-Rcpt-To", b"X-Other")
    assert parse_arf(without_rcpt).recipients == ["three@example.com"]
    assert not parse_arf(raw.replace(b"Abuse", b"not-spam")).is_complaint
    with pytest.raises(NotAnArf):
        parse_arf(b"Content-Type: text/plain\r\n\r\nhello")
    with pytest.raises(NotAnArf):
        parse_arf(raw.replace(b"message/feedback-report", b"text/plain"))


def test_the_silence_rule_falls_due_after_the_sends_and_the_days() -> None:
    sent = datetime(2026, 1, 1, tzinfo=UTC)
    engaged = datetime(2026, 3, 1, tzinfo=UTC)

    def due(health: Health) -> datetime | None:
        return silence_due(health, unengaged_days=180, min_sends=5)

    assert due(Health(0, 4, None, sent)) is None
    assert due(Health(0, 5, None, sent)) == sent + timedelta(days=180)
    assert due(Health(0, 5, engaged, sent)) == engaged + timedelta(days=180)
    assert due(Health(2, 9, None, None)) is None


@pytest.mark.parametrize(
    ("status", "recipient", "message_id", "reason"),
    [
        ("sent", "ada@example.com", "<abc@nudge.localhost>", None),
        ("skipped", None, None, "no email address"),
        ("failed", "+33612345678", None, "550 no such user"),
    ],
)
def test_a_delivery_report_written_directly_is_the_models(
    status: DeliveryStatus, recipient: str | None, message_id: str | None, reason: str | None
) -> None:
    contact = ContactSnapshot(contact_id=uuid.uuid4(), user_id="u-1", traits={"name": "Ada"})
    request = NotificationRequested(
        idempotency_key="run:0", channel="email", template_id=uuid.uuid4(), contact=contact
    )
    payload = report_payload(
        request,
        status,
        contact_id=str(contact.contact_id),
        recipient=recipient,
        message_id=message_id,
        reason=reason,
    )
    model = DeliveryReported(
        idempotency_key="run:0",
        channel="email",
        status=status,
        contact_id=contact.contact_id,
        recipient=recipient,
        provider_message_id=message_id,
        reason=reason,
    ).model_dump(mode="json", by_alias=True)
    assert list(payload.items()) == list(model.items())
