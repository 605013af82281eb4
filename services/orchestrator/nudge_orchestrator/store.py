"""Orchestrator's tables (schema ``orchestrator``) and the queries on them; never commits.

* ``workflows`` and their immutable published ``workflow_versions`` (a run keeps the version
  it started on);
* ``runs``, ``step_executions`` (one row per (run, step): a step executes once), ``timers``
  (at most one pending wait per run, found by the index on ``due_at``; waits for an event
  are also found by (workspace, contact, event)), ``sends`` (frequency caps and analytics);
* ``contacts``: the orchestrator's copy of what scoring announces on the contacts topic,
  and of the segments the contact is in (from the memberships topic);
* ``api_keys`` (hashed), ``idempotency_keys`` of POST requests, ``templates`` announced
  through the API, and per-workspace ``messaging_settings`` (caps, quiet hours).
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.db import (
    array_param,
    array_rows_of,
    column_lists,
    insert_arrays,
    processed_messages_table,
)
from nudge_orchestrator.domain.broadcasts import (
    ABTest,
    BroadcastGoal,
    BroadcastVariant,
    send_definition,
    split_definition,
)
from nudge_orchestrator.domain.workflows import (
    DateTrait,
    WorkflowDefinition,
    next_date_occurrence,
    trigger_key,
)

SCHEMA = "orchestrator"
metadata = sa.MetaData(schema=SCHEMA)
TIMESTAMP = sa.DateTime(timezone=True)
JSON_OBJECT = sa.text("'{}'::jsonb")
ACTIVE = "active"

workflows = sa.Table(
    "workflows",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    # draft (never published) | active | paused | archived
    sa.Column("status", sa.Text, nullable=False, server_default="active"),
    sa.Column("version", sa.Integer, nullable=False, server_default="0"),
    # The published version new runs start on (0: none yet).
    sa.Column("trigger_kind", sa.Text, nullable=False, server_default=""),
    sa.Column("trigger_key", sa.Text, nullable=False, server_default=""),
    sa.Column("definition", JSONB, nullable=False),
    # The latest definition (the draft; equal to the published one after publishing).
    sa.Column("created_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
    sa.Column("updated_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
    sa.Index("ix_workflows_trigger", "workspace_id", "trigger_kind", "trigger_key"),
)
workflow_versions = sa.Table(
    "workflow_versions",
    metadata,
    sa.Column("workflow_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("definition", JSONB, nullable=False),
    sa.Column("published_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
)
runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("workflow_id", UUID(as_uuid=True), nullable=False),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("contact_id", UUID(as_uuid=True), nullable=False),
    # active | completed | exited | converted | cancelled
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("exclusive", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("variant", sa.Text),
    sa.Column("performed", ARRAY(sa.Text), nullable=False, server_default="{}"),
    # Events the contact performed since the run started (branches and waits read it).
    sa.Column("goal_event", sa.Text),
    sa.Column("contact", JSONB, nullable=False, server_default=JSON_OBJECT),
    # The contact as the trigger saw it (traits, scores), used until a fresher copy exists.
    sa.Column("segment_id", UUID(as_uuid=True)),
    # The segment or list that started the run (segment triggers, broadcasts): analytics.
    sa.Column("started_at", TIMESTAMP, nullable=False),
    sa.Column("finished_at", TIMESTAMP),
    sa.Index("ix_runs_entries", "workflow_id", "contact_id", "started_at"),
    sa.Index(
        "ix_runs_one_active",
        "workflow_id",
        "contact_id",
        unique=True,
        postgresql_where=sa.text("status = 'active' AND exclusive"),
    ),
    sa.Index(
        "ix_runs_active_by_contact",
        "workspace_id",
        "contact_id",
        postgresql_where=sa.text("status = 'active'"),
    ),
    sa.Index("ix_runs_segment", "segment_id", postgresql_where=sa.text("segment_id IS NOT NULL")),
)
step_executions = sa.Table(
    "step_executions",
    metadata,
    sa.Column("run_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("step", sa.Integer, primary_key=True),
    sa.Column("executed_at", TIMESTAMP, nullable=False),
    sa.Column("outcome", sa.Text, nullable=False, server_default=""),
)
timers = sa.Table(
    "timers",
    metadata,
    sa.Column("run_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("contact_id", UUID(as_uuid=True), nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    # The step that is waiting.
    sa.Column("due_at", TIMESTAMP, nullable=False, index=True),
    sa.Column("resume_step", sa.Integer),
    # Where the run goes on when due (None: it ends).
    sa.Column("event", sa.Text),
    sa.Column("event_step", sa.Integer),
    sa.Column("kind", sa.Text, nullable=False),  # wait | event | quiet
    sa.Index(
        "ix_timers_waiting_for_event",
        "workspace_id",
        "contact_id",
        "event",
        postgresql_where=sa.text("event IS NOT NULL"),
    ),
)
date_triggers = sa.Table(
    "date_triggers",
    metadata,
    # The next time a date-trait workflow fires for a contact, written when the contact's
    # trait (or timezone) is learned or changes, and after each firing (yearly).
    sa.Column("workflow_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("contact_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("due_at", TIMESTAMP, nullable=False, index=True),
)
webhooks = sa.Table(
    "webhooks",
    metadata,
    # Outbox of webhook calls (webhook and notify_sales steps): written in the step's
    # transaction, delivered and retried by the webhook worker (claimed with SKIP LOCKED).
    sa.Column("run_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("step", sa.Integer, primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("body", JSONB, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_at", TIMESTAMP),
    # When to try (again); None once delivered or given up.
    sa.Column("status", sa.Text, nullable=False, server_default="pending"),
    # pending | delivered | failed
    sa.Column("last_error", sa.Text),
    sa.Index("ix_webhooks_due", "next_at", postgresql_where=sa.text("next_at IS NOT NULL")),
)
sends = sa.Table(
    "sends",
    metadata,
    sa.Column("run_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("step", sa.Integer, primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("workflow_id", UUID(as_uuid=True), nullable=False),
    sa.Column("contact_id", UUID(as_uuid=True), nullable=False),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("variant", sa.Text),
    sa.Column("idempotency_key", sa.Text, nullable=False, unique=True),
    sa.Column("at", TIMESTAMP, nullable=False),
    sa.Index("ix_sends_caps", "contact_id", "channel", "at"),
    sa.Index("ix_sends_workflow", "workflow_id", "step"),
)
deliveries = sa.Table(
    "deliveries",
    metadata,
    # What became of each message a run requested (from the deliveries topic): one row per
    # (message, status), so a status reported twice counts once.
    sa.Column("run_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("step", sa.Integer, primary_key=True),
    sa.Column("status", sa.Text, primary_key=True),
    sa.Column("at", TIMESTAMP, nullable=False),
)
contacts = sa.Table(
    "contacts",
    metadata,
    sa.Column("contact_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("user_id", sa.Text),
    sa.Column("traits", JSONB, nullable=False, server_default=JSON_OBJECT),
    sa.Column("scores", JSONB, nullable=False, server_default=JSON_OBJECT),
    sa.Column("tags", JSONB, nullable=False, server_default=JSON_OBJECT),
    # {tag: tag score}, as scoring announces them
    sa.Column("stages", JSONB, nullable=False, server_default=JSON_OBJECT),
    # {model: lifecycle stage}
    sa.Column("segments", JSONB, nullable=False, server_default=JSON_OBJECT),
    # {segment id: segment name}, entered adds, exited removes
    sa.Column("updated_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
    sa.Index("ix_contacts_user", "workspace_id", "user_id"),
)
api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False, index=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("prefix", sa.Text, nullable=False),
    sa.Column("hash", sa.Text, nullable=False, unique=True),
    sa.Column("scopes", ARRAY(sa.Text), nullable=False),
    sa.Column("created_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
    sa.Column("revoked_at", TIMESTAMP),
)
idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("workspace_id", sa.Text, primary_key=True),
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("request", sa.Text, nullable=False),
    # Method and path: the same key on another request is a conflict.
    sa.Column("status_code", sa.Integer, nullable=False),
    sa.Column("body", JSONB, nullable=False),
    sa.Column("created_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
)
templates = sa.Table(
    "templates",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False, index=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("definition", JSONB, nullable=False),
    sa.Column("created_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
    sa.Column("updated_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
    sa.Column("deleted_at", TIMESTAMP),
)
messaging_settings = sa.Table(
    "messaging_settings",
    metadata,
    sa.Column("workspace_id", sa.Text, primary_key=True),
    sa.Column("caps", JSONB, nullable=False, server_default=JSON_OBJECT),
    # {channel: {"per_day": n, "per_week": n}} across all workflows, per contact.
    sa.Column("quiet_hours", JSONB),
    # {"start": "21:00", "end": "08:00"} in the contact's timezone (trait ``timezone``).
)
broadcasts = sa.Table(
    "broadcasts",
    metadata,
    # A one-off send to a segment or static list. Its messages are the runs of the one-step
    # workflow with the same id (trigger ``broadcast``), started by the broadcast worker as
    # it pages through the members (ordered by contact id).
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("template_id", UUID(as_uuid=True)),
    # An A/B broadcast's: None until its winner is chosen.
    sa.Column("segment_id", UUID(as_uuid=True), nullable=False),
    sa.Column("send_at", TIMESTAMP, nullable=False),
    sa.Column("rate_per_s", sa.Float),
    sa.Column("goal", JSONB),
    # {"event", "window_s"}: the runs stay open window_s after the message for the goal.
    sa.Column("ab_test", JSONB),
    # domain.broadcasts.ABTest: variants, test_fraction, metric, decide_after_s, alpha.
    sa.Column("status", sa.Text, nullable=False),
    # scheduled | testing (A/B: the test group) | deciding (A/B: waiting for the winner)
    # | sending | sent | cancelled | failed
    sa.Column("after", UUID(as_uuid=True)),
    # The last member of the current pass handed to a run: the next page starts after it.
    sa.Column("members", sa.Integer, nullable=False, server_default="0"),
    # Runs started (test group and the rest).
    sa.Column("test_members", sa.Integer, nullable=False, server_default="0"),
    sa.Column("tested_at", TIMESTAMP),
    # When the test group's last run started: decide_after_s counts from it.
    sa.Column("decision", JSONB),
    # The winner, why (significant | deadline), when, and the counts it was chosen on.
    sa.Column("next_at", TIMESTAMP),
    # When the worker takes it (again): send_at, then paced by rate_per_s; None once over.
    sa.Column("last_error", sa.Text),
    sa.Column("created_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
    sa.Column("started_at", TIMESTAMP),
    sa.Column("finished_at", TIMESTAMP),
    sa.Index("ix_broadcasts_due", "next_at", postgresql_where=sa.text("next_at IS NOT NULL")),
    sa.Index("ix_broadcasts_workspace", "workspace_id", "created_at"),
)
processed_messages = processed_messages_table(metadata)


# --- workflows ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Workflow:
    id: uuid.UUID
    workspace_id: str
    name: str
    status: str
    version: int
    definition: WorkflowDefinition
    created_at: datetime
    updated_at: datetime


def _workflow(row: Any) -> Workflow:
    return Workflow(
        row.id,
        row.workspace_id,
        row.name,
        row.status,
        row.version,
        WorkflowDefinition.model_validate(row.definition),
        row.created_at,
        row.updated_at,
    )


async def create_workflow(
    session: AsyncSession,
    *,
    workspace_id: str,
    workflow_id: uuid.UUID,
    name: str,
    definition: WorkflowDefinition,
    publish: bool = True,
    now: datetime | None = None,
) -> None:
    """Create a workflow; published (version 1, active) unless ``publish`` is false."""
    inserted = await session.execute(
        pg_insert(workflows)
        .values(
            id=workflow_id,
            workspace_id=workspace_id,
            name=name,
            status="draft",
            version=0,
            trigger_kind=definition.trigger.kind,
            trigger_key=trigger_key(definition.trigger),
            definition=definition.model_dump(mode="json", by_alias=True),
        )
        .on_conflict_do_nothing()
        .returning(workflows.c.id)
    )
    if publish and inserted.first() is not None:
        await publish_workflow(session, workflow_id=workflow_id, now=now)


async def get_workflow(
    session: AsyncSession, *, workspace_id: str, workflow_id: uuid.UUID
) -> Workflow | None:
    row = (
        await session.execute(
            sa.select(workflows).where(
                workflows.c.id == workflow_id, workflows.c.workspace_id == workspace_id
            )
        )
    ).first()
    return _workflow(row) if row else None


async def list_workflows(
    session: AsyncSession, *, workspace_id: str, status: str | None, limit: int, offset: int
) -> tuple[list[Workflow], int]:
    """The workspace's workflows, without the broadcasts' own."""
    where = [workflows.c.workspace_id == workspace_id, workflows.c.trigger_kind != "broadcast"]
    if status:
        where.append(workflows.c.status == status)
    total = await session.scalar(sa.select(sa.func.count()).select_from(workflows).where(*where))
    rows = await session.execute(
        sa.select(workflows)
        .where(*where)
        .order_by(workflows.c.created_at, workflows.c.id)
        .limit(limit)
        .offset(offset)
    )
    return [_workflow(row) for row in rows], total or 0


async def update_workflow(
    session: AsyncSession,
    *,
    workflow_id: uuid.UUID,
    name: str | None = None,
    definition: WorkflowDefinition | None = None,
    status: str | None = None,
) -> None:
    values: dict[str, Any] = {"updated_at": sa.func.now()}
    if name is not None:
        values["name"] = name
    if status is not None:
        values["status"] = status
    if definition is not None:
        values["definition"] = definition.model_dump(mode="json", by_alias=True)
    await session.execute(sa.update(workflows).where(workflows.c.id == workflow_id).values(values))


async def publish_workflow(
    session: AsyncSession, *, workflow_id: uuid.UUID, now: datetime | None = None
) -> int:
    """Freeze the current definition as the next version; new runs start on it, runs in
    flight keep theirs. A date-trait workflow is scheduled for the contacts known to have
    the trait (once, here; later changes schedule it per contact). Returns the version."""
    row = (
        await session.execute(
            sa.select(workflows).where(workflows.c.id == workflow_id).with_for_update()
        )
    ).one()
    version: int = row.version + 1
    definition = WorkflowDefinition.model_validate(row.definition)
    await session.execute(
        sa.insert(workflow_versions).values(
            workflow_id=workflow_id, version=version, definition=row.definition
        )
    )
    await session.execute(
        sa.update(workflows)
        .where(workflows.c.id == workflow_id)
        .values(
            version=version,
            status="active" if row.status in ("draft", "active") else row.status,
            trigger_kind=definition.trigger.kind,
            trigger_key=trigger_key(definition.trigger),
            updated_at=sa.func.now(),
        )
    )
    trigger = definition.trigger
    if isinstance(trigger, DateTrait):
        at = now or datetime.now(UTC)
        for contact_id, traits in await contacts_with_trait(
            session, workspace_id=row.workspace_id, trait=trigger.trait
        ):
            timezone = traits.get("timezone") if isinstance(traits.get("timezone"), str) else None
            await put_date_trigger(
                session,
                workflow_id=workflow_id,
                contact_id=contact_id,
                workspace_id=row.workspace_id,
                due_at=next_date_occurrence(trigger, traits.get(trigger.trait), timezone, at),
            )
    return version


async def workflow_names(
    session: AsyncSession, *, workflow_ids: list[uuid.UUID]
) -> dict[uuid.UUID, str]:
    rows = await session.execute(_WORKFLOW_NAMES, {"ids": workflow_ids})
    return {row.id: row.name for row in rows}


# The statements of the consumers' and the timer worker's paths are built once, here: a
# statement built per call is coerced, keyed and (with an IN list) expanded again each
# time, which cost more CPU than running it.
_WORKFLOW_NAMES = sa.select(workflows.c.id, workflows.c.name).where(
    workflows.c.id == sa.any_(array_param("ids", workflows.c.id.type))
)


Messaging = tuple[dict[str, Any], dict[str, Any] | None]
"""A workspace's messaging settings: caps and quiet hours (``get_messaging_settings``)."""


