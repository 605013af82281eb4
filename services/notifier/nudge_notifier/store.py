"""Notifier's tables (schema ``notifier``): templates and the delivery ledger that makes
every idempotency key send at most once."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.db import array_rows, array_rows_of, processed_messages_table
from nudge_common.events import Channel, ConsentStatus, DeliveryStatus
from nudge_notifier.domain.hygiene import Health
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
    sa.Column("topic", sa.Text, nullable=False, server_default="marketing"),
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
sa.Index("deliveries_provider_message_id", deliveries.c.provider_message_id)
consents = sa.Table(
    "consents",
    metadata,
    sa.Column("workspace_id", sa.Text, primary_key=True),
    sa.Column("channel", sa.Text, primary_key=True),
    sa.Column("address", sa.Text, primary_key=True),
    sa.Column("topic", sa.Text, primary_key=True),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("updated_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
)
suppressions = sa.Table(
    "suppressions",
    metadata,
    sa.Column("workspace_id", sa.Text, primary_key=True),
    sa.Column("channel", sa.Text, primary_key=True),
    sa.Column("address", sa.Text, primary_key=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("detail", sa.Text),
    sa.Column("created_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
)
address_health = sa.Table(
    "address_health",
    metadata,
    sa.Column("workspace_id", sa.Text, primary_key=True),
    sa.Column("channel", sa.Text, primary_key=True),
    sa.Column("address", sa.Text, primary_key=True),
    sa.Column("soft_bounces_in_a_row", sa.Integer, nullable=False, server_default="0"),
    sa.Column("sends_since_engaged", sa.Integer, nullable=False, server_default="0"),
    sa.Column("first_sent_at", TIMESTAMP),
    sa.Column("last_engaged_at", TIMESTAMP),
    sa.Column("disposable", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("role", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("invalid", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("suggestion", sa.Text),
    sa.Column("sunset_at", TIMESTAMP),
    sa.Column("sunset_reason", sa.Text),
    sa.Column("silence_due_at", TIMESTAMP),
    sa.Column("contact_id", UUID(as_uuid=True)),
    sa.Column("user_id", sa.Text),
)
"""``silence_due_at``: when the silence rule (no open or click for the configured days
over the configured sends) selects the address if nothing changes; set once it has
those sends, cleared by an engagement and by the sunset. The sunset job reads it by index
instead of scanning. ``contact_id``/``user_id``: the contact of the last send, whom the
sunset's events are about."""
sa.Index(
    "address_health_silence_due",
    address_health.c.silence_due_at,
    postgresql_where=address_health.c.silence_due_at.is_not(None),
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
    return Template(row.id, row.name, row.channel, row.subject, row.html, row.text, row.topic)


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
            topic=template.topic,
        )
        .on_conflict_do_nothing()
    )


async def put_template(session: AsyncSession, *, workspace_id: str, template: Template) -> None:
    """Create or replace (a template announced again); a template id of another workspace
    is left alone."""
    statement = pg_insert(templates).values(
        id=template.id,
        workspace_id=workspace_id,
        name=template.name,
        channel=template.channel,
        subject=template.subject,
        html=template.html,
        text=template.text,
        topic=template.topic,
    )
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[templates.c.id],
            set_={
                name: statement.excluded[name]
                for name in ("name", "channel", "subject", "html", "text", "topic")
            },
            where=templates.c.workspace_id == workspace_id,
        )
    )


async def delete_template(
    session: AsyncSession, *, workspace_id: str, template_id: uuid.UUID
) -> None:
    await session.execute(
        sa.delete(templates).where(
            templates.c.id == template_id, templates.c.workspace_id == workspace_id
        )
    )


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


# --- the ledger, batch-wise ----------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    idempotency_key: str
    workspace_id: str
    channel: Channel
    contact_id: uuid.UUID
    recipient: str


@dataclass(frozen=True)
class Skipped:
    idempotency_key: str
    workspace_id: str
    channel: Channel
    contact_id: uuid.UUID
    reason: str


@dataclass(frozen=True)
class HygieneNote:
    workspace_id: str
    channel: str
    address: str
    invalid: bool = False
    disposable: bool = False
    role: bool = False
    suggestion: str | None = None


