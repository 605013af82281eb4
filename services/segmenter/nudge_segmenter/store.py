"""Segmenter's tables (schema ``segmenter``): segment and list definitions, the contact
state it evaluates them on (its own copy, fed by the contacts topic), each contact's
events, current memberships and their history, and the durable work: time-driven
re-evaluations and backfills."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.conditions import (
    Condition,
    condition_adapter,
)
from nudge_common.db import processed_messages_table

SCHEMA = "segmenter"
metadata = sa.MetaData(schema=SCHEMA)
TIMESTAMP = sa.DateTime(timezone=True)

SegmentKind = Literal["dynamic", "static"]
SegmentStatus = Literal["backfilling", "active", "archived"]

segments = sa.Table(
    "segments",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False, index=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False, server_default="dynamic"),
    sa.Column("condition", JSONB),
    sa.Column("status", sa.Text, nullable=False, server_default="active"),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    sa.Column("backfill_total", sa.BigInteger),
    sa.Column("backfill_done", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("backfill_started_at", TIMESTAMP),
    sa.Column("backfill_finished_at", TIMESTAMP),
    sa.Column("created_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
    sa.Column("updated_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
)
contacts = sa.Table(
    "contacts",
    metadata,
    sa.Column("contact_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False, index=True),
    sa.Column("user_id", sa.Text),
    sa.Column("traits", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("scores", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("tags", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("stages", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("consents", ARRAY(sa.Text), nullable=False, server_default="{}"),
    sa.Column("last_seen_at", TIMESTAMP),
    sa.Column("orders", sa.Integer, nullable=False, server_default="0"),
    sa.Column("revenue", sa.Float, nullable=False, server_default="0"),
    sa.Column("first_order_at", TIMESTAMP),
    sa.Column("last_order_at", TIMESTAMP),
    sa.Column("rfm_recency", sa.SmallInteger),
    sa.Column("rfm_frequency", sa.SmallInteger),
    sa.Column("rfm_monetary", sa.SmallInteger),
    sa.Column("clv", sa.Float),
    sa.Column("p_alive", sa.Float),
    sa.Column("expected_purchases", sa.Float),
    sa.Column("updated_at", TIMESTAMP, nullable=False),
)
contact_events = sa.Table(
    "contact_events",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("contact_id", UUID(as_uuid=True), nullable=False),
    sa.Column("event", sa.Text, nullable=False),
    sa.Column("at", TIMESTAMP, nullable=False),
    sa.Column("properties", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("revenue", sa.Float),
    sa.Index("contact_events_contact_event_at", "contact_id", "event", "at"),
)
"""What each contact did, for behavioural conditions: counted per contact through the
(contact, event, at) index, in real time and in backfills alike."""
memberships = sa.Table(
    "memberships",
    metadata,
    sa.Column("segment_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("contact_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("entered_at", TIMESTAMP, nullable=False),
    sa.Index("memberships_contact_segment", "contact_id", "segment_id"),
)
"""A contact's memberships are read by ``(contact_id, segment_id)``: an index-only scan,
not one heap page per membership (a contact's rows are scattered across the table)."""
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
rechecks = sa.Table(
    "rechecks",
    metadata,
    sa.Column("contact_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("due_at", TIMESTAMP, nullable=False, index=True),
)
"""The earliest time at which time alone may change one of a contact's memberships (a
window closing, a birthday coming): the recheck worker then re-evaluates the contact's
time-driven segments, which schedules the next one. One row per contact, not one per
(segment, contact): a real-time batch reads one row a contact instead of one per timed
segment (~40 in the bench) and writes one only when it moves earlier."""
BULK_WRITTEN = (memberships, membership_history, rechecks)
"""What a backfill writes in bulk, and the real-time batch reads by ``= ANY(:contacts)``."""
_STALE_STATISTICS = sa.text(
    "SELECT c.relname FROM pg_class AS c,"
    " LATERAL (SELECT pg_relation_size(c.oid) / current_setting('block_size')::int) AS p(pages)"
    " WHERE c.oid = ANY(CAST(:tables AS regclass[])) AND p.pages > :min_pages"
    " AND (p.pages > greatest(c.relpages * 6 / 5, c.relpages + :min_pages)"
    " OR NOT EXISTS (SELECT FROM pg_stats AS s"
    " WHERE s.schemaname = :schema AND s.tablename = c.relname))"
)


async def analyze_bulk_written(session: AsyncSession, *, min_pages: int = 64) -> list[str]:
    """ANALYZE those of :data:`BULK_WRITTEN` without column statistics, or grown by more than
    a fifth since they were last analyzed (at least ``min_pages``); returns their names.

    Planned without statistics, the batch's ``contact_id = ANY(:ids)`` is taken at
    PostgreSQL's default selectivity (1/200 per element) and ``exited_at IS NULL`` at 0.5%:
    from ~80 contacts a batch it seq-scans memberships and rechecks and merge-joins the
    whole history, until autovacuum analyzes them. ANALYZE reads a sample of at most
    30,000 rows per table."""
    tables = [f"{SCHEMA}.{table.name}" for table in BULK_WRITTEN]
    stale = (
        await session.scalars(
            _STALE_STATISTICS, {"tables": tables, "min_pages": min_pages, "schema": SCHEMA}
        )
    ).all()
    for name in stale:
        await session.execute(sa.text(f"ANALYZE {SCHEMA}.{name}"))
    return list(stale)


backfill_dirty = sa.Table(
    "backfill_dirty",
    metadata,
    sa.Column("segment_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("contact_id", UUID(as_uuid=True), primary_key=True),
)
"""Contacts that changed while their segment was backfilling: re-evaluated when the
backfill hands over to real time."""
backfill_changes = sa.Table(
    "backfill_changes",
    metadata,
    sa.Column("segment_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("contact_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("entering", sa.Boolean, nullable=False),
)
"""A backfill's transitions, computed set-based, then applied and published in chunks."""
value_models = sa.Table(
    "value_models",
    metadata,
    sa.Column("workspace_id", sa.Text, primary_key=True),
    sa.Column("rfm_cuts", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("bg_nbd", JSONB),
    sa.Column("gamma_gamma", JSONB),
    sa.Column("customers", sa.Integer, nullable=False, server_default="0"),
    sa.Column("refreshed_at", TIMESTAMP),
    sa.Column("error", sa.Text),
)
"""A workspace's customer-value models from the last refresh: the RFM quintile cut points
(an order scores its contact against them at once) and the fitted BG/NBD and Gamma-Gamma
parameters."""
merged_contacts = sa.Table(
    "merged_contacts",
    metadata,
    sa.Column("contact_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("survivor_id", UUID(as_uuid=True), nullable=False, index=True),
    sa.Column("at", TIMESTAMP, nullable=False),
)
"""Tombstones of contacts merged away: a message for one of them that arrives after the
merge (it travels keyed by the merged id, the merge by the survivor's) is stale and
ignored. Merged ids never come back (``ContactMerged``), so the rows are final; erasure
deletes them with the survivor's family."""
processed_messages = processed_messages_table(metadata)


# --- segments ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    id: uuid.UUID
    workspace_id: str
    name: str
    kind: SegmentKind
    condition: Condition | None
    status: SegmentStatus
    version: int
    backfill_total: int | None = None
    backfill_done: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None


_parsed: dict[tuple[uuid.UUID, int], Condition] = {}


def _segment(row: sa.Row[Any]) -> Segment:
    condition = None
    if row.condition is not None:
        key = (row.id, row.version)
        condition = _parsed.get(key)
        if condition is None:
            condition = _parsed[key] = condition_adapter.validate_python(row.condition)
    return Segment(
        id=row.id,
        workspace_id=row.workspace_id,
        name=row.name,
        kind=row.kind,
        condition=condition,
        status=row.status,
        version=row.version,
        backfill_total=row.backfill_total,
        backfill_done=row.backfill_done,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


async def list_segments(
    session: AsyncSession, *, workspace_id: str, live_only: bool = True
) -> list[Segment]:
    """The workspace's segments; ``live_only``: the dynamic ones not archived (what
    evaluation needs)."""
    query = sa.select(segments).where(segments.c.workspace_id == workspace_id)
    if live_only:
        query = query.where(segments.c.kind == "dynamic", segments.c.status != "archived")
    rows = await session.execute(query.order_by(segments.c.created_at, segments.c.id))
    return [_segment(row) for row in rows]


async def get_segment(
    session: AsyncSession, *, workspace_id: str, segment_id: uuid.UUID, lock: bool = False
) -> Segment | None:
    query = sa.select(segments).where(
        segments.c.workspace_id == workspace_id, segments.c.id == segment_id
    )
    row = (await session.execute(query.with_for_update() if lock else query)).first()
    return _segment(row) if row else None


async def segment_status_shared(session: AsyncSession, segment_id: uuid.UUID) -> str | None:
    """The segment's status under a share lock: a backfill handing over (which takes the
    row for update) waits for this transaction, and this one sees the handed-over status."""
    return await session.scalar(
        sa.select(segments.c.status).where(segments.c.id == segment_id).with_for_update(read=True)
    )


async def create_segment(
    session: AsyncSession,
    *,
    workspace_id: str,
    segment_id: uuid.UUID,
    name: str,
    condition: Condition | None,
    kind: SegmentKind = "dynamic",
    status: SegmentStatus = "active",
) -> None:
    await session.execute(
        pg_insert(segments)
        .values(
            id=segment_id,
            workspace_id=workspace_id,
            name=name,
            kind=kind,
            condition=None
            if condition is None
            else condition_adapter.dump_python(condition, mode="json"),
            status=status,
        )
        .on_conflict_do_nothing()
    )


async def update_segment(
    session: AsyncSession,
    *,
    segment_id: uuid.UUID,
    name: str | None = None,
    condition: Condition | None = None,
    status: SegmentStatus | None = None,
    new_version: bool = False,
) -> None:
    values: dict[str, Any] = {"updated_at": sa.func.now()}
    if name is not None:
        values["name"] = name
    if condition is not None:
        values["condition"] = condition_adapter.dump_python(condition, mode="json")
    if status is not None:
        values["status"] = status
    if new_version:
        values.update(
            version=segments.c.version + 1,
            backfill_total=None,
            backfill_done=0,
            backfill_started_at=None,
            backfill_finished_at=None,
        )
    await session.execute(sa.update(segments).where(segments.c.id == segment_id).values(values))


async def member_count(session: AsyncSession, *, segment_id: uuid.UUID) -> int:
    count = await session.scalar(
        sa.select(sa.func.count()).where(memberships.c.segment_id == segment_id)
    )
    return count or 0


async def members_page(
    session: AsyncSession, *, segment_id: uuid.UUID, after: uuid.UUID | None, limit: int
) -> list[uuid.UUID]:
    query = sa.select(memberships.c.contact_id).where(memberships.c.segment_id == segment_id)
    if after is not None:
        query = query.where(memberships.c.contact_id > after)
    rows = await session.scalars(query.order_by(memberships.c.contact_id).limit(limit))
    return list(rows)


async def history_of(
    session: AsyncSession, *, segment_id: uuid.UUID, contact_id: uuid.UUID | None, limit: int
) -> list[sa.Row[Any]]:
    query = sa.select(membership_history).where(membership_history.c.segment_id == segment_id)
    if contact_id is not None:
        query = query.where(membership_history.c.contact_id == contact_id)
    rows = await session.execute(
        query.order_by(
            membership_history.c.entered_at.desc(), membership_history.c.id.desc()
        ).limit(limit)
    )
    return list(rows)


# --- contacts ------------------------------------------------------------------------------


async def set_consent(
    session: AsyncSession,
    *,
    workspace_id: str,
    contact_id: uuid.UUID,
    channel: str,
    subscribed: bool,
    at: datetime,
) -> None:
    without = sa.func.array_remove(contacts.c.consents, channel)
    statement = pg_insert(contacts).values(
        contact_id=contact_id,
        workspace_id=workspace_id,
        consents=[channel] if subscribed else [],
        updated_at=at,
    )
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[contacts.c.contact_id],
            set_={
                "consents": sa.func.array_append(without, channel) if subscribed else without,
                "updated_at": statement.excluded.updated_at,
            },
        )
    )


async def segment_ids_of(session: AsyncSession, *, contact_id: uuid.UUID) -> set[uuid.UUID]:
    rows = await session.execute(
        sa.select(memberships.c.segment_id).where(memberships.c.contact_id == contact_id)
    )
    return set(rows.scalars())


# --- memberships ---------------------------------------------------------------------------


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


@dataclass(frozen=True)
class DueRecheck:
    contact_id: uuid.UUID
    workspace_id: str
    due_at: datetime


_DUE = (
    sa.select(rechecks.c.contact_id)
    .where(rechecks.c.due_at <= sa.bindparam("now"))
    .order_by(rechecks.c.due_at)
    .limit(sa.bindparam("limit", type_=sa.Integer))
    .with_for_update(skip_locked=True)
    .cte("due")
)
_CLAIM_DUE = (
    sa.delete(rechecks)
    .where(rechecks.c.contact_id == _DUE.c.contact_id)
    .returning(rechecks.c.contact_id, rechecks.c.workspace_id, rechecks.c.due_at)
)
"""Built once: the recheck worker runs it five times a second, mostly finding nothing."""


async def claim_due_rechecks(
    session: AsyncSession, *, now: datetime, limit: int
) -> list[DueRecheck]:
    """Due rechecks, claimed (deleted, their rows locked against other replicas until
    this transaction ends) in due order."""
    rows = await session.execute(_CLAIM_DUE, {"now": now, "limit": limit})
    return sorted(
        (DueRecheck(r.contact_id, r.workspace_id, r.due_at) for r in rows),
        key=lambda r: r.due_at,
    )


# --- merges and erasure --------------------------------------------------------------------


async def merge_contacts(
    session: AsyncSession, *, survivor_id: uuid.UUID, merged_id: uuid.UUID, at: datetime
) -> None:
    """Scoring merged two contacts: the merged one's memberships (and their open history)
    move to the survivor, except where the survivor is already a member; its events and
    order totals add to the survivor's, and its state goes. The caller then re-evaluates
    the survivor."""
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
    await session.execute(
        sa.update(contact_events)
        .where(contact_events.c.contact_id == merged_id)
        .values(contact_id=survivor_id)
    )
    merged = (
        await session.execute(
            sa.delete(contacts).where(contacts.c.contact_id == merged_id).returning(contacts)
        )
    ).first()
    await session.execute(sa.delete(rechecks).where(rechecks.c.contact_id == merged_id))
    if merged is not None:
        await session.execute(
            sa.update(contacts)
            .where(contacts.c.contact_id == survivor_id)
            .values(
                orders=contacts.c.orders + merged.orders,
                revenue=contacts.c.revenue + merged.revenue,
                last_seen_at=_latest(contacts.c.last_seen_at, merged.last_seen_at),
                first_order_at=_earliest(contacts.c.first_order_at, merged.first_order_at),
                last_order_at=_latest(contacts.c.last_order_at, merged.last_order_at),
            )
        )
    await session.execute(
        pg_insert(merged_contacts)
        .values(contact_id=merged_id, survivor_id=survivor_id, at=at)
        .on_conflict_do_nothing()
    )


def _latest(column: sa.ColumnElement[Any], value: datetime | None) -> sa.ColumnElement[Any]:
    return column if value is None else sa.func.greatest(column, value)


def _earliest(column: sa.ColumnElement[Any], value: datetime | None) -> sa.ColumnElement[Any]:
    return column if value is None else sa.func.least(column, value)


async def was_merged(session: AsyncSession, *, contact_id: uuid.UUID) -> bool:
    found = await session.scalar(
        sa.select(merged_contacts.c.contact_id).where(merged_contacts.c.contact_id == contact_id)
    )
    return found is not None


async def erase_contacts(
    session: AsyncSession, *, workspace_id: str, contact_ids: Sequence[uuid.UUID]
) -> None:
    """GDPR erase: the contacts' state, events, memberships, history and rechecks go (and
    the tombstones of contacts merged into them)."""
    for table, column in (
        (memberships, memberships.c.contact_id),
        (membership_history, membership_history.c.contact_id),
        (contact_events, contact_events.c.contact_id),
        (rechecks, rechecks.c.contact_id),
        (contacts, contacts.c.contact_id),
    ):
        await session.execute(
            sa.delete(table).where(table.c.workspace_id == workspace_id, column.in_(contact_ids))
        )
    await session.execute(
        sa.delete(backfill_dirty).where(backfill_dirty.c.contact_id.in_(contact_ids))
    )
    await session.execute(
        sa.delete(merged_contacts).where(
            sa.or_(
                merged_contacts.c.contact_id.in_(contact_ids),
                merged_contacts.c.survivor_id.in_(contact_ids),
            )
        )
    )
