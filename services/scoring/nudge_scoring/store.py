"""Scoring's tables (schema ``scoring``) and the queries on them. Functions take the
caller's session and never commit."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.db import processed_messages_table
from nudge_common.events import SegmentEvent
from nudge_common.ids import stable_id
from nudge_scoring.domain.scoring import Rule, ScoreDelta

SCHEMA = "scoring"
metadata = sa.MetaData(schema=SCHEMA)
TIMESTAMP = sa.DateTime(timezone=True)

contacts = sa.Table(
    "contacts",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("user_id", sa.Text),
    sa.Column("traits", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("first_seen_at", TIMESTAMP, nullable=False),
    sa.Column("last_seen_at", TIMESTAMP, nullable=False),
)
identities = sa.Table(
    "identities",
    metadata,
    sa.Column("workspace_id", sa.Text, primary_key=True),
    sa.Column("kind", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, primary_key=True),
    sa.Column("contact_id", UUID(as_uuid=True), nullable=False),
)
events = sa.Table(
    "events",
    metadata,
    sa.Column("workspace_id", sa.Text, primary_key=True),
    sa.Column("message_id", sa.Text, primary_key=True),
    sa.Column("contact_id", UUID(as_uuid=True), nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("name", sa.Text),
    sa.Column("properties", JSONB, nullable=False),
    sa.Column("occurred_at", TIMESTAMP, nullable=False),
    sa.Column("received_at", TIMESTAMP, nullable=False),
)
rules = sa.Table(
    "rules",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("event", sa.Text, nullable=False),
    sa.Column("points", sa.Integer, nullable=False),
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
    sa.Column("contact_id", UUID(as_uuid=True), nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("rule_id", UUID(as_uuid=True), nullable=False),
    sa.Column("points", sa.Integer, nullable=False),
    sa.Column("message_id", sa.Text, nullable=False),
    sa.Column("at", TIMESTAMP, nullable=False),
)
processed_messages = processed_messages_table(metadata)


@dataclass(frozen=True)
class Contact:
    id: uuid.UUID
    user_id: str | None
    traits: dict[str, Any]


async def resolve_contact(
    session: AsyncSession, *, workspace_id: str, event: SegmentEvent
) -> Contact:
    """The contact an event belongs to, created on first sight. Its id derives from the
    identity it was first seen with, so a replay after a crash finds the same contact."""
    known = [(kind, value) for kind, value in _identities_of(event) if value]
    rows = (
        await session.execute(
            sa.select(identities.c.kind, identities.c.contact_id).where(
                identities.c.workspace_id == workspace_id,
                sa.tuple_(identities.c.kind, identities.c.value).in_(known),
            )
        )
    ).all()
    by_kind = {row.kind: row.contact_id for row in rows}
    contact_id = by_kind.get("user_id") or by_kind.get("anonymous_id")
    seen_at = event.timestamp
    if contact_id is None:
        contact_id = stable_id(workspace_id, "contact", *known[0])
        await session.execute(
            pg_insert(contacts)
            .values(
                id=contact_id,
                workspace_id=workspace_id,
                user_id=event.user_id,
                first_seen_at=seen_at,
                last_seen_at=seen_at,
            )
            .on_conflict_do_nothing()
        )
    missing = [(kind, value) for kind, value in known if kind not in by_kind]
    if missing:
        await session.execute(
            pg_insert(identities)
            .values(
                [
                    {"workspace_id": workspace_id, "kind": k, "value": v, "contact_id": contact_id}
                    for k, v in missing
                ]
            )
            .on_conflict_do_nothing()
        )
    row = (
        await session.execute(
            sa.update(contacts)
            .where(contacts.c.id == contact_id)
            .values(
                last_seen_at=sa.func.greatest(contacts.c.last_seen_at, seen_at),
                user_id=sa.func.coalesce(contacts.c.user_id, event.user_id),
            )
            .returning(contacts.c.id, contacts.c.user_id, contacts.c.traits)
        )
    ).one()
    return Contact(row.id, row.user_id, row.traits)


def _identities_of(event: SegmentEvent) -> list[tuple[str, str | None]]:
    return [("user_id", event.user_id), ("anonymous_id", event.anonymous_id)]


async def store_event(
    session: AsyncSession, *, workspace_id: str, contact_id: uuid.UUID, event: SegmentEvent
) -> bool:
    """Append the event; False when this (workspace, messageId) was stored before."""
    statement = (
        pg_insert(events)
        .values(
            workspace_id=workspace_id,
            message_id=event.message_id,
            contact_id=contact_id,
            type=event.type.value,
            name=event.event or event.name,
            properties=event.properties,
            occurred_at=event.timestamp,
            received_at=event.received_at,
        )
        .on_conflict_do_nothing()
        .returning(events.c.message_id)
    )
    return (await session.execute(statement)).first() is not None


async def set_traits(
    session: AsyncSession, *, contact_id: uuid.UUID, traits: dict[str, Any]
) -> None:
    await session.execute(
        sa.update(contacts).where(contacts.c.id == contact_id).values(traits=traits)
    )


async def list_rules(session: AsyncSession, *, workspace_id: str) -> list[Rule]:
    rows = await session.execute(sa.select(rules).where(rules.c.workspace_id == workspace_id))
    return [Rule(row.id, row.model, row.event, row.points) for row in rows]


async def create_rule(session: AsyncSession, *, workspace_id: str, rule: Rule) -> None:
    await session.execute(
        pg_insert(rules)
        .values(
            id=rule.id,
            workspace_id=workspace_id,
            model=rule.model,
            event=rule.event,
            points=rule.points,
        )
        .on_conflict_do_nothing()
    )


async def add_points(
    session: AsyncSession,
    *,
    workspace_id: str,
    contact_id: uuid.UUID,
    deltas: Sequence[ScoreDelta],
    message_id: str,
    at: datetime,
) -> None:
    """Apply score deltas and record each in the contact's score breakdown."""
    if not deltas:
        return
    totals: dict[str, int] = {}
    for delta in deltas:
        totals[delta.model] = totals.get(delta.model, 0) + delta.points
    upsert = pg_insert(scores).values(
        [
            {"contact_id": contact_id, "model": model, "workspace_id": workspace_id, "points": p}
            for model, p in totals.items()
        ]
    )
    await session.execute(
        upsert.on_conflict_do_update(
            index_elements=[scores.c.contact_id, scores.c.model],
            set_={"points": scores.c.points + upsert.excluded.points},
        )
    )
    await session.execute(
        sa.insert(score_changes),
        [
            {
                "workspace_id": workspace_id,
                "contact_id": contact_id,
                "model": delta.model,
                "rule_id": delta.rule_id,
                "points": delta.points,
                "message_id": message_id,
                "at": at,
            }
            for delta in deltas
        ],
    )


async def scores_of(session: AsyncSession, *, contact_id: uuid.UUID) -> dict[str, int]:
    rows = await session.execute(
        sa.select(scores.c.model, scores.c.points).where(scores.c.contact_id == contact_id)
    )
    return {row.model: row.points for row in rows}