def _ledger_rows(prefix: str) -> sa.TableValuedAlias:
    return array_rows_of(
        [
            (f"{prefix}k", sa.Text()),
            (f"{prefix}w", sa.Text()),
            (f"{prefix}ch", sa.Text()),
            (f"{prefix}c", UUID(as_uuid=True)),
            (f"{prefix}r", sa.Text()),
        ]
    )


_HEALTH_KEY = [address_health.c.workspace_id, address_health.c.channel, address_health.c.address]
_NOTED = ("invalid", "disposable", "role", "suggestion")
_note_rows = array_rows_of(
    [
        ("hw", sa.Text()),
        ("hch", sa.Text()),
        ("ha", sa.Text()),
        ("hi", sa.Boolean()),
        ("hd", sa.Boolean()),
        ("hr", sa.Boolean()),
        ("hs", sa.Text()),
    ]
)
_notes_insert = pg_insert(address_health).from_select(
    ["workspace_id", "channel", "address", *_NOTED], sa.select(*_note_rows.c)
)
_NOTE_HYGIENE = _notes_insert.on_conflict_do_update(
    index_elements=_HEALTH_KEY, set_={name: _notes_insert.excluded[name] for name in _NOTED}
).cte("hygiene")
_skipped_rows = _ledger_rows("s")
_RECORD_SKIPPED = (
    pg_insert(deliveries)
    .from_select(
        ["idempotency_key", "workspace_id", "channel", "contact_id", "reason", "status"],
        sa.select(*_skipped_rows.c, sa.literal("skipped", sa.Text)),
    )
    .on_conflict_do_nothing()
    .cte("skipped")
)
_claim_rows = _ledger_rows("")
_claim_insert = pg_insert(deliveries).from_select(
    ["idempotency_key", "workspace_id", "channel", "contact_id", "recipient", "status"],
    sa.select(*_claim_rows.c, sa.literal(SENDING, sa.Text)),
)
_CLAIM = (
    _claim_insert.on_conflict_do_update(
        index_elements=[deliveries.c.idempotency_key],
        set_={
            "status": SENDING,
            "attempts": deliveries.c.attempts + 1,
            "updated_at": sa.func.now(),
        },
        where=deliveries.c.status == RETRY,
    )
    .returning(deliveries.c.idempotency_key, deliveries.c.attempts)
    .add_cte(_NOTE_HYGIENE, _RECORD_SKIPPED)
)
"""The batch's statements are built once, here, and executed with one list per column:
built per call, SQLAlchemy constructed and keyed them again for every batch."""


async def claim_many(
    session: AsyncSession,
    claims: Sequence[Claim],
    *,
    skipped: Sequence[Skipped] = (),
    notes: Sequence[HygieneNote] = (),
) -> dict[str, int]:
    """Take the keys for sending: a new key, or one whose last attempt failed in a way
    that is safe to retry (status ``retry``). Returns the keys taken with their attempt
    count. In the same statement (one round trip, atomic without a transaction): the
    requests that must not be sent, recorded with the reason (a key recorded before keeps
    its first record), and the addresses' hygiene flags (an address noted twice keeps the
    last note). The keys must be distinct. Commit before sending."""
    if not (claims or skipped or notes):
        return {}
    latest = {(n.workspace_id, n.channel, n.address): n for n in notes}
    noted = list(latest.values())
    columns = {
        "k": [c.idempotency_key for c in claims],
        "w": [c.workspace_id for c in claims],
        "ch": [c.channel for c in claims],
        "c": [c.contact_id for c in claims],
        "r": [c.recipient for c in claims],
        "sk": [s.idempotency_key for s in skipped],
        "sw": [s.workspace_id for s in skipped],
        "sch": [s.channel for s in skipped],
        "sc": [s.contact_id for s in skipped],
        "sr": [s.reason for s in skipped],
        "hw": [n.workspace_id for n in noted],
        "hch": [n.channel for n in noted],
        "ha": [n.address for n in noted],
        "hi": [n.invalid for n in noted],
        "hd": [n.disposable for n in noted],
        "hr": [n.role for n in noted],
        "hs": [n.suggestion for n in noted],
    }
    return {row.idempotency_key: row.attempts for row in await session.execute(_CLAIM, columns)}


