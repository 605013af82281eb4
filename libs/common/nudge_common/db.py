"""Async SQLAlchemy engine and sessions.

Repositories take an ``AsyncSession`` and never commit: whoever owns the unit of work (the
consumer runner for a batch, a route for a request) opens it with :func:`transaction`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, UUID, Insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import QueuePool

from nudge_common import codec, metrics
from nudge_common.settings import NudgeSettings

SessionMaker = async_sessionmaker[AsyncSession]


def create_engine(settings: NudgeSettings) -> AsyncEngine:
    engine = create_async_engine(
        settings.database_url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_pool_size,
        # No ping before each checkout: with asyncpg it costs three round trips (BEGIN, ";",
        # ROLLBACK), as many as a consumer's whole batch otherwise needs when it is small.
        # A connection the server closed fails its first statement instead; the pool then
        # replaces its connections, a consumer retries the batch (``is_transient``) and
        # the API answers 503 (``nudge_common.service.dependency_unavailable``).
        pool_pre_ping=False,
        pool_timeout=10,
        # JSONB columns through the wire codec: the standard library's json took ~6% of a
        # busy consumer's CPU decoding them
        json_serializer=_json_text,
        json_deserializer=codec.loads,
    )
    instrument(engine)
    return engine


def _json_text(value: Any) -> str:
    return codec.dumps(value).decode()


def instrument(engine: AsyncEngine) -> None:
    """Time every statement and follow the pool's connections in the shared metrics."""
    sync_engine = engine.sync_engine

    @sa.event.listens_for(sync_engine, "before_cursor_execute")
    def started(conn: sa.Connection, *_: Any) -> None:
        conn.info.setdefault(_STARTED, []).append(time.perf_counter())

    @sa.event.listens_for(sync_engine, "after_cursor_execute")
    def finished(conn: sa.Connection, _cursor: Any, statement: str, *_: Any) -> None:
        began = conn.info[_STARTED].pop()
        kind = statement.lstrip().split(None, 1)[0].lower() if statement.strip() else "empty"
        metrics.DB_QUERY_DURATION.labels(kind if kind in _KINDS else "other").observe(
            time.perf_counter() - began
        )

    @sa.event.listens_for(sync_engine, "handle_error")
    def failed(context: sa.engine.ExceptionContext) -> None:
        started_at = context.connection.info.get(_STARTED) if context.connection else None
        if started_at:
            started_at.pop()

    pool = sync_engine.pool

    def observe_pool(*_: Any) -> None:
        if isinstance(pool, QueuePool):
            metrics.DB_POOL_CHECKED_OUT.set(pool.checkedout())
            metrics.DB_POOL_SIZE.set(pool.checkedout() + pool.checkedin())

    for event_name in ("checkout", "checkin", "connect", "close"):
        sa.event.listen(pool, event_name, observe_pool)


_STARTED = "nudge_query_started"
_KINDS = frozenset({"select", "insert", "update", "delete", "with", "begin", "commit", "rollback"})


def array_rows(
    columns: Sequence[tuple[str, sa.types.TypeEngine[Any], Sequence[Any]]],
) -> sa.TableValuedAlias:
    """Rows given as one array parameter per column (``unnest``), to select from, insert
    from or join: the statement's SQL is the same whatever the number of rows, so SQLAlchemy
    compiles it once and PostgreSQL gets one parameter per column (a multi-row ``VALUES``
    is compiled again for every row count, and an ``IN`` list of tuples is planned as one
    condition per tuple)."""
    return (
        sa.func.unnest(*(_array(type_, values) for _, type_, values in columns))
        .table_valued(*(sa.column(name, type_) for name, type_, _ in columns))
        .render_derived(with_types=False)
    )


