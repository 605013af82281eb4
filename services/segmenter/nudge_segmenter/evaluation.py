"""Re-evaluating one contact: the single path by which a membership changes in real time,
shared by the contacts consumer, the recheck worker and a backfill's hand-over.

It locks the contact's row (so writers take turns), evaluates the segments that depend on
what changed, in dependency order (a transition re-evaluates the segments referencing
that segment), writes each transition with its history, schedules the next time-driven
recheck per segment, and returns one ``segment.entered`` / ``segment.exited`` per
transition, with an id derived from its cause.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.conditions import evaluate
from nudge_common.events import (
    SEGMENT_ENTERED,
    SEGMENT_EXITED,
    ContactSnapshot,
    Envelope,
    MembershipChanged,
    Topic,
)
from nudge_common.ids import stable_id
from nudge_common.kafka import OutgoingMessage
from nudge_segmenter import metrics, store
from nudge_segmenter.domain.segments import ALL_FACTS, SegmentIndex, event_names


@dataclass(frozen=True)
class Cause:
    """Why a contact is re-evaluated: a message (outputs derive their ids from it) or a
    named piece of durable work (a recheck, a backfill hand-over)."""

    envelope: Envelope | None = None
    work: str = ""

    def message_id(self, segment_id: uuid.UUID, contact_id: uuid.UUID) -> uuid.UUID | None:
        if self.envelope is not None:
            return None  # derived from the envelope by EventType.envelope
        return stable_id(self.work, str(segment_id), str(contact_id))


@dataclass
class _Cached:
    fingerprint: tuple[int, datetime | None]
    index: SegmentIndex
    names: dict[uuid.UUID, str]
    backfilling: frozenset[uuid.UUID]


class SegmentCache:
    """Each workspace's segment index, rebuilt when a segment is created or changed (one
    cheap fingerprint query per use)."""

    def __init__(self) -> None:
        self._cached: dict[str, _Cached] = {}

    async def get(self, session: AsyncSession, workspace_id: str) -> _Cached:
        row = (
            await session.execute(
                sa.select(sa.func.count(), sa.func.max(store.segments.c.updated_at)).where(
                    store.segments.c.workspace_id == workspace_id
                )
            )
        ).one()
        fingerprint = (int(row[0]), row[1])
        cached = self._cached.get(workspace_id)
        if cached is None or cached.fingerprint != fingerprint:
            live = await store.list_segments(session, workspace_id=workspace_id)
            cached = _Cached(
                fingerprint,
                SegmentIndex([(s.id, s.condition) for s in live if s.condition is not None]),
                {s.id: s.name for s in live},
                frozenset(s.id for s in live if s.status == "backfilling"),
            )
            self._cached[workspace_id] = cached
        return cached


segment_cache = SegmentCache()


async def reevaluate(
    session: AsyncSession,
    *,
    workspace_id: str,
    contact_id: uuid.UUID,
    now: datetime,
    cause: Cause,
    facts: Iterable[str] | None = None,
    only: Iterable[uuid.UUID] | None = None,
) -> list[OutgoingMessage]:
    """Re-evaluate the segments depending on ``facts`` (all when None), or just ``only``."""
    state = await store.lock_contact(session, contact_id)
    if state is None:
        return []
    cached = await segment_cache.get(session, workspace_id)
    index = cached.index
    if only is not None:
        wanted = {s for s in only if s in index.position}
    else:
        wanted = {s.id for s in index.affected(ALL_FACTS if facts is None else facts)}
    if facts is None and only is None:
        wanted |= {s.id for s in index.ordered}
    if not wanted:
        return []
    reachable = index.reachable(wanted)
    names = {n for s in index.ordered if s.id in reachable for n in event_names(s.condition)}
    events = await store.events_of(session, contact_id=contact_id, names=names)
    profile = replace(state.profile_without_events, events=events)
    snapshot = ContactSnapshot(
        contact_id=contact_id, user_id=state.user_id, traits=state.traits, scores=state.scores
    )
    messages: list[OutgoingMessage] = []
    rechecks: dict[uuid.UUID, datetime | None] = {}
    for segment in index.ordered:
        if segment.id not in wanted:
            continue
        if segment.id in cached.backfilling:
            status = await store.segment_status_shared(session, segment.id)
            if status == "backfilling":
                await store.mark_dirty(session, segment_id=segment.id, contact_id=contact_id)
                continue
        verdict = evaluate(segment.condition, profile, now)
        rechecks[segment.id] = verdict.recheck_at
        member = segment.id in profile.segments
        if verdict.matches == member:
            continue
        if verdict.matches:
            await store.enter(
                session,
                workspace_id=workspace_id,
                segment_id=segment.id,
                contact_id=contact_id,
                at=now,
            )
            profile = replace(profile, segments=profile.segments | {segment.id})
        else:
            await store.exit_(session, segment_id=segment.id, contact_id=contact_id, at=now)
            profile = replace(profile, segments=profile.segments - {segment.id})
        messages.append(
            transition(
                workspace_id,
                segment.id,
                cached.names[segment.id],
                snapshot,
                entered=verdict.matches,
                at=now,
                cause=cause,
            )
        )
        wanted |= {d.id for d in index.dependents(segment.id)}
    await store.set_rechecks(
        session, workspace_id=workspace_id, contact_id=contact_id, due=rechecks
    )
    return messages


def transition(
    workspace_id: str,
    segment_id: uuid.UUID,
    segment_name: str,
    contact: ContactSnapshot,
    *,
    entered: bool,
    at: datetime,
    cause: Cause,
) -> OutgoingMessage:
    metrics.TRANSITIONS.labels("entered" if entered else "exited").inc()
    event_type = SEGMENT_ENTERED if entered else SEGMENT_EXITED
    return OutgoingMessage(
        Topic.MEMBERSHIPS,
        key=str(contact.contact_id),
        envelope=event_type.envelope(
            workspace_id=workspace_id,
            payload=MembershipChanged(
                segment_id=segment_id, segment_name=segment_name, contact=contact, at=at
            ),
            occurred_at=at,
            id=cause.message_id(segment_id, contact.contact_id),
            caused_by=cause.envelope,
            scope=str(segment_id),
        ),
    )
