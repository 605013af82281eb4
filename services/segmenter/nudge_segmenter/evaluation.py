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
next time-driven recheck of each contact.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from pydantic import TypeAdapter
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common import codec
from nudge_common.conditions import CustomerValue, EventFact, Performed, Profile, leaves
from nudge_common.events import (
    SEGMENT_ENTERED,
    SEGMENT_EXITED,
    ContactActivity,
    ContactSnapshot,
    ContactUpdated,
    Envelope,
    EventType,
    MembershipChanged,
    Topic,
)
from nudge_common.ids import stable_id
from nudge_common.kafka import OutgoingMessage
from nudge_segmenter import metrics, store
from nudge_segmenter.domain.segments import Needed, SegmentIndex, event_names


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
    filtered_events: frozenset[str]
    """The events some condition filters by property: only theirs are loaded."""
    canonical: dict[uuid.UUID, uuid.UUID] = field(default_factory=dict)
    """Each live segment's id to the one object the index holds."""

    def __post_init__(self) -> None:
        self.canonical = {s.id: s.id for s in self.index.ordered}

    def needed(self, facts: Iterable[str] | None) -> Needed | None:
        """What a batch touching ``facts`` needs loaded; None: everything."""
        return None if facts is None else self.index.needed(facts)


_S = store.SCHEMA
_HEAD_COLUMNS = (
    f"(SELECT count(*) FROM {_S}.segments WHERE workspace_id = :ws),"
    f" (SELECT max(updated_at) FROM {_S}.segments WHERE workspace_id = :ws),"
    f" (SELECT rfm_cuts FROM {_S}.value_models WHERE workspace_id = :ws),"
    f" ARRAY(SELECT contact_id FROM {_S}.merged_contacts"
    " WHERE :skip_merged AND contact_id = ANY(CAST(:ids AS uuid[])))"
)
_HEAD = sa.text(f"SELECT {_HEAD_COLUMNS}")
"""The workspace's segments fingerprint, its RFM cut points and (if asked) which of the
contacts were merged away."""
_LOAD_CONTACTS = sa.text(
    f"SELECT {_HEAD_COLUMNS}, contact_id, user_id, traits, scores, tags, stages, consents,"
    " last_seen_at, orders, revenue, first_order_at, last_order_at, rfm_recency,"
    " rfm_frequency, rfm_monetary, clv, p_alive, expected_purchases"
    f" FROM {_S}.contacts AS c WHERE contact_id = ANY(CAST(:ids AS uuid[]))"
    f" AND NOT (:skip_merged AND EXISTS (SELECT FROM {_S}.merged_contacts AS m"
    " WHERE m.contact_id = c.contact_id))"
    " ORDER BY contact_id FOR UPDATE OF c"
)
"""The contacts, locked in id order, each row with :data:`_HEAD` in front (one round trip;
:data:`_HEAD` alone when none of them is known yet)."""
_LOAD_STATE = sa.text(
    f"WITH never_parallel AS (SELECT FROM {_S}.contacts"
    " WHERE contact_id = ANY(CAST(:ids AS uuid[])) FOR KEY SHARE)"
    " SELECT 0, contact_id, array_agg(segment_id), NULL::text[], NULL::timestamptz[],"
    f" NULL::jsonb[] FROM {_S}.memberships WHERE contact_id = ANY(CAST(:ids AS uuid[]))"
    " AND (:all OR segment_id = ANY(CAST(:segments AS uuid[]))"
    " OR contact_id = ANY(CAST(:new AS uuid[]))) GROUP BY contact_id"
    " UNION ALL"
    " SELECT 1, contact_id, NULL::uuid[], array_agg(event), array_agg(at),"
    " array_agg(CASE WHEN event = ANY(CAST(:filtered AS text[])) THEN properties END)"
    f" FROM {_S}.contact_events WHERE contact_id = ANY(CAST(:ids AS uuid[]))"
    " AND event = ANY(CAST(:events AS text[])) AND (:all"
    " OR event = ANY(CAST(:needed_events AS text[])) OR contact_id = ANY(CAST(:new AS uuid[])))"
    " GROUP BY contact_id"
    " UNION ALL"
    " SELECT 2, contact_id, NULL::uuid[], NULL::text[], ARRAY[due_at], NULL::jsonb[]"
    f" FROM {_S}.rechecks WHERE :timed AND contact_id = ANY(CAST(:ids AS uuid[]))"
)
"""The memberships (0), events (1) and scheduled recheck (2) of the batch's contacts that
its evaluations read, in one round trip, as arrays per contact (a few rows a contact, not
one per membership; the event properties only of the events a condition filters on).

``never_parallel`` is never run (a ``WITH`` query nothing reads), but its locking clause
keeps PostgreSQL from planning the statement in parallel: for the ``UNION ALL`` it chose a
parallel plan whose workers took ~10-20 ms to start, for ~1 ms of work in a batch of 10
(and no faster for 500). One row per contact with its lookups joined laterally avoids it
too, but took ~40% longer in batches of 500."""


