"""Which database errors the consumer runner retries (the database is down or busy) and which
it dead-letters (the message is bad), on errors the real PostgreSQL raises."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from nudge_common.consumer import is_transient
from nudge_common.db import SessionMaker, transaction


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
