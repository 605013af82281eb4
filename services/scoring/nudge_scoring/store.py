"""Scoring's tables (schema ``scoring``) and the queries on them. Functions take the
caller's session and never commit.

Events are append-only and range-partitioned by month on ``occurred_at`` (see
docs/scoring.md); ``event_ids`` is the small unpartitioned index that makes
(workspace, messageId) unique across partitions and says where each event lives. A merged
contact keeps its row (``merged_into`` the survivor) and its events: reads of a contact's
history take the contact and every contact merged into it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, UUID, Insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.db import (
    array_rows_of,
    processed_messages_table,
)
from nudge_common.events import SegmentEvent
from nudge_scoring.domain.rules import (
    DecaySpec,
    Rule,
    ScoreDelta,
    Stage,
    spec_adapter,
)

SCHEMA = "scoring"
metadata = sa.MetaData(schema=SCHEMA)
TIMESTAMP = sa.DateTime(timezone=True)
JSON_OBJECT = sa.text("'{}'::jsonb")
EPOCH = datetime.min.replace(tzinfo=UTC)

contacts = sa.Table(
    "contacts",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("user_id", sa.Text),
    sa.Column("traits", JSONB, nullable=False, server_default=JSON_OBJECT),
    sa.Column("trait_sources", JSONB, nullable=False, server_default=JSON_OBJECT),
    sa.Column("first_touch", JSONB),
    sa.Column("first_seen_at", TIMESTAMP, nullable=False),
    sa.Column("last_seen_at", TIMESTAMP, nullable=False),
    # typed common traits, kept in step with ``traits`` (domain.profile.typed_traits)
    sa.Column("name", sa.Text),
    sa.Column("email", sa.Text),
    sa.Column("phone", sa.Text),
    sa.Column("birthday", sa.Date),
    sa.Column("language", sa.Text),
    sa.Column("country", sa.Text),
    sa.Column("city", sa.Text),
    sa.Column("timezone", sa.Text),
    sa.Column("company", sa.Text),
    sa.Column("job_title", sa.Text),
    # transaction aggregates for RFM / value segments / CLV
    sa.Column("orders_count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("revenue_total", sa.Numeric(18, 4), nullable=False, server_default="0"),
    sa.Column("first_order_at", TIMESTAMP),
    sa.Column("last_order_at", TIMESTAMP),
    sa.Column("merged_into", UUID(as_uuid=True)),
    sa.Column("erased_at", TIMESTAMP),
    sa.Index("contacts_workspace_email", "workspace_id", "email"),
    sa.Index("contacts_merged_into", "merged_into"),
)
identities = sa.Table(
    "identities",
    metadata,
    sa.Column("workspace_id", sa.Text, primary_key=True),
    sa.Column("kind", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, primary_key=True),
    sa.Column("contact_id", UUID(as_uuid=True), nullable=False, index=True),
)
event_ids = sa.Table(
    "event_ids",
    metadata,
    sa.Column("workspace_id", sa.Text, primary_key=True),
    sa.Column("message_id", sa.Text, primary_key=True),
    sa.Column("occurred_at", TIMESTAMP, nullable=False),
    sa.Column("contact_id", UUID(as_uuid=True), nullable=False, index=True),
)
events = sa.Table(
    "events",
    metadata,
    sa.Column("workspace_id", sa.Text, primary_key=True),
    sa.Column("message_id", sa.Text, primary_key=True),
    sa.Column("occurred_at", TIMESTAMP, primary_key=True),
    sa.Column("contact_id", UUID(as_uuid=True), nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("name", sa.Text),
    sa.Column("properties", JSONB, nullable=False),
    sa.Column("context", JSONB, nullable=False, server_default=JSON_OBJECT),
    sa.Column("received_at", TIMESTAMP, nullable=False),
    sa.Index("events_contact_occurred", "contact_id", "occurred_at"),
    postgresql_partition_by="RANGE (occurred_at)",
)
transactions = sa.Table(
    "transactions",
    metadata,
    sa.Column("workspace_id", sa.Text, primary_key=True),
    sa.Column("message_id", sa.Text, primary_key=True),
    sa.Column("contact_id", UUID(as_uuid=True), nullable=False, index=True),
    sa.Column("kind", sa.Text, nullable=False),  # order | refund
    sa.Column("order_id", sa.Text),
    sa.Column("revenue", sa.Numeric(18, 4), nullable=False),
    sa.Column("currency", sa.Text),
    sa.Column("payment_method", sa.Text),
    sa.Column("products", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
    sa.Column("occurred_at", TIMESTAMP, nullable=False),
)
models = sa.Table(
    "models",
    metadata,
    sa.Column("workspace_id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("stages", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
    sa.Column("created_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
    sa.Column("updated_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
)
rules = sa.Table(
    "rules",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False, index=True),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("event", sa.Text),
    sa.Column("points", sa.Integer, nullable=False),
    sa.Column("kind", sa.Text, nullable=False, server_default="behavioural"),
    sa.Column("spec", JSONB),
    sa.Column("name", sa.Text, nullable=False, server_default=""),
    sa.Column("updated_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
)
scores = sa.Table(
    "scores",
    metadata,
    sa.Column("contact_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("model", sa.Text, primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("points", sa.Integer, nullable=False),
)
score_changes = sa.Table(
    "score_changes",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("contact_id", UUID(as_uuid=True), nullable=False, index=True),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("rule_id", UUID(as_uuid=True)),  # none for a score adjustment
    sa.Column("points", sa.Integer, nullable=False),
    sa.Column("message_id", sa.Text, nullable=False),
    sa.Column("at", TIMESTAMP, nullable=False),
    # event | decay | recompute, or an adjustment's reason (e.g. workflow)
    sa.Column("reason", sa.Text, nullable=False, server_default="event"),
)
rule_spending = sa.Table(
    "rule_spending",
    metadata,
    sa.Column("contact_id", UUID(as_uuid=True), nullable=False),
    sa.Column("rule_id", UUID(as_uuid=True), nullable=False),
    sa.Column("period", sa.Text, nullable=False),  # day:YYYY-MM-DD | ever | held
    sa.Column("points", sa.Integer, nullable=False),
    # period before rule: a batch reads a contact's rows from a period on
    # (``lock_states_claiming``), one index range, however many days it had before
    sa.PrimaryKeyConstraint("contact_id", "period", "rule_id", name="rule_spending_pkey"),
)
stages = sa.Table(
    "stages",
    metadata,
    sa.Column("contact_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("model", sa.Text, primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("stage", sa.Text, nullable=False),
    sa.Column("since", TIMESTAMP, nullable=False),
)
stage_history = sa.Table(
    "stage_history",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("contact_id", UUID(as_uuid=True), nullable=False, index=True),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("from_stage", sa.Text),
    sa.Column("to_stage", sa.Text, nullable=False),
    sa.Column("score", sa.Integer, nullable=False),
    sa.Column("at", TIMESTAMP, nullable=False),
)
tags = sa.Table(
    "tags",
    metadata,
    sa.Column("contact_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("tag", sa.Text, primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("assignments", sa.Integer, nullable=False),  # the tag score
    sa.Column("active", sa.Boolean, nullable=False),
    sa.Column("first_assigned_at", TIMESTAMP, nullable=False),
    sa.Column("last_assigned_at", TIMESTAMP, nullable=False),
)
merges = sa.Table(
    "merges",
    metadata,
    sa.Column("merged_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("survivor_id", UUID(as_uuid=True), nullable=False, index=True),
    sa.Column("reason", sa.Text, nullable=False),  # identify | alias | email
    sa.Column("identity", sa.Text, nullable=False),
    sa.Column("cause_message_id", sa.Text, nullable=False),
    sa.Column("at", TIMESTAMP, nullable=False),
)
workspace_settings = sa.Table(
    "workspace_settings",
    metadata,
    sa.Column("workspace_id", sa.Text, primary_key=True),
    sa.Column("merge_on_email", sa.Boolean, nullable=False, server_default=sa.false()),
)
timers = sa.Table(
    "timers",
    metadata,
    sa.Column("contact_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("rule_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("due_at", TIMESTAMP, nullable=False, index=True),
)
"""Durable time-based work: one pending decay per (contact, decay rule), due when the
contact has been inactive for the rule's period. Claimed with FOR UPDATE SKIP LOCKED."""
jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),  # recompute | import
    sa.Column("status", sa.Text, nullable=False),  # pending | running | done | failed
    sa.Column("params", JSONB, nullable=False, server_default=JSON_OBJECT),
    sa.Column("total", sa.Integer, nullable=False, server_default="0"),
    sa.Column("done", sa.Integer, nullable=False, server_default="0"),
    sa.Column("errors", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
    sa.Column("cursor", sa.Text),
    sa.Column("created_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
    sa.Column("finished_at", TIMESTAMP),
)
processed_messages = processed_messages_table(metadata)


# --- contacts and identities -------------------------------------------------------------


@dataclass(frozen=True)
class Contact:
    id: uuid.UUID
    user_id: str | None
    traits: dict[str, Any]
    trait_sources: dict[str, Any]
    first_touch: dict[str, Any] | None
    orders_count: int
    merged_into: uuid.UUID | None = None
    first_seen_at: datetime = EPOCH


CONTACT_COLUMNS = (
    contacts.c.id,
    contacts.c.user_id,
    contacts.c.traits,
    contacts.c.trait_sources,
    contacts.c.first_touch,
    contacts.c.orders_count,
    contacts.c.merged_into,
    contacts.c.first_seen_at,
)


def _contact(row: Any) -> Contact:
    return Contact(
        row.id,
        row.user_id,
        row.traits,
        row.trait_sources,
        row.first_touch,
        row.orders_count,
        row.merged_into,
        row.first_seen_at,
    )


CONTACT_KEY = "contact"
"""A key kind looked up with the identities but never stored: ``("contact", <id>)`` is the
contact with that id in the workspace, or the contact it was merged into."""


async def identities_of(
    session: AsyncSession, *, workspace_id: str, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], uuid.UUID]:
    """The contact each key points at (keys nobody holds are absent), in one statement."""
    if not keys:
        return {}
    named = [uuid.UUID(value) for kind, value in keys if kind == CONTACT_KEY]
    stored = [key for key in keys if key[0] != CONTACT_KEY]
    parameters: dict[str, Any] = {
        "workspace_id": workspace_id,
        "kind": [kind for kind, _ in stored],
        "value": [value for _, value in stored],
    }
    if named:
        rows = await session.execute(_IDENTITIES_AND_CONTACTS, {**parameters, "named": named})
    else:
        rows = await session.execute(_IDENTITIES, parameters)
    return {(kind, value): contact_id for kind, value, contact_id in rows.all()}


