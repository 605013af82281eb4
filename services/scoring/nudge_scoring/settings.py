from __future__ import annotations

from pydantic import Field

from nudge_common.settings import NudgeSettings


class ScoringSettings(NudgeSettings):
    service_name: str = "scoring"
    http_port: int = 8002
    events_consumers: int = Field(default=2, ge=1)
    """Consumers of the events topic in one process, members of the one ``scoring`` group:
    while one waits for PostgreSQL or Kafka, another applies its batch."""
