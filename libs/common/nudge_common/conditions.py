"""The segment condition language, and its evaluation against one contact. Pure.

Shared by the segmenter (segments) and the orchestrator (workflow branches and event
property filters). A condition is JSON, nested with ``all`` / ``any`` / ``not``::

    {"kind": "all", "conditions": [
        {"kind": "trait", "name": "address.country", "op": "eq", "value": "IT"},
        {"kind": "event", "event": "Order Completed", "op": "gte", "count": 2, "within_days": 30},
        {"kind": "not", "condition": {"kind": "tag", "tag": "churned"}}
    ]}

Every leaf kind is documented in ``docs/segmenter.md``. The segmenter also compiles a
condition to SQL (``nudge_segmenter.sql``) for set-based backfill; the semantics
here are the reference, and the property tests hold the two equal:

* values compare only with values of the same JSON kind (number with number, string with
  string by code point, boolean with boolean); anything else is no match, except ``neq``,
  which is the negation of ``eq`` (a missing trait is "not equal" to anything);
* dates are the ``YYYY-MM-DD`` prefix of an ISO string, compared by calendar day;
* time windows end at ``now``: an event is within the last N days when
  ``now - at < N days``, a contact was last seen more than N days ago when
  ``now - last_seen >= N days``.

:func:`evaluate` also says when the passing of time alone could change the answer
(``recheck_at``), so the segmenter schedules that contact's re-evaluation instead of
rescanning everyone on a cron. It is never later than the first moment the answer can
change; it may be earlier (a recheck that finds nothing changed only schedules the next).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from nudge_common.rfm import CELL_NAMES, LEVEL_SCORES, MATRIX_AXES, Axis, Matrix, cell_levels

_ISO_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")

Comparison = Literal["eq", "neq", "gt", "gte", "lt", "lte"]
Channel = Literal["email", "sms", "push"]
ValueMetric = Literal[
    "revenue", "orders", "average_order_value", "clv", "p_alive", "expected_purchases"
]


def trait_path(name: str) -> str:
    if any(not part or part.lstrip("-").isdigit() for part in name.split(".")):
        raise ValueError("a dotted path of trait names (no empty parts, no list indexes)")
    return name


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AllOf(_Node):
    kind: Literal["all"]
    conditions: list[Condition] = Field(min_length=1)


class AnyOf(_Node):
    kind: Literal["any"]
    conditions: list[Condition] = Field(min_length=1)


class Not(_Node):
    kind: Literal["not"]
    condition: Condition


class TraitIs(_Node):
    """A trait (``name`` is a dotted path into nested traits, e.g. ``address.city``)."""

    kind: Literal["trait"]
    name: str = Field(min_length=1, max_length=200)
    op: Comparison | Literal["exists", "in", "contains", "starts_with"]
    value: Any = None

    _path = field_validator("name")(classmethod(lambda cls, name: trait_path(name)))

    @model_validator(mode="after")
    def _value_fits_op(self) -> TraitIs:
        if self.op != "exists" and self.value is None:
            raise ValueError(f"'{self.op}' needs a value")
        if self.op == "in" and not (
            isinstance(self.value, list) and all(v is not None for v in self.value)
        ):
            raise ValueError("'in' needs a list of values (no nulls)")
        if self.op == "starts_with" and not isinstance(self.value, str):
            raise ValueError("'starts_with' needs a string value")
        if self.op == "contains" and not _is_scalar(self.value):
            raise ValueError("'contains' needs a string, number or boolean value")
        if self.op in ("gt", "gte", "lt", "lte") and not (
            _is_number(self.value) or isinstance(self.value, str)
        ):
            raise ValueError(f"'{self.op}' needs a number or string value")
        return self


class TraitDate(_Node):
    """A date trait: ``before`` / ``after`` a date, ``within_last`` / ``within_next`` N
    days, or an ``anniversary_within`` N days (birthday in the next N days, 0 = today, in
    the contact's ``timezone`` trait)."""

    kind: Literal["date"]
    name: str = Field(min_length=1, max_length=200)
    op: Literal["before", "after", "within_last", "within_next", "anniversary_within"]
    value: date | None = None
    days: int | None = Field(default=None, ge=0, le=36_500)

    _path = field_validator("name")(classmethod(lambda cls, name: trait_path(name)))

    @model_validator(mode="after")
    def _operand_fits_op(self) -> TraitDate:
        if self.op in ("before", "after") and self.value is None:
            raise ValueError(f"'{self.op}' needs a date 'value'")
        if self.op not in ("before", "after") and self.days is None:
            raise ValueError(f"'{self.op}' needs 'days'")
        return self


class Age(_Node):
    """Age in whole years from a birthday trait, in the contact's timezone."""

    kind: Literal["age"]
    op: Comparison
    value: int = Field(ge=0, le=200)
    trait: str = "birthday"


class ScoreAtLeast(_Node):
    """A score in a scoring model (a contact without one scores 0)."""

    kind: Literal["score"]
    model: str = Field(min_length=1)
    op: Comparison
    value: int


class StageIs(_Node):
    kind: Literal["stage"]
    model: str = Field(min_length=1)
    op: Literal["eq", "neq", "in"] = "eq"
    value: str | list[str]


class HasTag(_Node):
    """An active tag, with a tag score (times assigned) of at least ``min_score``."""

    kind: Literal["tag"]
    tag: str = Field(min_length=1, max_length=100)
    min_score: int = Field(default=1, ge=1)


class Performed(_Node):
    """Performed ``event`` (with ``where``, a condition whose ``trait`` nodes name event
    properties) ``op`` ``count`` times within the last ``within_days`` days, or ever.
    "Has not performed X in 30 days" is ``op: eq, count: 0, within_days: 30``."""

    kind: Literal["event"]
    event: str = Field(min_length=1, max_length=200)
    where: Condition | None = None
    op: Comparison = "gte"
    count: int = Field(default=1, ge=0)
    within_days: int | None = Field(default=None, ge=1, le=3650)

    @field_validator("where")
    @classmethod
    def _where_on_properties(cls, where: Condition | None) -> Condition | None:
        if where is not None and not _only_traits(where):
            raise ValueError("'where' may only hold all/any/not and trait nodes (properties)")
        return where


class LastSeen(_Node):
    """Last seen (any track, page or screen call) more or less than N days ago; a contact
    never seen was seen "more than" any number of days ago."""

    kind: Literal["last_seen"]
    op: Literal["more_than", "less_than"]
    days: int = Field(ge=0, le=3650)


class InSegment(_Node):
    kind: Literal["segment"]
    segment_id: uuid.UUID


class Consents(_Node):
    """Subscribed to a channel (the notifier's consent, as it publishes it)."""

    kind: Literal["consent"]
    channel: Channel


class ValueIs(_Node):
    """Customer value: revenue, order count, average order value, and the CLV model's
    outputs (``clv``, ``p_alive``, ``expected_purchases``; unset until the first fit)."""

    kind: Literal["value"]
    metric: ValueMetric
    op: Comparison
    value: float


class RfmScore(_Node):
    kind: Literal["rfm"]
    axis: Axis
    op: Comparison
    value: int = Field(ge=1, le=5)


class RfmCell(_Node):
    kind: Literal["rfm_cell"]
    matrix: Matrix
    cell: str

    @model_validator(mode="after")
    def _known_cell(self) -> RfmCell:
        if cell_levels(self.matrix, self.cell) is None:
            names = ", ".join(sorted(CELL_NAMES[self.matrix].values()))
            raise ValueError(f"unknown cell of matrix {self.matrix!r}; one of: {names}")
        return self


Leaf = (
    TraitIs
    | TraitDate
    | Age
    | ScoreAtLeast
    | StageIs
    | HasTag
    | Performed
    | LastSeen
    | InSegment
    | Consents
    | ValueIs
    | RfmScore
    | RfmCell
)
Condition = Annotated[AllOf | AnyOf | Not | Leaf, Field(discriminator="kind")]
condition_adapter: TypeAdapter[Condition] = TypeAdapter(Condition)


def _only_traits(condition: Condition) -> bool:
    match condition:
        case AllOf(conditions=children) | AnyOf(conditions=children):
            return all(_only_traits(child) for child in children)
        case Not(condition=child):
            return _only_traits(child)
        case TraitIs():
            return True
    return False


def leaves(condition: Condition) -> list[Leaf]:
    match condition:
        case AllOf(conditions=children) | AnyOf(conditions=children):
            return [leaf for child in children for leaf in leaves(child)]
        case Not(condition=child):
            return leaves(child)
    return [condition]


# --- what is known of a contact ----------------------------------------------------------


@dataclass(frozen=True)
class EventFact:
    event: str
    at: datetime
    properties: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CustomerValue:
    revenue: float = 0.0
    orders: int = 0
    clv: float | None = None
    p_alive: float | None = None
    expected_purchases: float | None = None
    rfm: Mapping[Axis, int] | None = None

    def metric(self, name: ValueMetric) -> float | None:
        if name == "revenue":
            return self.revenue
        if name == "orders":
            return float(self.orders)
        if name == "average_order_value":
            return self.revenue / self.orders if self.orders else None
        return getattr(self, name)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Profile:
    """What is known of a contact. ``events`` need only hold the events the conditions
    evaluated name (the segmenter loads just those)."""

    traits: Mapping[str, Any] = field(default_factory=dict)
    scores: Mapping[str, int] = field(default_factory=dict)
    tags: Mapping[str, int] = field(default_factory=dict)
    stages: Mapping[str, str] = field(default_factory=dict)
    consents: frozenset[str] = frozenset()
    segments: AbstractSet[uuid.UUID] = frozenset()
    value: CustomerValue = CustomerValue()
    last_seen_at: datetime | None = None
    events: Sequence[EventFact] = ()
    events_by_name: Mapping[str, Sequence[EventFact]] | None = None
    """Optional: ``events`` grouped by name (the same facts), which compiled conditions
    (:func:`compile_evaluator`) read instead of scanning every event."""


@dataclass(frozen=True)
class Verdict:
    matches: bool
    recheck_at: datetime | None = None
    """The earliest moment after which time alone could change ``matches``; None when
    only a change of the contact can."""


def matches(condition: Condition, profile: Profile, now: datetime | None = None) -> bool:
    return evaluate(condition, profile, now or datetime.now(UTC)).matches


def evaluate(condition: Condition, profile: Profile, now: datetime) -> Verdict:
    match condition:
        case AllOf(conditions=children):
            return _combine(children, profile, now, decisive=False)
        case AnyOf(conditions=children):
            return _combine(children, profile, now, decisive=True)
        case Not(condition=child):
            verdict = evaluate(child, profile, now)
            return Verdict(not verdict.matches, verdict.recheck_at)
        case TraitDate() | Age() | Performed() | LastSeen():
            return _timed(condition, profile, now)
    return Verdict(_static(condition, profile))


def _combine(
    children: Sequence[Condition], profile: Profile, now: datetime, *, decisive: bool
) -> Verdict:
    """``all`` (a false child decides) or ``any`` (a true child decides). A child that
    decides and that time cannot change decides for good: the rest need not be evaluated,
    and time cannot change the whole either."""
    result, earliest = not decisive, None
    for child in children:
        verdict = evaluate(child, profile, now)
        if verdict.matches == decisive:
            if verdict.recheck_at is None:
                return Verdict(decisive)
            result = decisive
        if verdict.recheck_at is not None and (earliest is None or verdict.recheck_at < earliest):
            earliest = verdict.recheck_at
    return Verdict(result, earliest)


def _static(leaf: Leaf, profile: Profile) -> bool:
    match leaf:
        case TraitIs(name=name, op=op, value=value):
            return trait_matches(trait_at(profile.traits, name), op, value)
        case ScoreAtLeast(model=model, op=op, value=value):
            return compare(profile.scores.get(model, 0), op, value)
        case StageIs(model=model, op=op, value=value):
            stage = profile.stages.get(model)
            if op == "in":
                return isinstance(value, list) and stage in value
            return (stage == value) == (op == "eq")
        case HasTag(tag=tag, min_score=min_score):
            return profile.tags.get(tag, 0) >= min_score
        case InSegment(segment_id=segment_id):
            return segment_id in profile.segments
        case Consents(channel=channel):
            return channel in profile.consents
        case ValueIs(metric=metric, op=op, value=value):
            return compare(profile.value.metric(metric), op, value)
        case RfmScore(axis=axis, op=op, value=value):
            rfm = profile.value.rfm
            return rfm is not None and compare(rfm[axis], op, value)
        case RfmCell(matrix=matrix, cell=cell):
            rfm, levels = profile.value.rfm, cell_levels(matrix, cell)
            if rfm is None or levels is None:
                return False
            return all(
                LEVEL_SCORES[lvl][0] <= rfm[axis] <= LEVEL_SCORES[lvl][1]
                for axis, lvl in zip(MATRIX_AXES[matrix], levels, strict=True)
            )
    raise AssertionError(f"not a static leaf: {leaf!r}")


# --- values --------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return type(value) is int or type(value) is float  # a bool is no number here


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str | bool) or _is_number(value)