# The statements of the consumer's path are built once, here: a statement built per call is
# coerced and keyed again every time, which cost more CPU than running it.
_KEYS = array_rows_of([("kind", sa.Text()), ("value", sa.Text())])
_IDENTITIES = sa.select(identities.c.kind, identities.c.value, identities.c.contact_id).where(
    identities.c.workspace_id == sa.bindparam("workspace_id"),
    identities.c.kind == _KEYS.c.kind,
    identities.c.value == _KEYS.c.value,
)
_NAMED = array_rows_of([("named", UUID(as_uuid=True))])
_IDENTITIES_AND_CONTACTS = _IDENTITIES.union_all(
    sa.select(
        sa.literal(CONTACT_KEY, sa.Text),
        sa.cast(contacts.c.id, sa.Text),
        sa.func.coalesce(contacts.c.merged_into, contacts.c.id),
    ).where(
        contacts.c.workspace_id == sa.bindparam("workspace_id"),
        contacts.c.id == _NAMED.c.named,
    )
)


async def claim_identities(
    session: AsyncSession,
    *,
    workspace_id: str,
    keys: Sequence[tuple[str, str]],
    contact_id: uuid.UUID,
) -> None:
    """Point the unclaimed ``keys`` at ``contact_id``; keys another contact holds (even one
    committed a moment ago by a concurrent transaction) keep their owner."""
    if not keys:
        return
    await session.execute(
        pg_insert(identities)
        .values(
            [
                {"workspace_id": workspace_id, "kind": k, "value": v, "contact_id": contact_id}
                for k, v in sorted(keys)
            ]
        )
        .on_conflict_do_nothing()
    )


async def create_contact(
    session: AsyncSession,
    *,
    workspace_id: str,
    contact_id: uuid.UUID,
    user_id: str | None,
    at: datetime,
) -> None:
    await session.execute(
        pg_insert(contacts)
        .values(
            id=contact_id,
            workspace_id=workspace_id,
            user_id=user_id,
            first_seen_at=at,
            last_seen_at=at,
        )
        .on_conflict_do_nothing()
    )


async def lock_contacts(
    session: AsyncSession, ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, Contact]:
    """Lock the contacts' rows (in id order, so two merges never deadlock) and read them."""
    rows = await session.execute(
        sa.select(*CONTACT_COLUMNS)
        .where(contacts.c.id.in_(sorted(set(ids))))
        .order_by(contacts.c.id)
        .with_for_update()
    )
    return {row.id: _contact(row) for row in rows}


async def touch_contact(
    session: AsyncSession, *, contact_id: uuid.UUID, user_id: str | None, at: datetime
) -> Contact:
    row = (
        await session.execute(
            sa.update(contacts)
            .where(contacts.c.id == contact_id)
            .values(
                last_seen_at=sa.func.greatest(contacts.c.last_seen_at, at),
                first_seen_at=sa.func.least(contacts.c.first_seen_at, at),
                user_id=sa.func.coalesce(contacts.c.user_id, user_id),
            )
            .returning(*CONTACT_COLUMNS)
        )
    ).one()
    return _contact(row)


async def get_contact(session: AsyncSession, *, contact_id: uuid.UUID) -> Contact | None:
    row = (
        await session.execute(sa.select(*CONTACT_COLUMNS).where(contacts.c.id == contact_id))
    ).first()
    return _contact(row) if row else None


async def set_profile(
    session: AsyncSession,
    *,
    contact_id: uuid.UUID,
    traits: dict[str, Any],
    trait_sources: dict[str, Any],
    typed: dict[str, Any],
) -> None:
    await session.execute(
        sa.update(contacts)
        .where(contacts.c.id == contact_id)
        .values(traits=traits, trait_sources=trait_sources, **typed)
    )


async def set_first_touch(
    session: AsyncSession, *, contact_id: uuid.UUID, touch: dict[str, Any]
) -> None:
    await session.execute(
        sa.update(contacts)
        .where(contacts.c.id == contact_id, contacts.c.first_touch.is_(None))
        .values(first_touch=touch)
    )


async def put_workspace_settings(
    session: AsyncSession, *, workspace_id: str, merge_on_email: bool
) -> None:
    upsert = pg_insert(workspace_settings).values(
        workspace_id=workspace_id, merge_on_email=merge_on_email
    )
    await session.execute(
        upsert.on_conflict_do_update(
            index_elements=[workspace_settings.c.workspace_id],
            set_={"merge_on_email": merge_on_email},
        )
    )


