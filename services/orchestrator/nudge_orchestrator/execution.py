"""Applying a run's decisions durably, in the caller's transaction.

Every path into a run (a trigger in a consumer, a due timer, an awaited event, a goal)
ends here. A step's execution is recorded in ``step_executions`` before its effect, so a
step executes once per run; its outputs (notification requests) carry ids and idempotency
keys derived from (run, step), so re-publishing them after a crash changes nothing
downstream. Waits become rows in ``timers``, in the same transaction.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.conditions import Profile
from nudge_common.events import (
    CONTACT_SUMMARY_TEMPLATE_ID,
    EVENT_RECEIVED,
    LIST_CHANGED,
    NOTIFICATION_REQUESTED,
    SCORE_ADJUSTED,
    ContactSnapshot,
    Envelope,
    ListChanged,
    NotificationRequested,
    ScoreAdjusted,
    SegmentEvent,
    Topic,
    segment_event_id,
)
from nudge_common.ids import stable_id
from nudge_common.kafka import OutgoingMessage
from nudge_orchestrator import metrics, store
from nudge_orchestrator.domain.workflows import (
    Act,
    Action,
    AdjustScore,
    Context,
    Defer,
    End,
    Goto,
    ListChange,
    NotifySales,
    QuietHours,
    Schedule,
    Send,
    SetTraits,
    Tag,
    Webhook,
    WorkflowDefinition,
    decide,
    idempotency_key,
)

CAP_WINDOWS = {"per_day": timedelta(days=1), "per_week": timedelta(days=7)}


@dataclass
class Outputs:
    messages: list[OutgoingMessage] = field(default_factory=list)
    origin_received_at: datetime | None = None
    """When ingest received the outside event behind this work (None for timers): carried
    on, so the notifier measures the end-to-end latency."""
    origins: dict[uuid.UUID, datetime] = field(default_factory=dict)
    """The same, per run, when one batch holds the work of several outside events."""


def run_id_for(workflow_id: uuid.UUID, contact_id: uuid.UUID, cause: str) -> uuid.UUID:
    """Derived from what triggered it, so a replayed trigger can never mint a second run."""
    return stable_id(str(workflow_id), str(contact_id), cause)


@dataclass(frozen=True)
class Entrant:
    contact_id: uuid.UUID
    contact: dict[str, Any]
    """The contact as the trigger saw it (user id, traits, scores)."""
    cause: str
    """The id of what triggered the entry (the run id derives from it)."""
    origin_received_at: datetime | None = None
    segment_id: uuid.UUID | None = None
    """The segment or list behind the entry (segment triggers, broadcasts), for analytics."""


async def enter(
    session: AsyncSession,
    out: Outputs,
    *,
    workflow: store.Published,
    contact_id: uuid.UUID,
    contact: dict[str, Any],
    cause: str,
    now: datetime,
) -> uuid.UUID | None:
    """Start a run when the entry rule allows it, and advance it as far as it goes now.
    Returns the run id, or None when the contact may not enter."""
    started = await enter_many(
        session, out, workflow=workflow, entrants=[Entrant(contact_id, contact, cause)], now=now
    )
    return started[0] if started else None


async def enter_many(
    session: AsyncSession,
    out: Outputs,
    *,
    workflow: store.Published,
    entrants: list[Entrant],
    now: datetime,
    copies: dict[uuid.UUID, dict[str, Any]] | None = None,
    entry_states: dict[uuid.UUID, tuple[datetime, bool]] | None = None,
) -> list[uuid.UUID]:
    """:func:`enter` for many contacts at once (each contact at most once), with a few
    set-based statements. Returns the ids of the runs started. ``copies`` (the entrants'
    copies, :func:`store.get_contacts`) and ``entry_states`` (:func:`store.entry_states`),
    when the caller read them in this transaction, are not read again."""
    definition = workflow.definition
    entry = definition.entry
    states = (
        entry_states
        if entry_states is not None
        else await store.entry_states(
            session, workflow_id=workflow.id, contact_ids=[e.contact_id for e in entrants]
        )
    )
    rows: list[dict[str, Any]] = []
    candidates: dict[uuid.UUID, store.Run] = {}
    for entrant in entrants:
        previous, active = states.get(entrant.contact_id, (None, False))
        if not store.entry_allowed(
            previous,
            active,
            rule=entry.rule,
            cooldown_s=entry.cooldown_s,
            concurrent=entry.concurrent,
            at=now,
        ):
            metrics.ENTRIES_REFUSED.inc()
            continue
        run_id = run_id_for(workflow.id, entrant.contact_id, entrant.cause)
        if entrant.origin_received_at is not None:
            out.origins[run_id] = entrant.origin_received_at
        rows.append(
            {
                "id": run_id,
                "workflow_id": workflow.id,
                "version": workflow.version,
                "workspace_id": workflow.workspace_id,
                "contact_id": entrant.contact_id,
                "status": store.ACTIVE,
                "exclusive": not entry.concurrent,
                "goal_event": definition.goal.event if definition.goal else None,
                "contact": entrant.contact,
                "segment_id": entrant.segment_id,
                "started_at": now,
            }
        )
        candidates[run_id] = store.Run(
            run_id,
            workflow.id,
            workflow.version,
            workflow.workspace_id,
            entrant.contact_id,
            store.ACTIVE,
            None,
            [],
            entrant.contact,
            now,
        )
    if not rows:
        return []
    started = await store.start_runs(session, rows)
    metrics.RUNS_STARTED.inc(len(started))
    runs = [run for run_id, run in candidates.items() if run_id in started]
    messaging = workflow.messaging
    await advance_many(
        session,
        out,
        [(run, definition, 0) for run in runs],
        now=now,
        fresh=True,
        copies=copies,
        messaging=None if messaging is None else {workflow.workspace_id: messaging},
    )
    return [run.id for run in runs]


async def resume(
    session: AsyncSession, out: Outputs, *, run_id: uuid.UUID, index: int | None, now: datetime
) -> None:
    """Go on with a run at step ``index`` (None: it ends) after a wait."""
    await resume_many(session, out, [(run_id, index)], now=now)


async def resume_many(
    session: AsyncSession,
    out: Outputs,
    waits: list[tuple[uuid.UUID, int | None]],
    *,
    now: datetime,
) -> None:
    """:func:`resume` for many runs (each at most once), locking them in one statement."""
    if not waits:
        return
    runs = await store.get_runs(session, run_ids=[run_id for run_id, _ in waits], lock=True)
    items: list[tuple[store.Run, WorkflowDefinition, int | None]] = []
    for run_id, index in waits:
        run = runs.get(run_id)
        if run is None or run.status != store.ACTIVE:
            continue
        definition = await store.version_definition(
            session, workflow_id=run.workflow_id, version=run.version
        )
        items.append((run, definition, index))
    await advance_many(session, out, items, now=now)


async def advance(
    session: AsyncSession,
    out: Outputs,
    *,
    run: store.Run,
    definition: WorkflowDefinition,
    index: int | None,
    now: datetime,
) -> None:
    """Execute steps from ``index`` until the run waits or ends."""
    await advance_many(session, out, [(run, definition, index)], now=now)


class _Caps:
    """Sends per (contact, channel) in the cap windows: read once for a set of runs, and
    counted on as the set's own sends are decided (so a batch caps as one by one would)."""

    def __init__(self, sent: list[tuple[uuid.UUID, str, datetime]]) -> None:
        self.sent: dict[tuple[uuid.UUID, str], list[datetime]] = {}
        for contact_id, channel, at in sent:
            self.sent.setdefault((contact_id, channel), []).append(at)

    def capped(
        self, caps: dict[str, Any], contact_id: uuid.UUID, channel: str, now: datetime
    ) -> bool:
        times = self.sent.get((contact_id, channel), [])
        for window, limit in (caps.get(channel) or {}).items():
            span = CAP_WINDOWS.get(window)
            if span is not None and sum(1 for at in times if at > now - span) >= limit:
                return True
        return False

    def note(self, contact_id: uuid.UUID, channel: str, at: datetime) -> None:
        self.sent.setdefault((contact_id, channel), []).append(at)