@dataclass(frozen=True)
class Published:
    id: uuid.UUID
    workspace_id: str
    version: int
    definition: WorkflowDefinition
    messaging: Messaging | None = None
    """Its workspace's messaging settings, when read with the workflow (a trigger's lookup,
    :func:`workflows_triggered_by`), so starting its runs need not read them again."""


_versions_cache: dict[tuple[uuid.UUID, int], WorkflowDefinition] = {}


async def version_definition(
    session: AsyncSession, *, workflow_id: uuid.UUID, version: int
) -> WorkflowDefinition:
    """A published version (immutable, so cached in the process)."""
    key = (workflow_id, version)
    cached = _versions_cache.get(key)
    if cached is None:
        raw = await session.scalar(
            sa.select(workflow_versions.c.definition).where(
                workflow_versions.c.workflow_id == workflow_id,
                workflow_versions.c.version == version,
            )
        )
        cached = _versions_cache[key] = WorkflowDefinition.model_validate(raw)
    return cached


async def triggered_workflows(
    session: AsyncSession, *, workspace_id: str, kind: str, key: str | None = None
) -> list[Published]:
    """Active workflows whose published trigger listens to (kind, key); without ``key``,
    every active workflow of that trigger kind."""
    found = await workflows_triggered_by(session, workspace_ids={workspace_id}, kinds={kind})
    return [
        workflow
        for (_, _, trigger_key), published in found.items()
        if key is None or trigger_key == key
        for workflow in published
    ]


TriggerKey = tuple[str, str, str]
"""(workspace id, trigger kind, trigger key)"""


async def workflows_triggered_by(
    session: AsyncSession, *, workspace_ids: set[str], kinds: set[str]
) -> dict[TriggerKey, list[Published]]:
    """Every active workflow of these workspaces whose trigger is of one of ``kinds``, by
    what its trigger listens to: one query for a whole batch of messages."""
    rows = await session.execute(
        _TRIGGERED_BY, {"workspace_ids": list(workspace_ids), "kinds": list(kinds)}
    )
    return await _published(session, [tuple(row) for row in rows])