async def merge_contacts(
    session: AsyncSession,
    *,
    workspace_id: str,
    survivor: Contact,
    merged: Contact,
    reason: str,
    identity: str,
    cause_message_id: str,
    at: datetime,
) -> None:
    """Move everything ``merged`` has onto ``survivor`` and keep an audit record. Both rows
    must be locked by the caller. Events stay where they are (append-only): the survivor's
    history reads them through ``merged_into``."""
    s, m = survivor.id, merged.id
    await session.execute(
        sa.update(identities).where(identities.c.contact_id == m).values(contact_id=s)
    )
    await session.execute(
        sa.update(score_changes).where(score_changes.c.contact_id == m).values(contact_id=s)
    )
    await session.execute(
        sa.update(transactions).where(transactions.c.contact_id == m).values(contact_id=s)
    )
    await session.execute(
        sa.update(stage_history).where(stage_history.c.contact_id == m).values(contact_id=s)
    )
    for table, keys in (
        (scores, ("model",)),
        (rule_spending, ("rule_id", "period")),
    ):
        await _merge_sums(session, table, keys, "points", s, m)
    await _merge_tags(session, s, m)
    await session.execute(sa.delete(stages).where(stages.c.contact_id == m))
    await session.execute(sa.delete(timers).where(timers.c.contact_id == m))
    # the survivor's own traits win; the merged contact fills the gaps
    other = (await session.execute(sa.select(contacts).where(contacts.c.id == m))).one()
    await session.execute(
        sa.update(contacts)
        .where(contacts.c.id == s)
        .values(
            traits=sa.cast(other.traits, JSONB).op("||")(contacts.c.traits),
            trait_sources=sa.cast(other.trait_sources, JSONB).op("||")(contacts.c.trait_sources),
            first_seen_at=sa.func.least(contacts.c.first_seen_at, other.first_seen_at),
            last_seen_at=sa.func.greatest(contacts.c.last_seen_at, other.last_seen_at),
            first_touch=sa.cast(other.first_touch, JSONB)
            if other.first_touch is not None and other.first_seen_at < _first_seen(survivor)
            else sa.func.coalesce(contacts.c.first_touch, sa.cast(other.first_touch, JSONB)),
            user_id=sa.func.coalesce(contacts.c.user_id, other.user_id),
            orders_count=contacts.c.orders_count + other.orders_count,
            revenue_total=contacts.c.revenue_total + other.revenue_total,
            first_order_at=sa.func.least(contacts.c.first_order_at, other.first_order_at),
            last_order_at=sa.func.greatest(contacts.c.last_order_at, other.last_order_at),
        )
    )
    await session.execute(
        sa.update(contacts)
        .where(sa.or_(contacts.c.id == m, contacts.c.merged_into == m))
        .values(merged_into=s)
    )
    await session.execute(
        pg_insert(merges)
        .values(
            merged_id=m,
            workspace_id=workspace_id,
            survivor_id=s,
            reason=reason,
            identity=identity,
            cause_message_id=cause_message_id,
            at=at,
        )
        .on_conflict_do_nothing()
    )


def _first_seen(contact: Contact) -> datetime:
    return contact.first_seen_at


async def _merge_sums(
    session: AsyncSession,
    table: sa.Table,
    keys: tuple[str, ...],
    column: str,
    survivor: uuid.UUID,
    merged: uuid.UUID,
) -> None:
    rows = (
        await session.execute(sa.delete(table).where(table.c.contact_id == merged).returning(table))
    ).all()
    if not rows:
        return
    upsert = pg_insert(table).values([{**row._asdict(), "contact_id": survivor} for row in rows])
    await session.execute(
        upsert.on_conflict_do_update(
            index_elements=[table.c.contact_id, *(table.c[k] for k in keys)],
            set_={column: table.c[column] + upsert.excluded[column]},
        )
    )


async def _merge_tags(session: AsyncSession, survivor: uuid.UUID, merged: uuid.UUID) -> None:
    rows = (
        await session.execute(sa.delete(tags).where(tags.c.contact_id == merged).returning(tags))
    ).all()
    if not rows:
        return
    upsert = pg_insert(tags).values([{**row._asdict(), "contact_id": survivor} for row in rows])
    await session.execute(
        upsert.on_conflict_do_update(
            index_elements=[tags.c.contact_id, tags.c.tag],
            set_={
                "assignments": tags.c.assignments + upsert.excluded.assignments,
                "active": tags.c.active | upsert.excluded.active,
                "first_assigned_at": sa.func.least(
                    tags.c.first_assigned_at, upsert.excluded.first_assigned_at
                ),
                "last_assigned_at": sa.func.greatest(
                    tags.c.last_assigned_at, upsert.excluded.last_assigned_at
                ),
            },
        )
    )


def family(contact_id: uuid.UUID) -> sa.ColumnElement[bool]:
    """The contact and every contact merged into it, for reading events."""
    merged = sa.select(contacts.c.id).where(contacts.c.merged_into == contact_id)
    return sa.or_(events.c.contact_id == contact_id, events.c.contact_id.in_(merged))


# --- events and transactions -------------------------------------------------------------


async def store_event(
    session: AsyncSession, *, workspace_id: str, contact_id: uuid.UUID, event: SegmentEvent
) -> bool:
    """Append the event; False when this (workspace, messageId) was stored before."""
    claimed = (
        await session.execute(
            pg_insert(event_ids)
            .values(
                workspace_id=workspace_id,
                message_id=event.message_id,
                occurred_at=event.timestamp,
                contact_id=contact_id,
            )
            .on_conflict_do_nothing()
            .returning(event_ids.c.message_id)
        )
    ).first()
    if claimed is None:
        return False
    await session.execute(
        sa.insert(events).values(
            workspace_id=workspace_id,
            message_id=event.message_id,
            contact_id=contact_id,
            type=event.type.value,
            name=event.event or event.name,
            properties=event.properties,
            context=event.context,
            occurred_at=event.timestamp,
            received_at=event.received_at,
        )
    )
    return True


async def record_transaction(
    session: AsyncSession,
    *,
    workspace_id: str,
    contact_id: uuid.UUID,
    event: SegmentEvent,
    kind: str,
    revenue: float,
) -> None:
    properties = event.properties
    products = properties.get("products")
    method = properties.get("payment_method") or properties.get("paymentMethod")
    await session.execute(
        pg_insert(transactions)
        .values(
            workspace_id=workspace_id,
            message_id=event.message_id,
            contact_id=contact_id,
            kind=kind,
            order_id=str(properties["order_id"]) if properties.get("order_id") else None,
            revenue=revenue,
            currency=str(properties.get("currency") or "") or None,
            payment_method=str(method) if method else None,
            products=products if isinstance(products, list) else [],
            occurred_at=event.timestamp,
        )
        .on_conflict_do_nothing()
    )
    is_order = kind == "order"
    await session.execute(
        sa.update(contacts)
        .where(contacts.c.id == contact_id)
        .values(
            orders_count=contacts.c.orders_count + (1 if is_order else 0),
            revenue_total=contacts.c.revenue_total + revenue,
            first_order_at=sa.func.least(contacts.c.first_order_at, event.timestamp)
            if is_order
            else contacts.c.first_order_at,
            last_order_at=sa.func.greatest(contacts.c.last_order_at, event.timestamp)
            if is_order
            else contacts.c.last_order_at,
        )
    )


# --- models and rules --------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    name: str
    description: str
    stages: list[Stage]


async def list_models(session: AsyncSession, *, workspace_id: str) -> list[Model]:
    rows = await session.execute(
        sa.select(models).where(models.c.workspace_id == workspace_id).order_by(models.c.name)
    )
    return [
        Model(row.name, row.description, [Stage.model_validate(s) for s in row.stages])
        for row in rows
    ]


async def put_model(
    session: AsyncSession,
    *,
    workspace_id: str,
    name: str,
    description: str,
    stages: list[Stage],
) -> None:
    values = {
        "description": description,
        "stages": [s.model_dump() for s in stages],
        "updated_at": sa.func.now(),
    }
    upsert = pg_insert(models).values(workspace_id=workspace_id, name=name, **values)
    await session.execute(
        upsert.on_conflict_do_update(
            index_elements=[models.c.workspace_id, models.c.name], set_=values
        )
    )


