"""Re-evaluating contacts: the single path by which a membership changes in real time,
shared by the contacts consumer, the recheck worker, a backfill's hand-over, list and
consent changes.

A :class:`ContactBatch` loads the state of a set of contacts with a few queries (locking
their rows, so writers take turns), then applies changes and evaluates in memory, message
by message in order: after each change it evaluates the segments that depend on what
changed, in dependency order (a transition re-evaluates the segments referencing that
segment), and records one ``segment.entered`` / ``segment.exited`` per transition with an
id derived from its cause. :meth:`ContactBatch.save` writes the new state back with a
few set-based statements: events, contacts, membership changes and their history, and the
next time-driven recheck per (segment, contact).
"""

from __future__ import annotations

import bisect
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.conditions import CustomerValue, EventFact, Profile, evaluate
from nudge_common.events import (
    SEGMENT_ENTERED,
    SEGMENT_EXITED,
    ContactActivity,
    ContactSnapshot,
    ContactUpdated,
    Envelope,
    MembershipChanged,
    Topic,
)
from nudge_common.ids import stable_id
from nudge_common.kafka import OutgoingMessage
from nudge_segmenter import metrics, store
from nudge_segmenter.domain.segments import SegmentIndex, event_names
from nudge_segmenter.store import contacts, memberships


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
class Workspace:
    fingerprint: tuple[int, datetime | None]
    index: SegmentIndex
    names: dict[uuid.UUID, str]
    backfilling: frozenset[uuid.UUID]
    event_names: frozenset[str]


class SegmentCache:
    """Each workspace's segment index, rebuilt when a segment is created or changed (one
    cheap fingerprint query per use)."""

    def __init__(self) -> None:
        self._cached: dict[str, Workspace] = {}

    async def get(self, session: AsyncSession, workspace_id: str) -> Workspace:
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
            live = [
                s
                for s in await store.list_segments(session, workspace_id=workspace_id)
                if s.condition is not None
            ]
            index = SegmentIndex([(s.id, s.condition) for s in live if s.condition is not None])
            cached = Workspace(
                fingerprint,
                index,
                {s.id: s.name for s in live},
                frozenset(s.id for s in live if s.status == "backfilling"),
                frozenset(n for s in index.ordered for n in event_names(s.condition)),
            )
            self._cached[workspace_id] = cached
        return cached


segment_cache = SegmentCache()


@dataclass
class Contact:
    """A contact's state in memory while a batch applies to it."""

    contact_id: uuid.UUID
    exists: bool
    user_id: str | None = None
    traits: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, int] = field(default_factory=dict)
    tags: dict[str, int] = field(default_factory=dict)
    stages: dict[str, str] = field(default_factory=dict)
    consents: frozenset[str] = frozenset()
    last_seen_at: datetime | None = None
    orders: int = 0
    revenue: float = 0.0
    first_order_at: datetime | None = None
    last_order_at: datetime | None = None
    rfm: dict[str, int] | None = None
    clv: float | None = None
    p_alive: float | None = None
    expected_purchases: float | None = None
    segments: set[uuid.UUID] = field(default_factory=set)
    events: list[EventFact] = field(default_factory=list)
    changed: bool = False

    def profile(self) -> Profile:
        return Profile(
            traits=self.traits,
            scores=self.scores,
            tags=self.tags,
            stages=self.stages,
            consents=self.consents,
            segments=frozenset(self.segments),
            value=CustomerValue(
                revenue=self.revenue,
                orders=self.orders,
                clv=self.clv,
                p_alive=self.p_alive,
                expected_purchases=self.expected_purchases,
                rfm=self.rfm,  # type: ignore[arg-type]
            ),
            last_seen_at=self.last_seen_at,
            events=self.events,
        )

    def snapshot(self) -> ContactSnapshot:
        return ContactSnapshot(
            contact_id=self.contact_id, user_id=self.user_id, traits=self.traits, scores=self.scores
        )


@dataclass
class _Transition:
    segment_id: uuid.UUID
    contact_id: uuid.UUID
    entered: bool
    at: datetime


