from __future__ import annotations

from fastapi import FastAPI

from nudge_common.service import create_service_app
from nudge_ingest.api import tracking
from nudge_ingest.api.auth import WriteKeyCache
from nudge_ingest.api.errors import IngestError, ingest_error_handler
from nudge_ingest.settings import IngestSettings


def create_app() -> FastAPI:
    settings = IngestSettings()
    app = create_service_app(settings=settings, routers=[tracking.router])
    app.state.write_keys = WriteKeyCache(settings.write_key_cache_ttl_s)
    app.add_exception_handler(IngestError, ingest_error_handler)
    return app
