"""Notifier's tables (schema ``notifier``): templates and the delivery ledger that makes
every idempotency key send at most once."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.db import processed_messages_table
from nudge_common.events import Channel, DeliveryStatus
from nudge_notifier.domain.templates import Template

SCHEMA = "notifier"
metadata = sa.MetaData(schema=SCHEMA)
TIMESTAMP = sa.DateTime(timezone=True)

templates = sa.Table(
    "templates",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("html", sa.Text, nullable=False),
    sa.Column("text", sa.Text, nullable=False),
)
deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("idempotency_key", sa.Text, primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("contact_id", UUID(as_uuid=True), nullable=False),
    sa.Column("recipient", sa.Text),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="1"),
    sa.Column("provider_message_id", sa.Text),
    sa.Column("reason", sa.Text),
    sa.Column("created_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
    sa.Column("updated_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
)
processed_messages = processed_messages_table(metadata)

SENDING = "sending"
RETRY = "retry"


@dataclass(frozen=True)
class Delivery:
    idempotency_key: str
    status: str
    recipient: str | None
    provider_message_id: str | None
    reason: str | None


async def get_template(
    session: AsyncSession, *, workspace_id: str, template_id: uuid.UUID
) -> Template | None:
    row = (
        await session.execute(
            sa.select(templates).where(
                templates.c.id == template_id, templates.c.workspace_id == workspace_id
            )
        )
    ).one_or_none()
    if row is None:
        return None
    return Template(row.id, row.name, row.channel, row.subject, row.html, row.text)


async def create_template(session: AsyncSession, *, workspace_id: str, template: Template) -> None:
    await session.execute(
        pg_insert(templates)
        .values(
            id=template.id,
            workspace_id=workspace_id,
            name=template.name,
            channel=template.channel,
            subject=template.subject,
            html=template.html,
            text=template.text,
        )
        .on_conflict_do_nothing()
    )


async def claim(
    session: AsyncSession,
    *,
    idempotency_key: str,
    workspace_id: str,
    channel: Channel,
    contact_id: uuid.UUID,
    recipient: str,
) -> bool:
    """Take the key for sending: True for a new key, or one whose last attempt failed in a
    way that is safe to retry. Commit before sending."""
    statement = pg_insert(deliveries).values(
        idempotency_key=idempotency_key,
        workspace_id=workspace_id,
        channel=channel,
        contact_id=contact_id,
        recipient=recipient,
        status=SENDING,
    )
    returning = statement.on_conflict_do_update(
        index_elements=[deliveries.c.idempotency_key],
        set_={
            "status": SENDING,
            "attempts": deliveries.c.attempts + 1,
            "updated_at": sa.func.now(),
        },
        where=deliveries.c.status == RETRY,
    ).returning(deliveries.c.idempotency_key)
    return (await session.execute(returning)).first() is not None


async def get_delivery(session: AsyncSession, *, idempotency_key: str) -> Delivery:
    row = (
        await session.execute(
            sa.select(deliveries).where(deliveries.c.idempotency_key == idempotency_key)
        )
    ).one()
    return Delivery(
        row.idempotency_key, row.status, row.recipient, row.provider_message_id, row.reason
    )


async def record_outcome(
    session: AsyncSession,
    *,
    idempotency_key: str,
    status: DeliveryStatus | str,
    provider_message_id: str | None = None,
    reason: str | None = None,
) -> None:
    await session.execute(
        sa.update(deliveries)
        .where(deliveries.c.idempotency_key == idempotency_key)
        .values(
            status=status,
            provider_message_id=provider_message_id,
            reason=reason,
            updated_at=sa.func.now(),
        )
    )


async def record_skipped(
    session: AsyncSession,
    *,
    idempotency_key: str,
    workspace_id: str,
    channel: Channel,
    contact_id: uuid.UUID,
    reason: str,
) -> None:
    await session.execute(
        pg_insert(deliveries)
        .values(
            idempotency_key=idempotency_key,
            workspace_id=workspace_id,
            channel=channel,
            contact_id=contact_id,
            status="skipped",
            reason=reason,
        )
        .on_conflict_do_nothing()
    )
