"""Email over SMTP with aiosmtplib: a pool of open connections (TLS or STARTTLS, auth),
Message-ID, RFC 8058 one-click List-Unsubscribe headers and optional DKIM signing."""

from __future__ import annotations

import asyncio
from email import policy
from email.header import Header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formatdate, make_msgid, parseaddr

import aiosmtplib
import dkim

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


def build_message(settings: NotifierSettings, outbound: Outbound) -> Message:
    """multipart/alternative (text, then HTML), UTF-8. Built with the ``compat32`` MIME
    classes: the modern ``EmailMessage`` policy re-parses and re-folds every header and
    was most of the CPU time of a send."""
    message = MIMEMultipart("alternative")
    message["From"] = settings.email_from
    message["To"] = outbound.to
    message["Subject"] = Header(outbound.rendered.subject, "utf-8").encode()
    message["Date"] = formatdate(localtime=False, usegmt=True)
    message["Message-ID"] = make_msgid(domain=settings.email_domain)
    message["X-Nudge-Idempotency-Key"] = outbound.idempotency_key
    for name, value in outbound.headers.items():
        message[name] = value
    message.attach(MIMEText(outbound.rendered.text, "plain", "utf-8"))
    message.attach(MIMEText(outbound.rendered.html, "html", "utf-8"))
    return message


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

    async def send(self, message: Outbound) -> str:
        """Hand the message to the SMTP server; returns its Message-ID.

        Everything up to DATA is safe to retry (the server has not got the message); a
        reply to DATA is a clear yes or no; a connection lost or a timeout *during* DATA
        propagates as is, because the server may have taken the message: unknown."""
        email = build_message(self.settings, message)
        data = dkim_sign(
            self.settings, email.as_bytes(policy=policy.compat32.clone(linesep="\r\n"))
        )
        try:
            client = await self.pool.acquire()
        except aiosmtplib.SMTPException as error:
            raise TransientFailure(f"cannot connect: {error}") from error
        except OSError as error:
            raise TransientFailure(f"cannot connect: {error!r}") from error
        reuse = False
        try:
            try:
                await client.mail(self.sender)
                await client.rcpt(message.to)
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
        return str(email["Message-ID"])

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
