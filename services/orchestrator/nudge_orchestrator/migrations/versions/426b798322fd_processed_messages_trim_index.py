"""processed messages: BRIN index on processed_at, for trimming the old ids

Revision ID: 426b798322fd
Revises: 1fc4bfa2e9ab
"""

from __future__ import annotations

from alembic import op

revision = "426b798322fd"
down_revision = "1fc4bfa2e9ab"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_processed_messages_processed_at",
        "processed_messages",
        ["processed_at"],
        unique=False,
        schema="orchestrator",
        postgresql_using="brin",
    )


def downgrade() -> None:
    op.drop_index(
        "ix_processed_messages_processed_at",
        table_name="processed_messages",
        schema="orchestrator",
        postgresql_using="brin",
    )
