from __future__ import annotations

from pydantic import Field

from nudge_common.settings import NudgeSettings


class IngestSettings(NudgeSettings):
    service_name: str = "ingest"
    http_port: int = 8001
    produce_timeout_s: float = Field(default=5.0, gt=0)
    """How long a request waits for Kafka's acknowledgement before answering 503."""
    write_key_cache_ttl_s: float = Field(default=30.0, ge=0)
