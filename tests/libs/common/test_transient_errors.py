"""Which database errors the consumer runner retries (the database is down or busy) and which
it dead-letters (the message is bad), on errors the real PostgreSQL raises; and the API's
answer to the same errors."""

from __future__ import annotations

import asyncpg
import httpx
import pytest
import sqlalchemy as sa
from fastapi import APIRouter

from nudge_common.consumer import is_transient
from nudge_common.db import SessionMaker, create_engine, create_sessionmaker, transaction
from nudge_common.service import create_service_app
from nudge_devtools.pipeline import eventually
from nudge_devtools.services import free_port
from tests.conftest import StackHandle


async def database_error(sessionmaker: SessionMaker, sqlstate: str) -> sa.exc.DBAPIError:
    statement = (
        f"DO $$ BEGIN RAISE EXCEPTION 'raised for a test' USING ERRCODE = '{sqlstate}'; END $$"
    )
    with pytest.raises(sa.exc.DBAPIError) as raised:
        async with transaction(sessionmaker) as session:
            await session.execute(sa.text(statement))
    return raised.value


@pytest.mark.parametrize(
    ("sqlstate", "transient"),
    [
        ("57P01", True),  # admin shutdown: PostgreSQL is stopping
        ("57P03", True),  # cannot connect now: PostgreSQL is starting
        ("08006", True),  # connection failure
        ("40P01", True),  # deadlock detected
        ("40001", True),  # serialization failure
        ("53300", True),  # too many connections
        ("22012", False),  # division by zero: the message's own problem
        ("23505", False),  # unique violation
        ("42601", False),  # syntax error
    ],
)
async def test_database_errors_are_retried_only_when_the_database_is_the_cause(
    sessionmaker: SessionMaker, sqlstate: str, transient: bool
) -> None:
    assert is_transient(await database_error(sessionmaker, sqlstate)) is transient


def test_errors_outside_the_database() -> None:
    assert is_transient(TimeoutError())
    assert is_transient(ConnectionRefusedError())
    assert not is_transient(ValueError("bad payload"))
    # asyncpg's own errors, raised as they are while connecting
    assert is_transient(asyncpg.CannotConnectNowError("the database system is starting up"))
    assert not is_transient(asyncpg.UniqueViolationError("duplicate key"))


async def test_a_connection_the_server_closed_fails_one_request_with_503_then_is_replaced(
    stack: StackHandle,
) -> None:
    """Pooled connections are not pinged before use: the first request on a connection the
    server closed (as a PostgreSQL restart does) gets a 503 to retry, not a 500, and the
    pool's next connection works. The test has its own pool, so the connection it has killed
    cannot reach another test."""
    engine = create_engine(stack.settings)
    sessionmaker = create_sessionmaker(engine)
    router = APIRouter()

    @router.get("/backend")
    async def backend() -> dict[str, int]:
        async with transaction(sessionmaker) as session:
            return {"pid": await session.scalar(sa.text("SELECT pg_backend_pid()")) or 0}

    app = create_service_app(settings=stack.settings, routers=[router])
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://nudge") as client:
            first = await client.get("/backend")
            assert first.status_code == 200
            await terminate_backend(stack, first.json()["pid"])

            refused = await client.get("/backend")
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert "unavailable" in refused.json()["detail"]

            again = await client.get("/backend")
            assert again.status_code == 200
            assert again.json()["pid"] != first.json()["pid"]
    finally:
        await engine.dispose()


async def terminate_backend(stack: StackHandle, pid: int) -> None:
    """pg_terminate_backend only signals the backend: wait until it has exited, or the next
    request may still find the connection alive."""
    dsn = sa.make_url(stack.settings.database_url).set(drivername="postgresql")
    closer = await asyncpg.connect(dsn.render_as_string(hide_password=False))
    try:
        assert await closer.fetchval("SELECT pg_terminate_backend($1)", pid)

        async def exited() -> bool:
            alive = await closer.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid
            )
            return bool(alive == 0)

        await eventually(exited, deadline_s=10, what=f"backend {pid} exited")
    finally:
        await closer.close()


async def test_a_database_that_refuses_connections_gets_503(stack: StackHandle) -> None:
    """Connecting to a database that is down raises the socket's own error, not SQLAlchemy's:
    it is a 503 too."""
    closed = sa.make_url(stack.settings.database_url).set(port=free_port())
    settings = stack.settings.model_copy(
        update={"database_url": closed.render_as_string(hide_password=False)}
    )
    engine = create_engine(settings)
    router = APIRouter()

    @router.get("/one")
    async def one() -> dict[str, int]:
        async with transaction(create_sessionmaker(engine)) as session:
            return {"one": await session.scalar(sa.text("SELECT 1")) or 0}

    app = create_service_app(settings=settings, routers=[router])
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://nudge"
        ) as client:
            refused = await client.get("/one")
        assert refused.status_code == 503
        assert "unavailable" in refused.json()["detail"]
    finally:
        await engine.dispose()
