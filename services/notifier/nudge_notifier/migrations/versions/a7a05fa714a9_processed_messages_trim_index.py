"""processed messages: BRIN index on processed_at, for trimming the old ids

Revision ID: a7a05fa714a9
Revises: e7bbef91841a
"""

from __future__ import annotations

from alembic import op

revision = "a7a05fa714a9"
down_revision = "e7bbef91841a"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_processed_messages_processed_at",
        "processed_messages",
        ["processed_at"],
        unique=False,
        schema="notifier",
        postgresql_using="brin",
    )


def downgrade() -> None:
    op.drop_index(
        "ix_processed_messages_processed_at",
        table_name="processed_messages",
        schema="notifier",
        postgresql_using="brin",
    )
