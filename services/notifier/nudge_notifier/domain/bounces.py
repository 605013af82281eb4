"""Delivery status notifications (RFC 3464 ``multipart/report``): which recipients
bounced, hard or soft, and which message it was about. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import Message
from typing import Literal


@dataclass(frozen=True)
class Bounce:
    recipient: str
    kind: Literal["hard", "soft"]
    status: str
    diagnostic: str | None
    idempotency_key: str | None
    message_id: str | None


class NotADsn(ValueError):
    pass


def parse_dsn(raw: bytes) -> list[Bounce]:
    report = message_from_bytes(raw, policy=policy.default)
    if report.get_content_type() != "multipart/report":
        raise NotADsn(f"expected multipart/report, got {report.get_content_type()}")
    status_part: Message | None = None
    original: Message | None = None
    for part in report.walk():
        kind = part.get_content_type()
        if kind == "message/delivery-status":
            status_part = part
        elif kind in ("message/rfc822", "text/rfc822-headers"):
            original = part
    if status_part is None:
        raise NotADsn("no message/delivery-status part")
    key, message_id, _ = original_ids(original)
    bounces = []
    for group in field_groups(status_part):
        fields = {name: values[0] for name, values in group.items()}
        action = fields.get("action", "").lower()
        status = fields.get("status", "")
        recipient = fields.get("final-recipient") or fields.get("original-recipient") or ""
        recipient = recipient.split(";", 1)[-1].strip()
        if action not in ("failed", "delayed") or not recipient:
            continue
        hard = action == "failed" and status.startswith("5")
        bounces.append(
            Bounce(
                recipient,
                "hard" if hard else "soft",
                status,
                fields.get("diagnostic-code"),
                key,
                message_id,
            )
        )
    return bounces


def field_groups(part: Message) -> list[dict[str, list[str]]]:
    """The field groups of a report part (``message/delivery-status``: the per-message
    group, then one per recipient; ``message/feedback-report``: one), by lower-case
    name; a field may repeat."""
    payload = part.get_payload()
    if isinstance(payload, list):  # parsed by the email package into header blocks
        groups = []
        for sub in payload:
            if isinstance(sub, Message):
                fields: dict[str, list[str]] = {}
                for name, value in sub.items():
                    fields.setdefault(name.lower(), []).append(str(value))
                groups.append(fields)
        return groups
    text = part.get_payload(decode=True)
    body = text.decode(errors="replace") if isinstance(text, bytes) else str(payload)
    groups = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        fields = {}
        for line in block.splitlines():
            if ":" in line and not line.startswith((" ", "\t")):
                name, _, value = line.partition(":")
                fields.setdefault(name.strip().lower(), []).append(value.strip())
        if fields:
            groups.append(fields)
    return groups


def original_ids(original: Message | None) -> tuple[str | None, str | None, str | None]:
    """The idempotency key, Message-ID and To of the original message (or its headers)
    that a report carries."""
    if original is None:
        return None, None, None
    payload = original.get_payload()
    headers: Message = original
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        headers = payload[0]
    elif isinstance(payload, str):
        headers = message_from_bytes(payload.encode(), policy=policy.default)
    found = [headers.get(name) for name in ("X-Nudge-Idempotency-Key", "Message-ID", "To")]
    key, message_id, to = (str(value) if value else None for value in found)
    return key, message_id, to