async def _published(
    session: AsyncSession, rows: Sequence[Sequence[Any]]
) -> dict[TriggerKey, list[Published]]:
    """Rows of ``_TRIGGERED_BY``'s columns as the workflows, by what their trigger listens to."""
    found: dict[TriggerKey, list[Published]] = {}
    for id_, workspace_id, version, kind, key, caps, quiet in rows:
        definition = await version_definition(session, workflow_id=id_, version=version)
        found.setdefault((workspace_id, kind, key), []).append(
            Published(id_, workspace_id, version, definition, (caps or {}, quiet))
        )
    return found


def _and_triggers(lookup: sa.Select[Any]) -> sa.CompoundSelect[Any]:
    """``lookup``'s rows and ``_TRIGGERED_BY``'s in one statement (one round trip where a
    batch needs both): each row has the columns of both, the other's null. Executed with
    ``lookup``'s parameters and ``workspace_ids`` and ``kinds``; :func:`_split_triggers`
    parts the rows again."""
    own = list(lookup.selected_columns)
    theirs = list(_TRIGGERED_BY.selected_columns)
    return sa.union_all(
        lookup.add_columns(
            *(sa.cast(sa.null(), column.type).label(f"t_{column.name}") for column in theirs)
        ),
        _TRIGGERED_BY.with_only_columns(
            *(sa.cast(sa.null(), column.type).label(column.name) for column in own),
            *(column.label(f"t_{column.name}") for column in theirs),
        ),
    )


async def _split_triggers(
    session: AsyncSession, rows: sa.Result[Any], width: int
) -> tuple[list[Sequence[Any]], dict[TriggerKey, list[Published]]]:
    """The rows of an :func:`_and_triggers` statement: the lookup's (its ``width`` columns),
    and the workflows."""
    own: list[Sequence[Any]] = []
    workflows: list[Sequence[Any]] = []
    for row in rows:
        if row[width] is None:
            own.append(row[:width])
        else:
            workflows.append(row[width:])
    return own, await _published(session, workflows)


_TRIGGERED_BY = (
    sa.select(
        workflows.c.id,
        workflows.c.workspace_id,
        workflows.c.version,
        workflows.c.trigger_kind,
        workflows.c.trigger_key,
        messaging_settings.c.caps,
        messaging_settings.c.quiet_hours.label("quiet"),
    )
    .select_from(
        workflows.outerjoin(
            messaging_settings, messaging_settings.c.workspace_id == workflows.c.workspace_id
        )
    )
    .where(
        workflows.c.workspace_id == sa.any_(array_param("workspace_ids", sa.Text())),
        workflows.c.trigger_kind == sa.any_(array_param("kinds", sa.Text())),
        workflows.c.status == "active",
        workflows.c.version > 0,
    )
)


async def cancel_runs(session: AsyncSession, *, workflow_id: uuid.UUID, at: datetime) -> int:
    """End every active run of a workflow (archiving) and drop their timers."""
    ended = await session.execute(
        sa.update(runs)
        .where(runs.c.workflow_id == workflow_id, runs.c.status == ACTIVE)
        .values(status="cancelled", finished_at=at)
        .returning(runs.c.id)
    )
    ids = list(ended.scalars())
    if ids:
        await session.execute(sa.delete(timers).where(timers.c.run_id.in_(ids)))
    return len(ids)


# --- runs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    id: uuid.UUID
    workflow_id: uuid.UUID
    version: int
    workspace_id: str
    contact_id: uuid.UUID
    status: str
    variant: str | None
    performed: list[str]
    contact: dict[str, Any]
    started_at: datetime


def _run(row: Any) -> Run:
    return Run(
        row.id,
        row.workflow_id,
        row.version,
        row.workspace_id,
        row.contact_id,
        row.status,
        row.variant,
        list(row.performed),
        row.contact,
        row.started_at,
    )


def entry_allowed(
    previous_started_at: datetime | None,
    active: bool,
    *,
    rule: str,
    cooldown_s: int | None,
    concurrent: bool,
    at: datetime,
) -> bool:
    """The entry rule, given the contact's latest run of the workflow (its start, and
    whether a run of it is active)."""
    if previous_started_at is None:
        return True
    if rule == "once":
        return False
    if not concurrent and active:
        return False
    if rule == "cooldown" and cooldown_s is not None:
        return (at - previous_started_at).total_seconds() >= cooldown_s
    return True


async def entry_states(
    session: AsyncSession, *, workflow_id: uuid.UUID, contact_ids: list[uuid.UUID]
) -> dict[uuid.UUID, tuple[datetime, bool]]:
    """For each contact that ever entered the workflow: (latest start, any run active), in
    one query on the index (workflow, contact, started_at)."""
    rows = await session.execute(
        _ENTRY_STATES, {"workflow_id": workflow_id, "contact_ids": contact_ids}
    )
    return {row[0]: (row[1], bool(row[2])) for row in rows}


_ENTRY_STATES = (
    sa.select(
        runs.c.contact_id,
        sa.func.max(runs.c.started_at),
        sa.func.bool_or(runs.c.status == ACTIVE),
    )
    .where(
        runs.c.workflow_id == sa.bindparam("workflow_id"),
        runs.c.contact_id == sa.any_(array_param("contact_ids", runs.c.contact_id.type)),
    )
    .group_by(runs.c.contact_id)
)


async def start_runs(session: AsyncSession, rows: list[dict[str, Any]]) -> set[uuid.UUID]:
    """Insert runs (the columns of ``runs``); returns the ids inserted. A run that exists
    (a replayed trigger) or a second active exclusive run (the partial unique index) is
    not inserted."""
    result = await session.execute(_START_RUNS, column_lists(rows))
    return set(result.scalars())


_START_RUNS = (
    insert_arrays(
        runs,
        [
            "id",
            "workflow_id",
            "version",
            "workspace_id",
            "contact_id",
            "status",
            "exclusive",
            "goal_event",
            "contact",
            "segment_id",
            "started_at",
        ],
    )
    .on_conflict_do_nothing()
    .returning(runs.c.id)
)


async def get_runs(
    session: AsyncSession, *, run_ids: list[uuid.UUID], lock: bool = False
) -> dict[uuid.UUID, Run]:
    query = _RUNS_LOCKED if lock else _RUNS
    return {row.id: _run(row) for row in await session.execute(query, {"run_ids": run_ids})}


_RUNS = sa.select(runs).where(runs.c.id == sa.any_(array_param("run_ids", runs.c.id.type)))
_RUNS_LOCKED = _RUNS.with_for_update()


async def executed_steps(
    session: AsyncSession, *, run_ids: list[uuid.UUID]
) -> set[tuple[uuid.UUID, int]]:
    rows = await session.execute(_EXECUTED_STEPS, {"run_ids": run_ids})
    return {(row.run_id, row.step) for row in rows}


_EXECUTED_STEPS = sa.select(step_executions.c.run_id, step_executions.c.step).where(
    step_executions.c.run_id == sa.any_(array_param("run_ids", step_executions.c.run_id.type))
)


@dataclass
class Writes:
    """What advancing a set of runs writes, flushed with a few multi-row statements."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    sends: list[dict[str, Any]] = field(default_factory=list)
    timers: list[dict[str, Any]] = field(default_factory=list)
    variants: dict[str, list[uuid.UUID]] = field(default_factory=dict)
    finished: dict[str, list[uuid.UUID]] = field(default_factory=dict)
    webhooks: list[dict[str, Any]] = field(default_factory=list)


async def flush(
    session: AsyncSession, writes: Writes, *, at: datetime, fresh: bool = False
) -> None:
    """One statement (``_FLUSH``) whatever was decided, and one more per split variant.
    ``fresh``: the runs were started in this transaction, so none has a timer to drop."""
    for variant, ids in writes.variants.items():
        await session.execute(_SET_VARIANT, {"run_ids": ids, "to_variant": variant})
    finished = [(run_id, status) for status, ids in writes.finished.items() for run_id in ids]
    if not (writes.steps or writes.sends or writes.timers or writes.webhooks or finished):
        return
    await session.execute(
        _FLUSH,
        {
            **_prefixed("st_", _STEP_NAMES, writes.steps),
            **_prefixed("se_", _SEND_NAMES, writes.sends),
            **_prefixed("ti_", _TIMER_NAMES, writes.timers),
            **_prefixed("wh_", _WEBHOOK_NAMES, writes.webhooks),
            "fi_run_id": [run_id for run_id, _ in finished],
            "fi_status": [status for _, status in finished],
            "fi_at": at,
            "dr_run_ids": [] if fresh else [run_id for run_id, _ in finished],
        },
    )


def _prefixed(prefix: str, names: list[str], rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows as one list per column, named ``<prefix><column>`` (empty lists for no rows)."""
    return {prefix + name: [row[name] for row in rows] for name in names}


def _insert_new(table: sa.Table, names: list[str], prefix: str = "") -> sa.Insert:
    return insert_arrays(table, names, prefix=prefix).on_conflict_do_nothing()