async def delete_model(session: AsyncSession, *, workspace_id: str, name: str) -> bool:
    await session.execute(
        sa.delete(rules).where(rules.c.workspace_id == workspace_id, rules.c.model == name)
    )
    result = await session.execute(
        sa.delete(models).where(models.c.workspace_id == workspace_id, models.c.name == name)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def _rule(row: Any) -> Rule:
    spec = spec_adapter.validate_python(row.spec) if row.spec is not None else None
    return Rule(row.id, row.model, row.event, row.points, spec)


async def list_rules(
    session: AsyncSession, *, workspace_id: str, model: str | None = None
) -> list[Rule]:
    query = sa.select(rules).where(rules.c.workspace_id == workspace_id)
    if model is not None:
        query = query.where(rules.c.model == model)
    rows = await session.execute(query.order_by(rules.c.model, rules.c.id))
    return [_rule(row) for row in rows]


async def get_rule(session: AsyncSession, *, workspace_id: str, rule_id: uuid.UUID) -> Rule | None:
    row = (
        await session.execute(
            sa.select(rules).where(rules.c.workspace_id == workspace_id, rules.c.id == rule_id)
        )
    ).first()
    return _rule(row) if row else None


async def create_rule(
    session: AsyncSession, *, workspace_id: str, rule: Rule, name: str = ""
) -> None:
    await session.execute(
        pg_insert(rules)
        .values(
            id=rule.id,
            workspace_id=workspace_id,
            model=rule.model,
            event=rule.event,
            points=rule.points,
            kind=rule.kind,
            spec=rule.spec.model_dump(mode="json") if rule.spec is not None else None,
            name=name,
        )
        .on_conflict_do_nothing()
    )


async def update_rule(session: AsyncSession, *, workspace_id: str, rule: Rule, name: str) -> bool:
    result = await session.execute(
        sa.update(rules)
        .where(rules.c.workspace_id == workspace_id, rules.c.id == rule.id)
        .values(
            model=rule.model,
            event=rule.event,
            points=rule.points,
            kind=rule.kind,
            spec=rule.spec.model_dump(mode="json") if rule.spec is not None else None,
            name=name,
            updated_at=sa.func.now(),
        )
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def delete_rule(session: AsyncSession, *, workspace_id: str, rule_id: uuid.UUID) -> bool:
    result = await session.execute(
        sa.delete(rules).where(rules.c.workspace_id == workspace_id, rules.c.id == rule_id)
    )
    await session.execute(sa.delete(timers).where(timers.c.rule_id == rule_id))
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def batch_settings(
    session: AsyncSession, *, workspace_id: str
) -> tuple[tuple[Any, ...], bool]:
    """What a batch of the workspace's events needs to know first, in one statement: the
    rules version (it changes whenever a rule or model of the workspace is created, changed
    or deleted) and the ``merge_on_email`` setting."""
    *version, merge = (await session.execute(_BATCH_SETTINGS, {"workspace_id": workspace_id})).one()
    return tuple(version), bool(merge)


_RULE_STATS = (
    sa.select(sa.func.count(), sa.func.max(rules.c.updated_at))
    .where(rules.c.workspace_id == sa.bindparam("workspace_id"))
    .subquery()
)
_MODEL_STATS = (
    sa.select(sa.func.count(), sa.func.max(models.c.updated_at))
    .where(models.c.workspace_id == sa.bindparam("workspace_id"))
    .subquery()
)
_BATCH_SETTINGS = sa.select(
    _RULE_STATS,
    _MODEL_STATS,
    sa.select(workspace_settings.c.merge_on_email)
    .where(workspace_settings.c.workspace_id == sa.bindparam("workspace_id"))
    .scalar_subquery(),
).join_from(_RULE_STATS, _MODEL_STATS, sa.true())


# --- scores, spending, stages, tags --------------------------------------------------------


async def add_points(
    session: AsyncSession,
    *,
    workspace_id: str,
    contact_id: uuid.UUID,
    deltas: Sequence[ScoreDelta],
    message_id: str,
    at: datetime,
    reason: str = "event",
) -> None:
    """Apply score deltas, record each in the contact's score breakdown and count it
    against its caps (one contact, outside a consumer's batch: ``BatchWrites.points``)."""
    if not deltas:
        return
    writes = BatchWrites(workspace_id)
    writes.points(contact_id, deltas, message_id=message_id, at=at, reason=reason)
    await write_batch(session, writes)


async def scores_of(session: AsyncSession, *, contact_id: uuid.UUID) -> dict[str, int]:
    rows = await session.execute(
        sa.select(scores.c.model, scores.c.points).where(scores.c.contact_id == contact_id)
    )
    return {row.model: row.points for row in rows}


async def stages_of(session: AsyncSession, *, contact_id: uuid.UUID) -> dict[str, str]:
    rows = await session.execute(
        sa.select(stages.c.model, stages.c.stage).where(stages.c.contact_id == contact_id)
    )
    return {row.model: row.stage for row in rows}


async def set_stage(
    session: AsyncSession,
    *,
    workspace_id: str,
    contact_id: uuid.UUID,
    model: str,
    previous: str | None,
    stage: str,
    score: int,
    at: datetime,
) -> None:
    values = {"stage": stage, "since": at}
    upsert = pg_insert(stages).values(
        contact_id=contact_id, model=model, workspace_id=workspace_id, **values
    )
    await session.execute(
        upsert.on_conflict_do_update(
            index_elements=[stages.c.contact_id, stages.c.model], set_=values
        )
    )
    await session.execute(
        sa.insert(stage_history).values(
            workspace_id=workspace_id,
            contact_id=contact_id,
            model=model,
            from_stage=previous,
            to_stage=stage,
            score=score,
            at=at,
        )
    )


async def assign_tags(
    session: AsyncSession,
    *,
    workspace_id: str,
    contact_id: uuid.UUID,
    add: Sequence[str],
    remove: Sequence[str],
    at: datetime,
) -> None:
    if add:
        upsert = pg_insert(tags).values(
            [
                {
                    "contact_id": contact_id,
                    "tag": tag,
                    "workspace_id": workspace_id,
                    "assignments": 1,
                    "active": True,
                    "first_assigned_at": at,
                    "last_assigned_at": at,
                }
                for tag in sorted(set(add))
            ]
        )
        await session.execute(
            upsert.on_conflict_do_update(
                index_elements=[tags.c.contact_id, tags.c.tag],
                set_={
                    "assignments": tags.c.assignments + 1,
                    "active": True,
                    "last_assigned_at": sa.func.greatest(tags.c.last_assigned_at, at),
                },
            )
        )
    if remove:
        await session.execute(
            sa.update(tags)
            .where(tags.c.contact_id == contact_id, tags.c.tag.in_(sorted(set(remove))))
            .values(active=False)
        )


async def tags_of(session: AsyncSession, *, contact_id: uuid.UUID) -> dict[str, int]:
    """Active tags and their tag scores."""
    rows = await session.execute(
        sa.select(tags.c.tag, tags.c.assignments).where(
            tags.c.contact_id == contact_id, tags.c.active
        )
    )
    return {row.tag: row.assignments for row in rows}


# --- durable time-based work ---------------------------------------------------------------


async def schedule_decay(
    session: AsyncSession,
    *,
    workspace_id: str,
    contact_id: uuid.UUID,
    decays: Sequence[tuple[uuid.UUID, DecaySpec]],
    active_at: datetime,
) -> None:
    """Activity at ``active_at`` pushes each decay of the contact back to one period after
    it (never earlier than already scheduled)."""
    if not decays:
        return
    upsert = pg_insert(timers).values(
        [
            {
                "contact_id": contact_id,
                "rule_id": rule_id,
                "workspace_id": workspace_id,
                "due_at": active_at + timedelta(days=spec.after_days),
            }
            for rule_id, spec in sorted(decays, key=lambda d: d[0])
        ]
    )
    await session.execute(
        upsert.on_conflict_do_update(
            index_elements=[timers.c.contact_id, timers.c.rule_id],
            set_={"due_at": sa.func.greatest(timers.c.due_at, upsert.excluded.due_at)},
        )
    )


@dataclass(frozen=True)
class DueTimer:
    contact_id: uuid.UUID
    rule_id: uuid.UUID
    workspace_id: str
    due_at: datetime


async def claim_due_timers(session: AsyncSession, *, now: datetime, limit: int) -> list[DueTimer]:
    """Due timers, locked for this transaction with their contacts' rows; timers another
    worker holds, and timers of contacts the consumer is applying events to, are skipped
    (the worker never waits for a lock, so it never deadlocks with the consumer, which
    locks contacts first and timers after)."""
    rows = await session.execute(
        sa.select(timers.c.contact_id, timers.c.rule_id, timers.c.workspace_id, timers.c.due_at)
        .join(contacts, contacts.c.id == timers.c.contact_id)
        .where(timers.c.due_at <= now)
        .order_by(timers.c.due_at)
        .limit(limit)
        .with_for_update(of=[timers, contacts], skip_locked=True)
    )
    return [DueTimer(r.contact_id, r.rule_id, r.workspace_id, r.due_at) for r in rows]


async def reschedule_timer(
    session: AsyncSession, *, timer: DueTimer, due_at: datetime | None
) -> None:
    if due_at is None:
        await session.execute(
            sa.delete(timers).where(
                timers.c.contact_id == timer.contact_id, timers.c.rule_id == timer.rule_id
            )
        )
    else:
        await session.execute(
            sa.update(timers)
            .where(timers.c.contact_id == timer.contact_id, timers.c.rule_id == timer.rule_id)
            .values(due_at=due_at)
        )


async def ensure_event_partitions(
    session: AsyncSession, *, around: datetime, ahead: int = 3
) -> None:
    """Monthly partitions of ``events`` from the month of ``around`` to ``ahead`` months
    after it (rows outside every range land in ``events_default``)."""
    await session.execute(
        sa.text("SELECT scoring.ensure_events_partition(:at, :ahead)"),
        {"at": around, "ahead": ahead},
    )


async def erase_contacts(
    session: AsyncSession, *, workspace_id: str, contact_ids: Sequence[uuid.UUID]
) -> None:
    """GDPR erase: delete the contacts and everything about them, events included."""
    ids = list(contact_ids)
    for table in (events, event_ids, transactions, score_changes, stage_history, tags):
        await session.execute(
            sa.delete(table).where(
                table.c.workspace_id == workspace_id, table.c.contact_id.in_(ids)
            )
        )
    for table in (scores, rule_spending, stages, timers, identities):
        await session.execute(sa.delete(table).where(table.c.contact_id.in_(ids)))
    await session.execute(
        sa.delete(merges).where(sa.or_(merges.c.merged_id.in_(ids), merges.c.survivor_id.in_(ids)))
    )
    await session.execute(sa.delete(contacts).where(contacts.c.id.in_(ids)))


async def export_page(
    session: AsyncSession, *, workspace_id: str, after: uuid.UUID | None, limit: int = 1000
) -> list[tuple[dict[str, Any], dict[str, int], list[str]]]:
    """A page of the workspace's contacts (not merged away) in id order, after ``after``,
    with their scores and active tags."""
    query = (
        sa.select(contacts)
        .where(contacts.c.workspace_id == workspace_id, contacts.c.merged_into.is_(None))
        .order_by(contacts.c.id)
        .limit(limit)
    )
    if after is not None:
        query = query.where(contacts.c.id > after)
    rows = [dict(row._mapping) for row in await session.execute(query)]
    ids = [row["id"] for row in rows]
    points: dict[uuid.UUID, dict[str, int]] = {i: {} for i in ids}
    active: dict[uuid.UUID, list[str]] = {i: [] for i in ids}
    if ids:
        for row in await session.execute(sa.select(scores).where(scores.c.contact_id.in_(ids))):
            points[row.contact_id][row.model] = row.points
        for row in await session.execute(
            sa.select(tags.c.contact_id, tags.c.tag).where(
                tags.c.contact_id.in_(ids), tags.c.active
            )
        ):
            active[row.contact_id].append(row.tag)
    return [(row, points[row["id"]], active[row["id"]]) for row in rows]


# --- set-based forms for a batch of events (the consumer's batch handler) -------------------


@dataclass
class ContactState:
    """What scoring keeps in memory about one contact while it applies a batch's events to
    it; the row is locked (``lock_states``) until the transaction ends."""

    id: uuid.UUID
    user_id: str | None
    traits: dict[str, Any]
    trait_sources: dict[str, Any]
    has_first_touch: bool
    orders_count: int
    merged_into: uuid.UUID | None
    scores: dict[str, int]
    stages: dict[str, str]
    spent: dict[tuple[uuid.UUID, str], int]
    tag_scores: dict[str, int] = field(default_factory=dict)
    """Every tag the contact ever had and its tag score (assignments), active or not."""
    active_tags: set[str] = field(default_factory=set)

    @property
    def tags(self) -> dict[str, int]:
        """The active tags and their tag scores."""
        return {tag: self.tag_scores[tag] for tag in sorted(self.active_tags)}

    def tag(self, add: Sequence[str], remove: Sequence[str]) -> bool:
        """``BatchWrites.tag`` on the in-memory state; returns whether the active tags or
        their tag scores changed."""
        for name in set(add):
            self.tag_scores[name] = self.tag_scores.get(name, 0) + 1
            self.active_tags.add(name)
        removed = self.active_tags & set(remove)
        self.active_tags -= removed
        return bool(add) or bool(removed)


async def identities_in(
    session: AsyncSession, *, workspace_id: str, keys: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], uuid.UUID]:
    """``identities_of`` for many keys at once."""
    return await identities_of(session, workspace_id=workspace_id, keys=sorted(set(keys)))


async def create_and_claim(
    session: AsyncSession,
    *,
    workspace_id: str,
    rows: Sequence[tuple[uuid.UUID, str | None, datetime]],
    claims: dict[tuple[str, str], uuid.UUID],
) -> set[tuple[str, str]]:
    """Contacts (id, user id, first seen) that may not exist yet (existing ones stay), and
    identity claims of several contacts, in one statement: each unclaimed key points at
    its contact; keys somebody holds keep their owner. Returns the keys claimed."""
    if not rows and not claims:
        return set()
    created = sorted(rows, key=lambda row: row[0])
    ordered = sorted(claims.items())
    claimed = await session.execute(
        _CREATE_AND_CLAIM,
        {
            "w_workspace_id": workspace_id,
            "n_id": [contact_id for contact_id, _, _ in created],
            "n_user_id": [user_id for _, user_id, _ in created],
            "n_first_seen_at": [at for _, _, at in created],
            "n_last_seen_at": [at for _, _, at in created],
            "i_kind": [kind for (kind, _), _ in ordered],
            "i_value": [value for (_, value), _ in ordered],
            "i_contact_id": [owner for _, owner in ordered],
        },
    )
    return {(kind, value) for kind, value in claimed}


async def lock_states(
    session: AsyncSession, ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, ContactState]:
    """Lock the contacts' rows (in id order, as merges do) and read their profile, scores,
    stages and tags (no cap spending)."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    states = await _lock_contacts(session, wanted)
    _read_states(states, (await session.execute(_STATE_ROWS, {"id": wanted})).all())
    return states


async def lock_states_claiming(
    session: AsyncSession,
    ids: Iterable[uuid.UUID],
    *,
    spending: Mapping[uuid.UUID, str],
    workspace_id: str,
    events: Sequence[tuple[str, datetime, uuid.UUID]],
) -> tuple[dict[uuid.UUID, ContactState], set[str]]:
    """``lock_states``, the contacts' cap spending of the periods from the one ``spending``
    gives each on (only those: per-day caps leave a row per rule per day, which a contact
    accumulates without end), and ``claim_event_ids`` of the events (message ids
    distinct), the claim made by the statement that reads the states: one round trip
    fewer a batch."""
    wanted = list(dict.fromkeys(ids))
    states = await _lock_contacts(session, wanted)
    parameters = {"id": wanted, **_event_id_arrays(workspace_id, events)}
    if spending:
        parameters["sp_contact"] = list(spending)
        parameters["sp_from"] = list(spending.values())
    rows = await session.execute(
        _CLAIMING_STATE_ROWS_WITH_SPENT if spending else _CLAIMING_STATE_ROWS, parameters
    )
    return states, _read_states(states, rows.all())


async def _lock_contacts(
    session: AsyncSession, wanted: list[uuid.UUID]
) -> dict[uuid.UUID, ContactState]:
    rows = await session.execute(_LOCK_CONTACTS, {"id": wanted})
    return {
        contact_id: ContactState(
            contact_id, user_id, traits, sources, has_first_touch, orders, merged_into, {}, {}, {}
        )
        for contact_id, user_id, traits, sources, has_first_touch, orders, merged_into in rows.all()
    }


def _read_states(states: dict[uuid.UUID, ContactState], rows: Iterable[Any]) -> set[str]:
    """The state rows (``_state_rows``) into ``states``; returns the names of the ``new``
    rows (the message ids a claiming read claimed)."""
    new: set[str] = set()
    for contact_id, kind, name, stage, rule_id, points, active in rows:
        if kind == "new":
            new.add(name)
            continue
        state = states[contact_id]
        if kind == "score":
            state.scores[name] = points
        elif kind == "stage":
            state.stages[name] = stage
        elif kind == "tag":
            state.tag_scores[name] = points
            if active:
                state.active_tags.add(name)
        else:
            state.spent[(rule_id, name)] = points
    return new


# joined to an array, not ``IN`` (compiled again per count) nor ``= ANY`` (whose generic
# plan can scan the whole table): one index probe per contact
_IDS = array_rows_of([("id", UUID(as_uuid=True))])
_LOCK_CONTACTS = (
    sa.select(
        contacts.c.id,
        contacts.c.user_id,
        contacts.c.traits,
        contacts.c.trait_sources,
        contacts.c.first_touch.is_not(None).label("has_first_touch"),
        contacts.c.orders_count,
        contacts.c.merged_into,
    )
    .join(_IDS, contacts.c.id == _IDS.c.id)
    .order_by(contacts.c.id)
    .with_for_update(of=contacts)
)


def _state_rows(
    kind: str,
    table: sa.Table,
    name: sa.ColumnElement[str],
    *,
    stage: sa.ColumnElement[Any] | None = None,
    rule_id: sa.ColumnElement[Any] | None = None,
    points: sa.ColumnElement[Any] | None = None,
    active: sa.ColumnElement[Any] | None = None,
    keys: sa.TableValuedAlias = _IDS,
    where: sa.ColumnElement[bool] | None = None,
) -> sa.Select[Any]:
    """One table's part of what ``lock_states`` reads, as rows (contact, kind, name, stage,
    rule, points, active) of one shape, so every table is read with one statement.

    Each contact's rows are read by a lateral subquery, one index probe per id: joined to
    the array, PostgreSQL hashed the whole table whenever its statistics lagged behind the
    table's growth (with 100,000 contacts, ~200 ms a batch instead of a few). ``OFFSET 0``
    keeps the subquery from being flattened back into that join. ``keys`` and ``where``
    replace the id array and the probe (``_SPENT_ROWS``: one per contact and period)."""
    per_contact = (
        sa.select(
            table.c.contact_id.label("contact_id"),
            sa.literal(kind, sa.Text).label("kind"),
            name.label("name"),
            (sa.cast(sa.null(), sa.Text) if stage is None else stage).label("stage"),
            (sa.cast(sa.null(), UUID(as_uuid=True)) if rule_id is None else rule_id).label(
                "rule_id"
            ),
            (sa.cast(sa.null(), sa.Integer) if points is None else points).label("points"),
            (sa.cast(sa.null(), sa.Boolean) if active is None else active).label("active"),
        )
        .where(table.c.contact_id == _IDS.c.id if where is None else where)
        .offset(0)
        .lateral()
    )
    return sa.select(*per_contact.c).select_from(keys).join(per_contact, sa.true())


_STATE_PARTS = [
    _state_rows("score", scores, scores.c.model, points=scores.c.points),
    _state_rows("stage", stages, stages.c.model, stage=stages.c.stage),
    _state_rows("tag", tags, tags.c.tag, points=tags.c.assignments, active=tags.c.active),
]
_SPENDING = array_rows_of([("sp_contact", UUID(as_uuid=True)), ("sp_from", sa.Text())])
_SPENT_ROWS = _state_rows(
    "spent",
    rule_spending,
    rule_spending.c.period,
    rule_id=rule_spending.c.rule_id,
    points=rule_spending.c.points,
    keys=_SPENDING,
    where=sa.and_(
        rule_spending.c.contact_id == _SPENDING.c.sp_contact,
        rule_spending.c.period >= _SPENDING.c.sp_from,
    ),
)
_STATE_ROWS = sa.union_all(*_STATE_PARTS)


async def claim_event_ids(
    session: AsyncSession,
    *,
    workspace_id: str,
    rows: Sequence[tuple[str, datetime, uuid.UUID]],
) -> set[str]:
    """Record (message id, occurred at, contact) in ``event_ids``; returns the message ids
    that were new (the events to store and apply; also score adjustments, as
    ``adjustment:<id>``). Message ids must be distinct."""
    if not rows:
        return set()
    claimed = await session.execute(_CLAIM_EVENT_IDS, _event_id_arrays(workspace_id, rows))
    return set(claimed.scalars())


def _event_id_arrays(
    workspace_id: str, rows: Sequence[tuple[str, datetime, uuid.UUID]]
) -> dict[str, Any]:
    return {
        "workspace_id": workspace_id,
        "message_id": [message_id for message_id, _, _ in rows],
        "occurred_at": [at for _, at, _ in rows],
        "contact_id": [contact_id for _, _, contact_id in rows],
    }


_EVENT_IDS = array_rows_of(
    [(name, event_ids.c[name].type) for name in ("message_id", "occurred_at", "contact_id")]
)
_CLAIM_EVENT_IDS = (
    pg_insert(event_ids)
    .from_select(
        ["message_id", "occurred_at", "contact_id", "workspace_id"],
        # the workspace is one parameter, not an array of copies
        sa.select(*_EVENT_IDS.c, sa.bindparam("workspace_id", type_=sa.Text)),
    )
    .on_conflict_do_nothing()
    .returning(event_ids.c.message_id)
)
_claimed_cte = _CLAIM_EVENT_IDS.cte("claimed_event_ids")
_CLAIMED_ROWS = sa.select(
    sa.cast(sa.null(), UUID(as_uuid=True)),
    sa.literal("new", sa.Text),
    _claimed_cte.c.message_id,
    sa.cast(sa.null(), sa.Text),
    sa.cast(sa.null(), UUID(as_uuid=True)),
    sa.cast(sa.null(), sa.Integer),
    sa.cast(sa.null(), sa.Boolean),
)
_CLAIMING_STATE_ROWS = sa.union_all(*_STATE_PARTS, _CLAIMED_ROWS).add_cte(_claimed_cte)
_CLAIMING_STATE_ROWS_WITH_SPENT = sa.union_all(*_STATE_PARTS, _SPENT_ROWS, _CLAIMED_ROWS).add_cte(
    _claimed_cte
)


def event_row(workspace_id: str, contact_id: uuid.UUID, event: SegmentEvent) -> dict[str, Any]:
    return {
        "workspace_id": workspace_id,
        "message_id": event.message_id,
        "contact_id": contact_id,
        "type": event.type.value,
        "name": event.event or event.name,
        "properties": event.properties,
        "context": event.context,
        "occurred_at": event.timestamp,
        "received_at": event.received_at,
    }


def transaction_row(
    workspace_id: str, contact_id: uuid.UUID, event: SegmentEvent, kind: str, revenue: float
) -> dict[str, Any]:
    properties = event.properties
    products = properties.get("products")
    method = properties.get("payment_method") or properties.get("paymentMethod")
    return {
        "workspace_id": workspace_id,
        "message_id": event.message_id,
        "contact_id": contact_id,
        "kind": kind,
        "order_id": str(properties["order_id"]) if properties.get("order_id") else None,
        "revenue": revenue,
        "currency": str(properties.get("currency") or "") or None,
        "payment_method": str(method) if method else None,
        "products": products if isinstance(products, list) else [],
        "occurred_at": event.timestamp,
    }


@dataclass
class BatchWrites:
    """Everything a batch of events changes, gathered in memory and written with one
    statement per table (``write_batch``). Counters are increments; rows are locked."""

    workspace_id: str
    events: list[dict[str, Any]] = field(default_factory=list)
    transactions: list[dict[str, Any]] = field(default_factory=list)
    touches: dict[uuid.UUID, dict[str, Any]] = field(default_factory=dict)
    """contact -> first/last seen, user id, first touch, orders, revenue, order times."""
    profiles: dict[uuid.UUID, dict[str, Any]] = field(default_factory=dict)
    """contact -> traits, trait sources and the typed columns, when they changed."""
    claims: dict[tuple[str, str], uuid.UUID] = field(default_factory=dict)
    tag_adds: dict[tuple[uuid.UUID, str], tuple[int, datetime, datetime]] = field(
        default_factory=dict
    )
    """(contact, tag) -> (assignments, first, last assigned)"""
    tag_removals: set[tuple[uuid.UUID, str]] = field(default_factory=set)
    score_changes: list[dict[str, Any]] = field(default_factory=list)
    scores: dict[tuple[uuid.UUID, str], int] = field(default_factory=dict)
    spending: dict[tuple[uuid.UUID, uuid.UUID, str], int] = field(default_factory=dict)
    stages: dict[tuple[uuid.UUID, str], tuple[str, datetime]] = field(default_factory=dict)
    stage_history: list[dict[str, Any]] = field(default_factory=list)
    timers: dict[tuple[uuid.UUID, uuid.UUID], datetime] = field(default_factory=dict)

    def touch(self, contact_id: uuid.UUID, at: datetime, user_id: str | None) -> dict[str, Any]:
        touch = self.touches.get(contact_id)
        if touch is None:
            touch = self.touches[contact_id] = {
                "cid": contact_id,
                "first_seen": at,
                "last_seen": at,
                "user_id": user_id,
                "first_touch": None,
                "orders": 0,
                "revenue": 0.0,
                "first_order": None,
                "last_order": None,
            }
        touch["first_seen"] = min(touch["first_seen"], at)
        touch["last_seen"] = max(touch["last_seen"], at)
        touch["user_id"] = touch["user_id"] or user_id
        return touch

    def tag(
        self, contact_id: uuid.UUID, add: Sequence[str], remove: Sequence[str], at: datetime
    ) -> None:
        for name in sorted(set(add)):
            count, first, last = self.tag_adds.get((contact_id, name), (0, at, at))
            self.tag_adds[(contact_id, name)] = (count + 1, min(first, at), max(last, at))
            self.tag_removals.discard((contact_id, name))
        for name in sorted(set(remove)):
            self.tag_removals.add((contact_id, name))

    def points(
        self,
        contact_id: uuid.UUID,
        deltas: Sequence[ScoreDelta],
        *,
        message_id: str,
        at: datetime,
        reason: str = "event",
    ) -> None:
        """Score deltas of rules: the contact's totals, its score breakdown, and what they
        spend of the rules' caps."""
        for delta in deltas:
            key = (contact_id, delta.model)
            self.scores[key] = self.scores.get(key, 0) + delta.points
            self.score_changes.append(
                {
                    "workspace_id": self.workspace_id,
                    "contact_id": contact_id,
                    "model": delta.model,
                    "rule_id": delta.rule_id,
                    "points": delta.points,
                    "message_id": message_id,
                    "at": at,
                    "reason": reason,
                }
            )
            for period in delta.periods:
                spend = (contact_id, delta.rule_id, period)
                self.spending[spend] = self.spending.get(spend, 0) + delta.points

    def adjust(
        self,
        contact_id: uuid.UUID,
        model: str,
        points: int,
        *,
        message_id: str,
        reason: str,
        at: datetime,
    ) -> None:
        """Points without a rule (a score adjustment): no caps to count against."""
        key = (contact_id, model)
        self.scores[key] = self.scores.get(key, 0) + points
        self.score_changes.append(
            {
                "workspace_id": self.workspace_id,
                "contact_id": contact_id,
                "model": model,
                "rule_id": None,
                "points": points,
                "message_id": message_id,
                "at": at,
                "reason": reason,
            }
        )


