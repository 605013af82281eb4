from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import Field, SecretStr, model_validator

from nudge_common.settings import NudgeSettings
from nudge_common.tracking import DEVELOPMENT_SECRET


class OrchestratorSettings(NudgeSettings):
    service_name: str = "orchestrator"
    http_port: int = 8004

    timer_batch: int = Field(default=500, ge=1)
    """Due timers claimed (FOR UPDATE SKIP LOCKED) per transaction."""
    timer_idle_s: float = Field(default=0.2, gt=0)
    """How long the timer worker sleeps when nothing is due."""
    delivery_batch_interval_s: float = Field(default=0.25, ge=0)
    """The deliveries consumer (analytics) starts a batch at most this often."""
    clock_file: Path | None = None
    """Tests only: a file holding an ISO-8601 instant that is "now" for workflows (waits,
    timers, quiet hours). Refused in production."""
    webhook_secret: SecretStr = SecretStr(DEVELOPMENT_SECRET)
    """Key of the HMAC-SHA256 signature of webhook calls (``X-Nudge-Signature``); set
    ``NUDGE_WEBHOOK_SECRET`` in production and share it with the receivers."""
    webhook_attempts: int = Field(default=8, ge=1)
    """Attempts of a webhook call before it is given up (backoff 2^n seconds, at most 1 h)."""
    scoring_url: str | None = None
    """Base URL of scoring's internal API, fronted under /api/v1 (contacts, scoring)."""
    notifier_url: str | None = None
    """Base URL of the notifier's internal API, fronted under /api/v1 (suppression)."""
    segmenter_url: str | None = None
    """Base URL of the segmenter's API: fronted under /api/v1 (segments, lists), and the
    members of a broadcast's segment."""
    broadcast_page: int = Field(default=1000, ge=1, le=5000)
    """Members of a broadcast handed to runs per transaction (at most ``rate_per_s``)."""
    broadcast_idle_s: float = Field(default=0.5, gt=0)
    """How long the broadcast worker sleeps when no broadcast is due."""
    broadcast_ab_check_s: float = Field(default=60.0, gt=0)
    """How often an A/B broadcast whose test went out looks at its results for a winner."""

    @model_validator(mode="after")
    def no_test_clock_in_production(self) -> Self:
        if self.environment == "production" and self.clock_file is not None:
            raise ValueError("NUDGE_CLOCK_FILE is for tests and refused in production")
        if (
            self.environment == "production"
            and self.webhook_secret.get_secret_value() == DEVELOPMENT_SECRET
        ):
            raise ValueError("NUDGE_WEBHOOK_SECRET must be set in production")
        return self