_STEP_NAMES = ["run_id", "step", "executed_at", "outcome"]
_SEND_NAMES = [
    "run_id",
    "step",
    "workspace_id",
    "workflow_id",
    "contact_id",
    "channel",
    "variant",
    "idempotency_key",
    "at",
]
_TIMER_NAMES = [
    "run_id",
    "workspace_id",
    "contact_id",
    "step",
    "due_at",
    "resume_step",
    "event",
    "event_step",
    "kind",
]
_WEBHOOK_NAMES = ["run_id", "step", "workspace_id", "url", "body", "next_at"]
_ANY_RUN = runs.c.id == sa.any_(array_param("run_ids", runs.c.id.type))
_SET_VARIANT = sa.update(runs).where(_ANY_RUN).values(variant=sa.bindparam("to_variant"))
_FINISHED = array_rows_of([("fi_run_id", runs.c.id.type), ("fi_status", sa.Text())])
_FLUSH: sa.Select[Any] = sa.select(sa.literal_column("1")).add_cte(
    # Data-modifying CTEs all run, to completion, whether read or not (an empty array is
    # no row). A run is in at most one part that touches ``runs`` or ``timers`` per flush:
    # a walk ends waiting (a new timer) or finished (its timer dropped), never both.
    _insert_new(step_executions, _STEP_NAMES, "st_").cte("stepped"),
    _insert_new(sends, _SEND_NAMES, "se_").cte("sent"),
    _insert_new(timers, _TIMER_NAMES, "ti_").cte("timed"),
    _insert_new(webhooks, _WEBHOOK_NAMES, "wh_").cte("hooked"),
    sa.update(runs)
    .where(runs.c.id == _FINISHED.c.fi_run_id, runs.c.status == ACTIVE)
    .values(status=_FINISHED.c.fi_status, finished_at=sa.bindparam("fi_at", type_=TIMESTAMP))
    .cte("finished"),
    sa.delete(timers)
    .where(timers.c.run_id == sa.any_(array_param("dr_run_ids", timers.c.run_id.type)))
    .cte("dropped"),
)


@dataclass(frozen=True)
class PendingWebhook:
    run_id: uuid.UUID
    step: int
    url: str
    body: dict[str, Any]
    attempts: int


async def claim_due_webhooks(
    session: AsyncSession, *, now: datetime, limit: int
) -> list[PendingWebhook]:
    """Webhooks due for an attempt, locked (SKIP LOCKED) until this transaction ends."""
    rows = await session.execute(_DUE_WEBHOOKS, {"now": now, "limit": limit})
    return [PendingWebhook(r.run_id, r.step, r.url, r.body, r.attempts) for r in rows]


_DUE_WEBHOOKS = (
    sa.select(webhooks)
    .where(webhooks.c.next_at <= sa.bindparam("now"))
    .order_by(webhooks.c.next_at)
    .limit(sa.bindparam("limit", type_=sa.Integer))
    .with_for_update(skip_locked=True)
)


async def webhook_attempted(
    session: AsyncSession,
    *,
    run_id: uuid.UUID,
    step: int,
    status: str,
    next_at: datetime | None,
    error: str | None,
) -> None:
    await session.execute(
        sa.update(webhooks)
        .where(webhooks.c.run_id == run_id, webhooks.c.step == step)
        .values(attempts=webhooks.c.attempts + 1, status=status, next_at=next_at, last_error=error)
    )


async def active_runs_of(
    session: AsyncSession, *, workspace_id: str, contact_id: uuid.UUID
) -> list[Run]:
    rows = await session.execute(
        sa.select(runs)
        .where(
            runs.c.workspace_id == workspace_id,
            runs.c.contact_id == contact_id,
            runs.c.status == ACTIVE,
        )
        .with_for_update()
    )
    return [_run(row) for row in rows]


async def note_performed(session: AsyncSession, *, run_ids: list[uuid.UUID], event: str) -> None:
    await session.execute(
        sa.update(runs)
        .where(runs.c.id.in_(run_ids), sa.not_(sa.literal(event) == sa.any_(runs.c.performed)))
        .values(performed=runs.c.performed + sa.cast([event], ARRAY(sa.Text)))
    )


async def finish_run(
    session: AsyncSession, *, run_id: uuid.UUID, status: str, at: datetime
) -> None:
    await session.execute(
        sa.update(runs)
        .where(runs.c.id == run_id, runs.c.status == ACTIVE)
        .values(status=status, finished_at=at)
    )
    await session.execute(sa.delete(timers).where(timers.c.run_id == run_id))


# --- timers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timer:
    run_id: uuid.UUID
    workspace_id: str
    contact_id: uuid.UUID
    step: int
    due_at: datetime
    resume_step: int | None
    event: str | None
    event_step: int | None
    kind: str


def _timer(row: Any) -> Timer:
    return Timer(
        row.run_id,
        row.workspace_id,
        row.contact_id,
        row.step,
        row.due_at,
        row.resume_step,
        row.event,
        row.event_step,
        row.kind,
    )


async def claim_due_timers(session: AsyncSession, *, now: datetime, limit: int) -> list[Timer]:
    """Due timers, deleted and locked by this transaction: a timer another replica holds is
    skipped, and a crash before the commit brings the timer back. The index on ``due_at``
    finds them without scanning."""
    rows = await session.execute(_CLAIM_TIMERS, {"now": now, "limit": limit})
    return sorted((_timer(row) for row in rows), key=lambda t: t.due_at)


_CLAIM_TIMERS = (
    sa.delete(timers)
    .where(
        timers.c.run_id.in_(
            sa.select(timers.c.run_id)
            .where(timers.c.due_at <= sa.bindparam("now"))
            .order_by(timers.c.due_at)
            .limit(sa.bindparam("limit", type_=sa.Integer))
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
    )
    .returning(timers)
)


async def claim_event_waits(
    session: AsyncSession, *, workspace_id: str, contact_id: uuid.UUID, event: str
) -> list[Timer]:
    """Waits of this contact for ``event``, deleted by this transaction. Blocks (rather
    than skips) a wait a timer worker is firing: once it commits, the wait is gone and the
    event is late."""
    rows = await session.execute(
        sa.delete(timers)
        .where(
            timers.c.workspace_id == workspace_id,
            timers.c.contact_id == contact_id,
            timers.c.event == event,
        )
        .returning(timers)
    )
    return [_timer(row) for row in rows]


# --- date triggers -----------------------------------------------------------------------


async def put_date_trigger(
    session: AsyncSession,
    *,
    workflow_id: uuid.UUID,
    contact_id: uuid.UUID,
    workspace_id: str,
    due_at: datetime | None,
) -> None:
    """Schedule (or, with None, unschedule) a date-trait workflow for a contact."""
    if due_at is None:
        await session.execute(
            sa.delete(date_triggers).where(
                date_triggers.c.workflow_id == workflow_id,
                date_triggers.c.contact_id == contact_id,
            )
        )
        return
    statement = pg_insert(date_triggers).values(
        workflow_id=workflow_id, contact_id=contact_id, workspace_id=workspace_id, due_at=due_at
    )
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[date_triggers.c.workflow_id, date_triggers.c.contact_id],
            set_={"due_at": statement.excluded.due_at},
        )
    )


@dataclass(frozen=True)
class DateTrigger:
    workflow_id: uuid.UUID
    contact_id: uuid.UUID
    workspace_id: str
    due_at: datetime


async def claim_due_date_triggers(
    session: AsyncSession, *, now: datetime, limit: int
) -> list[DateTrigger]:
    """Due date triggers, deleted and locked by this transaction (as timers are)."""
    rows = await session.execute(_CLAIM_DATE_TRIGGERS, {"now": now, "limit": limit})
    return [DateTrigger(r.workflow_id, r.contact_id, r.workspace_id, r.due_at) for r in rows]


_CLAIM_DATE_TRIGGERS = (
    sa.delete(date_triggers)
    .where(
        sa.tuple_(date_triggers.c.workflow_id, date_triggers.c.contact_id).in_(
            sa.select(date_triggers.c.workflow_id, date_triggers.c.contact_id)
            .where(date_triggers.c.due_at <= sa.bindparam("now"))
            .order_by(date_triggers.c.due_at)
            .limit(sa.bindparam("limit", type_=sa.Integer))
            .with_for_update(skip_locked=True)
        )
    )
    .returning(date_triggers)
)


async def contacts_with_trait(
    session: AsyncSession, *, workspace_id: str, trait: str
) -> list[tuple[uuid.UUID, dict[str, Any]]]:
    """Contacts of a workspace that have ``trait`` (when a date workflow is published)."""
    rows = await session.execute(
        sa.select(contacts.c.contact_id, contacts.c.traits).where(
            contacts.c.workspace_id == workspace_id, contacts.c.traits.has_key(trait)
        )
    )
    return [(row.contact_id, row.traits) for row in rows]


# --- sends, caps --------------------------------------------------------------------------


