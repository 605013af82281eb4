"""Abuse feedback reports (ARF, RFC 5965 ``multipart/report; report-type=feedback-report``),
as mailbox providers' feedback loops send them: what kind of feedback, about which
recipient, and which of our messages. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import Message
from email.utils import parseaddr

from nudge_notifier.domain.bounces import field_groups, original_ids

NOT_COMPLAINTS = frozenset({"not-spam"})
"""Feedback types that are not a complaint (RFC 6430: the reader took it out of spam)."""


@dataclass(frozen=True)
class Complaint:
    feedback_type: str
    recipients: list[str]
    """``Original-Rcpt-To`` fields, else the original message's ``To``; often redacted by
    the provider, so the idempotency key, when present, is the better guide."""
    idempotency_key: str | None
    message_id: str | None
    user_agent: str | None

    @property
    def is_complaint(self) -> bool:
        return self.feedback_type not in NOT_COMPLAINTS


class NotAnArf(ValueError):
    pass


def parse_arf(raw: bytes) -> Complaint:
    report = message_from_bytes(raw, policy=policy.default)
    if report.get_content_type() != "multipart/report":
        raise NotAnArf(f"expected multipart/report, got {report.get_content_type()}")
    feedback: Message | None = None
    original: Message | None = None
    for part in report.walk():
        kind = part.get_content_type()
        if kind == "message/feedback-report" and feedback is None:
            feedback = part
        elif kind in ("message/rfc822", "text/rfc822-headers") and original is None:
            original = part
    if feedback is None:
        raise NotAnArf("no message/feedback-report part")
    fields: dict[str, list[str]] = {}
    for group in field_groups(feedback):
        for name, values in group.items():
            fields.setdefault(name, []).extend(values)
    feedback_type = (fields.get("feedback-type") or [""])[0].strip().lower()
    if not feedback_type:
        raise NotAnArf("the feedback report has no Feedback-Type")
    key, message_id, to = original_ids(original)
    recipients = [_address(value) for value in fields.get("original-rcpt-to", [])]
    if not any(recipients) and to:
        recipients = [_address(to)]
    return Complaint(
        feedback_type,
        [r for r in recipients if r],
        key,
        message_id,
        next(iter(fields.get("user-agent", [])), None),
    )


def _address(value: str) -> str:
    return parseaddr(value.split(";", 1)[-1].strip())[1].lower()
