"""Scoring's Kafka wiring: an inbound event resolves to one contact (merging contacts that
turn out to be one person), is stored once, updates the profile, tags and transactions,
scores against the workspace's rules, and publishes ``contact.merged``,
``contact.activity`` (track, page and screen calls), ``contact.stage_changed`` and
``contact.updated`` (only on a real change), in that order. A ``score.adjusted`` adds its
points to one contact once.

Every output id derives from its cause (the inbound envelope, plus the merged contact or
the model as scope), and every contact id from the identity it was first seen with, so a
batch replayed after a crash produces the same rows and the same messages.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.consumer import BatchFirstHandler, ConsumerRunner
from nudge_common.errors import InvalidMessage, RetryLater
from nudge_common.events import (
    CONTACT_ACTIVITY,
    CONTACT_MERGED,
    CONTACT_STAGE_CHANGED,
    CONTACT_UPDATED,
    EVENT_RECEIVED,
    SCORE_ADJUSTED,
    ContactMerged,
    ContactUpdated,
    Envelope,
    EventType,
    ScoreAdjusted,
    SegmentEvent,
    SegmentType,
    Topic,
    derived_envelope,
    json_datetime,
)
from nudge_common.ids import stable_id
from nudge_common.kafka import OutgoingMessage
from nudge_common.service import Runtime, Worker
from nudge_scoring import metrics, store
from nudge_scoring.domain import profile
from nudge_scoring.domain.rules import (
    EVER,
    HELD,
    ORDER_COMPLETED,
    TRANSACTION_EVENTS,
    BehaviouralSpec,
    DecaySpec,
    ProfileSpec,
    Rule,
    RuleIndex,
    ScoringState,
    Stage,
    day_period,
    order_value,
    score_event,
    score_profile,
    stage_for,
)
from nudge_scoring.domain.scoring import incoming_traits
from nudge_scoring.settings import ScoringSettings

MergeReason = Literal["identify", "alias", "email"]
Changed = Literal["traits", "scores", "tags", "stages"]
ACTIVITY_NAMES = {SegmentType.PAGE: "Page Viewed", SegmentType.SCREEN: "Screen Viewed"}


@dataclass
class Outputs:
    """The messages one cause produces, each with an id derived from that cause. The
    messages of every event (activity, stage changes, updates) are built from their JSON
    form directly, without the payload models: ``tests/services/scoring/test_outputs.py``
    holds each equal to its model's."""

    workspace_id: str
    cause: Envelope
    occurred_at: datetime
    messages: list[OutgoingMessage] = field(default_factory=list)

    def _add(
        self, event_type: EventType[Any], key: str, payload: dict[str, Any], scope: str = ""
    ) -> None:
        self.messages.append(
            OutgoingMessage(
                Topic.CONTACTS,
                key=key,
                envelope=derived_envelope(
                    event_type,
                    workspace_id=self.workspace_id,
                    payload=payload,
                    occurred_at=self.occurred_at,
                    caused_by=self.cause,
                    scope=scope,
                ),
            )
        )

    def merged(self, change: ContactMerged) -> None:
        self._add(
            CONTACT_MERGED,
            str(change.survivor_id),
            change.model_dump(mode="json", by_alias=True),
            scope=str(change.merged_id),
        )

    def activity(
        self, contact_id: uuid.UUID, event: SegmentEvent, name: str, revenue: float | None
    ) -> None:
        """``contact.activity`` (a :class:`ContactActivity`) of a track, page or screen call."""
        properties = event.properties
        if event.type is not SegmentType.TRACK and event.name and "name" not in properties:
            properties = {"name": event.name, **properties}
        key = str(contact_id)
        self._add(
            CONTACT_ACTIVITY,
            key,
            {
                "contact_id": key,
                "message_id": event.message_id,
                "kind": event.type.value,
                "event": name,
                "properties": properties,
                "revenue": None if revenue is None else float(revenue),
                "at": json_datetime(event.timestamp),
            },
        )

    def stage_changed(
        self,
        contact_id: uuid.UUID,
        model: str,
        previous: str | None,
        stage: str,
        score: int,
        at: datetime,
    ) -> None:
        """``contact.stage_changed`` (a :class:`ContactStageChanged`)."""
        key = str(contact_id)
        self._add(
            CONTACT_STAGE_CHANGED,
            key,
            {
                "contact_id": key,
                "model": model,
                "previous_stage": previous,
                "stage": stage,
                "score": score,
                "at": json_datetime(at),
            },
            scope=model,
        )

    def updated_state(
        self,
        contact: store.ContactState,
        changed: list[Changed],
        cause_message_id: str | None,
    ) -> None:
        """``contact.updated``: what :func:`contact_updated` gives, in its JSON form."""
        key = str(contact.id)
        self._add(
            CONTACT_UPDATED,
            key,
            {
                "contact_id": key,
                "user_id": contact.user_id,
                "traits": dict(contact.traits),
                "scores": dict(contact.scores),
                "tags": contact.tags,
                "stages": dict(contact.stages),
                "changed": list(changed),
                "cause_message_id": cause_message_id,
            },
            scope=key,
        )

    def updated(self, update: ContactUpdated) -> None:
        """``contact.updated`` from its model (the timer worker's)."""
        self._add(
            CONTACT_UPDATED,
            str(update.contact_id),
            update.model_dump(mode="json", by_alias=True),
            scope=str(update.contact_id),
        )