class ContactBatch:
    def __init__(
        self,
        workspace_id: str,
        workspace: Workspace,
        loaded: dict[uuid.UUID, Contact],
        rfm_cuts: dict[str, list[float]] | None,
    ) -> None:
        self.workspace_id = workspace_id
        self.workspace = workspace
        self.contacts = loaded
        self.rfm_cuts = rfm_cuts
        self.new_events: list[dict[str, Any]] = []
        self.transitions: list[_Transition] = []
        self.rechecks: dict[tuple[uuid.UUID, uuid.UUID], datetime | None] = {}
        self.scheduled: dict[tuple[uuid.UUID, uuid.UUID], datetime] = {}
        """The rechecks already due for these contacts."""
        self.dirty: set[tuple[uuid.UUID, uuid.UUID]] = set()
        self.messages: list[OutgoingMessage] = []

    @classmethod
    async def load(
        cls, session: AsyncSession, workspace_id: str, contact_ids: Iterable[uuid.UUID]
    ) -> ContactBatch:
        ids = sorted(set(contact_ids))
        workspace = await segment_cache.get(session, workspace_id)
        rows = await session.execute(
            sa.select(contacts)
            .where(contacts.c.contact_id.in_(ids))
            .order_by(contacts.c.contact_id)
            .with_for_update()
        )
        loaded = {cid: Contact(cid, exists=False) for cid in ids}
        for row in rows:
            loaded[row.contact_id] = Contact(
                contact_id=row.contact_id,
                exists=True,
                user_id=row.user_id,
                traits=row.traits,
                scores=row.scores,
                tags=row.tags,
                stages=row.stages,
                consents=frozenset(row.consents),
                last_seen_at=row.last_seen_at,
                orders=row.orders,
                revenue=row.revenue,
                first_order_at=row.first_order_at,
                last_order_at=row.last_order_at,
                rfm=None
                if row.rfm_recency is None
                else {
                    "recency": row.rfm_recency,
                    "frequency": row.rfm_frequency,
                    "monetary": row.rfm_monetary,
                },
                clv=row.clv,
                p_alive=row.p_alive,
                expected_purchases=row.expected_purchases,
            )
        # A contact new to this table may already have memberships and events: a merge
        # moves them to a survivor not seen yet, a list takes anyone.
        member_rows = await session.execute(
            sa.select(memberships.c.contact_id, memberships.c.segment_id).where(
                memberships.c.contact_id.in_(ids)
            )
        )
        for contact_id, segment_id in member_rows:
            loaded[contact_id].segments.add(segment_id)
        if workspace.event_names:
            event_rows = await session.execute(
                sa.select(
                    store.contact_events.c.contact_id,
                    store.contact_events.c.event,
                    store.contact_events.c.at,
                    store.contact_events.c.properties,
                ).where(
                    store.contact_events.c.contact_id.in_(ids),
                    store.contact_events.c.event.in_(sorted(workspace.event_names)),
                )
            )
            for row in event_rows:
                loaded[row.contact_id].events.append(EventFact(row.event, row.at, row.properties))
        cuts = await session.scalar(
            sa.select(store.value_models.c.rfm_cuts).where(
                store.value_models.c.workspace_id == workspace_id
            )
        )
        batch = cls(workspace_id, workspace, loaded, cuts)
        if any(s.timed for s in workspace.index.ordered):
            scheduled = await session.execute(
                sa.select(
                    store.rechecks.c.segment_id,
                    store.rechecks.c.contact_id,
                    store.rechecks.c.due_at,
                ).where(store.rechecks.c.contact_id.in_(ids))
            )
            batch.scheduled = {(r.segment_id, r.contact_id): r.due_at for r in scheduled}
        return batch

    # --- changes -----------------------------------------------------------------------

    def apply_update(self, update: ContactUpdated) -> list[str] | None:
        """A scoring update; returns the facts it touched (None: all, a new contact)."""
        contact = self.contacts[update.contact_id]
        new = not contact.exists and not contact.changed
        contact.user_id = update.user_id
        contact.traits = update.traits
        contact.scores = update.scores
        contact.tags = update.tags
        contact.stages = update.stages
        contact.changed = True
        return None if new else list(update.changed) or None

    def apply_activity(self, activity: ContactActivity) -> list[str] | None:
        contact = self.contacts[activity.contact_id]
        new = not contact.exists and not contact.changed
        at = activity.at
        self.new_events.append(
            {
                "workspace_id": self.workspace_id,
                "contact_id": activity.contact_id,
                "event": activity.event,
                "at": at,
                "properties": activity.properties,
                "revenue": activity.revenue,
            }
        )
        if activity.event in self.workspace.event_names:
            contact.events.append(EventFact(activity.event, at, activity.properties))
        contact.last_seen_at = max(contact.last_seen_at or at, at)
        facts = ["activity", f"event:{activity.event}"]
        if activity.revenue is not None:
            contact.revenue += activity.revenue
            if activity.revenue >= 0:
                contact.orders += 1
                contact.first_order_at = min(contact.first_order_at or at, at)
                contact.last_order_at = max(contact.last_order_at or at, at)
                self._rescore(contact)
            facts.append("value")
        contact.changed = True
        return None if new else facts

    def _rescore(self, contact: Contact) -> None:
        """An order re-scores RFM against the workspace's last cut points."""
        if not self.rfm_cuts or contact.last_order_at is None:
            return
        values = {
            "recency": contact.last_order_at.timestamp(),
            "frequency": float(contact.orders),
            "monetary": contact.revenue,
        }
        contact.rfm = {
            axis: max(1, bisect.bisect_right(self.rfm_cuts[axis], values[axis])) for axis in values
        }

    # --- evaluation --------------------------------------------------------------------

    def evaluate(
        self,
        contact_id: uuid.UUID,
        *,
        now: datetime,
        cause: Cause,
        facts: Iterable[str] | None = None,
        only: Iterable[uuid.UUID] | None = None,
    ) -> None:
        """Re-evaluate the contact's segments depending on ``facts`` (all when None), or
        just ``only``; records the transitions, their messages and next rechecks."""
        contact = self.contacts[contact_id]
        index = self.workspace.index
        if only is not None:
            wanted = {s for s in only if s in index.position}
        elif facts is None:
            wanted = {s.id for s in index.ordered}
        else:
            wanted = {s.id for s in index.affected(facts)}
        if not wanted:
            return
        profile = contact.profile()
        for segment in index.ordered:
            if segment.id not in wanted:
                continue
            if segment.id in self.workspace.backfilling:
                self.dirty.add((segment.id, contact_id))
                continue
            verdict = evaluate(segment.condition, profile, now)
            if segment.timed:
                self.rechecks[(segment.id, contact_id)] = verdict.recheck_at
            if verdict.matches == (segment.id in contact.segments):
                continue
            if verdict.matches:
                contact.segments.add(segment.id)
            else:
                contact.segments.discard(segment.id)
            profile = contact.profile()
            self.transitions.append(_Transition(segment.id, contact_id, verdict.matches, now))
            self.messages.append(
                transition(
                    self.workspace_id,
                    segment.id,
                    self.workspace.names[segment.id],
                    contact.snapshot(),
                    entered=verdict.matches,
                    at=now,
                    cause=cause,
                )
            )
            wanted |= {d.id for d in index.dependents(segment.id)}

    def set_static(
        self,
        list_id: uuid.UUID,
        name: str,
        contact_id: uuid.UUID,
        *,
        add: bool,
        now: datetime,
        cause: Cause,
    ) -> None:
        """A static list gains or loses the contact (nothing if it already is or is not a
        member); the segments referencing the list follow."""
        contact = self.contacts[contact_id]
        if (list_id in contact.segments) == add:
            return
        if add:
            contact.segments.add(list_id)
        else:
            contact.segments.discard(list_id)
        contact.changed = contact.changed or not contact.exists
        self.transitions.append(_Transition(list_id, contact_id, add, now))
        self.messages.append(
            transition(
                self.workspace_id,
                list_id,
                name,
                contact.snapshot(),
                entered=add,
                at=now,
                cause=cause,
            )
        )
        self.evaluate(contact_id, now=now, cause=cause, facts=[f"segment:{list_id}"])

    # --- writing back ------------------------------------------------------------------

    async def save(self, session: AsyncSession, *, now: datetime) -> list[OutgoingMessage]:
        """Write the batch's effects; returns its messages, in order."""
        if self.new_events:
            await session.execute(sa.insert(store.contact_events), self.new_events)
        await self._save_contacts(session, now)
        await self._save_transitions(session)
        await self._save_rechecks(session)
        await self._save_dirty(session)
        return self.messages

    async def _save_contacts(self, session: AsyncSession, now: datetime) -> None:
        rows = [
            {
                "contact_id": c.contact_id,
                "workspace_id": self.workspace_id,
                "user_id": c.user_id,
                "traits": c.traits,
                "scores": c.scores,
                "tags": c.tags,
                "stages": c.stages,
                "last_seen_at": c.last_seen_at,
                "orders": c.orders,
                "revenue": c.revenue,
                "first_order_at": c.first_order_at,
                "last_order_at": c.last_order_at,
                "rfm_recency": c.rfm["recency"] if c.rfm else None,
                "rfm_frequency": c.rfm["frequency"] if c.rfm else None,
                "rfm_monetary": c.rfm["monetary"] if c.rfm else None,
                "updated_at": now,
            }
            for c in self.contacts.values()
            if c.changed
        ]
        if not rows:
            return
        statement = pg_insert(contacts)
        columns = [k for k in rows[0] if k not in ("contact_id", "workspace_id")]
        await session.execute(
            statement.on_conflict_do_update(
                index_elements=[contacts.c.contact_id],
                set_={k: statement.excluded[k] for k in columns},
            ),
            rows,
        )

    async def _save_transitions(self, session: AsyncSession) -> None:
        if not self.transitions:
            return
        # History: an entry in this batch opens a row (closed by a later exit of this batch);
        # an exit with no entry in this batch closes the row already open.
        opened: dict[tuple[uuid.UUID, uuid.UUID], dict[str, Any]] = {}
        history: list[dict[str, Any]] = []
        closing: list[_Transition] = []
        for t in self.transitions:
            key = (t.segment_id, t.contact_id)
            if t.entered:
                row = {
                    "segment_id": t.segment_id,
                    "contact_id": t.contact_id,
                    "workspace_id": self.workspace_id,
                    "entered_at": t.at,
                    "exited_at": None,
                }
                opened[key] = row
                history.append(row)
            elif key in opened:
                opened.pop(key)["exited_at"] = t.at
            else:
                closing.append(t)
        for at in sorted({t.at for t in closing}):
            history_table = store.membership_history
            given = _pairs([(t.segment_id, t.contact_id) for t in closing if t.at == at])
            await session.execute(
                sa.update(history_table)
                .where(
                    history_table.c.segment_id == given.c.segment_id,
                    history_table.c.contact_id == given.c.contact_id,
                    history_table.c.exited_at.is_(None),
                )
                .values(exited_at=at)
            )
        if history:
            await session.execute(sa.insert(store.membership_history), history)
        final: dict[tuple[uuid.UUID, uuid.UUID], _Transition] = {}
        for t in self.transitions:  # the last transition of each pair decides
            final[(t.segment_id, t.contact_id)] = t
        joined = [t for t in final.values() if t.entered]
        left = [t for t in final.values() if not t.entered]
        if joined:
            await session.execute(
                pg_insert(memberships).on_conflict_do_nothing(),
                [
                    {
                        "segment_id": t.segment_id,
                        "contact_id": t.contact_id,
                        "workspace_id": self.workspace_id,
                        "entered_at": t.at,
                    }
                    for t in joined
                ],
            )
        if left:
            await session.execute(
                _delete_pairs(memberships, [(t.segment_id, t.contact_id) for t in left])
            )

    async def _save_rechecks(self, session: AsyncSession) -> None:
        """Only earlier rechecks are written: a recheck already due sooner stays (it then
        finds nothing changed and schedules the right one), so a contact active every
        minute does not rewrite its rechecks every minute."""
        due = [
            {"segment_id": s, "contact_id": c, "workspace_id": self.workspace_id, "due_at": at}
            for (s, c), at in self.rechecks.items()
            if at is not None and ((s, c) not in self.scheduled or at < self.scheduled[(s, c)])
        ]
        if due:
            statement = pg_insert(store.rechecks)
            await session.execute(
                statement.on_conflict_do_update(
                    index_elements=[store.rechecks.c.segment_id, store.rechecks.c.contact_id],
                    set_={"due_at": statement.excluded.due_at},
                ),
                due,
            )

    async def _save_dirty(self, session: AsyncSession) -> None:
        """Contacts a backfilling segment must look at again once handed over. Under a
        share lock of the segment's row: a hand-over waits for this transaction, then
        settles these rows (rows for a segment handed over meanwhile are settled by the
        backfill worker's next round)."""
        for segment_id in sorted({s for s, _ in self.dirty}):
            await store.segment_status_shared(session, segment_id)
            await session.execute(
                pg_insert(store.backfill_dirty).on_conflict_do_nothing(),
                [{"segment_id": s, "contact_id": c} for s, c in self.dirty if s == segment_id],
            )


def _pairs(pairs: list[tuple[uuid.UUID, uuid.UUID]]) -> sa.TableValuedAlias:
    """(segment, contact) pairs as a table of two array parameters, whatever their number."""
    return (
        sa.func.unnest(
            sa.cast([s for s, _ in pairs], ARRAY(UUID(as_uuid=True))),
            sa.cast([c for _, c in pairs], ARRAY(UUID(as_uuid=True))),
        )
        .table_valued("segment_id", "contact_id")
        .render_derived(with_types=False)
    )


def _delete_pairs(table: sa.Table, pairs: list[tuple[uuid.UUID, uuid.UUID]]) -> sa.Delete:
    given = _pairs(pairs)
    return sa.delete(table).where(
        table.c.segment_id == given.c.segment_id, table.c.contact_id == given.c.contact_id
    )


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
    """Re-evaluate one contact whose state changed in the database (a merge, a consent,
    a list) or whose time came (a recheck, a hand-over)."""
    batch = await ContactBatch.load(session, workspace_id, [contact_id])
    if not batch.contacts[contact_id].exists:
        return []
    batch.evaluate(contact_id, now=now, cause=cause, facts=facts, only=only)
    return await batch.save(session, now=now)


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