@dataclass(frozen=True)
class Outcome:
    idempotency_key: str
    status: str
    provider_message_id: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class SentTo:
    workspace_id: str
    channel: str
    address: str
    contact_id: uuid.UUID
    user_id: str | None


_sent_rows = array_rows_of(
    [
        ("w", sa.Text()),
        ("ch", sa.Text()),
        ("a", sa.Text()),
        ("c", UUID(as_uuid=True)),
        ("u", sa.Text()),
        ("n", sa.Integer()),
    ]
)
_MIN_SENDS = sa.bindparam("min_sends", type_=sa.Integer())
_SILENCE = sa.func.make_interval(0, 0, 0, sa.bindparam("unengaged_days", type_=sa.Integer()))
_sends_insert = pg_insert(address_health).from_select(
    [
        "workspace_id",
        "channel",
        "address",
        "contact_id",
        "user_id",
        "sends_since_engaged",
        "first_sent_at",
        "silence_due_at",
    ],
    sa.select(
        *_sent_rows.c,
        sa.func.now(),
        sa.case((_sent_rows.c.n >= _MIN_SENDS, sa.func.now() + _SILENCE)),
    ),
)
_h = address_health.c
_sends = _h.sends_since_engaged + _sends_insert.excluded.sends_since_engaged
_NOTE_SENDS = _sends_insert.on_conflict_do_update(
    index_elements=[_h.workspace_id, _h.channel, _h.address],
    set_={
        "sends_since_engaged": _sends,
        "soft_bounces_in_a_row": 0,
        "first_sent_at": sa.func.coalesce(_h.first_sent_at, sa.func.now()),
        "contact_id": _sends_insert.excluded.contact_id,
        "user_id": sa.func.coalesce(_sends_insert.excluded.user_id, _h.user_id),
        "silence_due_at": sa.case(
            (
                sa.and_(_h.sunset_at.is_(None), _h.silence_due_at.is_(None), _sends >= _MIN_SENDS),
                sa.func.coalesce(_h.last_engaged_at, _h.first_sent_at, sa.func.now()) + _SILENCE,
            ),
            else_=_h.silence_due_at,
        ),
    },
)


_outcome_rows = array_rows_of(
    [("k", sa.Text()), ("s", sa.Text()), ("m", sa.Text()), ("r", sa.Text())]
)
_RECORD_OUTCOMES = _NOTE_SENDS.add_cte(
    sa.update(deliveries)
    .where(deliveries.c.idempotency_key == _outcome_rows.c.k)
    .values(
        status=_outcome_rows.c.s,
        provider_message_id=_outcome_rows.c.m,
        reason=_outcome_rows.c.r,
        updated_at=sa.func.now(),
    )
    .cte("outcomes")
)


async def record_outcomes(
    session: AsyncSession,
    outcomes: Sequence[Outcome],
    sent: Sequence[SentTo],
    *,
    unengaged_days: int,
    min_sends: int,
) -> None:
    """The outcomes of a batch's sends and, in the same statement (one round trip, atomic
    without a transaction), each successful send counted for its address: resets the
    soft-bounce run, remembers the contact, and once the address has ``min_sends`` sends
    since its last engagement, schedules the silence rule (``silence_due_at``)
    ``unengaged_days`` after that engagement, or after the first send."""
    if not outcomes and not sent:
        return
    counts: dict[tuple[str, str, str], int] = {}
    last: dict[tuple[str, str, str], SentTo] = {}
    for s in sent:
        key = (s.workspace_id, s.channel, s.address)
        counts[key] = counts.get(key, 0) + 1
        last[key] = s
    keys = sorted(counts)
    columns = {
        "k": [o.idempotency_key for o in outcomes],
        "s": [o.status for o in outcomes],
        "m": [o.provider_message_id for o in outcomes],
        "r": [o.reason for o in outcomes],
        "w": [w for w, _, _ in keys],
        "ch": [ch for _, ch, _ in keys],
        "a": [a for _, _, a in keys],
        "c": [last[k].contact_id for k in keys],
        "u": [last[k].user_id for k in keys],
        "n": [counts[k] for k in keys],
        "min_sends": min_sends,
        "unengaged_days": unengaged_days,
    }
    await session.execute(_RECORD_OUTCOMES, columns)


