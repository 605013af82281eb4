"""Forgetting the ids of applied messages once no replay can bring those messages back.

Every consumer records each message id it applies (``processed_messages``, see
:mod:`nudge_common.consumer`): at 1,000 events/s that is tens of millions of rows a day per
service. Ids older than ``processed_messages_retention_s`` (longer than the topics'
retention) are deleted in small chunks by a worker each service runs beside its consumers.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from nudge_common.db import SessionMaker, transaction
from nudge_common.settings import NudgeSettings
from nudge_common.worker import PollingWorker

TRIM_CHUNK = 10_000


async def trim_processed_messages(
    sessionmaker: SessionMaker, table: sa.Table, *, before: datetime, chunk: int = TRIM_CHUNK
) -> int:
    """Delete up to ``chunk`` ids processed before ``before``; returns how many went. Rows
    another replica is deleting are skipped, not waited for."""
    oldest = (
        sa.select(table.c.consumer, table.c.message_id)
        .where(table.c.processed_at < before)
        .limit(chunk)
        .with_for_update(skip_locked=True)
    )
    async with transaction(sessionmaker) as session:
        result = await session.execute(
            sa.delete(table).where(sa.tuple_(table.c.consumer, table.c.message_id).in_(oldest))
        )
    deleted: int = result.rowcount  # type: ignore[attr-defined]
    return deleted


def processed_messages_trimmer(
    settings: NudgeSettings, sessionmaker: SessionMaker, table: sa.Table
) -> PollingWorker:
    async def round() -> int:
        before = datetime.now(UTC) - timedelta(seconds=settings.processed_messages_retention_s)
        deleted = await trim_processed_messages(sessionmaker, table, before=before)
        return deleted if deleted == TRIM_CHUNK else 0  # a full chunk: more are waiting

    return PollingWorker(
        f"trim-{table.schema}.{table.name}",
        round,
        idle_s=settings.processed_messages_trim_every_s,
    )
