"""Workflow definitions and what one step of a run decides. Pure.

A definition is JSON: a ``trigger``, an ``entry`` rule, an optional ``goal`` and a list of
``steps``. Steps run in list order unless a step names its successor (``next``, or a
branch's ``then``/``else``, a split variant's ``next``, a wait-for-event's ``on_event``) by
its ``id``; a step's number is its index in the list (the idempotency key of a message is
``<run id>:<step number>``). The graph must be acyclic and every step reachable from the
first: :func:`problems` names the field of each violation.

:func:`decide` is the whole behaviour of one step given what is known of the contact; the
executor (``nudge_orchestrator.execution``) applies the decision durably, and
:func:`simulate` follows decisions without applying them.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from nudge_common.conditions import Condition, Profile, matches
from nudge_common.events import Channel


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# --- triggers ------------------------------------------------------------------------------


class SegmentEntered(_Node):
    kind: Literal["segment_entered"]
    segment_id: uuid.UUID


class SegmentExited(_Node):
    kind: Literal["segment_exited"]
    segment_id: uuid.UUID


class EventPerformed(_Node):
    """A track event by name; ``properties`` is a condition of the segment language whose
    ``trait`` nodes name the event's properties."""

    kind: Literal["event"]
    event: str = Field(min_length=1, max_length=200)
    properties: Condition | None = None


class ApiCall(_Node):
    """Runs start only through ``POST /api/v1/workflows/{id}/runs``."""

    kind: Literal["api"]


class ScoreCrossed(_Node):
    """The contact's score in ``model`` crosses ``threshold``: ``up`` (from below to at or
    above it) or ``down`` (from at or above to below). A contact first seen counts as 0."""

    kind: Literal["score_crossed"]
    model: str = Field(default="default", min_length=1, max_length=100)
    threshold: int
    direction: Literal["up", "down"] = "up"


class StageChanged(_Node):
    """Scoring moved the contact to another lifecycle stage of ``model``; ``to`` and
    ``from`` narrow it to a given stage (and the one it left)."""

    kind: Literal["stage_changed"]
    model: str = Field(default="default", min_length=1, max_length=100)
    to: str | None = Field(default=None, min_length=1, max_length=100)
    from_stage: str | None = Field(default=None, alias="from", min_length=1, max_length=100)


class DateTrait(_Node):
    """A date trait (birthday, anniversary, renewal date: ISO ``YYYY-MM-DD``, or a date and
    time) plus ``offset_days`` (negative: before it), at ``hour:minute`` in the contact's
    ``timezone`` trait. ``yearly`` repeats it every year (a run per year: use the entry rule
    ``every_time``), otherwise it fires once. Scheduled per contact as a durable timer when
    the trait is learned or changes; nothing scans the contacts."""

    kind: Literal["date_trait"]
    trait: str = Field(min_length=1, max_length=200)
    offset_days: int = Field(default=0, ge=-366, le=366)
    hour: int = Field(default=9, ge=0, le=23)
    minute: int = Field(default=0, ge=0, le=59)
    yearly: bool = True


class BroadcastSend(_Node):
    """The one-step workflow a broadcast runs per member of its segment or list: runs are
    started only by the broadcast worker (``/api/v1/broadcasts``), never by a message."""

    kind: Literal["broadcast"]


AnyTrigger = (
    SegmentEntered
    | SegmentExited
    | EventPerformed
    | ApiCall
    | ScoreCrossed
    | StageChanged
    | DateTrait
    | BroadcastSend
)
Trigger = Annotated[AnyTrigger, Field(discriminator="kind")]


def trigger_key(trigger: AnyTrigger) -> str:
    """What the trigger listens to, indexed so an incoming message finds its workflows."""
    match trigger:
        case SegmentEntered(segment_id=segment) | SegmentExited(segment_id=segment):
            return str(segment)
        case EventPerformed(event=event):
            return event
        case ScoreCrossed(model=model) | StageChanged(model=model):
            return model
        case DateTrait(trait=trait):
            return trait
    return ""


