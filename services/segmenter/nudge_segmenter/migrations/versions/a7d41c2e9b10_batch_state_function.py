"""batch_state: a real-time batch's memberships, events and rechecks, read with a snapshot
taken when it is called

Revision ID: a7d41c2e9b10
Revises: dc146be01f91
"""

from __future__ import annotations

from alembic import op

revision = "a7d41c2e9b10"
down_revision = "dc146be01f91"
branch_labels = None
depends_on = None

# VOLATILE: its query takes its own snapshot when the function runs, so called after the
# statement calling it has locked the contacts, it sees what the transactions it waited
# for committed, as a second statement would. PL/pgSQL keeps the query's plan for the
# session, as a prepared statement does (an SQL function's is planned on every call).
BATCH_STATE = """
CREATE FUNCTION segmenter.batch_state(
    p_ids uuid[], p_new uuid[], p_all boolean, p_segments uuid[], p_events text[],
    p_needed_events text[], p_filtered text[], p_timed boolean
) RETURNS TABLE (
    kind integer, contact_id uuid, segment_ids uuid[], names text[], ats timestamptz[],
    properties jsonb[]
) LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY WITH never_parallel AS (
    SELECT FROM segmenter.contacts WHERE contact_id = ANY(p_ids) FOR KEY SHARE
)
SELECT 0, contact_id, array_agg(segment_id), NULL::text[], NULL::timestamptz[], NULL::jsonb[]
FROM segmenter.memberships WHERE contact_id = ANY(p_ids)
AND (p_all OR segment_id = ANY(p_segments) OR contact_id = ANY(p_new))
GROUP BY contact_id
UNION ALL
SELECT 1, contact_id, NULL::uuid[], array_agg(event), array_agg(at),
    array_agg(CASE WHEN event = ANY(p_filtered) THEN properties END)
FROM segmenter.contact_events WHERE contact_id = ANY(p_ids) AND event = ANY(p_events)
AND (p_all OR event = ANY(p_needed_events) OR contact_id = ANY(p_new))
GROUP BY contact_id
UNION ALL
SELECT 2, contact_id, array_agg(segment_id), NULL::text[], array_agg(due_at), NULL::jsonb[]
FROM segmenter.rechecks WHERE p_timed AND contact_id = ANY(p_ids)
AND (p_all OR segment_id = ANY(p_segments) OR contact_id = ANY(p_new))
GROUP BY contact_id;
END
$$
"""


def upgrade() -> None:
    op.execute(BATCH_STATE)


def downgrade() -> None:
    op.execute(
        "DROP FUNCTION segmenter.batch_state(uuid[], uuid[], boolean, uuid[], text[], text[],"
        " text[], boolean)"
    )