# --- identity resolution -----------------------------------------------------------------


CONTACT_REFERENCE = "nudge-contact:"
"""How the notifier and ingest name a contact that has no userId in the engagement they
report (``nudge_common.tracking.engagement_event``): ``nudge-contact:<contact id>``."""


def contact_reference(event: SegmentEvent) -> uuid.UUID | None:
    """The contact the event names directly: its userId, else its anonymousId, when that is
    ``nudge-contact:<contact id>``."""
    primary = event.user_id or event.anonymous_id or ""
    if not primary.startswith(CONTACT_REFERENCE):
        return None
    name = "userId" if event.user_id else "anonymousId"
    try:
        return uuid.UUID(primary.removeprefix(CONTACT_REFERENCE))
    except ValueError:
        raise InvalidMessage(
            f"{name}: {primary!r} is not {CONTACT_REFERENCE}<contact id> (a UUID)"
        ) from None


def known_user_id(event: SegmentEvent) -> str | None:
    """The event's userId, unless it is a contact reference (which names no user)."""
    user_id = event.user_id
    return None if user_id and user_id.startswith(CONTACT_REFERENCE) else user_id


def identity_keys(event: SegmentEvent, email: str | None) -> list[tuple[str, str]]:
    """The keys an event is resolved by, primary first. A contact reference is the one key
    ``(CONTACT_KEY, id)``: it names the contact (or its survivor) and is never claimed."""
    reference = contact_reference(event)
    if reference is not None:
        return [(store.CONTACT_KEY, str(reference))]
    keys: list[tuple[str, str]] = []
    if event.user_id:
        keys.append(("user_id", event.user_id))
    if event.anonymous_id and not event.anonymous_id.startswith(CONTACT_REFERENCE):
        keys.append(("anonymous_id", event.anonymous_id))
    if email:
        keys.append(("email", email))
    return keys


def validate(event: SegmentEvent) -> None:
    """Refuse what can never be applied, naming the field."""
    if not event.user_id and not event.anonymous_id:
        raise InvalidMessage("the event has neither userId nor anonymousId")
    if event.type is SegmentType.ALIAS and not event.previous_id:
        raise InvalidMessage("an alias call needs previousId")
    if contact_reference(event) is not None and event.type is SegmentType.ALIAS:
        raise InvalidMessage(f"userId: an alias call names a user, not {CONTACT_REFERENCE}<id>")
    if event.type is SegmentType.IDENTIFY:
        bad = profile.invalid_tags(event.traits)
        if bad:
            raise InvalidMessage(
                f"traits.tags: {bad[0]!r} is not a tag name (lower-case namespace:value, "
                "e.g. interest:shoes)"
            )


