"""contacts, identity merges, partitioned events, transactions, scoring models, stages,
tags, durable timers and jobs

Written by hand: autogenerate cannot express the partitioned ``events`` table, its
partition function, or moving the walking skeleton's events into it.

Revision ID: c7d1e2f3a4b5
Revises: b5b70d2751e0
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "c7d1e2f3a4b5"
down_revision = "b5b70d2751e0"
branch_labels = None
depends_on = None

S = "scoring"
TS = sa.DateTime(timezone=True)
JSONB = postgresql.JSONB(astext_type=sa.Text())
EMPTY_OBJECT = sa.text("'{}'::jsonb")
EMPTY_ARRAY = sa.text("'[]'::jsonb")

ENSURE_PARTITION = """
CREATE OR REPLACE FUNCTION scoring.ensure_events_partition(at timestamptz, ahead int)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    month_start timestamp;
    partition_name text;
BEGIN
    FOR i IN 0..ahead LOOP
        month_start := date_trunc('month', at AT TIME ZONE 'UTC') + make_interval(months => i);
        partition_name := 'events_' || to_char(month_start, 'YYYYMM');
        IF to_regclass('scoring.' || partition_name) IS NULL THEN
            -- concurrent callers queue here; the second finds the partition made
            PERFORM pg_advisory_xact_lock(hashtext('scoring.' || partition_name));
            IF to_regclass('scoring.' || partition_name) IS NULL THEN
                EXECUTE format(
                    'CREATE TABLE scoring.%I PARTITION OF scoring.events '
                    'FOR VALUES FROM (%L) TO (%L)',
                    partition_name,
                    month_start AT TIME ZONE 'UTC',
                    (month_start + interval '1 month') AT TIME ZONE 'UTC'
                );
            END IF;
        END IF;
    END LOOP;
