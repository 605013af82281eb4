"""What ingest's routes share within one worker process: the write-key cache, the rate
limiter and the optional country table. Each worker process builds its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from nudge_ingest.api.auth import WriteKeyCache
from nudge_ingest.domain.network import CountryTable
from nudge_ingest.domain.ratelimit import RateLimiter
from nudge_ingest.settings import IngestSettings


@dataclass
class IngestState:
    settings: IngestSettings
    write_keys: WriteKeyCache
    rate_limiter: RateLimiter | None
    countries: CountryTable | None

    @classmethod
    def from_settings(cls, settings: IngestSettings) -> IngestState:
        countries = None
        if settings.geoip_csv_path is not None:
            with settings.geoip_csv_path.open(encoding="utf-8") as lines:
                countries = CountryTable.from_csv_lines(lines)
        limiter = (
            RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
            if settings.rate_limit_per_s > 0
            else None
        )
        return cls(settings, WriteKeyCache(settings.write_key_cache_ttl_s), limiter, countries)


def get_ingest_state(request: Request) -> IngestState:
    state: IngestState = request.app.state.ingest
    return state


IngestStateDep = Annotated[IngestState, Depends(get_ingest_state)]