async def advance_many(
    session: AsyncSession,
    out: Outputs,
    items: list[tuple[store.Run, WorkflowDefinition, int | None]],
    *,
    now: datetime,
    fresh: bool = False,
    copies: dict[uuid.UUID, dict[str, Any]] | None = None,
    messaging: dict[str, store.Messaging] | None = None,
) -> None:
    """Execute steps of many runs (each at most once) from their ``index`` until each waits
    or ends: what is read is read for all at once, each run's path is decided in memory,
    and the writes go in a few multi-row statements. A step already recorded for its run
    stops that run there (a replay); ``fresh`` runs were just started and have none.
    ``copies`` (the contacts' copies) and ``messaging`` (workspaces' settings), when the
    caller read them in this transaction, are not read again."""
    if not items:
        return
    run_ids = [run.id for run, _, _ in items]
    if copies is None:
        contact_ids = list({run.contact_id for run, _, _ in items})
        copies = await store.get_contacts(session, contact_ids=contact_ids)
    executed = set() if fresh else await store.executed_steps(session, run_ids=run_ids)
    settings: dict[str, tuple[dict[str, Any], QuietHours | None]] = {}
    for run, _, _ in items:
        if run.workspace_id not in settings:
            known = (messaging or {}).get(run.workspace_id)
            raw_caps, raw_quiet = known or await store.get_messaging_settings(
                session, workspace_id=run.workspace_id
            )
            settings[run.workspace_id] = (raw_caps, _quiet_hours(raw_quiet))
    capped_contacts = [run.contact_id for run, _, _ in items if settings[run.workspace_id][0]]
    counts = _Caps(
        await store.recent_sends(
            session, contact_ids=capped_contacts, since=now - max(CAP_WINDOWS.values())
        )
        if capped_contacts
        else []
    )
    mailing = {
        run.workflow_id
        for run, definition, _ in items
        if any(isinstance(step, NotifySales) and step.email for step in definition.steps)
    }
    names = await store.workflow_names(session, workflow_ids=list(mailing)) if mailing else {}
    writes = store.Writes()
    for run, definition, index in items:
        caps, quiet = settings[run.workspace_id]
        _walk(
            run,
            definition,
            index,
            copies.get(run.contact_id) or run.contact,
            caps,
            quiet,
            counts,
            executed,
            writes,
            out,
            now,
            names.get(run.workflow_id),
        )
    await store.flush(session, writes, at=now, fresh=fresh)


