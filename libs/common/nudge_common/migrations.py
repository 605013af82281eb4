"""Alembic, one migration history per service schema.

A service's ``migrations/env.py`` is two lines: it calls :func:`run_env`. Migrations of one
schema are serialised by an advisory lock, so replicas starting together are safe.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from nudge_common.settings import NudgeSettings


def upgrade(settings: NudgeSettings, *, schema: str, script_location: Path) -> None:
    """Bring ``schema`` to the newest revision. Synchronous: call it outside an event loop."""
    config = Config()
    config.set_main_option("script_location", str(script_location))
    config.attributes["nudge_schema"] = schema
    config.attributes["nudge_database_url"] = settings.database_url
    command.upgrade(config, "head")


def autogenerate(
    settings: NudgeSettings, *, schema: str, script_location: Path, message: str
) -> None:
    """Write a new revision from the difference between ``store.metadata`` and the database."""
    config = Config()
    config.set_main_option("script_location", str(script_location))
    config.attributes["nudge_schema"] = schema
    config.attributes["nudge_database_url"] = settings.database_url
    command.revision(config, message=message, autogenerate=True)


def run_env(metadata: sa.MetaData) -> None:
    """The body of every service's ``migrations/env.py``."""
    from alembic import context

    schema: str = context.config.attributes["nudge_schema"]
    url: str = context.config.attributes["nudge_database_url"]
    # alembic.context is a module that proxies the current EnvironmentContext.
    environment = cast(EnvironmentContext, context)
    asyncio.run(_run_async(environment, metadata, schema=schema, url=url))


async def _run_async(
    context: EnvironmentContext, metadata: sa.MetaData, *, schema: str, url: str
) -> None:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_sync, context, metadata, schema)
            await connection.commit()
    finally:
        await engine.dispose()


def _run_sync(
    connection: sa.Connection, context: EnvironmentContext, metadata: sa.MetaData, schema: str
) -> None:
    def only_this_schema(name: str | None, type_: str, _: object) -> bool:
        return type_ != "schema" or name == schema

    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table_schema=schema,
        include_schemas=True,
        include_name=only_this_schema,
    )
    with context.begin_transaction():
        connection.execute(
            sa.text("SELECT pg_advisory_xact_lock(hashtext(:schema))"), {"schema": schema}
        )
        connection.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        context.run_migrations()
