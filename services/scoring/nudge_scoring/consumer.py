"""Scoring's Kafka wiring: an inbound event resolves to one contact (merging contacts that
turn out to be one person), is stored once, updates the profile, tags and transactions,
scores against the workspace's rules, and publishes ``contact.merged``,
``contact.stage_changed`` and ``contact.updated`` (only on a real change).

Every output id derives from its cause (the inbound envelope, plus the merged contact or
the model as scope), and every contact id from the identity it was first seen with, so a
batch replayed after a crash produces the same rows and the same messages.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.consumer import ConsumerRunner
from nudge_common.errors import InvalidMessage, RetryLater
from nudge_common.events import (
    CONTACT_MERGED,
    CONTACT_STAGE_CHANGED,
    CONTACT_UPDATED,
    EVENT_RECEIVED,
    ContactMerged,
    ContactStageChanged,
    ContactUpdated,
    Envelope,
    SegmentEvent,
    SegmentType,
    Topic,
)
from nudge_common.ids import stable_id
from nudge_common.kafka import OutgoingMessage
from nudge_common.service import Runtime, Worker
from nudge_scoring import metrics, store
from nudge_scoring.domain import profile
from nudge_scoring.domain.rules import (
    ORDER_COMPLETED,
    TRANSACTION_EVENTS,
    DecaySpec,
    ProfileSpec,
    Rule,
    ScoringState,
    Stage,
    order_value,
    score_event,
    score_profile,
    stage_for,
)
from nudge_scoring.domain.scoring import incoming_traits

RETRYABLE_SQLSTATES = {"40P01", "40001"}  # deadlock detected, serialization failure
MergeReason = Literal["identify", "alias", "email"]


@dataclass
class Outputs:
    """The messages one cause produces, each with an id derived from that cause."""

    workspace_id: str
    cause: Envelope
    occurred_at: datetime
    messages: list[OutgoingMessage] = field(default_factory=list)

    def merged(self, change: ContactMerged) -> None:
        self.messages.append(
            OutgoingMessage(
                Topic.CONTACTS,
                key=str(change.survivor_id),
                envelope=CONTACT_MERGED.envelope(
                    workspace_id=self.workspace_id,
                    payload=change,
                    occurred_at=self.occurred_at,
                    caused_by=self.cause,
                    scope=str(change.merged_id),
                ),
            )
        )

    def stage_changed(self, change: ContactStageChanged) -> None:
        self.messages.append(
            OutgoingMessage(
                Topic.CONTACTS,
                key=str(change.contact_id),
                envelope=CONTACT_STAGE_CHANGED.envelope(
                    workspace_id=self.workspace_id,
                    payload=change,
                    occurred_at=self.occurred_at,
                    caused_by=self.cause,
                    scope=change.model,
                ),
            )
        )

    def updated(self, update: ContactUpdated) -> None:
        self.messages.append(
            OutgoingMessage(
                Topic.CONTACTS,
                key=str(update.contact_id),
                envelope=CONTACT_UPDATED.envelope(
                    workspace_id=self.workspace_id,
                    payload=update,
                    occurred_at=self.occurred_at,
                    caused_by=self.cause,
                    scope=str(update.contact_id),
                ),
            )
        )


# --- identity resolution -----------------------------------------------------------------


def identity_keys(event: SegmentEvent, email: str | None) -> list[tuple[str, str]]:
    keys: list[tuple[str, str]] = []
    if event.user_id:
        keys.append(("user_id", event.user_id))
    if event.anonymous_id:
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
    identity it was first seen with), merging the contacts the event shows to be one."""
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


@dataclass(frozen=True)
class Rulebook:
    rules: list[Rule]
    stages: dict[str, list[Stage]]

    @property
    def decays(self) -> list[tuple[uuid.UUID, DecaySpec]]:
        return [(r.id, r.definition) for r in self.rules if isinstance(r.definition, DecaySpec)]

    @property
    def needs_state(self) -> bool:
        return any(
            isinstance(r.definition, ProfileSpec)
            or getattr(r.definition, "cap_per_day", None) is not None
            or getattr(r.definition, "cap_ever", None) is not None
            for r in self.rules
        )


async def load_rulebook(session: AsyncSession, *, workspace_id: str) -> Rulebook:
    rules = await store.list_rules(session, workspace_id=workspace_id)
    models = await store.list_models(session, workspace_id=workspace_id)
    return Rulebook(rules, {m.name: m.stages for m in models if m.stages})


async def handle_event(session: AsyncSession, envelope: Envelope) -> Sequence[OutgoingMessage]:
    if envelope.type != EVENT_RECEIVED.name:
        return []
    event = EVENT_RECEIVED.parse(envelope)
    validate(event)
    try:
        return await apply_event(session, envelope, event)
    except sa.exc.DBAPIError as error:
        if getattr(error.orig, "sqlstate", None) in RETRYABLE_SQLSTATES:
            raise RetryLater(f"concurrent update: {error.orig}") from error
        raise