async def record_send(
    session: AsyncSession,
    *,
    run: Run,
    step: int,
    channel: str,
    variant: str | None,
    idempotency_key: str,
    at: datetime,
) -> None:
    await session.execute(
        pg_insert(sends)
        .values(
            run_id=run.id,
            step=step,
            workspace_id=run.workspace_id,
            workflow_id=run.workflow_id,
            contact_id=run.contact_id,
            channel=channel,
            variant=variant,
            idempotency_key=idempotency_key,
            at=at,
        )
        .on_conflict_do_nothing()
    )


async def recent_sends(
    session: AsyncSession, *, contact_ids: list[uuid.UUID], since: datetime
) -> list[tuple[uuid.UUID, str, datetime]]:
    """(contact, channel, at) of every send to these contacts since ``since`` (caps)."""
    rows = await session.execute(_RECENT_SENDS, {"contact_ids": contact_ids, "since": since})
    return [(row.contact_id, row.channel, row.at) for row in rows]


_RECENT_SENDS = sa.select(sends.c.contact_id, sends.c.channel, sends.c.at).where(
    sends.c.contact_id == sa.any_(array_param("contact_ids", sends.c.contact_id.type)),
    sends.c.at > sa.bindparam("since"),
)


async def get_messaging_settings(
    session: AsyncSession, *, workspace_id: str
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    row = (await session.execute(_MESSAGING_SETTINGS, {"workspace_id": workspace_id})).first()
    return (row.caps, row.quiet_hours) if row else ({}, None)


_MESSAGING_SETTINGS = sa.select(messaging_settings.c.caps, messaging_settings.c.quiet_hours).where(
    messaging_settings.c.workspace_id == sa.bindparam("workspace_id")
)


async def put_messaging_settings(
    session: AsyncSession,
    *,
    workspace_id: str,
    caps: dict[str, Any],
    quiet_hours: dict[str, Any] | None,
) -> None:
    statement = pg_insert(messaging_settings).values(
        workspace_id=workspace_id, caps=caps, quiet_hours=quiet_hours
    )
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[messaging_settings.c.workspace_id],
            set_={"caps": statement.excluded.caps, "quiet_hours": statement.excluded.quiet_hours},
        )
    )


# --- contacts (the orchestrator's copy) ---------------------------------------------------


@dataclass(frozen=True)
class ContactCopy:
    """What the orchestrator keeps of a contact, as its last ``contact.updated`` said;
    ``tags`` and ``stages`` are None when that update did not announce them."""

    contact_id: uuid.UUID
    workspace_id: str
    user_id: str | None
    traits: dict[str, Any]
    scores: dict[str, int]
    tags: dict[str, int] | None
    stages: dict[str, str] | None


async def set_contact_stage(
    session: AsyncSession, *, contact_id: uuid.UUID, model: str, stage: str
) -> None:
    await session.execute(
        sa.update(contacts)
        .where(contacts.c.contact_id == contact_id)
        .values(stages=contacts.c.stages.op("||")(sa.cast({model: stage}, JSONB)))
    )


@dataclass(frozen=True)
class Membership:
    contact_id: uuid.UUID
    workspace_id: str
    segment_id: uuid.UUID
    segment_name: str
    entered: bool
    user_id: str | None = None
    traits: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class MembershipsApplied:
    workflows: dict[TriggerKey, list[Published]]
    """The workflows the batch's kinds of change trigger in its workspaces."""
    copies: dict[uuid.UUID, dict[str, Any]]
    """The changed contacts' copies as they are now (what :func:`get_contacts` reads next
    in this transaction, as their rows stay locked); none when no workflow is triggered."""
    entry_states: dict[tuple[uuid.UUID, uuid.UUID], tuple[datetime, bool]]
    """:func:`entry_states` of the changed contacts in those workflows, by (workflow,
    contact)."""


async def apply_memberships(
    session: AsyncSession, changes: list[Membership], *, kinds: set[str]
) -> MembershipsApplied:
    """Entries add the segment to the copy's ``segments`` (a contact not copied yet is
    copied from the change's snapshot), exits remove it (each contact at most once), and
    what starting the triggered runs reads is read: the workflows triggered by one of
    ``kinds`` (:func:`workflows_triggered_by`), the copies and the contacts' entry states
    in them. One statement (``_APPLY_MEMBERSHIPS``) for a whole batch."""
    entries = [c for c in changes if c.entered]
    exits = [c for c in changes if not c.entered]
    rows = await session.execute(
        _APPLY_MEMBERSHIPS,
        {
            "e_contact_id": [c.contact_id for c in entries],
            "e_workspace_id": [c.workspace_id for c in entries],
            "e_user_id": [c.user_id for c in entries],
            "e_traits": [c.traits for c in entries],
            "e_scores": [c.scores for c in entries],
            "e_segments": [{str(c.segment_id): c.segment_name} for c in entries],
            "contact": [c.contact_id for c in exits],
            "segment": [str(c.segment_id) for c in exits],
            "workspace_ids": list({c.workspace_id for c in changes}),
            "kinds": list(kinds),
            "changed": [c.contact_id for c in changes],
        },
    )
    copies: dict[uuid.UUID, dict[str, Any]] = {}
    workflows: list[Sequence[Any]] = []
    states: dict[tuple[uuid.UUID, uuid.UUID], tuple[datetime, bool]] = {}
    for part, *values in rows:
        if part == _COPY_PART:
            row = values[: len(_COPY_COLUMNS)]
            copies[row[0]] = _contact(_CopyRow(*row))
        elif part == _WORKFLOW_PART:
            workflows.append(values[len(_COPY_COLUMNS) : len(_COPY_COLUMNS) + 7])
        else:
            workflow_id, contact_id, started_at, active = values[-4:]
            states[workflow_id, contact_id] = (started_at, bool(active))
    return MembershipsApplied(await _published(session, workflows), copies, states)


class _CopyRow(NamedTuple):
    contact_id: uuid.UUID
    user_id: str | None
    traits: dict[str, Any]
    scores: dict[str, int]
    tags: dict[str, int]
    stages: dict[str, str]
    segments: dict[str, str]


def _enter_segments() -> sa.Insert:
    # its parameters are prefixed: the exits' update in the same statement would take
    # parameters named after the table's columns as values to set
    statement = insert_arrays(
        contacts,
        ["contact_id", "workspace_id", "user_id", "traits", "scores", "segments"],
        prefix="e_",
    )
    return statement.on_conflict_do_update(
        index_elements=[contacts.c.contact_id],
        set_={
            "segments": contacts.c.segments.op("||")(statement.excluded.segments),
            "updated_at": sa.func.now(),
        },
    )


_ENTER_SEGMENTS = _enter_segments()
_GONE = array_rows_of([("contact", UUID(as_uuid=True)), ("segment", sa.Text())])
_EXIT_SEGMENTS = (
    sa.update(contacts)
    .where(contacts.c.contact_id == _GONE.c.contact)
    .values(segments=contacts.c.segments.op("-")(_GONE.c.segment), updated_at=sa.func.now())
)
_COPY_COLUMNS = (
    contacts.c.contact_id,
    contacts.c.user_id,
    contacts.c.traits,
    contacts.c.scores,
    contacts.c.tags,
    contacts.c.stages,
    contacts.c.segments,
)
_COPY_PART, _WORKFLOW_PART, _STATE_PART = 1, 2, 3


def _apply_memberships() -> sa.CompoundSelect[Any]:
    """The entries' upsert and the exits' update (returning the copies), the trigger
    lookup and the entry states, as one ``UNION ALL``: each row is a part number and every
    part's columns, the other parts' null. Copies are returned only when a workflow is
    triggered (what a batch that starts nothing would decode for nothing)."""
    entered = _ENTER_SEGMENTS.returning(*_COPY_COLUMNS).cte("entered")
    exited = _EXIT_SEGMENTS.returning(*_COPY_COLUMNS).cte("exited")
    triggered = _TRIGGERED_BY.cte("triggered")
    states = (
        sa.select(
            runs.c.workflow_id,
            runs.c.contact_id,
            sa.func.max(runs.c.started_at),
            sa.func.bool_or(runs.c.status == ACTIVE),
        )
        .select_from(runs.join(triggered, runs.c.workflow_id == triggered.c.id))
        .where(runs.c.contact_id == sa.any_(array_param("changed", runs.c.contact_id.type)))
        .group_by(runs.c.workflow_id, runs.c.contact_id)
        .subquery("states")
    )
    layout = [
        *((f"c_{column.name}", column.type) for column in _COPY_COLUMNS),
        *((f"t_{column.name}", column.type) for column in _TRIGGERED_BY.selected_columns),
        ("s_workflow_id", runs.c.workflow_id.type),
        ("s_contact_id", runs.c.contact_id.type),
        ("s_started_at", TIMESTAMP),
        ("s_active", sa.Boolean()),
    ]

    def part(number: int, first: int, columns: Sequence[Any]) -> list[Any]:
        """The part's number and ``columns`` at ``first`` in the layout, nulls elsewhere."""
        values: list[Any] = [sa.literal(number, sa.Integer()).label("part")]
        for index, (name, type_) in enumerate(layout):
            inside = first <= index < first + len(columns)
            value = columns[index - first] if inside else sa.cast(sa.null(), type_)
            values.append(value.label(name))
        return values

    any_triggered = sa.exists(sa.select(triggered.c.id))
    copies_width = len(_COPY_COLUMNS)
    return sa.union_all(
        *(
            sa.select(*part(_COPY_PART, 0, list(changed.c))).where(any_triggered)
            for changed in (entered, exited)
        ),
        sa.select(*part(_WORKFLOW_PART, copies_width, list(triggered.c))),
        sa.select(*part(_STATE_PART, copies_width + len(triggered.c), list(states.c))),
    )


