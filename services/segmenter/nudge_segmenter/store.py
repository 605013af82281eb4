"""Segmenter's tables (schema ``segmenter``): segment definitions, the contact state it
evaluates them on, current memberships and their history."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.conditions import Condition, condition_adapter
from nudge_common.db import processed_messages_table
from nudge_common.events import ContactUpdated

SCHEMA = "segmenter"
metadata = sa.MetaData(schema=SCHEMA)
TIMESTAMP = sa.DateTime(timezone=True)

segments = sa.Table(
    "segments",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False, index=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("condition", JSONB, nullable=False),
    sa.Column("created_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
)
contacts = sa.Table(
    "contacts",
    metadata,
    sa.Column("contact_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("user_id", sa.Text),
    sa.Column("traits", JSONB, nullable=False),
    sa.Column("scores", JSONB, nullable=False),
    sa.Column("updated_at", TIMESTAMP, nullable=False),
)
memberships = sa.Table(
    "memberships",
    metadata,
    sa.Column("segment_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("contact_id", UUID(as_uuid=True), primary_key=True, index=True),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("entered_at", TIMESTAMP, nullable=False),
)
membership_history = sa.Table(
    "membership_history",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("segment_id", UUID(as_uuid=True), nullable=False),
    sa.Column("contact_id", UUID(as_uuid=True), nullable=False),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("entered_at", TIMESTAMP, nullable=False),
    sa.Column("exited_at", TIMESTAMP),
    sa.Index("membership_history_segment_contact", "segment_id", "contact_id"),
)
merged_contacts = sa.Table(
    "merged_contacts",
    metadata,
    sa.Column("contact_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("survivor_id", UUID(as_uuid=True), nullable=False, index=True),
    sa.Column("at", TIMESTAMP, nullable=False),
)
"""Tombstones of contacts merged away: a ``contact.updated`` for one of them that arrives
after the merge (it travels keyed by the merged id, the merge by the survivor's) is stale
and ignored. Merged ids never come back (``ContactMerged``), so the rows are final; they
are three columns, and erasure deletes them with the survivor's family."""
processed_messages = processed_messages_table(metadata)


@dataclass(frozen=True)
class Segment:
    id: uuid.UUID
    name: str
    condition: Condition


async def save_contact(
    session: AsyncSession, *, workspace_id: str, update: ContactUpdated, at: datetime
) -> None:
    values = {
        "contact_id": update.contact_id,
        "workspace_id": workspace_id,
        "user_id": update.user_id,
        "traits": update.traits,
        "scores": update.scores,
        "updated_at": at,
    }
    statement = pg_insert(contacts).values(values)
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[contacts.c.contact_id],
            set_={k: statement.excluded[k] for k in ("user_id", "traits", "scores", "updated_at")},
        )
    )


async def list_segments(session: AsyncSession, *, workspace_id: str) -> list[Segment]:
    rows = await session.execute(sa.select(segments).where(segments.c.workspace_id == workspace_id))
    return [
        Segment(row.id, row.name, condition_adapter.validate_python(row.condition)) for row in rows
    ]


async def create_segment(
    session: AsyncSession,
    *,
    workspace_id: str,
    segment_id: uuid.UUID,
    name: str,
    condition: Condition,
) -> None:
    await session.execute(
        pg_insert(segments)
        .values(
            id=segment_id,
            workspace_id=workspace_id,
            name=name,
            condition=condition_adapter.dump_python(condition, mode="json"),
        )
        .on_conflict_do_nothing()
    )


async def segment_ids_of(session: AsyncSession, *, contact_id: uuid.UUID) -> set[uuid.UUID]:
    rows = await session.execute(
        sa.select(memberships.c.segment_id).where(memberships.c.contact_id == contact_id)
    )
    return set(rows.scalars())


async def enter(
    session: AsyncSession,
    *,
    workspace_id: str,
    segment_id: uuid.UUID,
    contact_id: uuid.UUID,
    at: datetime,
) -> None:
    key = {"segment_id": segment_id, "contact_id": contact_id, "workspace_id": workspace_id}
    await session.execute(sa.insert(memberships).values(**key, entered_at=at))
    await session.execute(sa.insert(membership_history).values(**key, entered_at=at))


async def exit_(
    session: AsyncSession, *, segment_id: uuid.UUID, contact_id: uuid.UUID, at: datetime
) -> None:
    await session.execute(
        sa.delete(memberships).where(
            memberships.c.segment_id == segment_id, memberships.c.contact_id == contact_id
        )
    )
    await session.execute(
        sa.update(membership_history)
        .where(
            membership_history.c.segment_id == segment_id,
            membership_history.c.contact_id == contact_id,
            membership_history.c.exited_at.is_(None),
        )
        .values(exited_at=at)
    )


async def merge_contacts(
    session: AsyncSession, *, survivor_id: uuid.UUID, merged_id: uuid.UUID, at: datetime
) -> None:
    """Scoring merged two contacts: the merged one's memberships (and their open history)
    move to the survivor, except where the survivor is already a member, and its state goes.
    The survivor's next ``contact.updated`` re-evaluates every segment."""
    already = await segment_ids_of(session, contact_id=survivor_id)
    for segment_id in await segment_ids_of(session, contact_id=merged_id):
        if segment_id in already:
            await exit_(session, segment_id=segment_id, contact_id=merged_id, at=at)
            continue
        for table in (memberships, membership_history):
            query = sa.update(table).where(
                table.c.segment_id == segment_id, table.c.contact_id == merged_id
            )
            if table is membership_history:
                query = query.where(membership_history.c.exited_at.is_(None))
            await session.execute(query.values(contact_id=survivor_id))
    await session.execute(sa.delete(contacts).where(contacts.c.contact_id == merged_id))
    await session.execute(
        pg_insert(merged_contacts)
        .values(contact_id=merged_id, survivor_id=survivor_id, at=at)
        .on_conflict_do_nothing()
    )


async def was_merged(session: AsyncSession, *, contact_id: uuid.UUID) -> bool:
    found = await session.scalar(
        sa.select(merged_contacts.c.contact_id).where(merged_contacts.c.contact_id == contact_id)
    )
    return found is not None


async def erase_contacts(
    session: AsyncSession, *, workspace_id: str, contact_ids: list[uuid.UUID]
) -> None:
    """GDPR erase: the contacts' state, memberships and membership history go (and the
    tombstones of contacts merged into them)."""
    for table, column in (
        (memberships, memberships.c.contact_id),
        (membership_history, membership_history.c.contact_id),
        (contacts, contacts.c.contact_id),
    ):
        await session.execute(
            sa.delete(table).where(table.c.workspace_id == workspace_id, column.in_(contact_ids))
        )
    await session.execute(
        sa.delete(merged_contacts).where(
            sa.or_(
                merged_contacts.c.contact_id.in_(contact_ids),
                merged_contacts.c.survivor_id.in_(contact_ids),
            )
        )
    )
