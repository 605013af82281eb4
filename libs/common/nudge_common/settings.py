"""The one settings base every service builds its own settings class on.

All variables share the ``NUDGE_`` prefix. A service adds its own fields; it never reads the
environment by hand.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEVELOPMENT_DATABASE_URL = "postgresql+asyncpg://nudge:nudge@127.0.0.1:15432/nudge"


class NudgeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NUDGE_", extra="ignore", frozen=True)

    environment: Literal["development", "test", "production"] = "development"
    service_name: str = "nudge"

    kafka_bootstrap_servers: str = "127.0.0.1:19092"
    kafka_linger_ms: int = Field(default=0, ge=0)
    """How long the producer holds a record for others to join its request. A consumer
    publishes a whole batch's outputs at once, which makes one request anyway, so it
    waits for nothing; ingest, whose requests arrive one by one, lingers."""
    topic_prefix: str = "nudge."
    """Prefixes every topic and consumer group, so one broker can host isolated test runs."""

    database_url: str = DEVELOPMENT_DATABASE_URL
    database_pool_size: int = Field(default=10, ge=1)

    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=0, le=65535)

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = True

    consumer_batch_max_records: int = Field(default=500, ge=1)
    consumer_poll_timeout_ms: int = Field(default=200, ge=1)
    dead_letters_per_minute_limit: int = Field(default=1000, ge=1)
    """Above this many dead letters in a minute the consumer stops: a bad deploy must not
    quietly dead-letter the whole stream."""
    processed_messages_retention_s: float = Field(default=14 * 86400, gt=0)
    """How long a consumer remembers the ids of the messages it applied. Longer than the
    topics keep messages (7 days), so any replay Kafka can still serve finds them."""
    processed_messages_trim_every_s: float = Field(default=300.0, gt=0)
    gc_young_threshold: int = Field(default=50_000, ge=1)
    """Container allocations (net of deallocations) between two young-generation garbage
    collections (CPython's default is 700); see ``nudge_common.service.freeze_startup_heap``."""

    @model_validator(mode="after")
    def refuse_development_defaults_in_production(self) -> Self:
        if self.environment == "production" and self.database_url == DEVELOPMENT_DATABASE_URL:
            raise ValueError("NUDGE_DATABASE_URL must be set explicitly in production")
        return self

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def consumer_group(self, consumer: str) -> str:
        return f"{self.topic_prefix}{consumer}"
