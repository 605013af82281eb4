from __future__ import annotations

from fastapi import FastAPI

from nudge_common.service import create_service_app
from nudge_notifier.consumer import consumers
from nudge_notifier.settings import NotifierSettings


def create_app() -> FastAPI:
    return create_service_app(settings=NotifierSettings(), consumers=consumers)
