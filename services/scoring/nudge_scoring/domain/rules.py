"""Scoring rules: their kinds, how they are validated, and what points each gives or takes.

Pure functions of rules, events and the little state a contact carries for scoring (caps
already spent, profile rules currently held, orders placed before). No Kafka, HTTP or
database here: the consumer loads the state, asks these functions, and stores the answer.

Rule kinds (``spec.kind``):

* ``behavioural``: an event (track name, or any page/screen view) and property filters ->
  points, optionally capped per UTC day and/or for ever;
* ``profile``: a trait's value (``op``/``value``) or the mere presence of a trait -> points
  held while the condition is true (given when it becomes true, taken back when false);
* ``transactional``: an order event within a value bracket, first or repeat purchase,
  payment method -> points;
* ``decay``: points lost after ``after_days`` without activity, a percentage or a number of
  points, repeated every ``after_days`` while the contact stays inactive.

Negative points are a sign, not a kind: any of the first three may take points (an
unsubscribe, a bounce, a careers page view, a competitor's email domain).
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from nudge_common.events import SegmentEvent, SegmentType

ORDER_COMPLETED = "Order Completed"
ORDER_REFUNDED = "Order Refunded"
TRANSACTION_EVENTS = frozenset({ORDER_COMPLETED, ORDER_REFUNDED})

FilterOp = Literal[
    "eq", "ne", "in", "not_in", "contains", "starts_with", "matches", "gte", "lte", "exists"
]
FIELD_ROOTS = ("properties", "context", "traits")


class Filter(BaseModel):
    """``field`` is a dotted path into the event: ``properties.url``, ``context.page.path``,
    ``name`` (page name) or ``event`` (track name)."""

    model_config = ConfigDict(extra="forbid")

    field: str = Field(min_length=1)
    op: FilterOp
    value: Any = None

    @cached_property
    def parts(self) -> tuple[str, ...]:
        """``field`` split at its dots."""
        return tuple(self.field.split("."))

    @field_validator("field")
    @classmethod
    def known_root(cls, value: str) -> str:
        root = value.split(".", 1)[0]
        if value in ("name", "event") or (root in FIELD_ROOTS and "." in value):
            return value
        raise ValueError(
            f"unknown field {value!r}: use name, event, or properties.<x>, context.<x>, traits.<x>"
        )

    @model_validator(mode="after")
    def value_fits_op(self) -> Filter:
        if self.op in ("in", "not_in") and not isinstance(self.value, list):
            raise ValueError(f"op {self.op!r} needs a list value")
        if self.op in ("gte", "lte") and not _is_number(self.value):
            raise ValueError(f"op {self.op!r} needs a number value")
        if self.op == "matches":
            try:
                re.compile(str(self.value))
            except re.error as error:
                raise ValueError(f"invalid pattern: {error}") from None
        return self


class BehaviouralSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["behavioural"] = "behavioural"
    type: Literal["track", "page", "screen"] = "track"
    event: str | None = Field(default=None, min_length=1)
    """The track event's name; for ``page``/``screen`` the page name, None for any."""
    filters: list[Filter] = Field(default_factory=list)
    cap_per_day: int | None = Field(default=None, gt=0)
    """At most this many points (in absolute value) from this rule per contact per UTC day."""
    cap_ever: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def track_needs_event(self) -> BehaviouralSpec:
        if self.type == "track" and not self.event:
            raise ValueError("a track rule needs 'event'")
        return self


ProfileOp = Literal[
    "eq", "ne", "in", "not_in", "gte", "lte", "contains", "exists", "email_domain_in"
]


