from __future__ import annotations

from fastapi import FastAPI

from nudge_common.service import create_service_app
from nudge_scoring.api import routers
from nudge_scoring.consumer import consumers
from nudge_scoring.settings import ScoringSettings


def create_app() -> FastAPI:
    return create_service_app(settings=ScoringSettings(), routers=routers, consumers=consumers)
