from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import Field, model_validator

from nudge_common.settings import NudgeSettings


class SegmenterSettings(NudgeSettings):
    service_name: str = "segmenter"
    http_port: int = 8003
    contacts_consumers: int = Field(default=1, ge=1)
    """Consumers of the contacts topic in one process, members of the one ``segmenter``
    group (as scoring's ``events_consumers``): while one waits for PostgreSQL or Kafka,
    another applies its batch. More take more activities a second from a backlog, but
    split a light flow into smaller batches, whose fixed costs then weigh more: one
    keeps the latency lowest (docs/segmenter.md)."""
    clock_file: Path | None = None
    """Tests only: read "now" from this file (see ``nudge_common.clock``)."""
    recheck_batch: int = 500
    recheck_idle_s: float = 0.2
    backfill_chunk: int = 5000
    backfill_idle_s: float = 0.5
    value_refresh_s: float = 86_400
    """How often a workspace's RFM scores and CLV models are refreshed."""
    value_idle_s: float = 5.0
    rfm_window_days: int = 365
    clv_horizon_days: int = 365

    @model_validator(mode="after")
    def no_test_clock_in_production(self) -> Self:
        if self.environment == "production" and self.clock_file is not None:
            raise ValueError("clock_file: a test clock cannot be used in production")
        return self
