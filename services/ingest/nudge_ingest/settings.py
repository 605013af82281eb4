from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

from pydantic import Field

from nudge_common.settings import NudgeSettings


class IngestSettings(NudgeSettings):
    service_name: str = "ingest"
    http_port: int = 8001
    kafka_linger_ms: int = Field(default=2, ge=0)
    """Concurrent requests within 2 ms share one produce request."""
    produce_timeout_s: float = Field(default=5.0, gt=0)
    """How long a request waits for Kafka's acknowledgement before answering 503."""
    write_key_cache_ttl_s: float = Field(default=30.0, ge=0)

    trusted_proxies: list[IPv4Network | IPv6Network] = Field(default_factory=list)
    """CIDRs of the reverse proxies in front of ingest (JSON list, e.g.
    ``["10.0.0.0/8"]``). ``X-Forwarded-For``/``X-Real-IP`` and ``X-Forwarded-Proto`` are
    believed only when the connection comes from one of them; otherwise the peer address is
    the client's."""
    geoip_csv_path: Path | None = None
    """Optional IP-to-country database: a CSV of ``first_ip,last_ip,country_code`` rows.
    When set, every event gets ``context.location.country``."""

    rate_limit_per_s: float = Field(default=0.0, ge=0)
    """Requests per second allowed per write key, per worker process (0: no limit)."""
    rate_limit_burst: int = Field(default=0, ge=0)
    """Requests a write key may send at once above its rate (0: one second's worth)."""

    public_api_host: str | None = None
    """``host[:port]/v1`` that analytics.js should send to, as announced by
    ``/v1/projects/{writeKey}/settings``; by default the host the settings were asked from."""