def _same_kind(a: Any, b: Any) -> bool:
    if _is_number(a):
        return _is_number(b)
    return type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict))


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values, as PostgreSQL's ``jsonb =``: true is not 1."""
    if not _same_kind(a, b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def compare(actual: Any, op: str, expected: Any) -> bool:
    if op == "eq":
        return actual is not None and json_equal(actual, expected)
    if op == "neq":
        return actual is None or not json_equal(actual, expected)
    if actual is None or not (
        (_is_number(actual) and _is_number(expected))
        or (isinstance(actual, str) and isinstance(expected, str))
    ):
        return False
    match op:
        case "gt":
            return bool(actual > expected)
        case "gte":
            return bool(actual >= expected)
        case "lt":
            return bool(actual < expected)
        case "lte":
            return bool(actual <= expected)
    raise AssertionError(f"unknown comparison {op!r}")


def trait_at(traits: Mapping[str, Any], path: str) -> Any:
    value: Any = traits
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def trait_matches(actual: Any, op: str, expected: Any) -> bool:
    if op == "exists":
        return actual is not None
    if op == "in":
        return actual is not None and any(json_equal(actual, e) for e in expected)
    if op == "contains":
        if isinstance(actual, str):
            return isinstance(expected, str) and expected in actual
        return isinstance(actual, list) and any(json_equal(e, expected) for e in actual)
    if op == "starts_with":
        return isinstance(actual, str) and actual.startswith(expected)
    return compare(actual, op, expected)


def as_date(value: Any) -> date | None:
    """The calendar day of an ISO date or date-time string (its first ten characters)."""
    if not isinstance(value, str) or not _ISO_DAY.match(value):
        return None
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        return None


def zone_of(traits: Mapping[str, Any]) -> ZoneInfo:
    """The contact's ``timezone`` trait, UTC when unset or unknown."""
    name = traits.get("timezone")
    if isinstance(name, str) and name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    return ZoneInfo("UTC")


def anniversary_on_or_after(born: date, day: date) -> date:
    """The first anniversary of ``born`` on or after ``day`` (29 February is the 28th in
    other years)."""
    for year in (day.year, day.year + 1):
        candidate = _in_year(born, year)
        if candidate >= day:
            return candidate
    raise AssertionError("unreachable: next year's anniversary is after day")


def _in_year(born: date, year: int) -> date:
    try:
        return born.replace(year=year)
    except ValueError:
        return date(year, 2, 28)


def age_on(born: date, day: date) -> int:
    return day.year - born.year - (1 if _in_year(born, day.year) > day else 0)


# --- time-dependent leaves ---------------------------------------------------------------


def _timed(
    leaf: TraitDate | Age | Performed | LastSeen, profile: Profile, now: datetime
) -> Verdict:
    match leaf:
        case Performed():
            return _performed(leaf, profile, now)
        case LastSeen(op=op, days=days):
            seen = profile.last_seen_at
            if seen is None:
                return Verdict(op == "more_than")
            boundary = seen + timedelta(days=days)
            long_ago = now >= boundary
            return Verdict(long_ago == (op == "more_than"), boundary if not long_ago else None)
        case Age(trait=trait, op=op, value=value):
            born = as_date(trait_at(profile.traits, trait))
            if born is None:
                return Verdict(False)
            zone = zone_of(profile.traits)
            today = now.astimezone(zone).date()
            birthday = anniversary_on_or_after(born, today + timedelta(days=1))
            return Verdict(compare(age_on(born, today), op, value), _midnight(birthday, zone))
        case TraitDate():
            return _dated(leaf, profile, now)
    raise AssertionError(f"not a timed leaf: {leaf!r}")


def _midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, time(), zone).astimezone(UTC)


