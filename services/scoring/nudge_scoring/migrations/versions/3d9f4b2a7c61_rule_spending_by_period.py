"""rule_spending keyed by (contact, period, rule): the consumer reads a contact's spending
of a few periods (today's, ever, held), one index range each, not every day it ever had

Revision ID: 3d9f4b2a7c61
Revises: 480e66d21fdd
"""

from __future__ import annotations

from alembic import op

revision = "3d9f4b2a7c61"
down_revision = "480e66d21fdd"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_constraint("rule_spending_pkey", "rule_spending", schema="scoring", type_="primary")
    op.create_primary_key(
        "rule_spending_pkey",
        "rule_spending",
        ["contact_id", "period", "rule_id"],
        schema="scoring",
    )


def downgrade() -> None:
    op.drop_constraint("rule_spending_pkey", "rule_spending", schema="scoring", type_="primary")
    op.create_primary_key(
        "rule_spending_pkey",
        "rule_spending",
        ["contact_id", "rule_id", "period"],
        schema="scoring",
    )