async def find_delivery(
    session: AsyncSession,
    *,
    workspace_id: str,
    idempotency_key: str | None = None,
    provider_message_id: str | None = None,
) -> sa.Row[Any] | None:
    condition = (
        deliveries.c.idempotency_key == idempotency_key
        if idempotency_key
        else deliveries.c.provider_message_id == provider_message_id
    )
    return (
        await session.execute(
            sa.select(deliveries).where(condition, deliveries.c.workspace_id == workspace_id)
        )
    ).first()


async def recipients(
    session: AsyncSession, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], tuple[str, str]]:
    """(workspace, idempotency key) -> (channel, recipient) of the deliveries that have
    a recipient."""
    if not keys:
        return {}
    given = array_rows(
        [("w", sa.Text(), [w for w, _ in keys]), ("k", sa.Text(), [k for _, k in keys])]
    )
    d = deliveries.c
    rows = await session.execute(
        sa.select(d.workspace_id, d.idempotency_key, d.channel, d.recipient).join(
            given, sa.and_(d.idempotency_key == given.c.k, d.workspace_id == given.c.w)
        )
    )
    return {
        (row.workspace_id, row.idempotency_key): (row.channel, row.recipient)
        for row in rows
        if row.recipient
    }


# --- consent and suppression ---------------------------------------------------------------


Address = tuple[str, str, str]
"""(workspace, channel, address)"""


@dataclass(frozen=True)
class Plan:
    """What planning a batch reads: its templates, and its addresses' suppressions and
    consents."""

    templates: dict[tuple[str, uuid.UUID], Template]
    suppressed: dict[Address, str]
    """The suppression reason of each address suppressed."""
    consents: dict[Address, dict[str, ConsentStatus]]
    """The consents of each address with any, by topic."""


def _json_rows(table: sa.Table, names: Sequence[str], on: sa.ColumnElement[bool]) -> Any:
    """The rows of ``table`` that match ``on`` as one JSON array of arrays (``[]`` if none)."""
    rows = sa.func.json_build_array(*(table.c[name] for name in names))
    return (
        sa.select(sa.func.coalesce(sa.func.json_agg(rows), sa.text("'[]'::json")))
        .where(on)
        .scalar_subquery()
    )


_wanted_templates = array_rows_of([("tw", sa.Text()), ("tid", UUID(as_uuid=True))])
_addresses = array_rows_of([("pw", sa.Text()), ("pch", sa.Text()), ("pa", sa.Text())])
_TEMPLATE_COLUMNS = ("workspace_id", "id", "name", "channel", "subject", "html", "text", "topic")


def _at_addresses(table: sa.Table) -> sa.ColumnElement[bool]:
    return sa.tuple_(table.c.workspace_id, table.c.channel, table.c.address).in_(
        sa.select(_addresses.c.pw, _addresses.c.pch, _addresses.c.pa)
    )


_PLAN = sa.select(
    sa.type_coerce(
        _json_rows(
            templates,
            _TEMPLATE_COLUMNS,
            sa.tuple_(templates.c.workspace_id, templates.c.id).in_(
                sa.select(_wanted_templates.c.tw, _wanted_templates.c.tid)
            ),
        ),
        sa.JSON,
    ),
    sa.type_coerce(
        _json_rows(
            suppressions,
            ("workspace_id", "channel", "address", "reason"),
            _at_addresses(suppressions),
        ),
        sa.JSON,
    ),
    sa.type_coerce(
        _json_rows(
            consents,
            ("workspace_id", "channel", "address", "topic", "status"),
            _at_addresses(consents),
        ),
        sa.JSON,
    ),
)


async def load_plan(
    session: AsyncSession,
    *,
    templates: Sequence[tuple[str, uuid.UUID]],
    addresses: Sequence[Address],
) -> Plan:
    """The templates (by workspace and id) and, for the addresses, the suppression
    reasons and the consents by topic: one statement for the batch, three result sets
    in one row (as JSON) instead of a round trip each."""
    if not templates and not addresses:
        return Plan({}, {}, {})
    given = {
        "tw": [w for w, _ in templates],
        "tid": [t for _, t in templates],
        "pw": [w for w, _, _ in addresses],
        "pch": [ch for _, ch, _ in addresses],
        "pa": [a for _, _, a in addresses],
    }
    found, suppressed, consented = (await session.execute(_PLAN, given)).one()
    plan = Plan(
        {
            (w, uuid.UUID(i)): Template(uuid.UUID(i), name, channel, subject, html, text, topic)
            for w, i, name, channel, subject, html, text, topic in found
        },
        {(w, ch, a): reason for w, ch, a, reason in suppressed},
        {},
    )
    for w, ch, a, topic, status in consented:
        plan.consents.setdefault((w, ch, a), {})[topic] = status
    return plan