def _walk(
    run: store.Run,
    definition: WorkflowDefinition,
    index: int | None,
    contact: dict[str, Any],
    caps: dict[str, Any],
    quiet: QuietHours | None,
    counts: _Caps,
    executed: set[tuple[uuid.UUID, int]],
    writes: store.Writes,
    out: Outputs,
    now: datetime,
    workflow_name: str | None,
) -> None:
    """One run's path from ``index`` until it waits or ends, as writes and messages."""
    traits = contact.get("traits") or {}
    ctx = Context(
        run_id=run.id,
        contact_id=run.contact_id,
        workflow_id=run.workflow_id,
        now=now,
        profile=Profile(traits, contact.get("scores") or {}),
        performed=frozenset(run.performed),
        timezone=traits.get("timezone") if isinstance(traits.get("timezone"), str) else None,
        quiet_hours=quiet,
    )
    variant = run.variant

    def record(step: int, outcome: str) -> bool:
        if (run.id, step) in executed:
            return False
        executed.add((run.id, step))
        writes.steps.append(
            {"run_id": run.id, "step": step, "executed_at": now, "outcome": outcome}
        )
        return True

    def timer(
        step: int,
        due: datetime,
        resume: int | None,
        event: str | None,
        on_event: int | None,
        kind: str,
    ) -> None:
        writes.timers.append(
            {
                "run_id": run.id,
                "workspace_id": run.workspace_id,
                "contact_id": run.contact_id,
                "step": step,
                "due_at": due,
                "resume_step": resume,
                "event": event,
                "event_step": on_event,
                "kind": kind,
            }
        )

    while index is not None:
        decision = decide(definition, index, ctx)
        kind = definition.steps[index].kind
        match decision:
            case Defer(until=until):
                # Quiet hours: the same step runs again when they end; nothing recorded yet.
                metrics.MESSAGES_DEFERRED.inc()
                timer(index, until, index, None, None, "quiet")
                return
            case Send(channel=channel, template_id=template, next=nxt):
                capped = counts.capped(caps, run.contact_id, channel, now)
                if not record(index, "capped" if capped else "requested"):
                    return
                if capped:
                    metrics.MESSAGES_CAPPED.labels(channel).inc()
                else:
                    key = idempotency_key(run.id, index)
                    counts.note(run.contact_id, channel, now)
                    writes.sends.append(
                        {
                            "run_id": run.id,
                            "step": index,
                            "workspace_id": run.workspace_id,
                            "workflow_id": run.workflow_id,
                            "contact_id": run.contact_id,
                            "channel": channel,
                            "variant": variant,
                            "idempotency_key": key,
                            "at": now,
                        }
                    )
                    out.messages.append(
                        _notification(run, contact, index, channel, template, key, now, out)
                    )
                    metrics.MESSAGES_REQUESTED.labels(channel).inc()
                index = nxt
            case Schedule(due=due, resume=nxt, event=event, on_event=on_event, variant=held):
                if not record(index, held or "waiting"):
                    return
                if held is not None:
                    writes.variants.setdefault(held, []).append(run.id)
                timer(index, due, nxt, event, on_event, "event" if event else "wait")
                metrics.TIMERS_SCHEDULED.labels(kind).inc()
                return
            case Goto(next=nxt, outcome=outcome):
                if not record(index, outcome):
                    return
                if kind == "split":
                    variant = outcome
                    writes.variants.setdefault(outcome, []).append(run.id)
                index = nxt
            case Act(action=action, next=nxt):
                if (run.id, index) in executed:
                    return  # a replay: the action's outputs went out with the first execution
                done = _act(run, index, action, contact, writes, out, now, workflow_name)
                record(index, done)
                metrics.ACTIONS.labels(action.kind, done).inc()
                index = nxt
            case End(outcome=outcome):
                if not record(index, outcome):
                    return
                writes.finished.setdefault("exited", []).append(run.id)
                metrics.RUNS_FINISHED.labels("exited").inc()
                return
    writes.finished.setdefault("completed", []).append(run.id)
    metrics.RUNS_FINISHED.labels("completed").inc()


