from __future__ import annotations

from fastapi import FastAPI

from nudge_common.service import create_service_app
from nudge_segmenter.api import routers
from nudge_segmenter.consumer import consumers
from nudge_segmenter.settings import SegmenterSettings


def create_app() -> FastAPI:
    return create_service_app(settings=SegmenterSettings(), routers=routers, consumers=consumers)
