"""RawStatement runs a statement built once on the asyncpg connection of the session's own
transaction, on the real database: the same transaction as SQLAlchemy's statements (also
as its first statement: BEGIN is sent), the same values both ways (JSON, UUIDs, literals),
errors raised as SQLAlchemy raises them, and the time counted in the query metric."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY
from sqlalchemy.dialects.postgresql import JSONB, UUID

from nudge_common.consumer import is_transient
from nudge_common.db import RawStatement, SessionMaker, array_param, insert_arrays

metadata = sa.MetaData()
rows = sa.Table(
    f"raw_probe_{uuid.uuid4().hex[:8]}",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("label", sa.Text),
    sa.Column("doc", JSONB),
)
INSERT = RawStatement(insert_arrays(rows, ["id", "label", "doc"]).returning(rows.c.id))
BY_IDS = sa.select(rows.c.id, rows.c.label, rows.c.doc, sa.literal("const", sa.Text)).where(
    rows.c.id == sa.any_(array_param("ids", rows.c.id.type))
)
RAW_BY_IDS = RawStatement(BY_IDS)
FAILING = RawStatement(
    sa.text("SELECT pg_temp.raw_probe_fail(:code)").bindparams(sa.bindparam("code", type_=sa.Text))
)

VALUES: list[Any] = [{"a": [1, 2], "b": "é"}, [1, "two", None], "text", 3.5, None]


def selects() -> float:
    return (
        REGISTRY.get_sample_value("nudge_db_query_duration_seconds_count", {"statement": "select"})
        or 0.0
    )


async def test_same_transaction_same_values_errors_and_metric(sessionmaker: SessionMaker) -> None:
    async with sessionmaker() as session, session.begin():
        await session.run_sync(lambda sync: metadata.create_all(sync.connection()))
    ids = [uuid.uuid4() for _ in VALUES]
    given = {"id": ids, "label": ["x", None, "y", "z", "w"], "doc": VALUES}

    # first statement of a transaction that rolls back: nothing stays
    async with sessionmaker() as session:
        assert len(await INSERT.fetch(session, given)) == len(ids)
        await session.rollback()
    async with sessionmaker() as session:
        assert (await session.execute(BY_IDS, {"ids": ids})).all() == []

    counted = selects()
    async with sessionmaker() as session, session.begin():
        await INSERT.fetch(session, given)
        # SQLAlchemy's statements see the raw one's rows: the same transaction
        by_sqlalchemy = {row.id: tuple(row) for row in await session.execute(BY_IDS, {"ids": ids})}
        async with sessionmaker() as other:
            assert (await other.execute(BY_IDS, {"ids": ids})).all() == []
        raw = await RAW_BY_IDS.fetch(session, {"ids": ids})
        assert {row[0]: tuple(row) for row in raw} == by_sqlalchemy
        assert [by_sqlalchemy[i][2] for i in ids] == VALUES
        assert all(isinstance(row[0], uuid.UUID) and row[3] == "const" for row in raw)
    assert selects() >= counted + 1
    async with sessionmaker() as session:
        assert len((await session.execute(BY_IDS, {"ids": ids})).all()) == len(ids)

    # errors are SQLAlchemy's; the transaction goes on after a savepoint's rollback
    async with sessionmaker() as session, session.begin():
        with pytest.raises(sa.exc.IntegrityError) as duplicate:
            async with session.begin_nested():
                await INSERT.fetch(session, given)
        assert not is_transient(duplicate.value)
        assert len(await RAW_BY_IDS.fetch(session, {"ids": ids})) == len(ids)


async def test_a_serialization_failure_is_transient(sessionmaker: SessionMaker) -> None:
    async with sessionmaker() as session, session.begin():
        await session.execute(
            sa.text(
                "CREATE FUNCTION pg_temp.raw_probe_fail(code text) RETURNS boolean"
                " LANGUAGE plpgsql AS"
                " $$ BEGIN RAISE EXCEPTION 'failed' USING ERRCODE = code; END $$"
            )
        )
        with pytest.raises(sa.exc.DBAPIError) as failure:
            await FAILING.fetch(session, {"code": "40001"})
        assert is_transient(failure.value)
