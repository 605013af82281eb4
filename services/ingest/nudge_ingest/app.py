from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from nudge_common.service import create_service_app
from nudge_common.tracking import TrackingSettings
from nudge_ingest.api import browser, engagement, tracking
from nudge_ingest.api.deps import IngestState
from nudge_ingest.api.errors import IngestError, ingest_error_handler
from nudge_ingest.settings import IngestSettings


def create_app() -> FastAPI:
    """One worker process's app: its own write-key cache, rate limiter and producer (the
    producer is opened in the lifespan), sharing nothing with other workers but Kafka."""
    settings = IngestSettings()
    TrackingSettings()  # refuses the development tracking secret in production, at start
    app = create_service_app(
        settings=settings, routers=[tracking.router, browser.router, engagement.router]
    )
    app.state.ingest = IngestState.from_settings(settings)
    app.add_exception_handler(IngestError, ingest_error_handler)
    # Write keys are public and sites call ingest from their own origin (analytics.js sends
    # application/json with fetch, which needs a preflight): any origin may send events.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"],
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["*"],
        max_age=86400,
    )
    return app
