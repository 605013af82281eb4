"""Email over SMTP with aiosmtplib: a pool of open connections (TLS or STARTTLS, auth),
Message-ID, RFC 8058 one-click List-Unsubscribe headers and optional DKIM signing."""

from __future__ import annotations

import asyncio
import base64
import functools
import re
import time
import uuid
from email.header import Header
from email.utils import formataddr, formatdate, parseaddr

import aiosmtplib
import dkim
from aiosmtplib import SMTPStatus
from aiosmtplib.email import quote_address

from nudge_notifier.providers.base import Outbound, PermanentFailure, TransientFailure
from nudge_notifier.settings import NotifierSettings

SIGNED_HEADERS = [
    b"from",
    b"to",
    b"subject",
    b"date",
    b"message-id",
    b"mime-version",
    b"content-type",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
]
HARD_BOUNCE_CODES = frozenset({550, 551, 553, 554})
"""Replies to RCPT that say the mailbox does not exist or will never take mail."""


_UNSAFE = re.compile(r"[\x00-\x1f\x7f]+")
_NOT_IN_A_MAILBOX = re.compile(r'[\s<>"]')
"""What aiosmtplib refuses in an address: it would break the MAIL or RCPT line."""
LINE_LIMIT = 900
"""Fold header lines longer than this (RFC 5322 allows 998 characters)."""


def _header(name: str, value: str) -> bytes:
    """One header line. Control characters become spaces (no header injection). Printable
    ASCII goes as is, folded at spaces when long (so URLs in List-Unsubscribe stay
    intact); anything else, or what looks like an encoded word, is RFC 2047 encoded."""
    if not _printable_ascii(value):
        value = _UNSAFE.sub(" ", value)
    value = value.strip()
    if not _printable_ascii(value) or "=?" in value:
        value = Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
    elif len(name) + len(value) > LINE_LIMIT:
        lines = [f"{name}:"]
        for word in value.split(" "):
            if len(lines[-1]) + len(word) >= LINE_LIMIT:
                lines.append("")
            lines[-1] += f" {word}"
        return ("\r\n".join(lines) + "\r\n").encode()
    return f"{name}: {value}\r\n".encode()


def _printable_ascii(value: str) -> bool:
    """Characters 0x20 to 0x7e only (faster than a regular expression over a long URL)."""
    return value.isascii() and value.isprintable()


@functools.lru_cache(maxsize=1)
def _date_header(second: int) -> bytes:
    """The Date header changes once a second, not with every message."""
    return _header("Date", formatdate(second, usegmt=True))


@functools.lru_cache(maxsize=16)
def _from_header(email_from: str) -> bytes:
    """``formataddr`` already encodes a display name that is not ASCII."""
    value = _UNSAFE.sub(" ", formataddr(parseaddr(email_from), charset="utf-8"))
    return f"From: {value}\r\n".encode()