async def set_consent(
    session: AsyncSession,
    *,
    workspace_id: str,
    channel: str,
    address: str,
    topic: str,
    status: ConsentStatus,
    source: str,
) -> None:
    statement = pg_insert(consents).values(
        workspace_id=workspace_id,
        channel=channel,
        address=address,
        topic=topic,
        status=status,
        source=source,
    )
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[
                consents.c.workspace_id,
                consents.c.channel,
                consents.c.address,
                consents.c.topic,
            ],
            set_={"status": status, "source": source, "updated_at": sa.func.now()},
        )
    )


async def get_consents(
    session: AsyncSession, *, workspace_id: str, channel: str, address: str
) -> dict[str, str]:
    rows = await session.execute(
        sa.select(consents.c.topic, consents.c.status).where(
            consents.c.workspace_id == workspace_id,
            consents.c.channel == channel,
            consents.c.address == address,
        )
    )
    return {row.topic: row.status for row in rows}


async def suppress(
    session: AsyncSession,
    *,
    workspace_id: str,
    channel: str,
    address: str,
    reason: str,
    detail: str | None = None,
) -> bool:
    """Add the address to the suppression list; False if it was there already."""
    result = await session.execute(
        pg_insert(suppressions)
        .values(
            workspace_id=workspace_id,
            channel=channel,
            address=address,
            reason=reason,
            detail=detail,
        )
        .on_conflict_do_nothing()
        .returning(suppressions.c.address)
    )
    return result.first() is not None


async def unsuppress(
    session: AsyncSession, *, workspace_id: str, channel: str, address: str
) -> bool:
    result = await session.execute(
        sa.delete(suppressions)
        .where(
            suppressions.c.workspace_id == workspace_id,
            suppressions.c.channel == channel,
            suppressions.c.address == address,
        )
        .returning(suppressions.c.address)
    )
    return result.first() is not None


async def list_suppressions(
    session: AsyncSession, *, workspace_id: str, channel: str | None, limit: int, after: str | None
) -> list[sa.Row[Any]]:
    query = sa.select(suppressions).where(suppressions.c.workspace_id == workspace_id)
    if channel:
        query = query.where(suppressions.c.channel == channel)
    if after:
        query = query.where(suppressions.c.address > after)
    return list(await session.execute(query.order_by(suppressions.c.address).limit(limit)))


# --- address health and hygiene ------------------------------------------------------------


@dataclass(frozen=True)
class Engaged:
    workspace_id: str
    channel: str
    address: str
    at: datetime


async def note_engagements(session: AsyncSession, engaged: Sequence[Engaged]) -> list[sa.Row[Any]]:
    """An open or a click: the address is engaged again. Its silence and soft-bounce
    counts restart and a sunset is lifted. Returns the rows that were sunset (before)."""
    if not engaged:
        return []
    latest: dict[tuple[str, str, str], datetime] = {}
    for e in engaged:
        key = (e.workspace_id, e.channel, e.address)
        latest[key] = max(e.at, latest.get(key, e.at))
    keys = sorted(latest)
    given = array_rows(
        [
            ("w", sa.Text(), [w for w, _, _ in keys]),
            ("ch", sa.Text(), [ch for _, ch, _ in keys]),
            ("a", sa.Text(), [a for _, _, a in keys]),
            ("at", TIMESTAMP, [latest[k] for k in keys]),
        ]
    )
    h = address_health.c
    match = sa.and_(h.workspace_id == given.c.w, h.channel == given.c.ch, h.address == given.c.a)
    was_sunset = list(
        await session.execute(
            sa.select(address_health)
            .join(given, match)
            .where(h.sunset_at.is_not(None))
            .order_by(h.workspace_id, h.channel, h.address)
            .with_for_update(of=address_health)
        )
    )
    await session.execute(
        sa.update(address_health)
        .where(match)
        .values(
            last_engaged_at=sa.func.greatest(h.last_engaged_at, given.c.at),
            sends_since_engaged=0,
            soft_bounces_in_a_row=0,
            silence_due_at=None,
            sunset_at=None,
            sunset_reason=None,
        )
    )
    return was_sunset


