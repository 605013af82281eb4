"""Orchestrator's tables (schema ``orchestrator``): workflows, their runs and the steps each
run has executed."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.db import processed_messages_table
from nudge_orchestrator.domain.workflows import WorkflowDefinition

SCHEMA = "orchestrator"
metadata = sa.MetaData(schema=SCHEMA)
TIMESTAMP = sa.DateTime(timezone=True)

workflows = sa.Table(
    "workflows",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False, server_default="active"),
    sa.Column("trigger_segment_id", UUID(as_uuid=True), index=True),
    sa.Column("definition", JSONB, nullable=False),
    sa.Column("created_at", TIMESTAMP, nullable=False, server_default=sa.func.now()),
)
runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("workflow_id", UUID(as_uuid=True), nullable=False),
    sa.Column("workspace_id", sa.Text, nullable=False),
    sa.Column("contact_id", UUID(as_uuid=True), nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("started_at", TIMESTAMP, nullable=False),
    sa.Column("finished_at", TIMESTAMP),
    # Entry rule of the skeleton: once per contact.
    sa.UniqueConstraint("workflow_id", "contact_id", name="runs_once_per_contact"),
)
step_executions = sa.Table(
    "step_executions",
    metadata,
    sa.Column("run_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("step", sa.Integer, primary_key=True),
    sa.Column("executed_at", TIMESTAMP, nullable=False),
)
processed_messages = processed_messages_table(metadata)


@dataclass(frozen=True)
class Workflow:
    id: uuid.UUID
    name: str
    definition: WorkflowDefinition


async def create_workflow(
    session: AsyncSession,
    *,
    workspace_id: str,
    workflow_id: uuid.UUID,
    name: str,
    definition: WorkflowDefinition,
) -> None:
    await session.execute(
        pg_insert(workflows)
        .values(
            id=workflow_id,
            workspace_id=workspace_id,
            name=name,
            trigger_segment_id=definition.trigger.segment_id,
            definition=definition.model_dump(mode="json"),
        )
        .on_conflict_do_nothing()
    )


async def workflows_entered_by(
    session: AsyncSession, *, workspace_id: str, segment_id: uuid.UUID
) -> list[Workflow]:
    rows = await session.execute(
        sa.select(workflows).where(
            workflows.c.workspace_id == workspace_id,
            workflows.c.trigger_segment_id == segment_id,
            workflows.c.status == "active",
        )
    )
    return [
        Workflow(row.id, row.name, WorkflowDefinition.model_validate(row.definition))
        for row in rows
    ]


async def start_run(
    session: AsyncSession,
    *,
    run_id: uuid.UUID,
    workflow_id: uuid.UUID,
    workspace_id: str,
    contact_id: uuid.UUID,
    at: datetime,
) -> bool:
    """False when the contact already has a run of this workflow."""
    statement = (
        pg_insert(runs)
        .values(
            id=run_id,
            workflow_id=workflow_id,
            workspace_id=workspace_id,
            contact_id=contact_id,
            status="running",
            started_at=at,
        )
        .on_conflict_do_nothing()
        .returning(runs.c.id)
    )
    return (await session.execute(statement)).first() is not None


async def record_step(session: AsyncSession, *, run_id: uuid.UUID, step: int, at: datetime) -> bool:
    """False when this step of this run was executed before."""
    statement = (
        pg_insert(step_executions)
        .values(run_id=run_id, step=step, executed_at=at)
        .on_conflict_do_nothing()
        .returning(step_executions.c.step)
    )
    return (await session.execute(statement)).first() is not None


async def finish_run(session: AsyncSession, *, run_id: uuid.UUID, at: datetime) -> None:
    await session.execute(
        sa.update(runs).where(runs.c.id == run_id).values(status="completed", finished_at=at)
    )