async def apply_event(
    session: AsyncSession, envelope: Envelope, event: SegmentEvent
) -> Sequence[OutgoingMessage]:
    workspace_id = envelope.workspace_id
    out = Outputs(workspace_id, envelope, event.timestamp)
    incoming = {k: v for k, v in incoming_traits(event).items() if k not in ("tags", "untags")}
    email = profile.typed_traits(incoming)["email"]
    merge_email = (
        email if email and await store.merge_on_email(session, workspace_id=workspace_id) else None
    )
    contact_id = await resolve_contact(
        session, workspace_id=workspace_id, event=event, email=merge_email, out=out
    )
    merged = bool(out.messages)
    # after a merge every model's stage is looked at again
    scores_before: dict[str, int] | None = {} if merged else None
    contact = await store.touch_contact(
        session, contact_id=contact_id, user_id=event.user_id, at=event.timestamp
    )
    if not await store.store_event(
        session, workspace_id=workspace_id, contact_id=contact.id, event=event
    ):
        return out.messages
    metrics.EVENTS_STORED.labels(event.type.value).inc()
    if contact.first_touch is None:
        await store.set_first_touch(
            session, contact_id=contact.id, touch=profile.first_touch(event)
        )

    changed: list[Literal["traits", "scores"]] = ["traits", "scores"] if merged else []
    traits = contact.traits
    new_traits = profile.changed_traits(contact.traits, incoming)
    if new_traits:
        traits = {**contact.traits, **new_traits}
        source = "identify" if event.type is SegmentType.IDENTIFY else "context"
        await store.set_profile(
            session,
            contact_id=contact.id,
            traits=traits,
            trait_sources=profile.learned(
                contact.trait_sources, new_traits, profile.trait_source(event, source=source)
            ),
            typed=profile.typed_traits(traits),
        )
        await _claim_contact_points(session, workspace_id, contact.id, traits)
        if "traits" not in changed:
            changed.append("traits")
    if event.type is SegmentType.IDENTIFY:
        add, remove = profile.tags_in(event.traits)
        await store.assign_tags(
            session,
            workspace_id=workspace_id,
            contact_id=contact.id,
            add=add,
            remove=remove,
            at=event.timestamp,
        )

    if event.type is SegmentType.TRACK and event.event in TRANSACTION_EVENTS:
        value = order_value(event.properties) or 0.0
        is_order = event.event == ORDER_COMPLETED
        await store.record_transaction(
            session,
            workspace_id=workspace_id,
            contact_id=contact.id,
            event=event,
            kind="order" if is_order else "refund",
            revenue=value if is_order else -abs(value),
        )

    book = await load_rulebook(session, workspace_id=workspace_id)
    state = ScoringState(orders_before=contact.orders_count)
    if book.needs_state:
        state.spent = await store.scoring_spent(session, contact_id=contact.id)
        state.held = {
            rule: points for (rule, period), points in state.spent.items() if period == "held"
        }
    deltas = score_event(book.rules, event, state)
    if new_traits:
        deltas += score_profile(book.rules, traits, state.held)
    if scores_before is None and deltas:
        scores_before = await store.scores_of(session, contact_id=contact.id)
    await store.add_points(
        session,
        workspace_id=workspace_id,
        contact_id=contact.id,
        deltas=deltas,
        message_id=event.message_id,
        at=event.timestamp,
    )
    await store.schedule_decay(
        session,
        workspace_id=workspace_id,
        contact_id=contact.id,
        decays=book.decays,
        active_at=event.timestamp,
    )
    for delta in deltas:
        metrics.SCORE_CHANGES.labels(delta.model).inc()
    if scores_before is not None:
        scores_now = await after_points(
            session, out, book, contact.id, scores_before, at=event.timestamp
        )
        moved = any(
            scores_now.get(m, 0) != scores_before.get(m, 0) for m in {*scores_now, *scores_before}
        )
        if moved and "scores" not in changed:
            changed.append("scores")
    if changed:
        out.updated(
            ContactUpdated(
                contact_id=contact.id,
                user_id=contact.user_id,
                traits=traits,
                scores=await store.scores_of(session, contact_id=contact.id),
                changed=changed,
                cause_message_id=event.message_id,
            )
        )
    return out.messages


async def _claim_contact_points(
    session: AsyncSession, workspace_id: str, contact_id: uuid.UUID, traits: dict[str, object]
) -> None:
    """Record email and phone as identities of the contact when nobody holds them yet."""
    typed = profile.typed_traits(traits)
    keys = [(kind, str(typed[kind])) for kind in ("email", "phone") if typed[kind]]
    await store.claim_identities(
        session, workspace_id=workspace_id, keys=keys, contact_id=contact_id
    )


async def after_points(
    session: AsyncSession,
    out: Outputs,
    book: Rulebook,
    contact_id: uuid.UUID,
    before: dict[str, int],
    *,
    at: datetime,
) -> dict[str, int]:
    """After a contact's scores may have moved: move lifecycle stages whose thresholds were
    crossed and publish each stage change. Returns the scores now."""
    now = await store.scores_of(session, contact_id=contact_id)
    moved = [m for m in set(now) | set(before) if now.get(m, 0) != before.get(m, 0)]
    staged = [m for m in moved if m in book.stages]
    if not staged:
        return now
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
        metrics.STAGE_CHANGES.labels(model, stage).inc()
        out.stage_changed(
            ContactStageChanged(
                contact_id=contact_id,
                model=model,
                previous_stage=previous,
                stage=stage,
                score=now.get(model, 0),
                at=at,
            )
        )
    return now


def consumers(runtime: Runtime) -> list[Worker]:
    from nudge_scoring.worker import TimerWorker  # the worker builds on this module

    return [
        ConsumerRunner(
            name="scoring",
            topics=[Topic.EVENTS],
            handler=handle_event,
            settings=runtime.settings,
            sessionmaker=runtime.sessionmaker,
            producer=runtime.producer,
            processed_messages=store.processed_messages,
        ),
        TimerWorker(
            settings=runtime.settings,
            sessionmaker=runtime.sessionmaker,
            producer=runtime.producer,
        ),
    ]