_APPLY_MEMBERSHIPS = _apply_memberships()


def _contact(row: Any) -> dict[str, Any]:
    return {
        "user_id": row.user_id,
        "traits": row.traits,
        "scores": row.scores,
        "tags": row.tags,
        "stages": row.stages,
        "segments": sorted(row.segments.values()),
    }


async def get_contact(session: AsyncSession, *, contact_id: uuid.UUID) -> dict[str, Any] | None:
    row = (await session.execute(_CONTACT, {"contact_id": contact_id})).first()
    return _contact(row) if row else None


async def get_contacts(
    session: AsyncSession, *, contact_ids: list[uuid.UUID]
) -> dict[uuid.UUID, dict[str, Any]]:
    rows = await session.execute(_CONTACTS, {"contact_ids": contact_ids})
    return {row.contact_id: _contact(row) for row in rows}


async def profiles(
    session: AsyncSession, *, contact_ids: list[uuid.UUID], workspace_ids: set[str], kinds: set[str]
) -> tuple[dict[uuid.UUID, dict[str, Any]], dict[TriggerKey, list[Published]]]:
    """The copy's ``traits`` and ``scores`` of these contacts (what a ``contact.updated``
    is compared with), without the columns :func:`get_contacts` decodes besides; and the
    workflows of ``workspace_ids`` triggered by one of ``kinds``
    (:func:`workflows_triggered_by`), in the same statement."""
    rows = await session.execute(
        _PROFILES,
        {"contact_ids": contact_ids, "workspace_ids": list(workspace_ids), "kinds": list(kinds)},
    )
    found, workflows = await _split_triggers(session, rows, 3)
    return {
        contact_id: {"traits": traits, "scores": scores} for contact_id, traits, scores in found
    }, workflows


_PROFILES = _and_triggers(
    sa.select(contacts.c.contact_id, contacts.c.traits, contacts.c.scores).where(
        contacts.c.contact_id == sa.any_(array_param("contact_ids", contacts.c.contact_id.type))
    )
)
_COPY = sa.select(*_COPY_COLUMNS)
_CONTACT = _COPY.where(contacts.c.contact_id == sa.bindparam("contact_id"))
_CONTACTS = _COPY.where(
    contacts.c.contact_id == sa.any_(array_param("contact_ids", contacts.c.contact_id.type))
)


async def upsert_contacts(session: AsyncSession, copies: Sequence[ContactCopy]) -> None:
    """Each copy's traits and scores replace the stored ones; its ``tags`` and ``stages``
    too, unless None (not announced: the stored ones are kept). One statement for the
    copies that announce the same of the two (each contact at most once)."""
    groups: dict[tuple[bool, bool], list[ContactCopy]] = {}
    for copy in copies:
        groups.setdefault((copy.tags is not None, copy.stages is not None), []).append(copy)
    for (tags, stages), group in groups.items():
        columns: dict[str, list[Any]] = {
            "contact_id": [copy.contact_id for copy in group],
            "workspace_id": [copy.workspace_id for copy in group],
            "user_id": [copy.user_id for copy in group],
            "traits": [copy.traits for copy in group],
            "scores": [copy.scores for copy in group],
        }
        if tags:
            columns["tags"] = [copy.tags for copy in group]
        if stages:
            columns["stages"] = [copy.stages for copy in group]
        await session.execute(_UPSERT_CONTACTS[tags, stages], columns)


def _upsert_contacts(tags: bool, stages: bool) -> sa.Insert:
    announced = [name for name, given in (("tags", tags), ("stages", stages)) if given]
    statement = insert_arrays(
        contacts, ["contact_id", "workspace_id", "user_id", "traits", "scores", *announced]
    )
    return statement.on_conflict_do_update(
        index_elements=[contacts.c.contact_id],
        set_={
            "user_id": sa.func.coalesce(statement.excluded.user_id, contacts.c.user_id),
            "traits": statement.excluded.traits,
            "scores": statement.excluded.scores,
            **{name: statement.excluded[name] for name in announced},
            "updated_at": sa.func.now(),
        },
    )


_UPSERT_CONTACTS = {
    (tags, stages): _upsert_contacts(tags, stages)
    for tags in (False, True)
    for stages in (False, True)
}


class Identity(NamedTuple):
    """Who performed an event: its workspace, its user id (None if anonymous), and the
    contact id scoring gives a contact first seen with this identity (which derives from
    the other two, so it identifies the identity)."""

    workspace_id: str
    user_id: str | None
    first_seen_id: uuid.UUID


async def event_contacts(
    session: AsyncSession, *, identities: set[Identity], kinds: set[str]
) -> tuple[dict[uuid.UUID, tuple[uuid.UUID, bool]], dict[TriggerKey, list[Published]]]:
    """For each identity, by its ``first_seen_id``: its contact (the copy's with this user
    id, the lowest id if it has several, else ``first_seen_id``) and whether that contact
    is in an active run; and the workflows of the identities' workspaces triggered by one
    of ``kinds`` (:func:`workflows_triggered_by`). One statement for a batch of events, on
    the indexes (workspace, user id) of the copy and (workspace, contact) of the active
    runs."""
    given = list(identities)
    rows = await session.execute(
        _EVENT_CONTACTS,
        {
            "workspace_id": [i.workspace_id for i in given],
            "user_id": [i.user_id for i in given],
            "first_seen_id": [i.first_seen_id for i in given],
            "workspace_ids": list({i.workspace_id for i in given}),
            "kinds": list(kinds),
        },
    )
    found, workflows = await _split_triggers(session, rows, 3)
    return {first_seen: (contact_id, in_run) for first_seen, contact_id, in_run in found}, workflows


def _event_contacts() -> sa.Select[Any]:
    given = array_rows_of(
        [
            ("workspace_id", sa.Text()),
            ("user_id", sa.Text()),
            ("first_seen_id", UUID(as_uuid=True)),
        ]
    )
    known = (
        sa.select(contacts.c.contact_id)
        .where(
            contacts.c.workspace_id == given.c.workspace_id,
            contacts.c.user_id == given.c.user_id,
        )
        .order_by(contacts.c.contact_id)
        .limit(1)
        .lateral()
    )
    contact_id = sa.func.coalesce(known.c.contact_id, given.c.first_seen_id)
    in_run = sa.exists().where(
        runs.c.workspace_id == given.c.workspace_id,
        runs.c.contact_id == contact_id,
        # a literal, not a parameter: the index of active runs is partial on it
        runs.c.status == sa.literal_column(f"'{ACTIVE}'"),
    )
    return sa.select(
        given.c.first_seen_id,
        contact_id.label("contact_id"),
        in_run.label("in_run"),
    ).select_from(given.outerjoin(known, sa.true()))


_EVENT_CONTACTS = _and_triggers(_event_contacts())


# --- templates ----------------------------------------------------------------------------


async def template_ids(session: AsyncSession, *, workspace_id: str) -> set[uuid.UUID]:
    rows = await session.execute(
        sa.select(templates.c.id).where(
            templates.c.workspace_id == workspace_id, templates.c.deleted_at.is_(None)
        )
    )
    return set(rows.scalars())


# --- API keys and idempotency keys --------------------------------------------------------

SCOPES = ("read", "write", "send")


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    id: uuid.UUID
    workspace_id: str
    name: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None


def _api_key(row: Any) -> ApiKey:
    return ApiKey(
        row.id,
        row.workspace_id,
        row.name,
        row.prefix,
        list(row.scopes),
        row.created_at,
        row.revoked_at,
    )


async def create_api_key(
    session: AsyncSession, *, workspace_id: str, name: str, scopes: list[str]
) -> tuple[ApiKey, str]:
    """A new secret key; only its hash is stored, the secret is returned once."""
    secret = f"nsk_{secrets.token_urlsafe(32)}"
    row = (
        await session.execute(
            sa.insert(api_keys)
            .values(
                id=uuid.uuid4(),
                workspace_id=workspace_id,
                name=name,
                prefix=secret[:12],
                hash=hash_secret(secret),
                scopes=scopes,
            )
            .returning(api_keys)
        )
    ).one()
    return _api_key(row), secret


async def api_key_by_secret(session: AsyncSession, *, secret: str) -> ApiKey | None:
    row = (
        await session.execute(
            sa.select(api_keys).where(
                api_keys.c.hash == hash_secret(secret), api_keys.c.revoked_at.is_(None)
            )
        )
    ).first()
    return _api_key(row) if row else None


async def list_api_keys(session: AsyncSession, *, workspace_id: str) -> list[ApiKey]:
    rows = await session.execute(
        sa.select(api_keys)
        .where(api_keys.c.workspace_id == workspace_id)
        .order_by(api_keys.c.created_at)
    )
    return [_api_key(row) for row in rows]


