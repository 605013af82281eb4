"""Backfill: a segment created or edited gets its membership over every existing contact,
computed set-based in PostgreSQL, then hands over to real time.

1. The API saves the segment as ``backfilling`` (a new version). From that commit on, the
   real-time path does not evaluate it: it records the contacts it would have evaluated in
   ``backfill_dirty`` (under a share lock of the segment's row).
2. :func:`stage` computes, in one ``INSERT ... SELECT`` over the compiled condition, the
   difference between who matches and who is a member, into ``backfill_changes``, and the
   time-driven rechecks of every contact, into ``rechecks``.
3. :func:`apply_chunk` applies and publishes the staged transitions a chunk at a time
   (publish, then commit: a crash re-publishes the chunk with the same ids).
4. :func:`hand_over` takes the segment's row for update (waiting for real-time
   transactions that saw it backfilling), marks it ``active``; then the dirty contacts are
   re-evaluated by the real-time path, a chunk at a time. Segments that reference this one
   are backfilled next (their memberships were computed on a half-built one).

A worker holds a session-level advisory lock per segment while it backfills, so replicas
never backfill the same segment; a crash releases it and any replica resumes from the
staged rows.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.events import ContactSnapshot
from nudge_common.kafka import OutgoingMessage
from nudge_segmenter import store
from nudge_segmenter.domain.segments import referenced_segments
from nudge_segmenter.evaluation import Cause, reevaluate, transition
from nudge_segmenter.sql import compile_condition
from nudge_segmenter.store import backfill_changes, contacts, memberships


def lock_key(segment_id: uuid.UUID) -> int:
    """A bigint advisory-lock key for the segment."""
    return int.from_bytes(segment_id.bytes[:8], "big", signed=True)


async def stage(session: AsyncSession, segment: store.Segment, now: datetime) -> int:
    """Stage the segment's transitions and schedule its rechecks; returns how many."""
    assert segment.condition is not None
    await session.execute(
        sa.delete(backfill_changes).where(backfill_changes.c.segment_id == segment.id)
    )
    compiled = compile_condition(segment.condition, now)
    is_member = (
        sa.exists()
        .where(memberships.c.segment_id == segment.id)
        .where(memberships.c.contact_id == contacts.c.contact_id)
    )
    in_workspace = contacts.c.workspace_id == segment.workspace_id
    changes = sa.select(
        sa.literal(segment.id, UUID(as_uuid=True)),
        contacts.c.contact_id,
        sa.literal(segment.version, sa.Integer),
        compiled.matches,
    ).where(in_workspace, compiled.matches != is_member)
    staged = await session.execute(
        sa.insert(backfill_changes).from_select(
            ["segment_id", "contact_id", "version", "entering"], changes
        )
    )
    if compiled.recheck_at is not None:
        await session.execute(schedule_rechecks(compiled.recheck_at, in_workspace))
    total = int(staged.rowcount or 0)  # type: ignore[attr-defined]
    await session.execute(
        sa.update(store.segments)
        .where(store.segments.c.id == segment.id)
        .values(backfill_total=total, backfill_done=0, backfill_started_at=now)
    )
    return total


def schedule_rechecks(
    recheck_at: sa.ColumnElement[Any], *where: sa.ColumnElement[bool]
) -> sa.Executable:
    """The contacts (``where``) whose recheck time for a segment is ``recheck_at`` get it
    as their recheck if it is earlier than theirs: a recheck moves earlier, never later,
    and then re-evaluates every time-driven segment of the contact (and schedules the
    next)."""
    scheduled = (
        sa.select(contacts.c.contact_id, contacts.c.workspace_id, recheck_at.label("due_at"))
        .where(*where)
        .subquery()
    )
    upsert = pg_insert(store.rechecks).from_select(
        ["contact_id", "workspace_id", "due_at"],
        sa.select(scheduled).where(scheduled.c.due_at.is_not(None)),
    )
    return upsert.on_conflict_do_update(
        index_elements=[store.rechecks.c.contact_id],
        set_={"due_at": upsert.excluded.due_at},
        where=upsert.excluded.due_at < store.rechecks.c.due_at,
    )


