from __future__ import annotations

from fastapi import FastAPI, Request

from nudge_common.http import JsonResponse
from nudge_common.service import create_service_app
from nudge_notifier.api import internal, public, webhooks
from nudge_notifier.api.deps import ApiError
from nudge_notifier.consumer import Providers, consumers
from nudge_notifier.settings import NotifierSettings


def create_app() -> FastAPI:
    settings = NotifierSettings()
    providers = Providers(settings)
    app = create_service_app(
        settings=settings,
        routers=[public.router, webhooks.router, internal.router],
        consumers=consumers(providers),
    )
    app.state.providers = providers
    app.add_exception_handler(ApiError, api_error_handler)  # type: ignore[arg-type]
    return app


async def api_error_handler(_request: Request, error: ApiError) -> JsonResponse:
    return JsonResponse({"error": error.message, "field": error.field}, status_code=error.status)