class SegmentCache:
    """Each workspace's segment index, rebuilt when a segment is created or changed (one
    cheap fingerprint query per use)."""

    def __init__(self) -> None:
        self._cached: dict[str, Workspace] = {}

    async def get(
        self, session: AsyncSession, workspace_id: str, fingerprint: tuple[int, datetime | None]
    ) -> Workspace:
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
                frozenset(
                    leaf.event
                    for s in index.ordered
                    for leaf in leaves(s.condition)
                    if isinstance(leaf, Performed) and leaf.where is not None
                ),
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
    events_by_name: dict[str, list[EventFact]] = field(default_factory=dict)
    changed: bool = False
    replaced: bool = False
    """Its traits, scores, tags or stages changed (or it is new): the whole row is
    written back, not just its activity and value columns."""

    def add_event(self, event: EventFact) -> None:
        self.events.append(event)
        self.events_by_name.setdefault(event.event, []).append(event)

    def profile(self) -> Profile:
        return Profile(
            traits=self.traits,
            scores=self.scores,
            tags=self.tags,
            stages=self.stages,
            consents=self.consents,
            segments=self.segments,  # live: a transition's effect is seen at once
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
            events_by_name=self.events_by_name,
        )

    def snapshot(self) -> ContactSnapshot:
        return ContactSnapshot(
            contact_id=self.contact_id, user_id=self.user_id, traits=self.traits, scores=self.scores
        )

    def snapshot_json(self) -> dict[str, Any]:
        """``snapshot().model_dump(mode="json", by_alias=True)`` (equal, tested) without
        validating a model: the traits and scores are JSON already (decoded from the
        database or from a validated message); scores other than ints go the model's way."""
        traits, scores = self.traits, self.scores
        if type(traits) is not dict or any(type(v) is not int for v in scores.values()):
            return self.snapshot().model_dump(mode="json", by_alias=True)
        return {
            "contact_id": str(self.contact_id),
            "user_id": self.user_id,
            "traits": traits,
            "scores": scores,
            "segments": [],
        }


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
        self.rechecks: dict[uuid.UUID, datetime] = {}
        """The earliest recheck time the contact's evaluated segments ask for, if any does."""
        self.scheduled: dict[uuid.UUID, datetime] = {}
        """Each contact's recheck already due, as loaded."""
        self.dirty: set[tuple[uuid.UUID, uuid.UUID]] = set()
        self.messages: list[OutgoingMessage] = []
        self.stale: set[uuid.UUID] = set()
        """The contacts left out as merged into another (``load(skip_merged=True)``)."""

    @classmethod
    async def load(
        cls,
        session: AsyncSession,
        workspace_id: str,
        contact_ids: Iterable[uuid.UUID],
        *,
        facts: Iterable[str] | None = None,
        skip_merged: bool = False,
    ) -> ContactBatch:
        """Lock and load the contacts. With ``facts`` (what the changes to come touch; None:
        anything), the memberships, events and rechecks loaded are only those that
        evaluating after such changes reads (all of them for a contact new to the table).
        With ``skip_merged``, contacts merged into another are left out, in ``stale``."""
        ids = sorted(set(contact_ids))
        given = {"ws": workspace_id, "ids": ids, "skip_merged": skip_merged}
        rows = (await session.execute(_LOAD_CONTACTS, given)).all()
        head = rows[0][:4] if rows else (await session.execute(_HEAD, given)).one()
        stale = set(head[3])
        if stale:
            ids = [cid for cid in ids if cid not in stale]
        workspace = await segment_cache.get(session, workspace_id, (int(head[0]), head[1]))
        loaded = {cid: Contact(cid, exists=False) for cid in ids}
        for row in rows:
            (cid, user_id, traits, scores, tags, stages, consents, last_seen_at, orders) = row[4:13]
            (revenue, first_order_at, last_order_at, recency, frequency, monetary) = row[13:19]
            cid = loaded[cid].contact_id  # the caller's object
            loaded[cid] = Contact(
                contact_id=cid,
                exists=True,
                user_id=user_id,
                traits=traits,
                scores=scores,
                tags=tags,
                stages=stages,
                consents=frozenset(consents),
                last_seen_at=last_seen_at,
                orders=orders,
                revenue=revenue,
                first_order_at=first_order_at,
                last_order_at=last_order_at,
                rfm=None
                if recency is None
                else {"recency": recency, "frequency": frequency, "monetary": monetary},
                clv=row[19],
                p_alive=row[20],
                expected_purchases=row[21],
            )
        # A contact new to this table may already have memberships and events: a merge
        # moves them to a survivor not seen yet, a list takes anyone.
        needed = workspace.needed(facts)
        timed = any(s.timed for s in workspace.index.ordered)
        new = [cid for cid, c in loaded.items() if not c.exists]
        batch = cls(workspace_id, workspace, loaded, head[2])
        batch.stale = stale
        state = await session.execute(
            _LOAD_STATE,
            {
                "ids": ids,
                "all": needed is None,
                "new": new,
                "segments": sorted(needed.segments) if needed else [],
                "events": sorted(workspace.event_names),
                "needed_events": sorted(needed.events) if needed else [],
                "filtered": sorted(workspace.filtered_events),
                "timed": timed,
            },
        )
        canonical = workspace.canonical  # ids hashed and compared from now on: one object
        for kind, cid, segment_ids, names, ats, properties in state:
            contact = loaded[cid]
            if kind == 0:
                contact.segments.update(canonical.get(s, s) for s in segment_ids)
            elif kind == 1:
                for name, at, given in zip(names, ats, properties, strict=True):
                    contact.add_event(EventFact(name, at, given or {}))
            else:
                batch.scheduled[contact.contact_id] = ats[0]
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
        contact.replaced = True
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
            contact.add_event(EventFact(activity.event, at, activity.properties))
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
        ordered, position = index.ordered, index.position
        if only is not None:
            pending = sorted({position[s] for s in only if s in position})
        elif facts is None:
            pending = list(range(len(ordered)))
        else:
            pending = index.affected_positions(frozenset(facts))
        if not pending:
            return
        # Positions in evaluation order, as a heap: a transition adds its dependents, which
        # come later in that order.
        done = -1
        profile = contact.profile()
        snapshot: dict[str, Any] | None = None
        backfilling = self.workspace.backfilling
        recheck = self.rechecks.get(contact_id)
        while pending:
            place = heapq.heappop(pending)
            if place <= done:
                continue
            done = place
            segment = ordered[place]
            if backfilling and segment.id in backfilling:
                self.dirty.add((segment.id, contact_id))
                continue
            matches, recheck_at = segment.check(profile, now)
            if recheck_at is not None and (recheck is None or recheck_at < recheck):
                recheck = self.rechecks[contact_id] = recheck_at
            if matches == (segment.id in contact.segments):
                continue
            if matches:
                contact.segments.add(segment.id)
            else:
                contact.segments.discard(segment.id)
            self.transitions.append(_Transition(segment.id, contact_id, matches, now))
            if snapshot is None:
                snapshot = contact.snapshot_json()
            self.messages.append(
                _transition(
                    self.workspace_id,
                    segment.id,
                    self.workspace.names[segment.id],
                    contact_id,
                    snapshot,
                    entered=matches,
                    at=now,
                    cause=cause,
                )
            )
            for dependent in index.dependents(segment.id):
                heapq.heappush(pending, position[dependent.id])

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
        """Write the batch's effects (one statement, whatever their number, plus the dirty
        rows of backfilling segments); returns its messages, in order."""
        writes = _Writes()
        ws = self.workspace_id
        if self.new_events:
            events = self.new_events
            writes.add(
                f"INSERT INTO {_S}.contact_events"
                " (workspace_id, contact_id, event, at, properties, revenue)"
                " SELECT CAST(:{p}ws AS text), * FROM unnest(CAST(:{p}c AS uuid[]),"
                " CAST(:{p}e AS text[]), CAST(:{p}at AS timestamptz[]),"
                " CAST(:{p}pr AS jsonb[]), CAST(:{p}r AS float8[]))",
                ws=ws,
                c=[e["contact_id"] for e in events],
                e=[e["event"] for e in events],
                at=[e["at"] for e in events],
                pr=[_jsonb(e["properties"]) for e in events],
                r=[e["revenue"] for e in events],
            )
        self._save_contacts(writes, now)
        self._save_transitions(writes)
        self._save_rechecks(writes)
        await writes.execute(session)
        await self._save_dirty(session)
        return self.messages

    def _save_contacts(self, writes: _Writes, now: datetime) -> None:
        changed = [c for c in self.contacts.values() if c.changed]
        whole = [c for c in changed if c.replaced or not c.exists]
        activity = [c for c in changed if not (c.replaced or not c.exists)]
        if whole:
            writes.add(
                f"INSERT INTO {_S}.contacts (contact_id, workspace_id, user_id, traits, scores,"
                " tags, stages, last_seen_at, orders, revenue, first_order_at, last_order_at,"
                " rfm_recency, rfm_frequency, rfm_monetary, updated_at)"
                " SELECT u.contact_id, CAST(:{p}ws AS text), u.user_id, u.traits, u.scores,"
                " u.tags, u.stages, u.last_seen_at, u.orders, u.revenue, u.first_order_at,"
                " u.last_order_at, u.r, u.f, u.m, CAST(:{p}now AS timestamptz)"
                " FROM unnest(CAST(:{p}c AS uuid[]), CAST(:{p}u AS text[]),"
                " CAST(:{p}t AS jsonb[]), CAST(:{p}s AS jsonb[]), CAST(:{p}g AS jsonb[]),"
                " CAST(:{p}st AS jsonb[]), CAST(:{p}seen AS timestamptz[]),"
                " CAST(:{p}o AS integer[]), CAST(:{p}rev AS float8[]),"
                " CAST(:{p}fo AS timestamptz[]), CAST(:{p}lo AS timestamptz[]),"
                " CAST(:{p}r AS smallint[]), CAST(:{p}f AS smallint[]), CAST(:{p}m AS smallint[]))"
                " AS u(contact_id, user_id, traits, scores, tags, stages, last_seen_at, orders,"
                " revenue, first_order_at, last_order_at, r, f, m)"
                " ON CONFLICT (contact_id) DO UPDATE SET user_id = excluded.user_id,"
                " traits = excluded.traits, scores = excluded.scores, tags = excluded.tags,"
                " stages = excluded.stages, last_seen_at = excluded.last_seen_at,"
                " orders = excluded.orders, revenue = excluded.revenue,"
                " first_order_at = excluded.first_order_at, last_order_at = excluded.last_order_at,"
                " rfm_recency = excluded.rfm_recency, rfm_frequency = excluded.rfm_frequency,"
                " rfm_monetary = excluded.rfm_monetary, updated_at = excluded.updated_at",
                ws=self.workspace_id,
                now=now,
                c=[c.contact_id for c in whole],
                u=[c.user_id for c in whole],
                t=[_jsonb(c.traits) for c in whole],
                s=[_jsonb(c.scores) for c in whole],
                g=[_jsonb(c.tags) for c in whole],
                st=[_jsonb(c.stages) for c in whole],
                **_activity_columns(whole),
            )
        if activity:
            # Only the columns activities change: the rest is as loaded (the row is locked).
            writes.add(
                f"UPDATE {_S}.contacts AS c SET last_seen_at = u.last_seen_at,"
                " orders = u.orders, revenue = u.revenue, first_order_at = u.first_order_at,"
                " last_order_at = u.last_order_at, rfm_recency = u.r, rfm_frequency = u.f,"
                " rfm_monetary = u.m, updated_at = CAST(:{p}now AS timestamptz)"
                " FROM unnest(CAST(:{p}c AS uuid[]), CAST(:{p}seen AS timestamptz[]),"
                " CAST(:{p}o AS integer[]), CAST(:{p}rev AS float8[]),"
                " CAST(:{p}fo AS timestamptz[]), CAST(:{p}lo AS timestamptz[]),"
                " CAST(:{p}r AS smallint[]), CAST(:{p}f AS smallint[]), CAST(:{p}m AS smallint[]))"
                " AS u(contact_id, last_seen_at, orders, revenue, first_order_at, last_order_at,"
                " r, f, m) WHERE c.contact_id = u.contact_id",
                now=now,
                c=[c.contact_id for c in activity],
                **_activity_columns(activity),
            )

    def _save_transitions(self, writes: _Writes) -> None:
        if not self.transitions:
            return
        # History: an entry in this batch opens a row (closed by a later exit of this batch);
        # an exit with no entry in this batch closes the row already open.
        opened: dict[tuple[uuid.UUID, uuid.UUID], list[Any]] = {}
        history: list[list[Any]] = []
        closing: list[_Transition] = []
        for t in self.transitions:
            key = (t.segment_id, t.contact_id)
            if t.entered:
                row = [t.segment_id, t.contact_id, t.at, None]
                opened[key] = row
                history.append(row)
            elif key in opened:
                opened.pop(key)[3] = t.at
            else:
                closing.append(t)
        if closing:
            writes.add(
                f"UPDATE {_S}.membership_history AS h SET exited_at = g.at"
                " FROM unnest(CAST(:{p}s AS uuid[]), CAST(:{p}c AS uuid[]),"
                " CAST(:{p}at AS timestamptz[])) AS g(segment_id, contact_id, at)"
                " WHERE h.segment_id = g.segment_id AND h.contact_id = g.contact_id"
                " AND h.exited_at IS NULL",
                s=[t.segment_id for t in closing],
                c=[t.contact_id for t in closing],
                at=[t.at for t in closing],
            )
        if history:
            writes.add(
                f"INSERT INTO {_S}.membership_history"
                " (segment_id, contact_id, workspace_id, entered_at, exited_at)"
                " SELECT h.s, h.c, CAST(:{p}ws AS text), h.e, h.x"
                " FROM unnest(CAST(:{p}s AS uuid[]), CAST(:{p}c AS uuid[]),"
                " CAST(:{p}e AS timestamptz[]), CAST(:{p}x AS timestamptz[])) AS h(s, c, e, x)",
                ws=self.workspace_id,
                s=[r[0] for r in history],
                c=[r[1] for r in history],
                e=[r[2] for r in history],
                x=[r[3] for r in history],
            )
        final: dict[tuple[uuid.UUID, uuid.UUID], _Transition] = {}
        for t in self.transitions:  # the last transition of each pair decides
            final[(t.segment_id, t.contact_id)] = t
        joined = [t for t in final.values() if t.entered]
        left = [t for t in final.values() if not t.entered]
        if joined:
            writes.add(
                f"INSERT INTO {_S}.memberships (segment_id, contact_id, workspace_id, entered_at)"
                " SELECT m.s, m.c, CAST(:{p}ws AS text), m.e FROM unnest(CAST(:{p}s AS uuid[]),"
                " CAST(:{p}c AS uuid[]), CAST(:{p}e AS timestamptz[])) AS m(s, c, e)"
                " ON CONFLICT DO NOTHING",
                ws=self.workspace_id,
                s=[t.segment_id for t in joined],
                c=[t.contact_id for t in joined],
                e=[t.at for t in joined],
            )
        if left:
            writes.add(
                f"DELETE FROM {_S}.memberships AS m USING unnest(CAST(:{{p}}s AS uuid[]),"
                " CAST(:{p}c AS uuid[])) AS g(segment_id, contact_id)"
                " WHERE m.segment_id = g.segment_id AND m.contact_id = g.contact_id",
                s=[t.segment_id for t in left],
                c=[t.contact_id for t in left],
            )

    def _save_rechecks(self, writes: _Writes) -> None:
        """A contact's recheck is written only when it moves earlier: one due sooner stays
        (it then re-evaluates every time-driven segment of the contact and schedules the
        right one), so a contact active every minute does not rewrite it every minute."""
        due = [
            (contact_id, at)
            for contact_id, at in self.rechecks.items()
            if (before := self.scheduled.get(contact_id)) is None or at < before
        ]
        if due:
            writes.add(
                f"INSERT INTO {_S}.rechecks (contact_id, workspace_id, due_at)"
                " SELECT r.c, CAST(:{p}ws AS text), r.d FROM unnest(CAST(:{p}c AS uuid[]),"
                " CAST(:{p}d AS timestamptz[])) AS r(c, d)"
                " ON CONFLICT (contact_id) DO UPDATE SET due_at = excluded.due_at",
                ws=self.workspace_id,
                c=[d[0] for d in due],
                d=[d[1] for d in due],
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


def _jsonb(value: Any) -> str:
    """A ``jsonb`` array element as the connection's codec takes it: JSON text."""
    return codec.dumps(value).decode()


def _activity_columns(changed: list[Contact]) -> dict[str, list[Any]]:
    return {
        "seen": [c.last_seen_at for c in changed],
        "o": [c.orders for c in changed],
        "rev": [c.revenue for c in changed],
        "fo": [c.first_order_at for c in changed],
        "lo": [c.last_order_at for c in changed],
        "r": [c.rfm["recency"] if c.rfm else None for c in changed],
        "f": [c.rfm["frequency"] if c.rfm else None for c in changed],
        "m": [c.rfm["monetary"] if c.rfm else None for c in changed],
    }


class _Writes:
    """A batch's writes as one statement: each is a data-modifying ``WITH`` query of the
    next (they touch different rows, and see the same snapshot: the history rows a batch
    closes are those open before it, as when closed first), its columns as array
    parameters, so the text depends only on which kinds of write there are."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.params: dict[str, Any] = {}

    def add(self, sql: str, **params: Any) -> None:
        prefix = f"w{len(self.parts)}_"
        self.parts.append(sql.replace("{p}", prefix))
        self.params.update({prefix + name: value for name, value in params.items()})

    async def execute(self, session: AsyncSession) -> None:
        if not self.parts:
            return
        if len(self.parts) == 1:
            statement = self.parts[0]
        else:
            queries = ", ".join(f"w{n} AS ({part})" for n, part in enumerate(self.parts))
            statement = f"WITH {queries} SELECT 1"
        await session.execute(_text(statement), self.params)


@functools.lru_cache(maxsize=256)
def _text(statement: str) -> sa.TextClause:
    """A write statement parsed once per shape (its text depends only on which kinds of
    write a batch has, not on their number)."""
    return sa.text(statement)


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
    facts = None if facts is None else list(facts)
    batch = await ContactBatch.load(
        session, workspace_id, [contact_id], facts=facts if only is None else None
    )
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
    return _transition(
        workspace_id,
        segment_id,
        segment_name,
        contact.contact_id,
        contact.model_dump(mode="json", by_alias=True),
        entered=entered,
        at=at,
        cause=cause,
    )


_DATETIME: TypeAdapter[datetime] = TypeAdapter(datetime)
_ENTERED = metrics.TRANSITIONS.labels("entered")
_EXITED = metrics.TRANSITIONS.labels("exited")


def _transition(
    workspace_id: str,
    segment_id: uuid.UUID,
    segment_name: str,
    contact_id: uuid.UUID,
    snapshot: dict[str, Any],
    *,
    entered: bool,
    at: datetime,
    cause: Cause,
) -> OutgoingMessage:
    """The envelope ``EventType.envelope`` builds for a :class:`MembershipChanged` (equal to
    it, tested), put together from the contact's snapshot already in JSON form (shared by a
    contact's transitions) without validating it again: a contact entering 3 segments on
    one event costs one snapshot, not three models and envelopes validated."""
    (_ENTERED if entered else _EXITED).inc()
    event_type: EventType[MembershipChanged] = SEGMENT_ENTERED if entered else SEGMENT_EXITED
    caused_by = cause.envelope
    segment_key = _text_of(segment_id)
    id = cause.message_id(segment_id, contact_id)
    if id is None:
        id = (
            stable_id(_text_of(caused_by.id), event_type.name, segment_key)
            if caused_by
            else uuid.uuid4()
        )
    return OutgoingMessage(
        Topic.MEMBERSHIPS,
        key=snapshot["contact_id"],
        envelope=Envelope.model_construct(
            type=event_type.name,
            version=event_type.version,
            id=id,
            occurred_at=at,
            workspace_id=workspace_id,
            origin_received_at=caused_by.origin_received_at if caused_by else None,
            payload={
                "segment_id": segment_key,
                "segment_name": segment_name,
                "contact": snapshot,
                "at": _json_time(at),
            },
        ),
    )


@functools.lru_cache(maxsize=4096)
def _text_of(id: uuid.UUID) -> str:
    """An id as text, remembered: a batch names the same segments and causes again and
    again (``str`` of a UUID costs more than the lookup)."""
    return str(id)


@functools.lru_cache(maxsize=64)
def _json_time(at: datetime) -> str:
    """A time as pydantic writes it in JSON; a batch's transitions share one."""
    text: str = _DATETIME.dump_python(at, mode="json")
    return text
