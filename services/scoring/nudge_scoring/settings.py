from __future__ import annotations

from nudge_common.settings import NudgeSettings


class ScoringSettings(NudgeSettings):
    service_name: str = "scoring"
    http_port: int = 8002