async def note_soft_bounce(
    session: AsyncSession, *, workspace_id: str, channel: str, address: str
) -> sa.Row[Any]:
    row: sa.Row[Any] = (
        await session.execute(
            pg_insert(address_health)
            .values(
                workspace_id=workspace_id, channel=channel, address=address, soft_bounces_in_a_row=1
            )
            .on_conflict_do_update(
                index_elements=[
                    address_health.c.workspace_id,
                    address_health.c.channel,
                    address_health.c.address,
                ],
                set_={"soft_bounces_in_a_row": address_health.c.soft_bounces_in_a_row + 1},
            )
            .returning(address_health)
        )
    ).one()
    return row


def health_of(row: sa.Row[Any]) -> Health:
    return Health(
        row.soft_bounces_in_a_row, row.sends_since_engaged, row.last_engaged_at, row.first_sent_at
    )


async def health_rows(session: AsyncSession, *, workspace_id: str) -> list[sa.Row[Any]]:
    """The workspace's addresses not sunset, locked (the on-demand sunset)."""
    h = address_health.c
    query = (
        sa.select(address_health)
        .where(h.workspace_id == workspace_id, h.sunset_at.is_(None))
        .order_by(h.channel, h.address)
        .with_for_update()
    )
    return list(await session.execute(query))


async def due_silences(session: AsyncSession, *, now: datetime, limit: int) -> list[sa.Row[Any]]:
    """Addresses whose silence rule is due, oldest first, locked; rows another replica
    holds are skipped."""
    h = address_health.c
    query = (
        sa.select(address_health)
        .where(h.silence_due_at <= now)
        .order_by(h.silence_due_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list(await session.execute(query))


async def reschedule_silence(
    session: AsyncSession, *, row: sa.Row[Any], due_at: datetime | None
) -> None:
    h = address_health.c
    await session.execute(
        sa.update(address_health)
        .where(
            h.workspace_id == row.workspace_id, h.channel == row.channel, h.address == row.address
        )
        .values(silence_due_at=due_at)
    )


async def mark_sunset(
    session: AsyncSession, *, workspace_id: str, channel: str, address: str, reason: str
) -> bool:
    result = await session.execute(
        sa.update(address_health)
        .where(
            address_health.c.workspace_id == workspace_id,
            address_health.c.channel == channel,
            address_health.c.address == address,
            address_health.c.sunset_at.is_(None),
        )
        .values(sunset_at=sa.func.now(), sunset_reason=reason, silence_due_at=None)
        .returning(address_health.c.address)
    )
    return result.first() is not None


async def hygiene_report(session: AsyncSession, *, workspace_id: str) -> dict[str, Any]:
    h = address_health.c
    totals = (
        await session.execute(
            sa.select(
                sa.func.count().label("addresses"),
                sa.func.count().filter(h.invalid).label("invalid"),
                sa.func.count().filter(h.disposable).label("disposable"),
                sa.func.count().filter(h.role).label("role"),
                sa.func.count().filter(h.suggestion.is_not(None)).label("typo_suggestions"),
                sa.func.count().filter(h.sunset_at.is_not(None)).label("sunset"),
                sa.func.count().filter(h.soft_bounces_in_a_row > 0).label("soft_bouncing"),
            ).where(h.workspace_id == workspace_id)
        )
    ).one()
    by_reason = {
        row.reason: row.count
        for row in await session.execute(
            sa.select(suppressions.c.reason, sa.func.count().label("count"))
            .where(suppressions.c.workspace_id == workspace_id)
            .group_by(suppressions.c.reason)
        )
    }
    suggestions = [
        {"channel": row.channel, "address": row.address, "suggestion": row.suggestion}
        for row in await session.execute(
            sa.select(h.channel, h.address, h.suggestion)
            .where(h.workspace_id == workspace_id, h.suggestion.is_not(None))
            .order_by(h.address)
            .limit(100)
        )
    ]
    return {**dict(totals._mapping), "suppressed": by_reason, "suggestions": suggestions}