def crossed(trigger: ScoreCrossed, before: int | None, after: int | None) -> bool:
    old = before if before is not None else 0
    new = after if after is not None else 0
    if trigger.direction == "up":
        return old < trigger.threshold <= new
    return new < trigger.threshold <= old


def stage_matches(trigger: StageChanged, previous: str | None, stage: str) -> bool:
    if trigger.to is not None and trigger.to != stage:
        return False
    return trigger.from_stage is None or trigger.from_stage == previous


def parse_date(value: Any) -> date | None:
    """A date trait's calendar date: ``YYYY-MM-DD`` or an ISO date and time; else None."""
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        return None


def next_date_occurrence(
    trigger: DateTrait, value: Any, timezone: str | None, now: datetime
) -> datetime | None:
    """The next instant (UTC) after ``now`` the trigger fires for a contact whose trait is
    ``value``: None when the value is no date, or a one-off date is past. A 29 February is
    the 28th in other years."""
    day = parse_date(value)
    if day is None:
        return None
    tz = zone(timezone)
    at = time(trigger.hour, trigger.minute)
    offset = timedelta(days=trigger.offset_days)

    def fires(on: date) -> datetime:
        return datetime.combine(on + offset, at, tzinfo=tz).astimezone(UTC)

    if not trigger.yearly:
        due = fires(day)
        return due if due > now else None
    year = (now.astimezone(tz) - offset).year - 1
    for candidate_year in range(year, year + 3):
        try:
            on = day.replace(year=candidate_year)
        except ValueError:  # 29 February
            on = date(candidate_year, 2, 28)
        due = fires(on)
        if due > now:
            return due
    raise AssertionError("a yearly date recurs within three years")


class Entry(_Node):
    """``once`` per contact ever; ``every_time`` the trigger fires; ``cooldown``: again once
    ``cooldown_s`` passed since the previous entry. A contact is never in two runs of the
    same workflow at once unless ``concurrent``."""

    rule: Literal["once", "every_time", "cooldown"] = "once"
    cooldown_s: int | None = Field(default=None, gt=0)
    concurrent: bool = False

    @model_validator(mode="after")
    def cooldown_needs_a_period(self) -> Entry:
        if (self.rule == "cooldown") != (self.cooldown_s is not None):
            raise ValueError("cooldown_s is required with rule 'cooldown', and only then")
        return self


class Goal(_Node):
    """The conversion: performing ``event`` ends the run and counts a conversion."""

    event: str = Field(min_length=1, max_length=200)


# --- steps ---------------------------------------------------------------------------------


class _Step(_Node):
    id: str | None = Field(default=None, min_length=1, max_length=100)
    next: str | None = None
    """The step that follows (by id); by default the next one in the list."""


class SendMessage(_Step):
    kind: Literal["send"]
    channel: Channel
    template_id: uuid.UUID


class Wait(_Step):
    kind: Literal["wait"]
    seconds: int = Field(gt=0, le=366 * 86400)


class WaitUntil(_Step):
    """Until the next ``hour:minute`` in the contact's timezone, on one of ``weekdays``
    (0 = Monday) when given."""

    kind: Literal["wait_until"]
    hour: int = Field(ge=0, le=23)
    minute: int = Field(default=0, ge=0, le=59)
    weekdays: list[int] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def weekdays_are_days(self) -> WaitUntil:
        if self.weekdays and any(day < 0 or day > 6 for day in self.weekdays):
            raise ValueError("weekdays are 0 (Monday) to 6 (Sunday)")
        return self


class WaitForEvent(_Step):
    """Wait up to ``timeout_s`` for ``event``: performed in time, the run goes on at
    ``on_event`` (by default, ends); otherwise at ``next``."""

    kind: Literal["wait_for_event"]
    event: str = Field(min_length=1, max_length=200)
    timeout_s: int = Field(gt=0, le=366 * 86400)
    on_event: str | None = None