TYPED_COLUMNS = (
    "name",
    "email",
    "phone",
    "birthday",
    "language",
    "country",
    "city",
    "timezone",
    "company",
    "job_title",
)


async def write_batch(session: AsyncSession, writes: BatchWrites) -> None:
    """Write what ``writes`` gathered: every table in one statement (``_WRITE_BATCH``), but
    the profiles (the contacts' second update) and tag removals (after the tags' upsert)."""
    touched = sorted(writes.touches.values(), key=lambda t: t["cid"])
    tagged = sorted(writes.tag_adds.items())
    scored = sorted(writes.scores.items())
    spent = sorted(writes.spending.items())
    staged = sorted(writes.stages.items())
    timed = sorted(writes.timers.items())
    claimed = sorted(writes.claims.items())
    if (
        writes.events
        or writes.transactions
        or touched
        or tagged
        or scored
        or writes.score_changes
        or spent
        or staged
        or timed
        or claimed
    ):
        await session.execute(
            _WRITE_BATCH,
            {
                "w_workspace_id": writes.workspace_id,
                **_arrays("e_", _EVENT_NAMES, writes.events),
                **_arrays("t_", _TRANSACTION_NAMES, writes.transactions),
                **_arrays("u_", _TOUCH_NAMES, touched),
                "i_kind": [kind for (kind, _), _ in claimed],
                "i_value": [value for (_, value), _ in claimed],
                "i_contact_id": [owner for _, owner in claimed],
                "g_contact_id": [contact_id for (contact_id, _), _ in tagged],
                "g_tag": [tag for (_, tag), _ in tagged],
                "g_assignments": [count for _, (count, _, _) in tagged],
                "g_first_assigned_at": [first for _, (_, first, _) in tagged],
                "g_last_assigned_at": [last for _, (_, _, last) in tagged],
                "s_contact_id": [contact_id for (contact_id, _), _ in scored],
                "s_model": [model for (_, model), _ in scored],
                "s_points": [points for _, points in scored],
                **_arrays("c_", _SCORE_CHANGE_NAMES, writes.score_changes),
                "sp_contact_id": [contact_id for (contact_id, _, _), _ in spent],
                "sp_rule_id": [rule_id for (_, rule_id, _), _ in spent],
                "sp_period": [period for (_, _, period), _ in spent],
                "sp_points": [points for _, points in spent],
                "st_contact_id": [contact_id for (contact_id, _), _ in staged],
                "st_model": [model for (_, model), _ in staged],
                "st_stage": [stage for _, (stage, _) in staged],
                "st_since": [since for _, (_, since) in staged],
                **_arrays("h_", _STAGE_HISTORY_NAMES, writes.stage_history),
                "m_contact_id": [contact_id for (contact_id, _), _ in timed],
                "m_rule_id": [rule_id for (_, rule_id), _ in timed],
                "m_due_at": [due_at for _, due_at in timed],
            },
        )
    if writes.profiles:
        await session.execute(
            _SET_PROFILES,
            [
                {
                    "cid": contact_id,
                    "p_traits": profile["traits"],
                    "p_sources": profile["trait_sources"],
                    **{f"p_{column}": profile["typed"][column] for column in TYPED_COLUMNS},
                }
                for contact_id, profile in sorted(writes.profiles.items())
            ],
        )
    for contact_id, tag in sorted(writes.tag_removals):
        await session.execute(_REMOVE_TAG, {"r_contact": contact_id, "r_tag": tag})