def _performed(leaf: Performed, profile: Profile, now: datetime) -> Verdict:
    window = timedelta(days=leaf.within_days) if leaf.within_days is not None else None
    counted = [
        e.at
        for e in profile.events
        if e.event == leaf.event
        and (window is None or now - e.at < window)
        and (leaf.where is None or matches_properties(leaf.where, e.properties))
    ]
    recheck = min(counted) + window if window is not None and counted else None
    return Verdict(compare(len(counted), leaf.op, leaf.count), recheck)


def matches_properties(where: Condition, properties: Mapping[str, Any]) -> bool:
    """A ``where`` of an event condition (trait nodes name properties)."""
    return _static_tree(where, properties)


def _static_tree(condition: Condition, properties: Mapping[str, Any]) -> bool:
    match condition:
        case AllOf(conditions=children):
            return all(_static_tree(child, properties) for child in children)
        case AnyOf(conditions=children):
            return any(_static_tree(child, properties) for child in children)
        case Not(condition=child):
            return not _static_tree(child, properties)
        case TraitIs(name=name, op=op, value=value):
            return trait_matches(trait_at(properties, name), op, value)
    raise AssertionError(f"not a property condition: {condition!r}")


def _dated(leaf: TraitDate, profile: Profile, now: datetime) -> Verdict:
    day = as_date(trait_at(profile.traits, leaf.name))
    if day is None:
        return Verdict(False)
    if leaf.op == "before":
        return Verdict(leaf.value is not None and day < leaf.value)
    if leaf.op == "after":
        return Verdict(leaf.value is not None and day > leaf.value)
    days = leaf.days or 0
    if leaf.op == "anniversary_within":
        zone = zone_of(profile.traits)
        today = now.astimezone(zone).date()
        next_one = anniversary_on_or_after(day, today)
        inside = (next_one - today).days <= days
        change = next_one + timedelta(days=1) if inside else next_one - timedelta(days=days)
        return Verdict(inside, _midnight(change, zone))
    utc = ZoneInfo("UTC")
    today = now.astimezone(UTC).date()
    if leaf.op == "within_last":  # today - days <= day <= today
        start, end = day, day + timedelta(days=days)
    else:  # within_next: today <= day <= today + days
        start, end = day - timedelta(days=days), day
    if today < start:
        return Verdict(False, _midnight(start, utc))
    if today <= end:
        return Verdict(True, _midnight(end + timedelta(days=1), utc))
    return Verdict(False)


