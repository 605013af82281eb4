from __future__ import annotations

from nudge_common.settings import NudgeSettings


class OrchestratorSettings(NudgeSettings):
    service_name: str = "orchestrator"
    http_port: int = 8004