def _part(content_type: str, text: str) -> bytes:
    return (
        f'Content-Type: {content_type}; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode() + base64.encodebytes(text.encode()).replace(b"\n", b"\r\n")


def build_message(settings: NotifierSettings, outbound: Outbound) -> tuple[bytes, str]:
    """The message as it goes over the wire, and its Message-ID: multipart/alternative
    (text, then HTML), UTF-8, base64 parts, CRLF line ends. Written directly rather than
    through the ``email`` package, whose generator folds every header and compiles a
    regular expression per boundary (most of a send's CPU time). The boundary starts with
    ``=_``, which base64 never produces, so it cannot occur in a part."""
    unique = uuid.uuid4().hex
    message_id = f"<{unique}@{settings.email_domain}>"
    boundary = f"=_{unique}"
    lines = [
        _from_header(settings.email_from),
        _header("To", outbound.to),
        _header("Subject", outbound.rendered.subject),
        _date_header(int(time.time())),
        _header("Message-ID", message_id),
        _header("X-Nudge-Idempotency-Key", outbound.idempotency_key),
        *(_header(name, value) for name, value in outbound.headers.items()),
        b"MIME-Version: 1.0\r\n",
        f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n'.encode(),
    ]
    delimiter = f"--{boundary}\r\n".encode()
    data = b"".join(
        [
            *lines,
            delimiter,
            _part("text/plain", outbound.rendered.text),
            delimiter,
            _part("text/html", outbound.rendered.html),
            f"--{boundary}--\r\n".encode(),
        ]
    )
    return data, message_id


def dkim_sign(settings: NotifierSettings, data: bytes) -> bytes:
    if not (settings.dkim_domain and settings.dkim_selector and settings.dkim_private_key):
        return data
    signature = dkim.sign(
        data,
        settings.dkim_selector.encode(),
        settings.dkim_domain.encode(),
        settings.dkim_private_key.get_secret_value().encode(),
        include_headers=SIGNED_HEADERS,
    )
    return bytes(signature) + data


class SmtpPool:
    """Up to ``smtp_max_connections`` open SMTP connections, reused across messages.
    A connection that saw any error is closed, never handed out again."""

    def __init__(self, settings: NotifierSettings) -> None:
        self.settings = settings
        self.idle: list[aiosmtplib.SMTP] = []
        self.open = 0
        self.condition = asyncio.Condition()

    def _client(self) -> aiosmtplib.SMTP:
        s = self.settings
        return aiosmtplib.SMTP(
            hostname=s.smtp_host,
            port=s.smtp_port,
            username=s.smtp_username,
            password=s.smtp_password.get_secret_value() if s.smtp_password else None,
            use_tls=s.smtp_use_tls,
            start_tls=s.smtp_start_tls,
            validate_certs=s.smtp_validate_certs,
            timeout=s.smtp_timeout_s,
        )

    async def acquire(self) -> aiosmtplib.SMTP:
        async with self.condition:
            while not self.idle and self.open >= self.settings.smtp_max_connections:
                await self.condition.wait()
            if self.idle:
                return self.idle.pop()
            self.open += 1
        client = self._client()
        try:
            await client.connect()
        except BaseException:
            await self.release(client, reuse=False)
            raise
        return client

    async def release(self, client: aiosmtplib.SMTP, *, reuse: bool) -> None:
        async with self.condition:
            if reuse and client.is_connected:
                self.idle.append(client)
            else:
                self.open -= 1
                client.close()
            self.condition.notify()

    async def close(self) -> None:
        async with self.condition:
            for client in self.idle:
                try:
                    await asyncio.wait_for(client.quit(), 1.0)
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    client.close()
            self.open -= len(self.idle)
            self.idle.clear()


class SmtpEmailProvider:
    name = "smtp"

    def __init__(self, settings: NotifierSettings) -> None:
        self.settings = settings
        self.pool = SmtpPool(settings)
        self.sender = parseaddr(settings.email_from)[1]
        self.mail_from = b"FROM:" + quote_address(self.sender).encode("ascii")

    async def send(self, message: Outbound) -> str:
        """Hand the message to the SMTP server; returns its Message-ID.

        Everything up to DATA is safe to retry (the server has not got the message); a
        reply to DATA is a clear yes or no; a connection lost or a timeout *during* DATA
        propagates as is, because the server may have taken the message: unknown."""
        data, message_id = build_message(self.settings, message)
        data = dkim_sign(self.settings, data)
        try:
            client = await self.pool.acquire()
        except aiosmtplib.SMTPException as error:
            raise TransientFailure(f"cannot connect: {error}") from error
        except OSError as error:
            raise TransientFailure(f"cannot connect: {error!r}") from error
        reuse = False
        try:
            try:
                await self._envelope(client, message.to)
            except aiosmtplib.SMTPResponseException as error:
                raise _refusal(error) from error
            except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as error:
                raise TransientFailure(f"connection lost before DATA: {error}") from error
            try:
                await client.data(data)
            except aiosmtplib.SMTPResponseException as error:
                if 400 <= error.code < 500:
                    raise TransientFailure(
                        f"{error.code} {error.message}", per_recipient=True
                    ) from error
                raise PermanentFailure(f"{error.code} {error.message}") from error
            reuse = True
        finally:
            await self.pool.release(client, reuse=reuse)
        return message_id

    async def _envelope(self, client: aiosmtplib.SMTP, to: str) -> None:
        """MAIL and RCPT as ``client.mail`` and ``client.rcpt`` send them, with the
        same errors, but without parsing both addresses again for every message: the
        sender is quoted once, and the recipient was checked and normalised before."""
        if client.is_ehlo_or_helo_needed:
            try:
                await client.ehlo()
            except aiosmtplib.SMTPHeloError:
                if not client.is_connected:
                    raise
                await client.helo()
        response = await client.execute_command(b"MAIL", self.mail_from)
        if response.code != SMTPStatus.completed:
            raise aiosmtplib.SMTPSenderRefused(response.code, response.message, self.sender)
        if _NOT_IN_A_MAILBOX.search(to):
            raise ValueError(f"{to!r} cannot be sent to: not a plain SMTP mailbox")
        response = await client.execute_command(b"RCPT", b"TO:<" + to.encode("ascii") + b">")
        if response.code not in (SMTPStatus.completed, SMTPStatus.will_forward):
            raise aiosmtplib.SMTPRecipientRefused(response.code, response.message, to)

    async def close(self) -> None:
        await self.pool.close()


def _refusal(error: aiosmtplib.SMTPResponseException) -> Exception:
    reason = f"{error.code} {error.message}"
    if 400 <= error.code < 500:
        return TransientFailure(reason, per_recipient=True)
    hard = isinstance(error, aiosmtplib.SMTPRecipientRefused) and (
        error.code in HARD_BOUNCE_CODES or "5.1." in error.message
    )
    return PermanentFailure(reason, hard_bounce=hard)