# --- compiled evaluation -------------------------------------------------------------------

Evaluator = Callable[[Profile, datetime], Verdict]
_Check = Callable[[Profile, datetime], tuple[bool, datetime | None]]
_TRUE: tuple[bool, datetime | None] = (True, None)
_FALSE: tuple[bool, datetime | None] = (False, None)


def compile_check(
    condition: Condition,
) -> Callable[[Profile, datetime], tuple[bool, datetime | None]]:
    """:func:`compile_evaluator`'s verdict as a ``(matches, recheck_at)`` tuple (no
    :class:`Verdict` built per call)."""
    return _compile(condition)


def compile_evaluator(condition: Condition) -> Evaluator:
    """:func:`evaluate` for one condition, its tree walked once into nested closures:
    the same verdicts and rechecks, without dispatching on node kinds per contact (the
    segmenter evaluates each segment's condition for every contact a change touches)."""
    check = _compile(condition)

    def evaluator(profile: Profile, now: datetime) -> Verdict:
        matched, recheck_at = check(profile, now)
        return Verdict(matched, recheck_at)

    return evaluator


def _compile(condition: Condition) -> _Check:
    match condition:
        case AllOf(conditions=children):
            return _compile_combine([_compile(c) for c in children], decisive=False)
        case AnyOf(conditions=children):
            return _compile_combine([_compile(c) for c in children], decisive=True)
        case Not(condition=child):
            inner = _compile(child)

            def negated(profile: Profile, now: datetime) -> tuple[bool, datetime | None]:
                matched, recheck_at = inner(profile, now)
                return not matched, recheck_at

            return negated
        case Performed():
            return _compile_performed(condition)
        case LastSeen(op=op, days=days):
            return _compile_last_seen(op == "more_than", timedelta(days=days))
        case TraitDate() | Age():
            leaf = condition

            def timed(profile: Profile, now: datetime) -> tuple[bool, datetime | None]:
                verdict = _timed(leaf, profile, now)
                return verdict.matches, verdict.recheck_at

            return timed
    return _compile_static(condition)


