from __future__ import annotations

from pathlib import Path
from typing import Self

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import BaseModel, Field, PrivateAttr, SecretStr, ValidationError, model_validator

from nudge_common.events import Channel
from nudge_common.settings import NudgeSettings
from nudge_common.tracking import DEVELOPMENT_SECRET, refuse_development_secret


class ServiceAccount(BaseModel):
    """The fields of a Google service account's JSON key that FCM authentication uses."""

    client_email: str
    private_key: SecretStr
    """PEM (PKCS#8) RSA key."""
    private_key_id: str | None = None
    token_uri: str
    project_id: str

    def signing_key(self) -> rsa.RSAPrivateKey:
        pem = self.private_key.get_secret_value().encode()
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("private_key is not an RSA key")
        return key

    @model_validator(mode="after")
    def key_loads(self) -> Self:
        self.signing_key()
        return self


class NotifierSettings(NudgeSettings):
    service_name: str = "notifier"
    http_port: int = 8005

    # --- email over SMTP -------------------------------------------------------------------
    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(default=2525, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_use_tls: bool = False
    """Implicit TLS from the first byte (port 465)."""
    smtp_start_tls: bool | None = None
    """None: upgrade with STARTTLS when the server offers it; True: require it."""
    smtp_validate_certs: bool = True
    smtp_timeout_s: float = Field(default=10.0, gt=0)
    smtp_max_connections: int = Field(default=16, ge=1)
    """Connections kept open to the SMTP server and used concurrently (the pool's size). An
    email costs two round trips to a server that pipelines (MAIL, RCPT and DATA, then the
    message), four to one that does not, so a batch's sending time is about its emails /
    connections x 2 (or 4) round trips: at 1,000 events/s in
    ``make bench-e2e`` (333 emails/s) 16 instead of 4 took the notifier's hop from ~390 to
    ~210 ms at the median for the same CPU. Lower it for a relay that limits concurrent
    connections per client."""
    smtp_rate_per_s: float = Field(default=0.0, ge=0)
    """Messages per second handed to the SMTP server; 0 means no limit."""
    email_from: str = "Nudge <no-reply@nudge.localhost>"
    email_domain: str = "nudge.localhost"
    """Right-hand side of Message-IDs and of the List-Unsubscribe mailto address."""
    dkim_domain: str | None = None
    dkim_selector: str | None = None
    dkim_private_key: SecretStr | None = None
    """PEM; with domain and selector set, every email is DKIM-signed."""
    email_double_opt_in: bool = False
    """True: email needs a confirmed (double opt-in) subscription, like SMS."""

    # --- SMS through a Twilio-style REST API ------------------------------------------------
    sms_api_url: str = "https://api.twilio.com"
    sms_account_sid: str = "AC-development"
    sms_auth_token: SecretStr = SecretStr("development")
    sms_from: str = "+15005550006"
    sms_default_region: str = "US"
    """Region used to read phone numbers written without a country code."""
    sms_rate_per_s: float = Field(default=10.0, ge=0)
    sms_concurrency: int = Field(default=4, ge=1)

    # --- push: FCM HTTP v1 and Web Push (VAPID) -----------------------------------------------
    fcm_api_url: str = "https://fcm.googleapis.com"
    fcm_service_account: SecretStr | None = None
    """A Google service account's JSON key, inline; access tokens are minted from it."""
    fcm_service_account_file: Path | None = None
    """Or the path of that JSON key file (one of the two, not both)."""
    fcm_project_id: str | None = None
    """Default: the service account's project_id, else nudge-development."""
    fcm_access_token: SecretStr = SecretStr("development")
    """Without a service account: a fixed OAuth2 access token, refreshed by the deployment."""
    vapid_private_key: SecretStr | None = None
    """PEM or base64url raw key; without it Web Push subscriptions are skipped."""
    vapid_subject: str = "mailto:no-reply@nudge.localhost"
    push_rate_per_s: float = Field(default=50.0, ge=0)
    push_concurrency: int = Field(default=8, ge=1)

    # --- retries, batches, consent, hygiene ---------------------------------------------------
    send_attempts: int = Field(default=3, ge=1)
    """Attempts of a transient failure inside one batch, with exponential backoff and full
    jitter, before the batch is handed back to the consumer runner to retry later."""
    max_batch_attempts: int = Field(default=5, ge=1)
    """Batches in which a recipient may be refused for now (4xx to RCPT or DATA) before
    the message is given up as a soft bounce; a server that cannot be reached at all is
    retried without end instead (back-pressure, nothing is given up)."""
    retry_base_delay_s: float = Field(default=0.05, ge=0)
    retry_max_delay_s: float = Field(default=2.0, ge=0)
    http_timeout_s: float = Field(default=10.0, gt=0)
    opt_in_channels: list[Channel] = Field(default_factory=lambda: list[Channel](["sms"]))
    """Channels that need a recorded subscription before anything is sent."""
    soft_bounce_sunset_threshold: int = Field(default=3, ge=1)
    """Soft bounces in a row after which an address is sunset."""
    unengaged_sunset_days: int = Field(default=180, ge=1)
    unengaged_sunset_min_sends: int = Field(default=5, ge=1)
    sunset_interval_s: float = Field(default=60.0, gt=0)
    """How often the sunset job looks for addresses whose silence rule is due."""
    sunset_batch: int = Field(default=500, ge=1)
    """Addresses the sunset job takes per transaction."""

    # --- public links --------------------------------------------------------------------------
    public_url: str = "http://127.0.0.1:8005"
    """Where readers reach the notifier's public pages (unsubscribe, opt-in confirmation)."""
    tracking_url: str = "http://127.0.0.1:8001"
    """Where readers reach ingest's tracking routes (open pixel, click redirect)."""
    tracking_secret: SecretStr = SecretStr(DEVELOPMENT_SECRET)
    """Signs tracking links and unsubscribe tokens; refused unset in production."""
    track_opens: bool = True
    track_clicks: bool = True

    _fcm_account: ServiceAccount | None = PrivateAttr(default=None)

    @property
    def fcm_account(self) -> ServiceAccount | None:
        return self._fcm_account

    @property
    def fcm_project(self) -> str:
        if self.fcm_project_id is not None:
            return self.fcm_project_id
        return self._fcm_account.project_id if self._fcm_account else "nudge-development"

    @model_validator(mode="after")
    def fcm_service_account_loads(self) -> Self:
        if self.fcm_service_account is not None and self.fcm_service_account_file is not None:
            raise ValueError("set fcm_service_account or fcm_service_account_file, not both")
        text: str | None = None
        if self.fcm_service_account is not None:
            text = self.fcm_service_account.get_secret_value()
        elif self.fcm_service_account_file is not None:
            try:
                text = self.fcm_service_account_file.read_text()
            except OSError as error:
                raise ValueError(f"fcm_service_account_file: {error}") from error
        if text is not None:
            try:
                self._fcm_account = ServiceAccount.model_validate_json(text)
            except ValidationError as error:
                # Named without the input: it holds the private key.
                problems = "; ".join(
                    f"{'.'.join(map(str, e['loc'])) or 'key'}: {e['msg']}"
                    for e in error.errors(include_input=False, include_url=False)
                )
                raise ValueError(f"fcm_service_account: {problems}") from None
        return self

    @model_validator(mode="after")
    def tracking_secret_set_in_production(self) -> Self:
        refuse_development_secret(self.environment, self.tracking_secret)
        return self
