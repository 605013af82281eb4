"""processed messages: BRIN index on processed_at, for trimming the old ids

Revision ID: 480e66d21fdd
Revises: 6888aa7d9b33
"""

from __future__ import annotations

from alembic import op

revision = "480e66d21fdd"
down_revision = "6888aa7d9b33"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_processed_messages_processed_at",
        "processed_messages",
        ["processed_at"],
        unique=False,
        schema="scoring",
        postgresql_using="brin",
    )


def downgrade() -> None:
    op.drop_index(
        "ix_processed_messages_processed_at",
        table_name="processed_messages",
        schema="scoring",
        postgresql_using="brin",
    )