def _act(
    run: store.Run,
    step: int,
    action: Action,
    contact: dict[str, Any],
    writes: store.Writes,
    out: Outputs,
    now: datetime,
    workflow_name: str | None = None,
) -> str:
    """An action of another service, as an output of this step: a Segment call on the
    events topic (tags, traits: scoring applies it like any call, identified by the
    contact's user id; the message id derives from (run, step), so a replay is the same
    call), a ``score.adjusted`` for scoring (adjustment id ``<run>:<step>``, applied once),
    a ``list.changed`` for the segmenter, internal email requests to the notifier,
    or a row in the webhook outbox. Returns the step's outcome."""
    match action:
        case Webhook() | NotifySales():
            if action.url is not None:
                body: dict[str, Any] = {
                    "kind": action.kind,
                    "workflow_id": str(run.workflow_id),
                    "run_id": str(run.id),
                    "step": step,
                    "at": now.isoformat(),
                    "contact": {
                        "contact_id": str(run.contact_id),
                        "user_id": contact.get("user_id"),
                        "traits": contact.get("traits") or {},
                        "scores": contact.get("scores") or {},
                    },
                }
                if isinstance(action, NotifySales):
                    body["summary"] = sales_summary(contact, action.note)
                writes.webhooks.append(
                    {
                        "run_id": run.id,
                        "step": step,
                        "workspace_id": run.workspace_id,
                        "url": action.url,
                        "body": body,
                        "next_at": now,
                    }
                )
            if isinstance(action, NotifySales):
                out.messages += _sales_emails(run, step, action, contact, workflow_name, now)
            return "requested"
        case ListChange(list_id=list_id, action=change):
            out.messages.append(
                OutgoingMessage(
                    Topic.CONTACTS,
                    key=str(run.contact_id),
                    envelope=LIST_CHANGED.envelope(
                        workspace_id=run.workspace_id,
                        payload=ListChanged(
                            list_id=list_id, contact_id=run.contact_id, action=change, at=now
                        ),
                        occurred_at=now,
                        id=stable_id(str(run.id), LIST_CHANGED.name, str(step)),
                    ),
                )
            )
            return "requested"
        case AdjustScore(model=model, points=points):
            out.messages.append(
                OutgoingMessage(
                    Topic.EVENTS,
                    key=str(run.contact_id),
                    envelope=SCORE_ADJUSTED.envelope(
                        workspace_id=run.workspace_id,
                        payload=ScoreAdjusted(
                            contact_id=run.contact_id,
                            model=model,
                            points=points,
                            reason="workflow",
                            adjustment_id=f"{run.id}:{step}",
                            at=now,
                        ),
                        occurred_at=now,
                        id=stable_id(str(run.id), SCORE_ADJUSTED.name, str(step)),
                    ),
                )
            )
            return "requested"
    user_id = contact.get("user_id")
    if not user_id:
        return "no_user_id"  # scoring resolves calls by identity; this contact has none here
    message_id = f"nudge-orchestrator:{run.id}:{step}"
    call: dict[str, Any] = {
        "messageId": message_id,
        "userId": user_id,
        "timestamp": now,
        "receivedAt": now,
        "context": {"nudge": {"workflow_id": str(run.workflow_id), "run_id": str(run.id)}},
    }
    match action:
        case Tag(add=add, remove=remove):
            call |= {"type": "identify", "traits": {"tags": add, "untags": remove}}
        case SetTraits(traits=traits):
            call |= {"type": "identify", "traits": dict(traits)}
    out.messages.append(
        OutgoingMessage(
            Topic.EVENTS,
            key=user_id,
            envelope=EVENT_RECEIVED.envelope(
                workspace_id=run.workspace_id,
                payload=SegmentEvent.model_validate(call),
                occurred_at=now,
                id=segment_event_id(run.workspace_id, message_id),
            ),
        )
    )
    return "requested"