def _compile_combine(children: list[_Check], *, decisive: bool) -> _Check:
    """As :func:`_combine`."""

    def combined(profile: Profile, now: datetime) -> tuple[bool, datetime | None]:
        result, earliest = not decisive, None
        for child in children:
            matched, recheck_at = child(profile, now)
            if matched == decisive:
                if recheck_at is None:
                    return decisive, None
                result = decisive
            if recheck_at is not None and (earliest is None or recheck_at < earliest):
                earliest = recheck_at
        return result, earliest

    return combined


def _compile_performed(leaf: Performed) -> _Check:
    """As :func:`_performed`."""
    event, op, count = leaf.event, leaf.op, leaf.count
    where = None if leaf.where is None else _compile_where(leaf.where)
    window = timedelta(days=leaf.within_days) if leaf.within_days is not None else None

    def performed(profile: Profile, now: datetime) -> tuple[bool, datetime | None]:
        by_name = profile.events_by_name
        counted = [
            e.at
            for e in (profile.events if by_name is None else by_name.get(event, ()))
            if e.event == event
            and (window is None or now - e.at < window)
            and (where is None or where(e.properties))
        ]
        recheck = min(counted) + window if window is not None and counted else None
        return compare(len(counted), op, count), recheck

    return performed


def _compile_where(condition: Condition) -> Callable[[Mapping[str, Any]], bool]:
    """As :func:`matches_properties`, the tree walked once (it runs for every event an
    event condition counts)."""
    match condition:
        case AllOf(conditions=children):
            checks = [_compile_where(c) for c in children]
            return lambda properties: all(check(properties) for check in checks)
        case AnyOf(conditions=children):
            checks = [_compile_where(c) for c in children]
            return lambda properties: any(check(properties) for check in checks)
        case Not(condition=child):
            inner = _compile_where(child)
            return lambda properties: not inner(properties)
        case TraitIs(name=name, op=op, value=value):
            return _compile_trait(name, op, value)
    raise AssertionError(f"not a property condition: {condition!r}")


