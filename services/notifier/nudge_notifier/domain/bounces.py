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
    key, message_id = _original_ids(original)
    bounces = []
    for fields in _status_groups(status_part):
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


def _status_groups(part: Message) -> list[dict[str, str]]:
    """The per-recipient field groups of a delivery-status part (the first group is the
    per-message one; groups are separated by blank lines)."""
    payload = part.get_payload()
    if isinstance(payload, list):  # parsed by the email package into header blocks
        return [
            {k.lower(): str(v) for k, v in sub.items()}
            for sub in payload
            if isinstance(sub, Message)
        ]
    text = part.get_payload(decode=True)
    body = text.decode(errors="replace") if isinstance(text, bytes) else str(payload)
    groups: list[dict[str, str]] = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if ":" in line and not line.startswith((" ", "\t")):
                name, _, value = line.partition(":")
                fields[name.strip().lower()] = value.strip()
        if fields:
            groups.append(fields)
    return groups


def _original_ids(original: Message | None) -> tuple[str | None, str | None]:
    if original is None:
        return None, None
    payload = original.get_payload()
    headers: Message = original
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        headers = payload[0]
    elif isinstance(payload, str):
        headers = message_from_bytes(payload.encode(), policy=policy.default)
    key = headers.get("X-Nudge-Idempotency-Key")
    message_id = headers.get("Message-ID")
    return (str(key) if key else None, str(message_id) if message_id else None)
