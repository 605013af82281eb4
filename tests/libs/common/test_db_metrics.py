"""The engine factory times every statement and follows the pool, on the real database."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from nudge_common.db import create_engine, create_sessionmaker, transaction
from tests.conftest import StackHandle


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def test_statements_are_timed_by_kind_and_the_pool_is_followed(stack: StackHandle) -> None:
    engine = create_engine(stack.settings)
    try:
        selects = sample("nudge_db_query_duration_seconds_count", {"statement": "select"})
        errors_before = sample("nudge_db_query_duration_seconds_count", {"statement": "other"})
        async with transaction(create_sessionmaker(engine)) as session:
            await session.execute(sa.text("SELECT 1"))
            await session.execute(sa.text("select 2"))
            assert sample("nudge_db_pool_checked_out_connections") >= 1
        assert (
            sample("nudge_db_query_duration_seconds_count", {"statement": "select"}) == selects + 2
        )
        assert sample("nudge_db_pool_size_connections") >= 1

        with pytest.raises(sa.exc.ProgrammingError):
            async with transaction(create_sessionmaker(engine)) as session:
                await session.execute(sa.text("SELEKT nonsense"))
        async with transaction(create_sessionmaker(engine)) as session:
            await session.execute(sa.text("SELECT 3"))
        assert (
            sample("nudge_db_query_duration_seconds_count", {"statement": "select"}) == selects + 3
        )
        assert (
            sample("nudge_db_query_duration_seconds_count", {"statement": "other"}) == errors_before
        )
    finally:
        await engine.dispose()
