"""A condition compiled to SQL over the segmenter's ``contacts`` table, for set-based
backfills and previews: the same semantics as :func:`nudge_common.conditions.evaluate`
(the property tests compare the two), as one boolean expression per contact and one
expression for its next time-driven recheck.

Every leaf compiles to a never-NULL boolean, so ``not`` is exact. Behavioural leaves are
correlated counts over ``contact_events`` through its (contact, event, at) index. Date
leaves use the SQL functions of the segmenter's schema (``iso_date``, ``local_today``,
``local_midnight``, ``next_anniversary``, ``age_on``), which mirror the Python ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from nudge_common import codec
from nudge_common.conditions import (
    Age,
    AllOf,
    AnyOf,
    Condition,
    Consents,
    HasTag,
    InSegment,
    LastSeen,
    Not,
    Performed,
    RfmCell,
    RfmScore,
    ScoreAtLeast,
    StageIs,
    TraitDate,
    TraitIs,
    ValueIs,
)
from nudge_common.rfm import LEVEL_SCORES, MATRIX_AXES, cell_levels
from nudge_segmenter.store import SCHEMA, contact_events, contacts, memberships

Bool = sa.ColumnElement[bool]
Expr = sa.ColumnElement[Any]
_FN = getattr(sa.func, SCHEMA)
_DAY = sa.text("interval '1 day'")


@dataclass(frozen=True)
class Compiled:
    matches: Bool
    recheck_at: Expr | None


def compile_condition(condition: Condition, now: datetime) -> Compiled:
    return _Compiler(sa.literal(now, sa.DateTime(timezone=True))).compile(condition)


def _days(n: int) -> Expr:
    return sa.literal(n) * _DAY


def _strict(expression: Bool) -> Bool:
    return sa.func.coalesce(expression, sa.false())


def _jsonb(value: Any) -> Expr:
    return sa.cast(sa.literal(codec.dumps(value).decode()), JSONB)


def _json_kind(value: Expr) -> Expr:
    return sa.func.jsonb_typeof(value)


def _path(column: Expr, dotted: str) -> Expr:
    return column.op("#>")(sa.literal(dotted.split("."), ARRAY(sa.Text)))


def _text_path(column: Expr, dotted: str) -> Expr:
    return column.op("#>>")(sa.literal(dotted.split("."), ARRAY(sa.Text)))


def _as_text(value: Expr) -> Expr:
    return sa.type_coerce(value.op("#>>")(sa.literal([], ARRAY(sa.Text))), sa.Text)


_OPS = {
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
    "eq": lambda a, b: a == b,
}


def compare_sql(actual: Expr, op: str, expected: Any) -> Bool:
    """A typed (non-JSON) value against a constant, as ``conditions.compare``."""
    if op == "neq":
        return sa.not_(_strict(actual == expected))
    return _strict(_OPS[op](actual, expected))


def json_compare_sql(actual: Expr, op: str, expected: Any) -> Bool:
    """A JSON value against a constant, as ``conditions.trait_matches``."""
    if op == "exists":
        return _strict(_json_kind(actual) != "null")
    if op == "eq":
        return _strict(actual == _jsonb(expected))
    if op == "neq":
        return sa.not_(_strict(actual == _jsonb(expected)))
    if op == "in":
        return _strict(actual.in_([_jsonb(v) for v in expected])) if expected else sa.false()
    if op == "starts_with":
        return _strict(
            sa.and_(
                _json_kind(actual) == "string",
                sa.func.starts_with(_as_text(actual), sa.literal(expected, sa.Text)),
            )
        )
    if op == "contains":
        in_array = sa.and_(_json_kind(actual) == "array", actual.op("@>")(_jsonb([expected])))
        if isinstance(expected, str):
            in_text = sa.and_(
                _json_kind(actual) == "string",
                sa.func.strpos(_as_text(actual), sa.literal(expected, sa.Text)) > 0,
            )
            return _strict(sa.or_(in_text, in_array))
        return _strict(in_array)
    if isinstance(expected, str):
        return _strict(
            sa.and_(
                _json_kind(actual) == "string",
                _OPS[op](_as_text(actual).collate("C"), sa.literal(expected, sa.Text)),
            )
        )
    return _strict(
        sa.and_(
            _json_kind(actual) == "number",
            _OPS[op](sa.cast(_as_text(actual), sa.Float), float(expected)),
        )
    )


class _Compiler:
    def __init__(self, now: Expr) -> None:
        self.now = now
        self.rechecks: list[Expr] = []

    def compile(self, condition: Condition) -> Compiled:
        expression = self.condition(condition)
        recheck = sa.func.least(*self.rechecks) if self.rechecks else None
        return Compiled(expression, recheck)

    def condition(self, condition: Condition) -> Bool:
        match condition:
            case AllOf(conditions=children):
                return sa.and_(*(self.condition(child) for child in children))
            case AnyOf(conditions=children):
                return sa.or_(*(self.condition(child) for child in children))
            case Not(condition=child):
                return sa.not_(self.condition(child))
            case TraitIs(name=name, op=op, value=value):
                return json_compare_sql(_path(contacts.c.traits, name), op, value)
            case ScoreAtLeast(model=model, op=op, value=value):
                score = sa.func.coalesce(
                    sa.cast(contacts.c.scores.op("->>")(sa.literal(model, sa.Text)), sa.BigInteger),
                    0,
                )
                return compare_sql(score, op, value)
            case StageIs(model=model, op=op, value=value):
                stage = contacts.c.stages.op("->>")(sa.literal(model, sa.Text))
                if op == "in":
                    return _strict(stage.in_(value)) if isinstance(value, list) else sa.false()
                return compare_sql(stage, op, value)
            case HasTag(tag=tag, min_score=min_score):
                assigned = contacts.c.tags.op("->>")(sa.literal(tag, sa.Text))
                return _strict(sa.func.coalesce(sa.cast(assigned, sa.Integer), 0) >= min_score)
            case InSegment(segment_id=segment_id):
                return sa.exists().where(
                    memberships.c.segment_id == segment_id,
                    memberships.c.contact_id == contacts.c.contact_id,
                )
            case Consents(channel=channel):
                return _strict(sa.literal(channel, sa.Text) == sa.any_(contacts.c.consents))
            case ValueIs(metric=metric, op=op, value=value):
                return compare_sql(self.metric(metric), op, value)
            case RfmScore(axis=axis, op=op, value=value):
                column = contacts.c[f"rfm_{axis}"]
                return _strict(sa.and_(column.is_not(None), compare_sql(column, op, value)))
            case RfmCell(matrix=matrix, cell=cell):
                levels = cell_levels(matrix, cell)
                assert levels is not None  # validated on parse
                return _strict(
                    sa.and_(
                        *(
                            contacts.c[f"rfm_{axis}"].between(*LEVEL_SCORES[lvl])
                            for axis, lvl in zip(MATRIX_AXES[matrix], levels, strict=True)
                        )
                    )
                )
            case Performed():
                return self.performed(condition)
            case LastSeen(op=op, days=days):
                seen = contacts.c.last_seen_at
                boundary = seen + _days(days)
                self.rechecks.append(sa.case((boundary > self.now, boundary)))
                if op == "more_than":
                    return _strict(sa.or_(seen.is_(None), boundary <= self.now))
                return _strict(boundary > self.now)
            case Age():
                return self.age(condition)
            case TraitDate():
                return self.date(condition)
        raise AssertionError(f"unknown condition {condition!r}")

    def metric(self, metric: str) -> Expr:
        if metric == "average_order_value":
            return sa.case((contacts.c.orders > 0, contacts.c.revenue / contacts.c.orders))
        if metric == "orders":
            return sa.cast(contacts.c.orders, sa.Float)
        return contacts.c[metric]

    def performed(self, leaf: Performed) -> Bool:
        filters: list[Bool] = [
            contact_events.c.contact_id == contacts.c.contact_id,
            contact_events.c.event == leaf.event,
        ]
        if leaf.within_days is not None:
            filters.append(contact_events.c.at > self.now - _days(leaf.within_days))
        if leaf.where is not None:
            filters.append(self.properties(leaf.where))
        if leaf.within_days is not None:
            first = sa.select(sa.func.min(contact_events.c.at)).where(*filters).scalar_subquery()
            self.rechecks.append(first + _days(leaf.within_days))
        if leaf.op == "gte" and leaf.count == 1:
            return sa.exists().where(*filters)
        if leaf.op in ("eq", "lte") and leaf.count == 0:
            return sa.not_(sa.exists().where(*filters))
        counted = sa.select(sa.func.count()).where(*filters).scalar_subquery()
        return compare_sql(counted, leaf.op, leaf.count)

    def properties(self, where: Condition) -> Bool:
        match where:
            case AllOf(conditions=children):
                return sa.and_(*(self.properties(child) for child in children))
            case AnyOf(conditions=children):
                return sa.or_(*(self.properties(child) for child in children))
            case Not(condition=child):
                return sa.not_(self.properties(child))
            case TraitIs(name=name, op=op, value=value):
                return json_compare_sql(_path(contact_events.c.properties, name), op, value)
        raise AssertionError(f"not a property condition: {where!r}")

    def zone(self) -> Expr:
        return contacts.c.traits.op("->>")(sa.literal("timezone", sa.Text))

    def age(self, leaf: Age) -> Bool:
        born = _FN.iso_date(_text_path(contacts.c.traits, leaf.trait))
        today = _FN.local_today(self.zone(), self.now)
        birthday = _FN.next_anniversary(born, today + 1)
        self.rechecks.append(_FN.local_midnight(birthday, self.zone()))
        return _strict(
            sa.and_(born.is_not(None), compare_sql(_FN.age_on(born, today), leaf.op, leaf.value))
        )

    def date(self, leaf: TraitDate) -> Bool:
        day = _FN.iso_date(_text_path(contacts.c.traits, leaf.name))
        if leaf.op == "before":
            return _strict(day < leaf.value)
        if leaf.op == "after":
            return _strict(day > leaf.value)
        days = leaf.days or 0
        if leaf.op == "anniversary_within":
            today = _FN.local_today(self.zone(), self.now)
            next_one = _FN.next_anniversary(day, today)
            inside = next_one - today <= days
            self.rechecks.append(
                _FN.local_midnight(
                    sa.case((inside, next_one + 1), else_=next_one - days), self.zone()
                )
            )
            return _strict(inside)
        today = sa.cast(sa.func.timezone("UTC", self.now), sa.Date)
        if leaf.op == "within_last":
            start, end = day, day + days
        else:
            start, end = day - days, day
        self.rechecks.append(
            sa.case(
                (today < start, _FN.local_midnight(start, "UTC")),
                (today <= end, _FN.local_midnight(end + 1, "UTC")),
            )
        )
        return _strict(sa.and_(start <= today, today <= end))