def _name(contact: dict[str, Any]) -> str | None:
    traits = contact.get("traits") or {}
    name = " ".join(str(traits[k]) for k in ("first_name", "last_name") if traits.get(k))
    return name or (str(traits["name"]) if traits.get("name") else None)


def sales_summary(contact: dict[str, Any], note: str) -> str:
    """One line for a salesperson: who, where they work, their scores."""
    traits = contact.get("traits") or {}
    who = _name(contact) or str(traits.get("email") or contact.get("user_id") or "?")
    parts = [who]
    if traits.get("email") and traits.get("email") != who:
        parts.append(str(traits["email"]))
    if traits.get("company"):
        parts.append(f"at {traits['company']}")
    scores = contact.get("scores") or {}
    if scores:
        parts.append("scores " + ", ".join(f"{k} {v}" for k, v in sorted(scores.items())))
    if note:
        parts.append(note)
    return " - ".join(parts)


def sales_data(
    run: store.Run, contact: dict[str, Any], note: str, workflow_name: str | None
) -> dict[str, Any]:
    """The contact's 360 summary for an internal email (the template's ``data``)."""
    traits = contact.get("traits") or {}
    return {
        "summary": sales_summary(contact, note),
        "contact_id": str(run.contact_id),
        "user_id": contact.get("user_id"),
        "name": _name(contact),
        **{key: traits.get(key) for key in ("email", "phone", "company", "title")},
        "scores": contact.get("scores") or {},
        "stages": contact.get("stages") or {},
        "tags": sorted(contact.get("tags") or {}),
        "traits": traits,
        "note": note,
        "workflow": {"id": str(run.workflow_id), "name": workflow_name, "run_id": str(run.id)},
    }


def _snapshot(run: store.Run, contact: dict[str, Any]) -> ContactSnapshot:
    return ContactSnapshot(
        contact_id=run.contact_id,
        user_id=contact.get("user_id"),
        traits=contact.get("traits") or {},
        scores=contact.get("scores") or {},
        segments=contact.get("segments") or [],
    )