async def resolve_contact(
    session: AsyncSession,
    *,
    workspace_id: str,
    event: SegmentEvent,
    email: str | None,
    out: Outputs,
) -> uuid.UUID:
    """The contact an event belongs to, created on first sight (its id derives from the
    identity it was first seen with), merging the contacts the event shows to be one.
    Events naming a contact by reference never come here: their one key never merges and
    they are no alias, so the batch lookup resolves them."""
    keys = identity_keys(event, email)
    primary = keys[0]
    for _ in range(5):
        found = await store.identities_of(session, workspace_id=workspace_id, keys=keys)
        missing = [key for key in keys if key not in found]
        if missing:
            target = found.get(primary) or next(iter(found.values()), None)
            if target is None:
                target = stable_id(workspace_id, "contact", *primary)
                await store.create_contact(
                    session,
                    workspace_id=workspace_id,
                    contact_id=target,
                    user_id=event.user_id,
                    at=event.timestamp,
                )
                metrics.CONTACTS_CREATED.inc()
            await store.claim_identities(
                session, workspace_id=workspace_id, keys=missing, contact_id=target
            )
            # re-read: a concurrent transaction may have claimed some of the keys first
            found = await store.identities_of(session, workspace_id=workspace_id, keys=keys)
        owners = {found[key] for key in keys if key in found}
        survivor_id = found.get(primary) or found[keys[0]]
        if event.user_id and ("user_id", event.user_id) in found:
            survivor_id = found[("user_id", event.user_id)]
        elif email and ("email", email) in found:
            survivor_id = found[("email", email)]
        others = sorted(owners - {survivor_id})
        if event.type is SegmentType.ALIAS and event.previous_id:
            previous = await _owner_of_previous(session, workspace_id, event.previous_id)
            if previous is not None and previous != survivor_id:
                others = sorted({*others, previous})
        if not others:
            return survivor_id
        locked = await store.lock_contacts(session, [survivor_id, *others])
        if (
            any(c.merged_into is not None for c in locked.values())
            or len(locked) != len(others) + 1
        ):
            continue  # a concurrent merge moved things under us: resolve again
        survivor = locked[survivor_id]
        for other_id in others:
            other = locked[other_id]
            reason, identity = _merge_reason(event, found, survivor_id, other_id)
            if (
                reason != "alias"
                and other.user_id is not None
                and survivor.user_id is not None
                and other.user_id != survivor.user_id
            ):
                continue  # two known people (a shared device or email): never merged silently
            await store.merge_contacts(
                session,
                workspace_id=workspace_id,
                survivor=survivor,
                merged=other,
                reason=reason,
                identity=identity,
                cause_message_id=event.message_id,
                at=event.timestamp,
            )
            metrics.MERGES.labels(reason).inc()
            out.merged(
                ContactMerged(
                    survivor_id=survivor_id,
                    merged_id=other_id,
                    reason=reason,
                    identity=identity,
                    at=event.timestamp,
                )
            )
        return survivor_id
    raise RetryLater("contacts kept changing under concurrent merges")


async def _owner_of_previous(
    session: AsyncSession, workspace_id: str, previous_id: str
) -> uuid.UUID | None:
    found = await store.identities_of(
        session,
        workspace_id=workspace_id,
        keys=[("user_id", previous_id), ("anonymous_id", previous_id)],
    )
    return found.get(("user_id", previous_id)) or found.get(("anonymous_id", previous_id))


def _merge_reason(
    event: SegmentEvent,
    found: dict[tuple[str, str], uuid.UUID],
    survivor: uuid.UUID,
    other: uuid.UUID,
) -> tuple[MergeReason, str]:
    """Why two contacts are one, and the identity that showed it."""
    own = [key for key, owner in found.items() if owner == survivor]
    theirs = [key for key, owner in found.items() if owner == other]
    for kind, value in [*theirs, *own]:
        if kind == "email":
            return "email", f"email:{value}"
    if event.type is SegmentType.ALIAS:
        return "alias", f"previous_id:{event.previous_id}"
    kind, value = theirs[0] if theirs else own[0]
    return "identify", f"{kind}:{value}"


# --- the handler ---------------------------------------------------------------------------


