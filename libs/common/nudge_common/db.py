"""Async SQLAlchemy engine and sessions.

Repositories take an ``AsyncSession`` and never commit: whoever owns the unit of work (the
consumer runner for a batch, a route for a request) opens it with :func:`transaction`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from nudge_common.settings import NudgeSettings

SessionMaker = async_sessionmaker[AsyncSession]


def create_engine(settings: NudgeSettings) -> AsyncEngine:
    return create_async_engine(
        settings.database_url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_pool_size,
        pool_pre_ping=True,
        pool_timeout=10,
    )


def create_sessionmaker(engine: AsyncEngine) -> SessionMaker:
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def transaction(sessionmaker: SessionMaker) -> AsyncIterator[AsyncSession]:
    """Commit on success, roll back on error."""
    async with sessionmaker() as session, session.begin():
        yield session


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
    )