def _sales_emails(
    run: store.Run,
    step: int,
    action: NotifySales,
    contact: dict[str, Any],
    workflow_name: str | None,
    now: datetime,
) -> list[OutgoingMessage]:
    """One internal email request per address: ids and idempotency keys derive from (run,
    step, address number), so a replay is the same request and the notifier sends once."""
    data = sales_data(run, contact, action.note, workflow_name)
    snapshot = _snapshot(run, contact)
    return [
        OutgoingMessage(
            Topic.NOTIFICATIONS,
            key=str(run.contact_id),
            envelope=NOTIFICATION_REQUESTED.envelope(
                workspace_id=run.workspace_id,
                payload=NotificationRequested(
                    idempotency_key=f"{idempotency_key(run.id, step)}:sales-{number}",
                    channel="email",
                    template_id=action.template_id or CONTACT_SUMMARY_TEMPLATE_ID,
                    contact=snapshot,
                    workflow_id=run.workflow_id,
                    run_id=run.id,
                    step=step,
                    recipient=address,
                    data=data,
                ),
                occurred_at=now,
                id=stable_id(str(run.id), "notification.requested", f"{step}:sales-{number}"),
            ),
        )
        for number, address in enumerate(action.email)
    ]


def _quiet_hours(raw: dict[str, Any] | None) -> QuietHours | None:
    if not raw:
        return None
    return QuietHours(time.fromisoformat(raw["start"]), time.fromisoformat(raw["end"]))


def _notification(
    run: store.Run,
    contact: dict[str, Any],
    step: int,
    channel: Any,
    template_id: uuid.UUID,
    key: str,
    now: datetime,
    out: Outputs,
) -> OutgoingMessage:
    """The request of a send step: the envelope ``NOTIFICATION_REQUESTED.envelope`` gives for
    ``NotificationRequested(..., contact=_snapshot(run, contact))``, field for field, built
    without validating and dumping the models (the copy's traits and scores are JSON
    already; a send is the hot path of every workflow)."""
    run_id, contact_id = str(run.id), str(run.contact_id)  # each used twice below
    payload = {
        "idempotency_key": key,
        "channel": channel,
        "template_id": str(template_id),
        "contact": {
            "contact_id": contact_id,
            "user_id": contact.get("user_id"),
            "traits": contact.get("traits") or {},
            "scores": contact.get("scores") or {},
            "segments": contact.get("segments") or [],
        },
        "workflow_id": str(run.workflow_id),
        "run_id": run_id,
        "step": step,
        "recipient": None,
        "data": {},
    }
    return OutgoingMessage(
        Topic.NOTIFICATIONS,
        key=contact_id,
        envelope=Envelope.model_construct(
            type=NOTIFICATION_REQUESTED.name,
            version=NOTIFICATION_REQUESTED.version,
            # Derived from (run, step): a re-publication after a crash is the same message.
            id=stable_id(run_id, "notification.requested", str(step)),
            occurred_at=now,
            workspace_id=run.workspace_id,
            origin_received_at=out.origins.get(run.id, out.origin_received_at),
            payload=payload,
        ),
    )


async def on_event(
    session: AsyncSession,
    out: Outputs,
    *,
    workspace_id: str,
    contact_id: uuid.UUID,
    event: str,
    now: datetime,
) -> None:
    """A contact performed ``event``: runs remember it, goals convert, waits for it end."""
    active = await store.active_runs_of(session, workspace_id=workspace_id, contact_id=contact_id)
    if not active:
        return
    await store.note_performed(session, run_ids=[run.id for run in active], event=event)
    converted = set()
    for run in active:
        definition = await store.version_definition(
            session, workflow_id=run.workflow_id, version=run.version
        )
        if definition.goal is not None and definition.goal.event == event:
            await store.finish_run(session, run_id=run.id, status="converted", at=now)
            metrics.RUNS_FINISHED.labels("converted").inc()
            converted.add(run.id)
    waits = await store.claim_event_waits(
        session, workspace_id=workspace_id, contact_id=contact_id, event=event
    )
    await resume_many(
        session,
        out,
        [(t.run_id, t.event_step) for t in waits if t.run_id not in converted],
        now=now,
    )