def contact_updated(
    contact: store.ContactState, changed: list[Changed], cause_message_id: str | None
) -> ContactUpdated:
    """The contact as it is now (traits, scores, active tags, stages) and what changed."""
    return ContactUpdated(
        contact_id=contact.id,
        user_id=contact.user_id,
        traits=contact.traits,
        scores=dict(contact.scores),
        tags=contact.tags,
        stages=dict(contact.stages),
        changed=changed,
        cause_message_id=cause_message_id,
    )


@dataclass(frozen=True)
class Rulebook:
    rules: list[Rule]
    stages: dict[str, list[Stage]]

    @cached_property
    def index(self) -> RuleIndex:
        return RuleIndex(self.rules)

    @cached_property
    def decays(self) -> list[tuple[uuid.UUID, DecaySpec]]:
        return [(r.id, r.definition) for r in self.rules if isinstance(r.definition, DecaySpec)]

    @cached_property
    def _holds(self) -> bool:
        return any(isinstance(r.definition, ProfileSpec) for r in self.rules)

    @cached_property
    def _caps(self) -> dict[tuple[str, str | None], tuple[bool, bool]]:
        """(call type, name) -> whether a rule such events may match has a cap per day, and
        one for ever; filled as names are met."""
        return {}

    def spending_from(self, event: SegmentEvent) -> str | None:
        """The first of the cap spending periods applying ``event`` can read (``score_event``,
        ``score_profile``), None for none: its day's when a rule it may match has a cap per
        day, ``ever`` when one has a cap for ever, ``held`` when the workspace has profile
        rules. Periods sort ``day:YYYY-MM-DD`` < ``ever`` < ``held``: reading from the first
        on reads the others, and the days after it (few: those of later events)."""
        key = (event.type, event.event if event.type is SegmentType.TRACK else event.name)
        caps = self._caps.get(key)
        if caps is None:
            specs = [rule.definition for rule in self.index.candidates(event)]
            behavioural = [spec for spec in specs if isinstance(spec, BehaviouralSpec)]
            caps = self._caps[key] = (
                any(spec.cap_per_day is not None for spec in behavioural),
                any(spec.cap_ever is not None for spec in behavioural),
            )
        per_day, ever = caps
        if per_day:
            return day_period(event.timestamp)
        return EVER if ever else HELD if self._holds else None


async def load_rulebook(session: AsyncSession, *, workspace_id: str) -> Rulebook:
    rules = await store.list_rules(session, workspace_id=workspace_id)
    models = await store.list_models(session, workspace_id=workspace_id)
    return Rulebook(rules, {m.name: m.stages for m in models if m.stages})


class RulebookCache:
    """Each workspace's rulebook, kept between batches and checked against the workspace's
    rules version (``store.batch_settings``: one small query per workspace per batch): a
    rule or model changed through the API, by any process, is seen by the next batch."""

    def __init__(self) -> None:
        self._books: dict[str, tuple[tuple[Any, ...], Rulebook]] = {}

    async def get(
        self, session: AsyncSession, workspace_id: str, version: tuple[Any, ...]
    ) -> Rulebook:
        cached = self._books.get(workspace_id)
        if cached is not None and cached[0] == version:
            return cached[1]
        book = await load_rulebook(session, workspace_id=workspace_id)
        self._books[workspace_id] = (version, book)
        return book


@dataclass
class Pending:
    """An event waiting in a run of the batch whose contacts are known."""

    envelope: Envelope
    event: SegmentEvent
    contact_id: uuid.UUID
    out: Outputs
    merged: bool = False