class ProfileSpec(BaseModel):
    """By value (``op`` and ``value``) or by presence (``op='exists'``: data we hold)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["profile"] = "profile"
    trait: str = Field(min_length=1)
    op: ProfileOp = "exists"
    value: Any = None

    @model_validator(mode="after")
    def value_fits_op(self) -> ProfileSpec:
        if self.op in ("in", "not_in", "email_domain_in") and not isinstance(self.value, list):
            raise ValueError(f"op {self.op!r} needs a list value")
        if self.op in ("gte", "lte") and not _is_number(self.value):
            raise ValueError(f"op {self.op!r} needs a number value")
        return self


class TransactionalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["transactional"] = "transactional"
    event: str = ORDER_COMPLETED
    min_value: float | None = Field(default=None, ge=0)
    """Order value bracket: ``min_value <= revenue < max_value``."""
    max_value: float | None = Field(default=None, gt=0)
    repeat: bool | None = None
    """True: only repeat purchases (the contact ordered before); False: only the first."""
    payment_methods: list[str] | None = None


class DecaySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["decay"] = "decay"
    after_days: float = Field(gt=0)
    percent: float | None = Field(default=None, gt=0, le=100)
    points: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def one_amount(self) -> DecaySpec:
        if (self.percent is None) == (self.points is None):
            raise ValueError("a decay rule needs exactly one of 'percent' or 'points'")
        return self


RuleSpec = Annotated[
    BehaviouralSpec | ProfileSpec | TransactionalSpec | DecaySpec, Field(discriminator="kind")
]
RuleKind = Literal["behavioural", "profile", "transactional", "decay"]
spec_adapter: TypeAdapter[RuleSpec] = TypeAdapter(RuleSpec)


@dataclass(frozen=True)
class Rule:
    id: uuid.UUID
    model: str
    event: str | None
    points: int
    spec: BehaviouralSpec | ProfileSpec | TransactionalSpec | DecaySpec | None = None

    @property
    def definition(self) -> BehaviouralSpec | ProfileSpec | TransactionalSpec | DecaySpec:
        """The spec; a rule made with only an event name is behavioural on that event."""
        if self.spec is not None:
            return self.spec
        return BehaviouralSpec(event=self.event)

    @property
    def kind(self) -> RuleKind:
        return self.definition.kind


@dataclass(frozen=True)
class ScoreDelta:
    rule_id: uuid.UUID
    model: str
    points: int
    periods: tuple[str, ...] = ()
    """The cap periods (``day_period``, ``EVER``, ``HELD``) the points count against."""


EVER = "ever"
"""The period of ``cap_ever``."""
HELD = "held"
"""The period of what a profile rule holds."""


def day_period(at: datetime) -> str:
    """The period of ``cap_per_day`` for an event at ``at``: ``day:YYYY-MM-DD``, its UTC
    day (a time without an offset is taken as UTC): a client's own offset, which ingest
    keeps when the call has no ``sentAt``, must not move an instant to another day."""
    if at.tzinfo is not None:
        at = at.astimezone(UTC)
    return f"day:{at.date().isoformat()}"


@dataclass
class ScoringState:
    """What scoring needs to know about a contact beyond the event itself."""

    spent: dict[tuple[uuid.UUID, str], int] = field(default_factory=dict)
    """Points already given per (rule, cap period)."""
    held: dict[uuid.UUID, int] = field(default_factory=dict)
    """Points each profile rule currently holds."""
    orders_before: int = 0


# --- evaluation ---------------------------------------------------------------------------


def lookup(document: Mapping[str, Any], path: str) -> Any:
    return lookup_parts(document, path.split("."))


def lookup_parts(document: Mapping[str, Any], parts: Sequence[str]) -> Any:
    """``lookup`` of a path already split at its dots."""
    value: Any = document
    for part in parts:
        # JSON objects are dicts: the exact type check first spares the ABC's
        if not (type(value) is dict or isinstance(value, Mapping)) or part not in value:
            return None
        value = value[part]
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def compare(op: str, actual: Any, expected: Any) -> bool:
    if op == "exists":
        return actual is not None and actual != "" and actual != []
    if actual is None:
        return op in ("ne", "not_in")
    if op == "eq":
        return bool(actual == expected)
    if op == "ne":
        return bool(actual != expected)
    if op == "in":
        return actual in expected
    if op == "not_in":
        return actual not in expected
    if op == "contains":
        if isinstance(actual, list):
            return expected in actual
        return str(expected).lower() in str(actual).lower()
    if op == "starts_with":
        return str(actual).startswith(str(expected))
    if op == "matches":
        return re.search(str(expected), str(actual)) is not None
    if op in ("gte", "lte"):
        number = _as_number(actual)
        if number is None:
            return False
        return bool(number >= expected) if op == "gte" else bool(number <= expected)
    if op == "email_domain_in":
        domain = str(actual).rsplit("@", 1)[-1].lower()
        return domain in {str(d).lower() for d in expected}
    raise ValueError(f"unknown op {op!r}")


def _as_number(value: Any) -> float | None:
    if _is_number(value):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        return None


def event_document(event: SegmentEvent) -> dict[str, Any]:
    return {
        "name": event.name,
        "event": event.event,
        "properties": event.properties,
        "context": event.context,
        "traits": event.traits,
    }


def order_value(properties: Mapping[str, Any]) -> float | None:
    for key in ("revenue", "total", "value"):
        number = _as_number(properties.get(key)) if properties.get(key) is not None else None
        if number is not None:
            return number
    return None


def _capped(rule: Rule, spec: BehaviouralSpec, at: datetime, state: ScoringState) -> ScoreDelta:
    periods: list[tuple[str, int]] = []
    if spec.cap_per_day is not None:
        periods.append((day_period(at), spec.cap_per_day))
    if spec.cap_ever is not None:
        periods.append((EVER, spec.cap_ever))
    points = rule.points
    for period, cap in periods:
        left = max(cap - abs(state.spent.get((rule.id, period), 0)), 0)
        points = int(math.copysign(min(abs(points), left), points))
    return ScoreDelta(rule.id, rule.model, points, tuple(p for p, _ in periods))


def matches_behavioural(
    spec: BehaviouralSpec, event: SegmentEvent, document: Mapping[str, Any] | None = None
) -> bool:
    """Whether the event matches the spec; ``document`` is the event's ``event_document``,
    when the caller has it already (it checks several rules against one event)."""
    if event.type != spec.type:  # a StrEnum: equal to its value
        return False
    name = event.event if event.type is SegmentType.TRACK else event.name
    if spec.event is not None and name != spec.event:
        return False
    if not spec.filters:
        return True
    if document is None:
        document = event_document(event)
    return all(compare(f.op, lookup_parts(document, f.parts), f.value) for f in spec.filters)


def matches_transactional(spec: TransactionalSpec, event: SegmentEvent, orders_before: int) -> bool:
    if event.type is not SegmentType.TRACK or event.event != spec.event:
        return False
    value = order_value(event.properties)
    if spec.min_value is not None and (value is None or value < spec.min_value):
        return False
    if spec.max_value is not None and (value is None or value >= spec.max_value):
        return False
    if spec.repeat is not None and (orders_before > 0) != spec.repeat:
        return False
    if spec.payment_methods is not None:
        method = event.properties.get("payment_method") or event.properties.get("paymentMethod")
        if method not in spec.payment_methods:
            return False
    return True


class RuleIndex:
    """The behavioural and transactional rules by the (call type, name) they can match, in
    their original order: an event is checked against the few rules of its name (and those
    of any name for its type) instead of every rule of the workspace."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self._by_key: dict[tuple[str, str | None], list[tuple[int, Rule]]] = {}
        for position, rule in enumerate(rules):
            spec = rule.definition
            if isinstance(spec, BehaviouralSpec):
                key = (spec.type, spec.event)
            elif isinstance(spec, TransactionalSpec):
                key = (SegmentType.TRACK.value, spec.event)
            else:
                continue
            self._by_key.setdefault(key, []).append((position, rule))

    def candidates(self, event: SegmentEvent) -> list[Rule]:
        """The rules that may match ``event`` (``score_event`` decides), in order."""
        kind = event.type.value
        name = event.event if event.type is SegmentType.TRACK else event.name
        named = self._by_key.get((kind, name), []) if name is not None else []
        anyname = self._by_key.get((kind, None), [])
        if not anyname or not named:
            return [rule for _, rule in named or anyname]
        return [rule for _, rule in sorted(named + anyname, key=lambda item: item[0])]


