"""processed messages: BRIN index on processed_at, for trimming the old ids

Revision ID: 4adfbee53330
Revises: cb57c3540851
"""

from __future__ import annotations

from alembic import op

revision = "4adfbee53330"
down_revision = "cb57c3540851"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_processed_messages_processed_at",
        "processed_messages",
        ["processed_at"],
        unique=False,
        schema="segmenter",
        postgresql_using="brin",
    )


def downgrade() -> None:
    op.drop_index(
        "ix_processed_messages_processed_at",
        table_name="processed_messages",
        schema="segmenter",
        postgresql_using="brin",
    )