class ScoringHandler(BatchFirstHandler):
    """Scoring's consumer handler. A batch (``handle_batch``) is applied with a few
    set-based statements: identities are looked up at once, contacts are created and
    claimed at once, the contacts' rows are locked and read at once (in id order), each
    event is then applied in order to that in-memory state, and every table is written
    with one statement. An event that merges contacts (or an alias) is applied alone, in
    its place in the batch, by ``resolve_contact``. Score adjustments (keyed by contact,
    so on other partitions than events) follow their workspace's events. One message
    (``__call__``, the runner's fallback when a batch fails) is a batch of one: there is
    one way to apply an event, whatever the batch size."""

    def __init__(self) -> None:
        self.rulebooks = RulebookCache()

    async def handle_batch(
        self, session: AsyncSession, envelopes: Sequence[Envelope]
    ) -> Sequence[OutgoingMessage]:
        by_workspace: dict[str, list[tuple[Envelope, SegmentEvent]]] = {}
        adjustments: dict[str, list[tuple[Envelope, ScoreAdjusted]]] = {}
        for envelope in envelopes:
            if envelope.type == SCORE_ADJUSTED.name:
                adjustment = SCORE_ADJUSTED.parse(envelope)
                adjustments.setdefault(envelope.workspace_id, []).append((envelope, adjustment))
                by_workspace.setdefault(envelope.workspace_id, [])
                continue
            if envelope.type != EVENT_RECEIVED.name:
                continue
            event = EVENT_RECEIVED.parse(envelope)
            validate(event)
            by_workspace.setdefault(envelope.workspace_id, []).append((envelope, event))
        # A deadlock or serialization failure with another partition's batch propagates:
        # the consumer runner sees it is transient and retries the batch.
        messages: list[OutgoingMessage] = []
        for workspace_id, items in by_workspace.items():
            version, merge_on_email = await store.batch_settings(session, workspace_id=workspace_id)
            batch = WorkspaceBatch(
                workspace_id,
                book=await self.rulebooks.get(session, workspace_id, version),
                merge_on_email=merge_on_email,
            )
            messages.extend(await batch.apply(session, items))
            messages.extend(await batch.adjust(session, adjustments.get(workspace_id, [])))
        return messages


handle_event = ScoringHandler()


