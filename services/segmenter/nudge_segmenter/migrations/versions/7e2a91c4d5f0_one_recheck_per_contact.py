"""one recheck per contact

Revision ID: 7e2a91c4d5f0
Revises: dc146be01f91
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "7e2a91c4d5f0"
down_revision = "dc146be01f91"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # each contact keeps its earliest recheck, which re-evaluates all its timed segments
    op.rename_table("rechecks", "rechecks_by_segment", schema="segmenter")
    op.execute("ALTER INDEX segmenter.rechecks_pkey RENAME TO rechecks_by_segment_pkey")
    op.execute(
        "ALTER INDEX segmenter.ix_segmenter_rechecks_due_at RENAME TO rechecks_by_segment_due_at"
    )
    op.create_table(
        "rechecks",
        sa.Column("contact_id", sa.UUID(), nullable=False),
        sa.Column("workspace_id", sa.Text(), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("contact_id"),
        schema="segmenter",
    )
    op.execute(
        "INSERT INTO segmenter.rechecks (contact_id, workspace_id, due_at)"
        " SELECT contact_id, min(workspace_id), min(due_at)"
        " FROM segmenter.rechecks_by_segment GROUP BY contact_id"
    )
    op.drop_table("rechecks_by_segment", schema="segmenter")
    op.create_index(
        op.f("ix_segmenter_rechecks_due_at"),
        "rechecks",
        ["due_at"],
        unique=False,
        schema="segmenter",
    )


def downgrade() -> None:
    # which segments a contact's recheck stood for is not kept: every dynamic segment of
    # its workspace is rechecked then (each finds nothing changed or the transition due)
    op.rename_table("rechecks", "rechecks_by_contact", schema="segmenter")
    op.execute("ALTER INDEX segmenter.rechecks_pkey RENAME TO rechecks_by_contact_pkey")
    op.execute(
        "ALTER INDEX segmenter.ix_segmenter_rechecks_due_at RENAME TO rechecks_by_contact_due_at"
    )
    op.create_table(
        "rechecks",
        sa.Column("segment_id", sa.UUID(), nullable=False),
        sa.Column("contact_id", sa.UUID(), nullable=False),
        sa.Column("workspace_id", sa.Text(), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("segment_id", "contact_id"),
        schema="segmenter",
    )
    op.execute(
        "INSERT INTO segmenter.rechecks (segment_id, contact_id, workspace_id, due_at)"
        " SELECT s.id, r.contact_id, r.workspace_id, r.due_at"
        " FROM segmenter.rechecks_by_contact AS r JOIN segmenter.segments AS s"
        " ON s.workspace_id = r.workspace_id AND s.kind = 'dynamic'"
    )
    op.drop_table("rechecks_by_contact", schema="segmenter")
    op.create_index(
        op.f("ix_segmenter_rechecks_due_at"),
        "rechecks",
        ["due_at"],
        unique=False,
        schema="segmenter",
    )
    op.create_index(
        "rechecks_contact_segment_due",
        "rechecks",
        ["contact_id", "segment_id", "due_at"],
        unique=False,
        schema="segmenter",
    )