class Branch(_Step):
    """True when the contact matches ``condition`` (the segment language, on the contact's
    traits and scores), has performed every event of ``performed`` and none of
    ``not_performed`` since the run started. True goes to ``then`` (default: the next
    step), false to ``else`` (default: the run ends)."""

    kind: Literal["branch"]
    condition: Condition | None = None
    performed: list[str] = Field(default_factory=list)
    not_performed: list[str] = Field(default_factory=list)
    then: str | None = None
    otherwise: str | None = Field(default=None, alias="else")

    @model_validator(mode="after")
    def tests_something(self) -> Branch:
        if self.condition is None and not self.performed and not self.not_performed:
            raise ValueError("a branch needs condition, performed or not_performed")
        return self


class Variant(_Node):
    name: str = Field(min_length=1, max_length=50)
    weight: int = Field(gt=0, le=10_000)
    next: str | None = None
    """Where this variant goes (by id); by default the step after the split."""


class Split(_Step):
    """A/B or n-way split, by weight, deterministic per contact; ``holdout`` (a fraction)
    of contacts are held out first: their run ends here and counts as the holdout."""

    kind: Literal["split"]
    variants: list[Variant] = Field(min_length=2, max_length=20)
    holdout: float = Field(default=0.0, ge=0.0, lt=1.0)
    holdout_window_s: int | None = Field(default=None, gt=0, le=366 * 86400)
    """How long a held-out run stays open (doing nothing) so the goal can still convert
    it, for the holdout's conversion rate; by default it ends at the split."""

    @model_validator(mode="after")
    def names_unique(self) -> Split:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names) or "holdout" in names:
            raise ValueError("variant names must be unique and not 'holdout'")
        return self


class Exit(_Step):
    kind: Literal["exit"]


class Tag(_Step):
    """Add and remove tags (``namespace:value``): an identify call with ``traits.tags`` /
    ``traits.untags`` on the events topic, which scoring applies like any other."""

    kind: Literal["tag"]
    add: list[str] = Field(default_factory=list, max_length=50)
    remove: list[str] = Field(default_factory=list, max_length=50)

    @model_validator(mode="after")
    def changes_something(self) -> Tag:
        if not self.add and not self.remove:
            raise ValueError("a tag step needs add or remove")
        return self


class SetTraits(_Step):
    """Set traits: an identify call with these ``traits`` on the events topic."""

    kind: Literal["set_traits"]
    traits: dict[str, Any] = Field(min_length=1, max_length=50)

    @model_validator(mode="after")
    def no_tag_keys(self) -> SetTraits:
        if {"tags", "untags"} & set(self.traits):
            raise ValueError("use a tag step for tags")
        return self


class AdjustScore(_Step):
    """Add ``points`` (negative: take) to the contact's score in ``model``: a
    ``score.adjusted`` on the events topic, which scoring applies once, without a rule."""

    kind: Literal["adjust_score"]
    model: str = Field(default="default", min_length=1, max_length=100)
    points: int = Field(ge=-10_000, le=10_000)


class Webhook(_Step):
    """POST the contact's summary to ``url``, signed (HMAC-SHA256), retried with backoff."""

    kind: Literal["webhook"]
    url: str = Field(pattern=r"^https?://", max_length=2000)


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


EmailAddress = Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$", max_length=320)]


class NotifySales(_Step):
    """Tell sales about the contact, by internal email and/or a signed webhook. ``email``
    (one address or a list) gets the contact's 360 summary (name, email, company, scores,
    stages, tags, the note, the workflow), or ``template_id``'s email template with that
    summary as ``data``; the contact's consent, suppression and caps do not apply. ``url``
    gets a signed webhook (like ``webhook``) whose body is the contact's summary with
    ``"kind": "notify_sales"`` and a one-line ``summary`` for a chat or CRM."""

    kind: Literal["notify_sales"]
    email: Annotated[list[EmailAddress], BeforeValidator(_one_or_many)] = Field(
        default_factory=list, max_length=20
    )
    template_id: uuid.UUID | None = None
    url: str | None = Field(default=None, pattern=r"^https?://", max_length=2000)
    note: str = Field(default="", max_length=500)

    @model_validator(mode="after")
    def goes_somewhere(self) -> NotifySales:
        if not self.email and self.url is None:
            raise ValueError("notify_sales needs email (an address or a list) or url")
        if self.template_id is not None and not self.email:
            raise ValueError("template_id: a template is for the email form (give email)")
        return self