async def revoke_api_key(
    session: AsyncSession, *, workspace_id: str, key_id: uuid.UUID, at: datetime
) -> bool:
    done = await session.execute(
        sa.update(api_keys)
        .where(api_keys.c.id == key_id, api_keys.c.workspace_id == workspace_id)
        .values(revoked_at=sa.func.coalesce(api_keys.c.revoked_at, at))
        .returning(api_keys.c.id)
    )
    return done.first() is not None


async def idempotent_response(
    session: AsyncSession, *, workspace_id: str, key: str
) -> tuple[str, int, Any] | None:
    row = (
        await session.execute(
            sa.select(idempotency_keys).where(
                idempotency_keys.c.workspace_id == workspace_id, idempotency_keys.c.key == key
            )
        )
    ).first()
    return (row.request, row.status_code, row.body) if row else None


async def remember_response(
    session: AsyncSession, *, workspace_id: str, key: str, request: str, status_code: int, body: Any
) -> bool:
    """False when a concurrent request with the same key got there first."""
    done = await session.execute(
        pg_insert(idempotency_keys)
        .values(
            workspace_id=workspace_id, key=key, request=request, status_code=status_code, body=body
        )
        .on_conflict_do_nothing()
        .returning(idempotency_keys.c.key)
    )
    return done.first() is not None


IN_PROGRESS = 0
"""The status code of a key reserved for a request that is still being forwarded."""


async def reserve_idempotency_key(
    session: AsyncSession,
    *,
    workspace_id: str,
    key: str,
    request: str,
    now: datetime,
    stale_s: float,
) -> tuple[str, int, Any] | None:
    """Reserve a key before a request whose effect is elsewhere (a fronted owner's), so a
    retry or a concurrent twin does not repeat it. None: reserved, go ahead (also when a
    reservation of the same request is older than ``stale_s``: its holder died). Else what
    the key holds: (request, status code, body), status ``IN_PROGRESS`` while forwarded."""
    reserved = await session.execute(
        pg_insert(idempotency_keys)
        .values(
            workspace_id=workspace_id,
            key=key,
            request=request,
            status_code=IN_PROGRESS,
            body={},
            created_at=now,
        )
        .on_conflict_do_nothing()
        .returning(idempotency_keys.c.key)
    )
    if reserved.first() is not None:
        return None
    taken_over = await session.execute(
        sa.update(idempotency_keys)
        .where(
            idempotency_keys.c.workspace_id == workspace_id,
            idempotency_keys.c.key == key,
            idempotency_keys.c.request == request,
            idempotency_keys.c.status_code == IN_PROGRESS,
            idempotency_keys.c.created_at < now - timedelta(seconds=stale_s),
        )
        .values(created_at=now)
        .returning(idempotency_keys.c.key)
    )
    if taken_over.first() is not None:
        return None
    return await idempotent_response(session, workspace_id=workspace_id, key=key)


async def settle_idempotency_key(
    session: AsyncSession, *, workspace_id: str, key: str, status_code: int | None, body: Any
) -> None:
    """The reserved request's answer, replayed to retries; None: it had no effect worth
    keeping (the owner failed or did not answer), so the key is free again."""
    mine = sa.and_(
        idempotency_keys.c.workspace_id == workspace_id,
        idempotency_keys.c.key == key,
        idempotency_keys.c.status_code == IN_PROGRESS,
    )
    if status_code is None:
        await session.execute(sa.delete(idempotency_keys).where(mine))
    else:
        await session.execute(
            sa.update(idempotency_keys).where(mine).values(status_code=status_code, body=body)
        )


# --- templates announced through the API --------------------------------------------------


async def put_template(
    session: AsyncSession,
    *,
    workspace_id: str,
    template_id: uuid.UUID,
    name: str,
    channel: str,
    definition: dict[str, Any],
) -> None:
    statement = pg_insert(templates).values(
        id=template_id, workspace_id=workspace_id, name=name, channel=channel, definition=definition
    )
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[templates.c.id],
            set_={
                "name": statement.excluded.name,
                "channel": statement.excluded.channel,
                "definition": statement.excluded.definition,
                "updated_at": sa.func.now(),
            },
        )
    )


async def get_template(
    session: AsyncSession, *, workspace_id: str, template_id: uuid.UUID
) -> Any | None:
    return (
        await session.execute(
            sa.select(templates).where(
                templates.c.id == template_id,
                templates.c.workspace_id == workspace_id,
                templates.c.deleted_at.is_(None),
            )
        )
    ).first()


async def list_templates(
    session: AsyncSession, *, workspace_id: str, channel: str | None, limit: int, offset: int
) -> tuple[list[Any], int]:
    where = [templates.c.workspace_id == workspace_id, templates.c.deleted_at.is_(None)]
    if channel:
        where.append(templates.c.channel == channel)
    total = await session.scalar(sa.select(sa.func.count()).select_from(templates).where(*where))
    rows = await session.execute(
        sa.select(templates)
        .where(*where)
        .order_by(templates.c.created_at, templates.c.id)
        .limit(limit)
        .offset(offset)
    )
    return list(rows), total or 0


async def delete_template(session: AsyncSession, *, template_id: uuid.UUID, at: datetime) -> None:
    await session.execute(
        sa.update(templates).where(templates.c.id == template_id).values(deleted_at=at)
    )


# --- analytics ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    run_id: uuid.UUID
    step: int
    status: str
    at: datetime


async def record_deliveries(session: AsyncSession, reports: Sequence[Delivery]) -> None:
    """Each (run, step, status) once, the first report's time kept."""
    if not reports:
        return
    await session.execute(
        _RECORD_DELIVERIES,
        {
            "run_id": [r.run_id for r in reports],
            "step": [r.step for r in reports],
            "status": [r.status for r in reports],
            "at": [r.at for r in reports],
        },
    )


# In the arrays' order, so the first report of a status is the one kept.
_RECORD_DELIVERIES = insert_arrays(
    deliveries, ["run_id", "step", "status", "at"]
).on_conflict_do_nothing()


@dataclass(frozen=True)
class WorkflowCounts:
    runs: list[tuple[str | None, str, int]]
    """(variant, run status, runs)."""
    sends: list[tuple[int, str | None, int]]
    """(step, variant, messages requested)."""
    deliveries: list[tuple[int, str | None, str, int]]
    """(step, variant, delivery status, messages)."""


async def workflow_counts(session: AsyncSession, *, workflow_id: uuid.UUID) -> WorkflowCounts:
    """Three grouped queries on the workflow's runs, sends and their deliveries (indexes
    lead with the workflow id)."""
    run_rows = await session.execute(
        sa.select(runs.c.variant, runs.c.status, sa.func.count())
        .where(runs.c.workflow_id == workflow_id)
        .group_by(runs.c.variant, runs.c.status)
    )
    send_rows = await session.execute(
        sa.select(sends.c.step, sends.c.variant, sa.func.count())
        .where(sends.c.workflow_id == workflow_id)
        .group_by(sends.c.step, sends.c.variant)
    )
    delivery_rows = await session.execute(
        sa.select(sends.c.step, sends.c.variant, deliveries.c.status, sa.func.count())
        .join(
            deliveries,
            sa.and_(deliveries.c.run_id == sends.c.run_id, deliveries.c.step == sends.c.step),
        )
        .where(sends.c.workflow_id == workflow_id)
        .group_by(sends.c.step, sends.c.variant, deliveries.c.status)
    )
    return WorkflowCounts(
        [(r[0], r[1], r[2]) for r in run_rows],
        [(r[0], r[1], r[2]) for r in send_rows],
        [(r[0], r[1], r[2], r[3]) for r in delivery_rows],
    )


async def step_counts(
    session: AsyncSession, *, workflow_id: uuid.UUID
) -> list[tuple[int, str, int]]:
    """(step, run status, runs that executed the step) of a workflow: its runs by the index
    leading with the workflow id, their step executions by primary key."""
    rows = await session.execute(
        sa.select(step_executions.c.step, runs.c.status, sa.func.count())
        .join(runs, runs.c.id == step_executions.c.run_id)
        .where(runs.c.workflow_id == workflow_id)
        .group_by(step_executions.c.step, runs.c.status)
    )
    return [(r[0], r[1], r[2]) for r in rows]


# --- broadcasts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Broadcast:
    id: uuid.UUID
    workspace_id: str
    name: str
    channel: str
    template_id: uuid.UUID | None
    segment_id: uuid.UUID
    send_at: datetime
    rate_per_s: float | None
    goal: dict[str, Any] | None
    ab_test: dict[str, Any] | None
    status: str
    after: uuid.UUID | None
    members: int
    test_members: int
    tested_at: datetime | None
    decision: dict[str, Any] | None
    next_at: datetime | None
    last_error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    def ab(self) -> ABTest | None:
        return ABTest.model_validate(self.ab_test) if self.ab_test is not None else None

    def goal_of(self) -> BroadcastGoal | None:
        return BroadcastGoal.model_validate(self.goal) if self.goal is not None else None


