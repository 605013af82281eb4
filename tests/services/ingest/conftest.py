"""The ingest app in-process on the real broker and database, with settings of the test's
choosing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import httpx
import pytest

from nudge_ingest.app import create_app
from tests.conftest import StackHandle

ClientFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def ingest_client(stack: StackHandle, monkeypatch: pytest.MonkeyPatch) -> ClientFactory:
    """``async with ingest_client(peer="10.0.0.2", NUDGE_X="..."):`` an httpx client on a
    fresh app whose requests come from ``peer``."""

    @asynccontextmanager
    async def open_client(peer: str = "127.0.0.7", **env: str) -> AsyncIterator[httpx.AsyncClient]:
        for name, value in {**stack.env, **env}.items():
            monkeypatch.setenv(name, value)
        app = create_app()
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, client=(peer, 5000))
            async with httpx.AsyncClient(transport=transport, base_url="http://ingest") as client:
                yield client

    return open_client


@pytest.fixture
async def client(ingest_client: ClientFactory) -> AsyncIterator[httpx.AsyncClient]:
    async with ingest_client() as client:
        yield client