class ListChange(_Step):
    """Add the contact to a static list, or remove it: ``list.changed`` on the contacts
    topic, which the segmenter (owner of lists) applies."""

    kind: Literal["list"]
    list_id: uuid.UUID
    action: Literal["add", "remove"]


Action = Tag | SetTraits | AdjustScore | Webhook | NotifySales | ListChange

Step = Annotated[
    SendMessage
    | Wait
    | WaitUntil
    | WaitForEvent
    | Branch
    | Split
    | Exit
    | Tag
    | SetTraits
    | AdjustScore
    | Webhook
    | NotifySales
    | ListChange,
    Field(discriminator="kind"),
]


class WorkflowDefinition(_Node):
    trigger: Trigger
    entry: Entry = Field(default_factory=Entry)
    goal: Goal | None = None
    steps: list[Step] = Field(min_length=1, max_length=200)


# --- the graph -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a definition: ``loc`` is the path of the offending field."""

    loc: tuple[str | int, ...]
    msg: str


def _targets(step: Any) -> list[tuple[str, str | None]]:
    """(field, target id) of every explicit edge of a step."""
    edges: list[tuple[str, str | None]] = [("next", step.next)]
    if isinstance(step, Branch):
        edges += [("then", step.then), ("else", step.otherwise)]
    if isinstance(step, WaitForEvent):
        edges.append(("on_event", step.on_event))
    if isinstance(step, Split):
        edges += [(f"variants.{i}.next", v.next) for i, v in enumerate(step.variants)]
    return edges


def successors(definition: WorkflowDefinition, index: int) -> dict[str, int | None]:
    """Where each outcome of step ``index`` leads: a step number, or None (the run ends)."""
    steps = definition.steps
    ids = {step.id: i for i, step in enumerate(steps) if step.id}
    step = steps[index]

    def to(target: str | None, *, default_next: bool = True) -> int | None:
        if target is not None:
            return ids[target]
        if default_next and index + 1 < len(steps):
            return index + 1
        return None

    if isinstance(step, Exit):
        return {}
    if isinstance(step, Branch):
        return {"then": to(step.then or step.next), "else": to(step.otherwise, default_next=False)}
    if isinstance(step, WaitForEvent):
        return {"timeout": to(step.next), "event": to(step.on_event, default_next=False)}
    if isinstance(step, Split):
        out = {v.name: to(v.next or step.next) for v in step.variants}
        if step.holdout:
            out["holdout"] = None
        return out
    return {"next": to(step.next)}


def problems(definition: WorkflowDefinition, known_templates: set[uuid.UUID]) -> list[Problem]:
    """Unknown step ids, duplicate ids, unknown templates, cycles and unreachable steps."""
    found: list[Problem] = []
    steps = definition.steps
    seen: dict[str, int] = {}
    for i, step in enumerate(steps):
        if step.id is not None:
            if step.id in seen:
                found.append(Problem(("steps", i, "id"), f"duplicate step id {step.id!r}"))
            seen[step.id] = i
        template = step.template_id if isinstance(step, SendMessage | NotifySales) else None
        if template is not None and template not in known_templates:
            found.append(Problem(("steps", i, "template_id"), f"unknown template {template}"))
        for name, target in _targets(step):
            if target is not None and target not in seen and target not in _ids(steps):
                loc: tuple[str | int, ...] = ("steps", i, *_split_loc(name))
                found.append(Problem(loc, f"no step has the id {target!r}"))
    if found:
        return found
    graph = {
        i: sorted({t for t in successors(definition, i).values() if t is not None})
        for i in range(len(steps))
    }
    cycle = _find_cycle(graph)
    if cycle is not None:
        path = " -> ".join(_name(steps, i) for i in cycle)
        found.append(Problem(("steps", cycle[-1]), f"the steps form a cycle: {path}"))
        return found
    reachable = _reachable(graph, 0)
    for i in range(len(steps)):
        if i not in reachable:
            found.append(Problem(("steps", i), f"step {_name(steps, i)} can never be reached"))
    return found


def _ids(steps: list[Any]) -> set[str]:
    return {step.id for step in steps if step.id}


