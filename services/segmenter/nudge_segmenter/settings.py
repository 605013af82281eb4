from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import model_validator

from nudge_common.settings import NudgeSettings


class SegmenterSettings(NudgeSettings):
    service_name: str = "segmenter"
    http_port: int = 8003
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
