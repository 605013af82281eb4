"""Ingest's tables (schema ``ingest``): the write keys that map a site to a workspace."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

SCHEMA = "ingest"
metadata = sa.MetaData(schema=SCHEMA)

write_keys = sa.Table(
    "write_keys",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
)


@dataclass(frozen=True)
class WriteKey:
    key: str
    workspace_id: str
    enabled: bool


async def get_write_key(session: AsyncSession, *, key: str) -> WriteKey | None:
    row = (
        await session.execute(sa.select(write_keys).where(write_keys.c.key == key))
    ).one_or_none()
    return WriteKey(row.key, row.workspace_id, row.enabled) if row else None


async def put_write_key(
    session: AsyncSession, *, key: str, workspace_id: str, enabled: bool = True
) -> None:
    statement = pg_insert(write_keys).values(key=key, workspace_id=workspace_id, enabled=enabled)
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[write_keys.c.key],
            set_={"workspace_id": workspace_id, "enabled": enabled},
        )
    )
