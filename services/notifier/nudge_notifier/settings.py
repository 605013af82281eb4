from __future__ import annotations

from pydantic import Field

from nudge_common.settings import NudgeSettings


class NotifierSettings(NudgeSettings):
    service_name: str = "notifier"
    http_port: int = 8005

    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(default=2525, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_use_tls: bool = False
    smtp_start_tls: bool | None = None
    """None: upgrade with STARTTLS when the server offers it."""
    smtp_timeout_s: float = Field(default=10.0, gt=0)
    email_from: str = "Nudge <no-reply@nudge.localhost>"