END $$;
"""


def upgrade() -> None:
    for name, type_ in (
        ("trait_sources", JSONB),
        ("first_touch", JSONB),
        ("name", sa.Text()),
        ("email", sa.Text()),
        ("phone", sa.Text()),
        ("birthday", sa.Date()),
        ("language", sa.Text()),
        ("country", sa.Text()),
        ("city", sa.Text()),
        ("timezone", sa.Text()),
        ("company", sa.Text()),
        ("job_title", sa.Text()),
        ("first_order_at", TS),
        ("last_order_at", TS),
        ("merged_into", sa.UUID()),
        ("erased_at", TS),
    ):
        default = EMPTY_OBJECT if name == "trait_sources" else None
        op.add_column(
            "contacts",
            sa.Column(name, type_, nullable=default is None, server_default=default),
            schema=S,
        )
    op.add_column(
        "contacts",
        sa.Column("orders_count", sa.Integer(), nullable=False, server_default="0"),
        schema=S,
    )
    op.add_column(
        "contacts",
        sa.Column("revenue_total", sa.Numeric(18, 4), nullable=False, server_default="0"),
        schema=S,
    )
    op.create_index("contacts_workspace_email", "contacts", ["workspace_id", "email"], schema=S)
    op.create_index("contacts_merged_into", "contacts", ["merged_into"], schema=S)
    op.create_index("ix_scoring_identities_contact_id", "identities", ["contact_id"], schema=S)

    # events: append-only, partitioned by month; event_ids keeps (workspace, messageId) unique
    op.execute("ALTER TABLE scoring.events RENAME TO events_walking_skeleton")
    op.execute(
        "ALTER TABLE scoring.events_walking_skeleton "
        "RENAME CONSTRAINT events_pkey TO events_walking_skeleton_pkey"
    )
    op.create_table(
        "event_ids",
        sa.Column("workspace_id", sa.Text(), nullable=False),
        sa.Column("message_id", sa.Text(), nullable=False),
        sa.Column("occurred_at", TS, nullable=False),
        sa.Column("contact_id", sa.UUID(), nullable=False),
        sa.PrimaryKeyConstraint("workspace_id", "message_id"),
        schema=S,
    )
    op.create_index("ix_scoring_event_ids_contact_id", "event_ids", ["contact_id"], schema=S)
    op.create_table(
        "events",
        sa.Column("workspace_id", sa.Text(), nullable=False),
        sa.Column("message_id", sa.Text(), nullable=False),
        sa.Column("occurred_at", TS, nullable=False),
        sa.Column("contact_id", sa.UUID(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("properties", JSONB, nullable=False),
        sa.Column("context", JSONB, nullable=False, server_default=EMPTY_OBJECT),
        sa.Column("received_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("workspace_id", "message_id", "occurred_at"),
        schema=S,
        postgresql_partition_by="RANGE (occurred_at)",
    )
    op.create_index("events_contact_occurred", "events", ["contact_id", "occurred_at"], schema=S)
    op.execute("CREATE TABLE scoring.events_default PARTITION OF scoring.events DEFAULT")
    op.execute(ENSURE_PARTITION)
    op.execute("SELECT scoring.ensure_events_partition(now() - interval '1 month', 4)")
    op.execute(
        "INSERT INTO scoring.event_ids (workspace_id, message_id, occurred_at, contact_id) "
        "SELECT workspace_id, message_id, occurred_at, contact_id "
        "FROM scoring.events_walking_skeleton"
    )
    op.execute(
        "INSERT INTO scoring.events (workspace_id, message_id, occurred_at, contact_id, type, "
        "name, properties, received_at) SELECT workspace_id, message_id, occurred_at, "
        "contact_id, type, name, properties, received_at FROM scoring.events_walking_skeleton"
    )
    op.execute("DROP TABLE scoring.events_walking_skeleton")

    op.create_table(
        "transactions",
        sa.Column("workspace_id", sa.Text(), nullable=False),
        sa.Column("message_id", sa.Text(), nullable=False),
        sa.Column("contact_id", sa.UUID(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("order_id", sa.Text(), nullable=True),
        sa.Column("revenue", sa.Numeric(18, 4), nullable=False),
        sa.Column("currency", sa.Text(), nullable=True),
        sa.Column("payment_method", sa.Text(), nullable=True),
        sa.Column("products", JSONB, nullable=False, server_default=EMPTY_ARRAY),
        sa.Column("occurred_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("workspace_id", "message_id"),
        schema=S,
    )
    op.create_index("ix_scoring_transactions_contact_id", "transactions", ["contact_id"], schema=S)
    op.create_table(
        "models",
        sa.Column("workspace_id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False, server_default=""),
        sa.Column("stages", JSONB, nullable=False, server_default=EMPTY_ARRAY),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("workspace_id", "name"),
        schema=S,
    )
    op.alter_column("rules", "event", nullable=True, schema=S)
    op.add_column(
        "rules",
        sa.Column("kind", sa.Text(), nullable=False, server_default="behavioural"),
        schema=S,
    )
    op.add_column("rules", sa.Column("spec", JSONB, nullable=True), schema=S)
    op.add_column(
        "rules", sa.Column("name", sa.Text(), nullable=False, server_default=""), schema=S
    )
    op.add_column(
        "rules",
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
        schema=S,
    )
    op.create_index("ix_scoring_rules_workspace_id", "rules", ["workspace_id"], schema=S)
    op.add_column(
        "score_changes",
        sa.Column("reason", sa.Text(), nullable=False, server_default="event"),
        schema=S,
    )
    op.create_index(
        "ix_scoring_score_changes_contact_id", "score_changes", ["contact_id"], schema=S
    )
    op.create_table(
        "rule_spending",
        sa.Column("contact_id", sa.UUID(), nullable=False),
        sa.Column("rule_id", sa.UUID(), nullable=False),
        sa.Column("period", sa.Text(), nullable=False),
        sa.Column("points", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("contact_id", "rule_id", "period"),
        schema=S,
    )
    op.create_table(
        "stages",
        sa.Column("contact_id", sa.UUID(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("workspace_id", sa.Text(), nullable=False),
        sa.Column("stage", sa.Text(), nullable=False),
        sa.Column("since", TS, nullable=False),
        sa.PrimaryKeyConstraint("contact_id", "model"),
        schema=S,
    )
    op.create_table(
        "stage_history",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("workspace_id", sa.Text(), nullable=False),
        sa.Column("contact_id", sa.UUID(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("from_stage", sa.Text(), nullable=True),
        sa.Column("to_stage", sa.Text(), nullable=False),
        sa.Column("score", sa.Integer(), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        schema=S,
    )
    op.create_index(
        "ix_scoring_stage_history_contact_id", "stage_history", ["contact_id"], schema=S
    )
    op.create_table(
        "tags",
        sa.Column("contact_id", sa.UUID(), nullable=False),
        sa.Column("tag", sa.Text(), nullable=False),
        sa.Column("workspace_id", sa.Text(), nullable=False),
        sa.Column("assignments", sa.Integer(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("first_assigned_at", TS, nullable=False),
        sa.Column("last_assigned_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("contact_id", "tag"),
        schema=S,
    )
    op.create_table(
        "merges",
        sa.Column("merged_id", sa.UUID(), nullable=False),
        sa.Column("workspace_id", sa.Text(), nullable=False),
        sa.Column("survivor_id", sa.UUID(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("identity", sa.Text(), nullable=False),
        sa.Column("cause_message_id", sa.Text(), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.PrimaryKeyConstraint("merged_id"),
        schema=S,
    )
    op.create_index("ix_scoring_merges_survivor_id", "merges", ["survivor_id"], schema=S)
    op.create_table(
        "workspace_settings",
        sa.Column("workspace_id", sa.Text(), nullable=False),
        sa.Column("merge_on_email", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.PrimaryKeyConstraint("workspace_id"),
        schema=S,
    )
    op.create_table(
        "timers",
        sa.Column("contact_id", sa.UUID(), nullable=False),
        sa.Column("rule_id", sa.UUID(), nullable=False),
        sa.Column("workspace_id", sa.Text(), nullable=False),
        sa.Column("due_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("contact_id", "rule_id"),
        schema=S,
    )
    op.create_index("ix_scoring_timers_due_at", "timers", ["due_at"], schema=S)
    op.create_table(
        "jobs",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("workspace_id", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("params", JSONB, nullable=False, server_default=EMPTY_OBJECT),
        sa.Column("total", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("done", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("errors", JSONB, nullable=False, server_default=EMPTY_ARRAY),
        sa.Column("cursor", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("finished_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id"),
        schema=S,
    )


def downgrade() -> None:
    raise NotImplementedError("forward only: restore from a backup to go back")