@dataclass
class WorkspaceBatch:
    workspace_id: str
    book: Rulebook
    merge_on_email: bool

    def keys_of(self, event: SegmentEvent) -> list[tuple[str, str]]:
        email = None
        if self.merge_on_email:
            incoming = incoming_traits(event)
            email = profile.typed_traits(incoming)["email"]
        return identity_keys(event, email)

    async def apply(
        self, session: AsyncSession, items: list[tuple[Envelope, SegmentEvent]]
    ) -> list[OutgoingMessage]:
        """Apply the events in order: runs whose contacts are resolved without a merge go
        together; an event that merges is applied alone where it stands."""
        messages: list[OutgoingMessage] = []
        rest = [(envelope, event, self.keys_of(event)) for envelope, event in items]
        while rest:
            keys = {key for _, _, keys_here in rest for key in keys_here}
            known = await store.identities_in(session, workspace_id=self.workspace_id, keys=keys)
            run: list[Pending] = []
            creates: dict[uuid.UUID, tuple[uuid.UUID, str | None, datetime]] = {}
            claims: dict[tuple[str, str], uuid.UUID] = {}
            slow: int | None = None
            for index, (envelope, event, keys_here) in enumerate(rest):
                if keys_here[0][0] == store.CONTACT_KEY and keys_here[0] not in known:
                    metrics.EVENTS_DROPPED.labels("unknown_contact").inc()
                    continue  # the contact it names was erased (or is not this workspace's)
                owners = {known[key] for key in keys_here if key in known}
                if event.type is SegmentType.ALIAS or len(owners) > 1:
                    slow = index
                    break
                target = (
                    owners.pop()
                    if owners
                    else stable_id(self.workspace_id, "contact", *keys_here[0])
                )
                if (
                    not owners
                    and target not in creates
                    and not any(key in known for key in keys_here)
                ):
                    creates[target] = (target, event.user_id, event.timestamp)
                for key in keys_here:
                    if key not in known:
                        known[key] = claims[key] = target
                out = Outputs(self.workspace_id, envelope, event.timestamp)
                run.append(Pending(envelope, event, target, out))
            claimed = await store.create_and_claim(
                session, workspace_id=self.workspace_id, rows=list(creates.values()), claims=claims
            )
            if len(claimed) < len(claims):  # somebody holds some: are they ours?
                owned = await store.identities_in(
                    session, workspace_id=self.workspace_id, keys=claims
                )
                if any(owned.get(key) != owner for key, owner in claims.items()):
                    raise RetryLater("a concurrent transaction claimed one of the identities")
            messages.extend(await self.apply_run(session, run))
            if slow is None:
                break
            envelope, event, _ = rest[slow]
            out = Outputs(self.workspace_id, envelope, event.timestamp)
            email = profile.typed_traits(incoming_traits(event))["email"]
            contact_id = await resolve_contact(
                session,
                workspace_id=self.workspace_id,
                event=event,
                email=email if self.merge_on_email else None,
                out=out,
            )
            pending = Pending(envelope, event, contact_id, out, merged=bool(out.messages))
            messages.extend(await self.apply_run(session, [pending]))
            rest = rest[slow + 1 :]
        return messages

    async def apply_run(self, session: AsyncSession, run: list[Pending]) -> list[OutgoingMessage]:
        if not run:
            return []
        first: dict[str, Pending] = {}
        spending: dict[uuid.UUID, str] = {}
        for pending in run:
            first.setdefault(pending.event.message_id, pending)
            period = self.book.spending_from(pending.event)
            if period is not None:
                spending[pending.contact_id] = min(spending.get(pending.contact_id, period), period)
        states, new = await store.lock_states_claiming(
            session,
            [p.contact_id for p in run],
            spending=spending,
            workspace_id=self.workspace_id,
            events=[(p.event.message_id, p.event.timestamp, p.contact_id) for p in first.values()],
        )
        if any(state.merged_into is not None for state in states.values()) or len(states) != len(
            {p.contact_id for p in run}
        ):
            raise RetryLater("a contact of the batch was merged or erased meanwhile")
        writes = store.BatchWrites(self.workspace_id)
        messages: list[OutgoingMessage] = []
        for pending in run:
            message_id = pending.event.message_id
            if message_id in new and first[message_id] is pending:
                self.apply_one(writes, states[pending.contact_id], pending)
            messages.extend(pending.out.messages)
        await store.write_batch(session, writes)
        count_writes(writes)
        return messages

    async def adjust(
        self, session: AsyncSession, items: list[tuple[Envelope, ScoreAdjusted]]
    ) -> list[OutgoingMessage]:
        """Score adjustments, in order: each ``adjustment_id`` adds its points once (it is
        claimed in ``event_ids`` as ``adjustment:<id>``) to the contact, or to the contact
        it was merged into; an erased contact's adjustments are dropped."""
        if not items:
            return []
        states = await store.lock_states(
            session, {adjustment.contact_id for _, adjustment in items}
        )
        survivors = {s.merged_into for s in states.values() if s.merged_into} - states.keys()
        if survivors:
            states |= await store.lock_states(session, survivors)
        first: dict[str, tuple[Envelope, ScoreAdjusted, store.ContactState]] = {}
        for envelope, adjustment in items:
            contact = states.get(adjustment.contact_id)
            if contact is not None and contact.merged_into is not None:
                contact = states.get(contact.merged_into)
                if contact is not None and contact.merged_into is not None:
                    raise RetryLater("a contact of the batch was merged meanwhile")
            if contact is not None:
                key = f"adjustment:{adjustment.adjustment_id}"
                first.setdefault(key, (envelope, adjustment, contact))
        new = await store.claim_event_ids(
            session,
            workspace_id=self.workspace_id,
            rows=[(key, a.at, contact.id) for key, (_, a, contact) in first.items()],
        )
        writes = store.BatchWrites(self.workspace_id)
        messages: list[OutgoingMessage] = []
        for key, (envelope, adjustment, contact) in first.items():
            if key not in new:
                continue
            out = Outputs(self.workspace_id, envelope, adjustment.at)
            model, points = adjustment.model, adjustment.points
            writes.adjust(
                contact.id,
                model,
                points,
                message_id=key,
                reason=adjustment.reason,
                at=adjustment.at,
            )
            before = dict(contact.scores)
            contact.scores[model] = contact.scores.get(model, 0) + points
            changed = self.move_stages(writes, contact, out, before, at=adjustment.at)
            if changed:
                out.updated_state(contact, changed, key)
            messages.extend(out.messages)
        await store.write_batch(session, writes)
        count_writes(writes)
        return messages

    def apply_one(
        self, writes: store.BatchWrites, contact: store.ContactState, pending: Pending
    ) -> None:
        """One new event's effects on the contact's in-memory state, gathered in
        ``writes``; outputs go to ``pending.out``."""
        event, out, book = pending.event, pending.out, self.book
        workspace_id = self.workspace_id
        at = event.timestamp
        writes.events.append(store.event_row(workspace_id, contact.id, event))
        user_id = known_user_id(event)
        touch = writes.touch(contact.id, at, user_id)
        contact.user_id = contact.user_id or user_id
        if not contact.has_first_touch:
            touch["first_touch"] = profile.first_touch(event)
            contact.has_first_touch = True

        changed: list[Changed] = ["traits", "scores", "tags", "stages"] if pending.merged else []
        incoming = {k: v for k, v in incoming_traits(event).items() if k not in ("tags", "untags")}
        new_traits = profile.changed_traits(contact.traits, incoming)
        if new_traits:
            source = "identify" if event.type is SegmentType.IDENTIFY else "context"
            contact.traits = {**contact.traits, **new_traits}
            contact.trait_sources = profile.learned(
                contact.trait_sources, new_traits, profile.trait_source(event, source=source)
            )
            typed = profile.typed_traits(contact.traits)
            writes.profiles[contact.id] = {
                "traits": contact.traits,
                "trait_sources": contact.trait_sources,
                "typed": typed,
            }
            for kind in ("email", "phone"):  # contact points become identities if free
                if typed[kind]:
                    writes.claims.setdefault((kind, str(typed[kind])), contact.id)
            if "traits" not in changed:
                changed.append("traits")
        if event.type is SegmentType.IDENTIFY:
            add, remove = profile.tags_in(event.traits)
            writes.tag(contact.id, add, remove, at)
            if contact.tag(add, remove) and "tags" not in changed:
                changed.append("tags")

        state = ScoringState(spent=contact.spent, orders_before=contact.orders_count)
        if new_traits:  # profile rules are scored: what each holds
            spent = contact.spent.items()
            state.held = {rule: points for (rule, period), points in spent if period == HELD}
        revenue: float | None = None
        if event.type is SegmentType.TRACK and event.event in TRANSACTION_EVENTS:
            value = order_value(event.properties) or 0.0
            is_order = event.event == ORDER_COMPLETED
            revenue = value if is_order else -abs(value)
            writes.transactions.append(
                store.transaction_row(
                    workspace_id, contact.id, event, "order" if is_order else "refund", revenue
                )
            )
            touch["revenue"] += revenue
            if is_order:
                touch["orders"] += 1
                contact.orders_count += 1
                touch["first_order"] = min(touch["first_order"] or at, at)
                touch["last_order"] = max(touch["last_order"] or at, at)
        if event.type is SegmentType.TRACK:
            out.activity(contact.id, event, event.event or "", revenue)
        elif event.type in ACTIVITY_NAMES:
            out.activity(contact.id, event, ACTIVITY_NAMES[event.type], None)

        # counts cap spending in state.spent
        deltas = score_event(book.index.candidates(event), event, state)
        if new_traits:
            held = score_profile(book.rules, contact.traits, state.held)
            for delta in held:
                key = (delta.rule_id, HELD)
                contact.spent[key] = contact.spent.get(key, 0) + delta.points
            deltas += held
        before = {} if pending.merged else dict(contact.scores)
        writes.points(contact.id, deltas, message_id=event.message_id, at=at)
        for delta in deltas:
            contact.scores[delta.model] = contact.scores.get(delta.model, 0) + delta.points
        for rule_id, spec in book.decays:
            due = at + timedelta(days=spec.after_days)
            timer = (contact.id, rule_id)
            writes.timers[timer] = max(writes.timers.get(timer, due), due)
        if deltas or pending.merged:
            moved = self.move_stages(writes, contact, out, before, at=at)
            changed.extend(m for m in moved if m not in changed)
        if changed:
            out.updated_state(contact, changed, event.message_id)

    def move_stages(
        self,
        writes: store.BatchWrites,
        contact: store.ContactState,
        out: Outputs,
        before: dict[str, int],
        *,
        at: datetime,
    ) -> list[Changed]:
        """``after_points`` on the in-memory state; returns what moved (``scores`` when a
        model's total did, ``stages`` when a stage did)."""
        now = contact.scores
        moved = [m for m in set(now) | set(before) if now.get(m, 0) != before.get(m, 0)]
        changed: list[Changed] = ["scores"] if moved else []
        for model in sorted(m for m in moved if m in self.book.stages):
            score = now.get(model, 0)
            stage = stage_for(self.book.stages[model], score)
            previous = contact.stages.get(model)
            if stage is None or stage == previous:
                continue
            contact.stages[model] = stage
            if "stages" not in changed:
                changed.append("stages")
            writes.stages[(contact.id, model)] = (stage, at)
            writes.stage_history.append(
                {
                    "workspace_id": self.workspace_id,
                    "contact_id": contact.id,
                    "model": model,
                    "from_stage": previous,
                    "to_stage": stage,
                    "score": score,
                    "at": at,
                }
            )
            out.stage_changed(contact.id, model, previous, stage, score, at)
        return changed