def _split_loc(name: str) -> tuple[str | int, ...]:
    return tuple(int(part) if part.isdigit() else part for part in name.split("."))


def _name(steps: list[Any], index: int) -> str:
    return repr(steps[index].id) if steps[index].id else f"#{index}"


def _find_cycle(graph: Mapping[int, list[int]]) -> list[int] | None:
    state: dict[int, int] = {}  # 1 = on the stack, 2 = done
    stack: list[int] = []

    def visit(node: int) -> list[int] | None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def _reachable(graph: Mapping[int, list[int]], start: int) -> set[int]:
    seen = {start}
    todo = [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


# --- what one step decides -----------------------------------------------------------------


@dataclass(frozen=True)
class QuietHours:
    """Local hours when messages wait: from ``start`` to ``end`` (may cross midnight)."""

    start: time
    end: time

    def until(self, local: datetime) -> datetime | None:
        """The local end of the quiet period ``local`` is in, or None when not quiet."""
        now = local.timetz().replace(tzinfo=None)
        if self.start <= self.end:
            quiet = self.start <= now < self.end
        else:
            quiet = now >= self.start or now < self.end
        if not quiet:
            return None
        end = local.replace(hour=self.end.hour, minute=self.end.minute, second=0, microsecond=0)
        return end if end > local else end + timedelta(days=1)


@dataclass(frozen=True)
class Context:
    """What a step may look at."""

    run_id: uuid.UUID
    contact_id: uuid.UUID
    workflow_id: uuid.UUID
    now: datetime
    profile: Profile = field(default_factory=Profile)
    performed: frozenset[str] = frozenset()
    """Events the contact performed since the run started."""
    timezone: str | None = None
    quiet_hours: QuietHours | None = None


@dataclass(frozen=True)
class Send:
    channel: Channel
    template_id: uuid.UUID
    next: int | None


@dataclass(frozen=True)
class Defer:
    """Execute this same step again at ``until`` (quiet hours)."""

    until: datetime


@dataclass(frozen=True)
class Schedule:
    """Wait: go on at ``resume`` when ``due``; or, when ``event`` is performed first, at
    ``on_event``."""

    due: datetime
    resume: int | None
    event: str | None = None
    on_event: int | None = None
    variant: str | None = None
    """A split's holdout waiting for the goal: the run's variant, recorded as the outcome."""


@dataclass(frozen=True)
class Goto:
    """Go on at ``next`` at once (None: the run ends); ``outcome`` is recorded."""

    next: int | None
    outcome: str


@dataclass(frozen=True)
class End:
    outcome: str = "exit"


@dataclass(frozen=True)
class Act:
    """Do an action of another service (tags, traits, score, list, webhook, notify sales);
    go on at ``next``."""

    action: Action
    next: int | None


Decision = Send | Defer | Schedule | Goto | End | Act


def zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name) if name else ZoneInfo("UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def decide(definition: WorkflowDefinition, index: int, ctx: Context) -> Decision:
    step = definition.steps[index]
    after = successors(definition, index)
    match step:
        case SendMessage(channel=channel, template_id=template):
            if ctx.quiet_hours is not None:
                local = ctx.now.astimezone(zone(ctx.timezone))
                until = ctx.quiet_hours.until(local)
                if until is not None:
                    return Defer(until.astimezone(UTC))
            return Send(channel, template, after["next"])
        case Wait(seconds=seconds):
            return Schedule(ctx.now + timedelta(seconds=seconds), after["next"])
        case WaitUntil():
            return Schedule(next_local_time(step, ctx.now, ctx.timezone), after["next"])
        case WaitForEvent(event=event, timeout_s=timeout):
            if event in ctx.performed:
                return Goto(after["event"], "event")
            return Schedule(
                ctx.now + timedelta(seconds=timeout), after["timeout"], event, after["event"]
            )
        case Branch():
            outcome = "then" if branch_holds(step, ctx) else "else"
            return Goto(after[outcome], outcome)
        case Split():
            variant = assign_variant(step, ctx.workflow_id, ctx.contact_id, index)
            if variant == "holdout" and step.holdout_window_s:
                window = timedelta(seconds=step.holdout_window_s)
                return Schedule(ctx.now + window, None, variant=variant)
            return Goto(after[variant], variant)
        case Exit():
            return End()
        case Tag() | SetTraits() | AdjustScore() | Webhook() | NotifySales() | ListChange():
            return Act(step, after["next"])
    raise AssertionError(f"unknown step {step!r}")


def branch_holds(step: Branch, ctx: Context) -> bool:
    if step.condition is not None and not matches(step.condition, ctx.profile):
        return False
    if any(event not in ctx.performed for event in step.performed):
        return False
    return not any(event in ctx.performed for event in step.not_performed)


def next_local_time(step: WaitUntil, now: datetime, timezone: str | None) -> datetime:
    local = now.astimezone(zone(timezone))
    candidate = local.replace(hour=step.hour, minute=step.minute, second=0, microsecond=0)
    for _ in range(8):
        if candidate > local and (step.weekdays is None or candidate.weekday() in step.weekdays):
            return candidate.astimezone(UTC)
        candidate = (candidate + timedelta(days=1)).replace(hour=step.hour, minute=step.minute)
    raise AssertionError("a weekday window always matches within a week")


def unit(*parts: str) -> float:
    """A uniform number in [0, 1) derived from ``parts``: the same contact always lands in
    the same bucket."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_variant(step: Split, workflow_id: uuid.UUID, contact_id: uuid.UUID, index: int) -> str:
    if (
        step.holdout
        and unit(str(workflow_id), str(contact_id), str(index), "holdout") < step.holdout
    ):
        return "holdout"
    point = unit(str(workflow_id), str(contact_id), str(index), "variant") * sum(
        v.weight for v in step.variants
    )
    for variant in step.variants:
        if point < variant.weight:
            return variant.name
        point -= variant.weight
    return step.variants[-1].name


def idempotency_key(run_id: uuid.UUID, step: int) -> str:
    return f"{run_id}:{step}"


# --- simulation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Visit:
    step: int
    id: str | None
    kind: str
    outcome: str
    at: datetime


def simulate(
    definition: WorkflowDefinition,
    ctx: Context,
    events: Iterable[tuple[str, datetime]] = (),
) -> list[Visit]:
    """The path a run would take for this contact, sending nothing: waits elapse, and a
    wait for an event ends with the event when ``events`` has it before the timeout.
    Quiet hours are ignored (they delay, never change the path)."""
    timeline = sorted(events, key=lambda item: item[1])
    path: list[Visit] = []
    index: int | None = 0
    now = ctx.now
    while index is not None:
        performed = frozenset(name for name, at in timeline if at <= now) | ctx.performed
        step_ctx = Context(
            ctx.run_id, ctx.contact_id, ctx.workflow_id, now, ctx.profile, performed, ctx.timezone
        )
        decision = decide(definition, index, step_ctx)
        step = definition.steps[index]
        match decision:
            case Send(next=nxt):
                path.append(Visit(index, step.id, step.kind, "sent", now))
                index = nxt
            case Act(next=nxt):
                path.append(Visit(index, step.id, step.kind, "done", now))
                index = nxt
            case Schedule(due=due, resume=resume, event=event, on_event=on_event):
                happened = next(
                    (at for name, at in timeline if name == event and now < at <= due), None
                )
                if event is not None and happened is not None:
                    path.append(Visit(index, step.id, step.kind, "event", happened))
                    now, index = happened, on_event
                else:
                    outcome = "timeout" if event is not None else "waited"
                    path.append(Visit(index, step.id, step.kind, outcome, due))
                    now, index = due, resume
            case Goto(next=nxt, outcome=outcome):
                path.append(Visit(index, step.id, step.kind, outcome, now))
                index = nxt
            case End(outcome=outcome):
                path.append(Visit(index, step.id, step.kind, outcome, now))
                index = None
            case Defer():
                raise AssertionError("simulation has no quiet hours")
        if definition.goal is not None and any(
            name == definition.goal.event and at <= now for name, at in timeline
        ):
            path.append(Visit(-1, None, "goal", "converted", now))
            break
    return path