def column_lists(rows: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows with the same keys as one list per column, for :func:`insert_arrays`."""
    return {name: [row[name] for row in rows] for name in rows[0]}


def _array(type_: sa.types.TypeEngine[Any], values: Sequence[Any]) -> sa.ColumnElement[Any]:
    if not isinstance(type_, sa.JSON):
        return sa.cast(list(values), ARRAY(type_))
    return sa.literal(list(values), JSONArray(type_))


class JSONArray(sa.types.TypeDecorator[list[Any]]):
    """An array of JSON values as a bind parameter: sent as text (a list value would read
    as one more array dimension) and cast to the JSON type's array in the statement."""

    impl = ARRAY(sa.Text())
    cache_ok = True

    def __init__(self, json_type: sa.JSON) -> None:
        super().__init__()
        self.json_type = json_type

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> list[str | None] | None:
        if value is None:
            return None
        return [
            None if item is None and self.json_type.none_as_null else codec.dumps(item).decode()
            for item in value
        ]

    def bind_expression(self, bindvalue: Any) -> sa.ColumnElement[Any]:
        return sa.cast(bindvalue, ARRAY(self.json_type))


def array_param(name: str, type_: sa.types.TypeEngine[Any]) -> sa.BindParameter[Any]:
    """A bind parameter holding an array of ``type_`` values (JSON ones through
    :class:`JSONArray`), for statements built once, at import, and executed with plain
    lists: ``column == sa.any_(array_param("ids", column.type))`` instead of an ``IN`` list,
    whose statement is built, keyed and expanded again on every call (and its SQL differs
    with every length, so PostgreSQL prepares it again)."""
    if isinstance(type_, sa.JSON):
        return sa.bindparam(name, type_=JSONArray(type_))
    return sa.bindparam(name, type_=ARRAY(type_))


def array_rows_of(columns: Sequence[tuple[str, sa.types.TypeEngine[Any]]]) -> sa.TableValuedAlias:
    """:func:`array_rows` for a statement built once: each column's array is the bind
    parameter named after it (:func:`array_param`)."""
    return (
        sa.func.unnest(*(array_param(name, type_) for name, type_ in columns))
        .table_valued(*(sa.column(name, type_) for name, type_ in columns))
        .render_derived(with_types=False)
    )


def insert_arrays(table: sa.Table, names: Sequence[str], *, prefix: str = "") -> Insert:
    """``INSERT INTO table (names) SELECT * FROM unnest(arrays)``, built once: executed with
    one list per column (:func:`column_lists`), named after the columns, or ``<prefix><column>``
    (so that several such inserts can be parts of one statement)."""
    given = array_rows_of([(prefix + name, table.c[name].type) for name in names])
    return pg_insert(table).from_select(list(names), sa.select(*given.c))


def create_sessionmaker(engine: AsyncEngine) -> SessionMaker:
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def transaction(sessionmaker: SessionMaker) -> AsyncIterator[AsyncSession]:
    """Commit on success, roll back on error."""
    async with sessionmaker() as session, session.begin():
        yield session


def autocommit(sessionmaker: SessionMaker) -> SessionMaker:
    """Sessions on the same engine whose statements each commit on their own: no BEGIN and
    COMMIT round trips (two of the three of a transaction of one statement). For work
    that is one statement (atomic by itself), or reads that need no common snapshot.
    Build it once: the engine it binds is a copy with its own options."""
    engine = sessionmaker.kw["bind"]
    return async_sessionmaker(
        engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False
    )


def processed_messages_table(metadata: sa.MetaData) -> sa.Table:
    """Ids of the messages a consumer has applied, written in the same transaction as the
    effects: a replayed message finds its id here and changes nothing."""
    return sa.Table(
        "processed_messages",
        metadata,
        sa.Column("consumer", sa.Text, primary_key=True),
        sa.Column("message_id", UUID(as_uuid=True), primary_key=True),
        sa.Column(
            "processed_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        # rows arrive in time order, so a BRIN index finds the old ones for a few pages
        sa.Index("ix_processed_messages_processed_at", "processed_at", postgresql_using="brin"),
    )