def count_writes(writes: store.BatchWrites) -> None:
    """The metrics of what a batch wrote: events stored, score changes, stage changes."""
    for kind, count in Counter(row["type"] for row in writes.events).items():
        metrics.EVENTS_STORED.labels(kind).inc(count)
    for model, count in Counter(row["model"] for row in writes.score_changes).items():
        metrics.SCORE_CHANGES.labels(model).inc(count)
    stage_changes = Counter((row["model"], row["to_stage"]) for row in writes.stage_history)
    for (model, stage), count in stage_changes.items():
        metrics.STAGE_CHANGES.labels(model, stage).inc(count)


async def after_points(
    session: AsyncSession,
    out: Outputs,
    book: Rulebook,
    contact_id: uuid.UUID,
    before: dict[str, int],
    *,
    at: datetime,
) -> list[Changed]:
    """After a contact's scores may have moved: move lifecycle stages whose thresholds were
    crossed and publish each stage change. Returns what moved, as ``move_stages`` does."""
    now = await store.scores_of(session, contact_id=contact_id)
    moved = [m for m in set(now) | set(before) if now.get(m, 0) != before.get(m, 0)]
    changed: list[Changed] = ["scores"] if moved else []
    staged = [m for m in moved if m in book.stages]
    if not staged:
        return changed
    current = await store.stages_of(session, contact_id=contact_id)
    workspace_id = out.workspace_id
    for model in sorted(staged):
        stage = stage_for(book.stages[model], now.get(model, 0))
        previous = current.get(model)
        if stage is None or stage == previous:
            continue
        await store.set_stage(
            session,
            workspace_id=workspace_id,
            contact_id=contact_id,
            model=model,
            previous=previous,
            stage=stage,
            score=now.get(model, 0),
            at=at,
        )
        if "stages" not in changed:
            changed.append("stages")
        metrics.STAGE_CHANGES.labels(model, stage).inc()
        out.stage_changed(contact_id, model, previous, stage, now.get(model, 0), at)
    return changed


def consumers(runtime: Runtime) -> list[Worker]:
    """The events topic's consumers (``events_consumers`` of them, one group: Kafka shares
    the partitions among them, so a contact's events stay in order) and the timer worker."""
    from nudge_scoring.worker import TimerWorker  # the worker builds on this module

    settings = runtime.settings
    count = settings.events_consumers if isinstance(settings, ScoringSettings) else 1
    handler = ScoringHandler()
    return [
        *(
            ConsumerRunner(
                name="scoring",
                topics=[Topic.EVENTS],
                handler=handler,
                settings=settings,
                sessionmaker=runtime.sessionmaker,
                producer=runtime.producer,
                processed_messages=store.processed_messages,
            )
            for _ in range(count)
        ),
        TimerWorker(
            settings=runtime.settings,
            sessionmaker=runtime.sessionmaker,
            producer=runtime.producer,
        ),
    ]
