"""What the notifier's routes share: settings, the providers, and turning a request's
effects into one committed transaction plus its published events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.db import transaction
from nudge_common.kafka import OutgoingMessage, publish
from nudge_common.service import Runtime
from nudge_notifier.consumer import Providers
from nudge_notifier.settings import NotifierSettings


class ApiError(Exception):
    """A 4xx answer with a JSON body naming the field."""

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


def get_settings(request: Request) -> NotifierSettings:
    settings = request.app.state.runtime.settings
    assert isinstance(settings, NotifierSettings)
    return settings


def get_providers(request: Request) -> Providers:
    providers: Providers = request.app.state.providers
    return providers


SettingsDep = Annotated[NotifierSettings, Depends(get_settings)]
ProvidersDep = Annotated[Providers, Depends(get_providers)]


@asynccontextmanager
async def effects(runtime: Runtime) -> AsyncIterator[tuple[AsyncSession, list[OutgoingMessage]]]:
    """Apply in one transaction; publish what it produced and wait for the broker before
    committing, so an answered request's events are on Kafka (a failure answers 5xx and
    changes nothing)."""
    outgoing: list[OutgoingMessage] = []
    async with transaction(runtime.sessionmaker) as session:
        yield session, outgoing
        await publish(runtime.producer, runtime.settings, outgoing)
