from __future__ import annotations

from fastapi import FastAPI

from nudge_common.service import create_service_app
from nudge_orchestrator.api import (
    analytics,
    broadcasts,
    fronted,
    keys,
    messaging,
    openapi,
    templates,
    workflows,
)
from nudge_orchestrator.consumer import consumers
from nudge_orchestrator.settings import OrchestratorSettings

ROUTERS = [
    workflows.router,
    broadcasts.router,
    analytics.router,
    templates.router,
    keys.router,
    messaging.router,
    fronted.router,
]
TITLE = "Nudge marketers' API"


def create_app() -> FastAPI:
    app = create_service_app(
        settings=OrchestratorSettings(), routers=ROUTERS, consumers=consumers, title=TITLE
    )
    openapi.install(app)
    return app