def _broadcast(row: Any) -> Broadcast:
    return Broadcast(**{column.name: getattr(row, column.name) for column in broadcasts.c})


async def create_broadcast(
    session: AsyncSession,
    *,
    broadcast_id: uuid.UUID,
    workspace_id: str,
    name: str,
    channel: str,
    template_id: uuid.UUID | None,
    segment_id: uuid.UUID,
    send_at: datetime,
    rate_per_s: float | None,
    goal: BroadcastGoal | None = None,
    ab_test: ABTest | None = None,
) -> Broadcast:
    """The broadcast and its workflow (same id), published: each member's message is a run
    of it, so caps, quiet hours, sends, deliveries and analytics are a workflow's. Give
    ``template_id`` (one message) or ``ab_test`` (the test group's split, version 1)."""
    if ab_test is not None:
        definition = split_definition(channel, ab_test, goal)
    else:
        assert template_id is not None
        definition = send_definition(channel, template_id, goal)
    await create_workflow(
        session,
        workspace_id=workspace_id,
        workflow_id=broadcast_id,
        name=f"broadcast: {name}",
        definition=definition,
    )
    row = (
        await session.execute(
            sa.insert(broadcasts)
            .values(
                id=broadcast_id,
                workspace_id=workspace_id,
                name=name,
                channel=channel,
                template_id=template_id,
                segment_id=segment_id,
                send_at=send_at,
                rate_per_s=rate_per_s,
                goal=goal.model_dump(mode="json") if goal else None,
                ab_test=ab_test.model_dump(mode="json") if ab_test else None,
                status="scheduled",
                next_at=send_at,
            )
            .returning(broadcasts)
        )
    ).one()
    return _broadcast(row)


async def get_broadcast(
    session: AsyncSession, *, workspace_id: str, broadcast_id: uuid.UUID, lock: bool = False
) -> Broadcast | None:
    query = sa.select(broadcasts).where(
        broadcasts.c.id == broadcast_id, broadcasts.c.workspace_id == workspace_id
    )
    if lock:
        query = query.with_for_update()
    row = (await session.execute(query)).first()
    return _broadcast(row) if row else None


async def list_broadcasts(
    session: AsyncSession, *, workspace_id: str, status: str | None, limit: int, offset: int
) -> tuple[list[Broadcast], int]:
    where = [broadcasts.c.workspace_id == workspace_id]
    if status:
        where.append(broadcasts.c.status == status)
    total = await session.scalar(sa.select(sa.func.count()).select_from(broadcasts).where(*where))
    rows = await session.execute(
        sa.select(broadcasts)
        .where(*where)
        .order_by(broadcasts.c.created_at, broadcasts.c.id)
        .limit(limit)
        .offset(offset)
    )
    return [_broadcast(row) for row in rows], total or 0


async def update_broadcast(
    session: AsyncSession,
    *,
    broadcast_id: uuid.UUID,
    name: str | None,
    send_at: datetime | None,
    rate_per_s: float | None,
    pace: bool,
) -> None:
    """A new name (its workflow's too), start (a scheduled broadcast's), or pace
    (``pace``: set ``rate_per_s``, None for no limit); what is None is kept."""
    values: dict[str, Any] = {}
    if name is not None:
        values["name"] = name
        await update_workflow(session, workflow_id=broadcast_id, name=f"broadcast: {name}")
    if send_at is not None:
        values |= {"send_at": send_at, "next_at": send_at}
    if pace:
        values["rate_per_s"] = rate_per_s
    if values:
        await session.execute(
            sa.update(broadcasts).where(broadcasts.c.id == broadcast_id).values(values)
        )


async def claim_due_broadcast(session: AsyncSession, *, now: datetime) -> Broadcast | None:
    """The broadcast most overdue for its next page, locked (SKIP LOCKED: replicas take
    different ones) until this transaction ends."""
    row = (await session.execute(_DUE_BROADCAST, {"now": now})).first()
    return _broadcast(row) if row else None


_DUE_BROADCAST = (
    sa.select(broadcasts)
    .where(broadcasts.c.next_at <= sa.bindparam("now"))
    .order_by(broadcasts.c.next_at)
    .limit(1)
    .with_for_update(skip_locked=True)
)


async def broadcast_progressed(
    session: AsyncSession,
    *,
    broadcast_id: uuid.UUID,
    status: str,
    after: uuid.UUID | None,
    members: int,
    next_at: datetime | None,
    last_error: str | None,
    at: datetime,
    test_members: int = 0,
    tested: bool = False,
) -> None:
    """A page went out (or failed, or an A/B test is not decided yet): where the next
    starts, and when; ``tested``: the test group's last page went out."""
    finished = next_at is None
    await session.execute(
        sa.update(broadcasts)
        .where(broadcasts.c.id == broadcast_id)
        .values(
            status=status,
            after=after,
            members=broadcasts.c.members + members,
            test_members=broadcasts.c.test_members + test_members,
            tested_at=at if tested else broadcasts.c.tested_at,
            next_at=next_at,
            last_error=last_error,
            started_at=sa.func.coalesce(broadcasts.c.started_at, at),
            finished_at=at if finished else None,
        )
    )


async def broadcast_decided(
    session: AsyncSession,
    *,
    broadcast_id: uuid.UUID,
    winner: BroadcastVariant,
    decision: dict[str, Any],
    at: datetime,
) -> None:
    """The winner of an A/B broadcast: its workflow's version 2 is the winner's send, and
    the rest of the members go from the first page (those with a test run are refused
    by the entry rule ``once``)."""
    broadcast = (
        await session.execute(sa.select(broadcasts).where(broadcasts.c.id == broadcast_id))
    ).one()
    await update_workflow(
        session,
        workflow_id=broadcast_id,
        definition=send_definition(
            broadcast.channel,
            winner.template_id,
            BroadcastGoal.model_validate(broadcast.goal) if broadcast.goal else None,
        ),
    )
    await publish_workflow(session, workflow_id=broadcast_id, now=at)
    await session.execute(
        sa.update(broadcasts)
        .where(broadcasts.c.id == broadcast_id)
        .values(
            status="sending",
            template_id=winner.template_id,
            decision=decision,
            after=None,
            next_at=at,
            last_error=None,
        )
    )


async def cancel_broadcast(session: AsyncSession, *, broadcast_id: uuid.UUID, at: datetime) -> int:
    """No more pages; its runs still waiting (quiet hours) are cancelled. Returns how many."""
    await session.execute(
        sa.update(broadcasts)
        .where(broadcasts.c.id == broadcast_id)
        .values(status="cancelled", next_at=None, finished_at=at)
    )
    await update_workflow(session, workflow_id=broadcast_id, status="archived")
    return await cancel_runs(session, workflow_id=broadcast_id, at=at)


@dataclass(frozen=True)
class SegmentCounts:
    workflows: dict[uuid.UUID, tuple[str, str]]
    """workflow -> (name, trigger kind) of every workflow the segment started runs of."""
    runs: list[tuple[uuid.UUID, str, int]]
    """(workflow, run status, runs)."""
    sends: list[tuple[uuid.UUID, int]]
    """(workflow, messages requested)."""
    deliveries: list[tuple[uuid.UUID, str, int]]
    """(workflow, delivery status, messages)."""


async def segment_counts(
    session: AsyncSession, *, workspace_id: str, segment_id: uuid.UUID
) -> SegmentCounts:
    """The runs a segment (or list) started, their sends and deliveries, per workflow: the
    runs through the index on ``segment_id``, their sends and deliveries by primary key."""
    mine = sa.and_(runs.c.segment_id == segment_id, runs.c.workspace_id == workspace_id)
    run_rows = await session.execute(
        sa.select(
            runs.c.workflow_id,
            workflows.c.name,
            workflows.c.trigger_kind,
            runs.c.status,
            sa.func.count(),
        )
        .join(workflows, workflows.c.id == runs.c.workflow_id)
        .where(mine)
        .group_by(runs.c.workflow_id, workflows.c.name, workflows.c.trigger_kind, runs.c.status)
    )
    send_rows = await session.execute(
        sa.select(sends.c.workflow_id, sa.func.count())
        .join(runs, runs.c.id == sends.c.run_id)
        .where(mine)
        .group_by(sends.c.workflow_id)
    )
    delivery_rows = await session.execute(
        sa.select(sends.c.workflow_id, deliveries.c.status, sa.func.count())
        .join(runs, runs.c.id == sends.c.run_id)
        .join(
            deliveries,
            sa.and_(deliveries.c.run_id == sends.c.run_id, deliveries.c.step == sends.c.step),
        )
        .where(mine)
        .group_by(sends.c.workflow_id, deliveries.c.status)
    )
    names: dict[uuid.UUID, tuple[str, str]] = {}
    counted: list[tuple[uuid.UUID, str, int]] = []
    for workflow_id, name, kind, status, count in run_rows:
        names[workflow_id] = (name, kind)
        counted.append((workflow_id, status, count))
    return SegmentCounts(
        names,
        counted,
        [(r[0], r[1]) for r in send_rows],
        [(r[0], r[1], r[2]) for r in delivery_rows],
    )