def score_event(
    rules: Iterable[Rule], event: SegmentEvent, state: ScoringState | None = None
) -> list[ScoreDelta]:
    """The points behavioural and transactional rules give (or take) for one event, within
    their caps. Deltas of zero (a spent cap) are left out; ``state.spent`` is updated so a
    caller scoring several events in a row sees its own spending."""
    state = state if state is not None else ScoringState()
    deltas: list[ScoreDelta] = []
    document = event_document(event)
    for rule in rules:
        spec = rule.definition
        if isinstance(spec, BehaviouralSpec) and matches_behavioural(spec, event, document):
            delta = _capped(rule, spec, event.timestamp, state)
        elif isinstance(spec, TransactionalSpec) and matches_transactional(
            spec, event, state.orders_before
        ):
            delta = ScoreDelta(rule.id, rule.model, rule.points)
        else:
            continue
        if delta.points == 0:
            continue
        for period in delta.periods:
            key = (rule.id, period)
            state.spent[key] = state.spent.get(key, 0) + delta.points
        deltas.append(delta)
    return deltas


def score_profile(
    rules: Iterable[Rule], traits: Mapping[str, Any], held: Mapping[uuid.UUID, int]
) -> list[ScoreDelta]:
    """Profile rules hold their points while their condition is true: the deltas that bring
    what each rule holds to what it should hold for ``traits``."""
    deltas = []
    for rule in rules:
        spec = rule.definition
        if not isinstance(spec, ProfileSpec):
            continue
        target = rule.points if compare(spec.op, lookup(traits, spec.trait), spec.value) else 0
        delta = target - held.get(rule.id, 0)
        if delta:
            deltas.append(ScoreDelta(rule.id, rule.model, delta, (HELD,)))
    return deltas


def decay_points(spec: DecaySpec, current: int) -> int:
    """The (negative) change a decay makes to a score of ``current``; never below zero."""
    if current <= 0:
        return 0
    if spec.percent is not None:
        return -min(current, math.floor(current * spec.percent / 100 + 0.5))
    assert spec.points is not None
    return -min(current, spec.points)


# --- lifecycle stages ---------------------------------------------------------------------

DEFAULT_STAGES: tuple[tuple[str, int], ...] = (
    ("subscriber", 0),
    ("lead", 20),
    ("mql", 50),
    ("sql", 100),
    ("opportunity", 150),
    ("customer", 250),
    ("evangelist", 400),
)


class Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    min_score: int


def stage_for(stages: Iterable[Stage], score: int) -> str | None:
    """The highest stage whose threshold the score reaches (stages in any order)."""
    best: Stage | None = None
    for stage in stages:
        if score >= stage.min_score and (best is None or stage.min_score > best.min_score):
            best = stage
    return best.name if best else None