def _compile_trait(name: str, op: str, value: Any) -> Callable[[Mapping[str, Any]], bool]:
    """``trait_matches(trait_at(values, name), op, value)``, with the usual string
    comparisons of a top-level name (``eq``, ``neq``, ``in``) made without the generic JSON
    equality (which for a string expected is: the actual value is exactly a string, equal)."""
    if "." not in name and op in ("eq", "neq", "in"):
        strings = [value] if op != "in" else value
        if isinstance(strings, list) and strings and all(type(v) is str for v in strings):
            expected = frozenset(strings)
            negated = op == "neq"

            def strings_match(values: Mapping[str, Any]) -> bool:
                actual = values.get(name) if type(values) is dict else trait_at(values, name)
                return (type(actual) is str and actual in expected) != negated

            return strings_match
    return lambda values: trait_matches(trait_at(values, name), op, value)


def _compile_last_seen(more_than: bool, span: timedelta) -> _Check:
    """As :func:`_timed` for :class:`LastSeen`."""

    def last_seen(profile: Profile, now: datetime) -> tuple[bool, datetime | None]:
        seen = profile.last_seen_at
        if seen is None:
            return more_than, None
        boundary = seen + span
        long_ago = now >= boundary
        return long_ago == more_than, None if long_ago else boundary

    return last_seen


def _compile_static(leaf: Leaf) -> _Check:
    """As :func:`_static`, for the common leaves; the others call it."""
    match leaf:
        case TraitIs(name=name, op=op, value=value):
            matches = _compile_trait(name, op, value)

            def trait(profile: Profile, now: datetime) -> tuple[bool, datetime | None]:
                return _TRUE if matches(profile.traits) else _FALSE

            return trait
        case ScoreAtLeast(model=model, op=op, value=value):

            def score(profile: Profile, now: datetime) -> tuple[bool, datetime | None]:
                return _TRUE if compare(profile.scores.get(model, 0), op, value) else _FALSE

            return score
        case HasTag(tag=tag, min_score=min_score):

            def tag_of(profile: Profile, now: datetime) -> tuple[bool, datetime | None]:
                return _TRUE if profile.tags.get(tag, 0) >= min_score else _FALSE

            return tag_of
        case InSegment(segment_id=segment_id):

            def member(profile: Profile, now: datetime) -> tuple[bool, datetime | None]:
                return _TRUE if segment_id in profile.segments else _FALSE

            return member
        case Consents(channel=channel):

            def consents(profile: Profile, now: datetime) -> tuple[bool, datetime | None]:
                return _TRUE if channel in profile.consents else _FALSE

            return consents

    def static(profile: Profile, now: datetime) -> tuple[bool, datetime | None]:
        return _TRUE if _static(leaf, profile) else _FALSE

    return static