def _arrays(prefix: str, names: Sequence[str], rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Rows (dicts with these keys) as one list per column, named ``<prefix><column>``."""
    return {prefix + name: [row[name] for row in rows] for name in names}


def _written(
    prefix: str, table: sa.Table, names: Sequence[str], constants: dict[str, Any]
) -> Insert:
    """``INSERT INTO table (...) SELECT ... FROM unnest(...)``, a part of ``_WRITE_BATCH``:
    the columns ``names`` from arrays named ``<prefix><column>`` (the parts' names must
    differ in one statement, so ``nudge_common.db.insert_arrays`` will not do), and
    ``constants`` (the workspace id: one parameter, not an array of copies)."""
    given = array_rows_of([(prefix + name, table.c[name].type) for name in names])
    columns = [*names, *constants]
    values = [*given.c, *constants.values()]
    return pg_insert(table).from_select(columns, sa.select(*values).select_from(given))


# ``write_batch``'s statements, built once; the row dicts gathered in ``BatchWrites``
# (``event_row``, ``transaction_row``, ``points``, ``move_stages``) have these keys.
_WORKSPACE = {"workspace_id": sa.bindparam("w_workspace_id", type_=sa.Text)}
_EVENT_NAMES = [
    "message_id",
    "contact_id",
    "type",
    "name",
    "properties",
    "context",
    "occurred_at",
    "received_at",
]
_TRANSACTION_NAMES = [
    "message_id",
    "contact_id",
    "kind",
    "order_id",
    "revenue",
    "currency",
    "payment_method",
    "products",
    "occurred_at",
]
_SCORE_CHANGE_NAMES = ["contact_id", "model", "rule_id", "points", "message_id", "at", "reason"]
_STAGE_HISTORY_NAMES = ["contact_id", "model", "from_stage", "to_stage", "score", "at"]
_TOUCHED = array_rows_of(
    [
        ("u_cid", UUID(as_uuid=True)),
        ("u_first_seen", TIMESTAMP),
        ("u_last_seen", TIMESTAMP),
        ("u_user_id", sa.Text()),
        ("u_first_touch", JSONB(none_as_null=True)),
        ("u_orders", sa.Integer()),
        ("u_revenue", sa.Float()),
        ("u_first_order", TIMESTAMP),
        ("u_last_order", TIMESTAMP),
    ]
)
_TOUCH_NAMES = [column.name.removeprefix("u_") for column in _TOUCHED.c]
_touch = (
    sa.update(contacts)
    .where(contacts.c.id == _TOUCHED.c.u_cid)
    .values(
        first_seen_at=sa.func.least(contacts.c.first_seen_at, _TOUCHED.c.u_first_seen),
        last_seen_at=sa.func.greatest(contacts.c.last_seen_at, _TOUCHED.c.u_last_seen),
        user_id=sa.func.coalesce(contacts.c.user_id, _TOUCHED.c.u_user_id),
        first_touch=sa.func.coalesce(contacts.c.first_touch, _TOUCHED.c.u_first_touch),
        orders_count=contacts.c.orders_count + _TOUCHED.c.u_orders,
        revenue_total=contacts.c.revenue_total + sa.cast(_TOUCHED.c.u_revenue, sa.Numeric(18, 4)),
        first_order_at=sa.func.least(contacts.c.first_order_at, _TOUCHED.c.u_first_order),
        last_order_at=sa.func.greatest(contacts.c.last_order_at, _TOUCHED.c.u_last_order),
    )
)
_tags = _written(
    "g_",
    tags,
    ["contact_id", "tag", "assignments", "first_assigned_at", "last_assigned_at"],
    {**_WORKSPACE, "active": sa.true()},
)
_scores = _written("s_", scores, ["contact_id", "model", "points"], _WORKSPACE)
_spending = _written("sp_", rule_spending, ["contact_id", "rule_id", "period", "points"], {})
_stages = _written("st_", stages, ["contact_id", "model", "stage", "since"], _WORKSPACE)
_timers = _written("m_", timers, ["contact_id", "rule_id", "due_at"], _WORKSPACE)
_WRITE_BATCH: sa.Select[Any] = sa.select(sa.literal_column("1")).add_cte(
    # Data-modifying CTEs all run, to completion, whether read or not; each table is
    # written once (the contacts' profiles, a second update of their rows, go apart).
    _written("e_", events, _EVENT_NAMES, _WORKSPACE).cte("written_events"),
    _written("t_", transactions, _TRANSACTION_NAMES, _WORKSPACE)
    .on_conflict_do_nothing()
    .cte("written_transactions"),
    _touch.cte("touched_contacts"),
    _written("i_", identities, ["kind", "value", "contact_id"], _WORKSPACE)
    .on_conflict_do_nothing()
    .cte("claimed_identities"),
    _tags.on_conflict_do_update(
        index_elements=[tags.c.contact_id, tags.c.tag],
        set_={
            "assignments": tags.c.assignments + _tags.excluded.assignments,
            "active": sa.true(),
            "last_assigned_at": sa.func.greatest(
                tags.c.last_assigned_at, _tags.excluded.last_assigned_at
            ),
        },
    ).cte("tagged"),
    _scores.on_conflict_do_update(
        index_elements=[scores.c.contact_id, scores.c.model],
        set_={"points": scores.c.points + _scores.excluded.points},
    ).cte("scored"),
    _written("c_", score_changes, _SCORE_CHANGE_NAMES, _WORKSPACE).cte("score_changed"),
    _spending.on_conflict_do_update(
        index_elements=[
            rule_spending.c.contact_id,
            rule_spending.c.rule_id,
            rule_spending.c.period,
        ],
        set_={"points": rule_spending.c.points + _spending.excluded.points},
    ).cte("spent"),
    _stages.on_conflict_do_update(
        index_elements=[stages.c.contact_id, stages.c.model],
        set_={"stage": _stages.excluded.stage, "since": _stages.excluded.since},
    ).cte("staged"),
    _written("h_", stage_history, _STAGE_HISTORY_NAMES, _WORKSPACE).cte("stage_moved"),
    _timers.on_conflict_do_update(
        index_elements=[timers.c.contact_id, timers.c.rule_id],
        set_={"due_at": sa.func.greatest(timers.c.due_at, _timers.excluded.due_at)},
    ).cte("timed"),
)
_CREATE_AND_CLAIM = (
    _written("i_", identities, ["kind", "value", "contact_id"], _WORKSPACE)
    .on_conflict_do_nothing()
    .returning(identities.c.kind, identities.c.value)
    .add_cte(
        _written("n_", contacts, ["id", "user_id", "first_seen_at", "last_seen_at"], _WORKSPACE)
        .on_conflict_do_nothing()
        .cte("created_contacts")
    )
)
_SET_PROFILES = (
    sa.update(contacts)
    .where(contacts.c.id == sa.bindparam("cid"))
    .values(
        traits=sa.bindparam("p_traits", type_=JSONB),
        trait_sources=sa.bindparam("p_sources", type_=JSONB),
        **{
            column: sa.bindparam(f"p_{column}", type_=contacts.c[column].type)
            for column in TYPED_COLUMNS
        },
    )
)
_REMOVE_TAG = (
    sa.update(tags)
    .where(tags.c.contact_id == sa.bindparam("r_contact"), tags.c.tag == sa.bindparam("r_tag"))
    .values(active=False)
)
