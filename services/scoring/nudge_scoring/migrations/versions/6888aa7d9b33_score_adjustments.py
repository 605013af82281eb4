"""score_changes.rule_id nullable: a score adjustment (score.adjusted) has no rule

Revision ID: 6888aa7d9b33
Revises: c7d1e2f3a4b5
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "6888aa7d9b33"
down_revision = "c7d1e2f3a4b5"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.alter_column(
        "score_changes", "rule_id", existing_type=sa.UUID(), nullable=True, schema="scoring"
    )


def downgrade() -> None:
    op.execute("DELETE FROM scoring.score_changes WHERE rule_id IS NULL")
    op.alter_column(
        "score_changes", "rule_id", existing_type=sa.UUID(), nullable=False, schema="scoring"
    )