async def apply_chunk(
    session: AsyncSession, segment: store.Segment, now: datetime, limit: int
) -> list[OutgoingMessage]:
    """Apply up to ``limit`` staged transitions; returns their messages (to publish before
    the commit)."""
    rows = (
        await session.execute(
            sa.select(
                backfill_changes.c.contact_id,
                backfill_changes.c.entering,
                contacts.c.user_id,
                contacts.c.traits,
                contacts.c.scores,
            )
            .join(contacts, contacts.c.contact_id == backfill_changes.c.contact_id)
            .where(backfill_changes.c.segment_id == segment.id)
            .order_by(backfill_changes.c.contact_id)
            .limit(limit)
            .with_for_update(of=backfill_changes)
        )
    ).all()
    if not rows:
        return []
    entering = [row.contact_id for row in rows if row.entering]
    leaving = [row.contact_id for row in rows if not row.entering]
    if entering:
        # one array parameter, not a statement of 4 x 5,000 parameters compiled per chunk
        entrants = sa.select(
            sa.literal(segment.id, UUID(as_uuid=True)),
            sa.column("contact_id", UUID(as_uuid=True)),
            sa.literal(segment.workspace_id, sa.Text),
            sa.literal(now, sa.DateTime(timezone=True)),
        ).select_from(
            sa.func.unnest(sa.cast(entering, ARRAY(UUID(as_uuid=True))))
            .table_valued("contact_id")
            .render_derived(with_types=False)
        )
        columns = ["segment_id", "contact_id", "workspace_id", "entered_at"]
        await session.execute(
            pg_insert(memberships).from_select(columns, entrants).on_conflict_do_nothing()
        )
        await session.execute(sa.insert(store.membership_history).from_select(columns, entrants))
    if leaving:
        await session.execute(
            sa.delete(memberships).where(
                memberships.c.segment_id == segment.id, memberships.c.contact_id == _any(leaving)
            )
        )
        await session.execute(
            sa.update(store.membership_history)
            .where(
                store.membership_history.c.segment_id == segment.id,
                store.membership_history.c.contact_id == _any(leaving),
                store.membership_history.c.exited_at.is_(None),
            )
            .values(exited_at=now)
        )
    await session.execute(
        sa.delete(backfill_changes).where(
            backfill_changes.c.segment_id == segment.id,
            backfill_changes.c.contact_id == _any([row.contact_id for row in rows]),
        )
    )
    await session.execute(
        sa.update(store.segments)
        .where(store.segments.c.id == segment.id)
        .values(backfill_done=store.segments.c.backfill_done + len(rows))
    )
    cause = Cause(work=f"backfill:{segment.version}")
    return [
        transition(
            segment.workspace_id,
            segment.id,
            segment.name,
            ContactSnapshot(
                contact_id=row.contact_id, user_id=row.user_id, traits=row.traits, scores=row.scores
            ),
            entered=row.entering,
            at=now,
            cause=cause,
        )
        for row in rows
    ]


def _any(ids: list[uuid.UUID]) -> sa.ColumnElement[Any]:
    """``= ANY(:ids)``: one array parameter, one compiled statement whatever the count."""
    return sa.any_(sa.cast(ids, ARRAY(UUID(as_uuid=True))))


async def hand_over(session: AsyncSession, segment: store.Segment, now: datetime) -> bool:
    """Mark the segment active once every real-time transaction that saw it backfilling
    has ended; its dependents are backfilled next. False if it was edited meanwhile."""
    current = await store.get_segment(
        session, workspace_id=segment.workspace_id, segment_id=segment.id, lock=True
    )
    if current is None or current.version != segment.version or current.status != "backfilling":
        return False
    await store.update_segment(session, segment_id=segment.id, status="active")
    await session.execute(
        sa.update(store.segments)
        .where(store.segments.c.id == segment.id)
        .values(backfill_finished_at=now)
    )
    for other in await store.list_segments(session, workspace_id=segment.workspace_id):
        if other.condition is not None and segment.id in referenced_segments(other.condition):
            await store.update_segment(
                session, segment_id=other.id, status="backfilling", new_version=True
            )
    return True


async def settle_dirty(
    session: AsyncSession, segment: store.Segment, now: datetime, limit: int
) -> tuple[int, list[OutgoingMessage]]:
    """Re-evaluate up to ``limit`` contacts that changed while the segment backfilled."""
    dirty = (
        await session.scalars(
            sa.select(store.backfill_dirty.c.contact_id)
            .where(store.backfill_dirty.c.segment_id == segment.id)
            .order_by(store.backfill_dirty.c.contact_id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    ).all()
    messages: list[OutgoingMessage] = []
    cause = Cause(work=f"handover:{segment.version}")
    for contact_id in dirty:
        messages += await reevaluate(
            session,
            workspace_id=segment.workspace_id,
            contact_id=contact_id,
            now=now,
            cause=cause,
            only=[segment.id],
        )
    if dirty:
        await session.execute(
            sa.delete(store.backfill_dirty).where(
                store.backfill_dirty.c.segment_id == segment.id,
                store.backfill_dirty.c.contact_id.in_(dirty),
            )
        )
    return len(dirty), messages
