"""Email over SMTP with aiosmtplib."""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import make_msgid

import aiosmtplib

from nudge_notifier.domain.templates import Rendered
from nudge_notifier.settings import NotifierSettings


class PermanentFailure(Exception):
    """The provider refused the message for good (5xx, invalid address): do not retry."""


class TransientFailure(Exception):
    """The provider refused the message for now (4xx, no connection): safe to retry,
    because the provider has certainly not accepted it."""


class SmtpEmailProvider:
    def __init__(self, settings: NotifierSettings) -> None:
        self.settings = settings

    async def send(self, *, to: str, rendered: Rendered, idempotency_key: str) -> str:
        """Hand the message to the SMTP server; returns its Message-ID.

        Errors after the server may have accepted the message (a connection lost during
        DATA, a timeout) propagate as they are: the caller records the outcome as unknown.
        """
        message = EmailMessage()
        message["From"] = self.settings.email_from
        message["To"] = to
        message["Subject"] = rendered.subject
        message["Message-ID"] = make_msgid(domain="nudge.localhost")
        message["X-Nudge-Idempotency-Key"] = idempotency_key
        message.set_content(rendered.text)
        message.add_alternative(rendered.html, subtype="html")
        try:
            await aiosmtplib.send(
                message,
                hostname=self.settings.smtp_host,
                port=self.settings.smtp_port,
                username=self.settings.smtp_username,
                password=self.settings.smtp_password,
                use_tls=self.settings.smtp_use_tls,
                start_tls=self.settings.smtp_start_tls,
                timeout=self.settings.smtp_timeout_s,
            )
        except aiosmtplib.SMTPConnectError as error:
            raise TransientFailure(str(error)) from error
        except aiosmtplib.SMTPRecipientsRefused as error:
            raise PermanentFailure(str(error)) from error
        except aiosmtplib.SMTPResponseException as error:
            failure = TransientFailure if 400 <= error.code < 500 else PermanentFailure
            raise failure(f"{error.code} {error.message}") from error
        return str(message["Message-ID"])
