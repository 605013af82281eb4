"""The segment condition language, and its evaluation against one contact. Pure.

Shared by the segmenter (segments) and the orchestrator (workflow branches).

A condition is JSON: ``{"kind": "all", "conditions": [...]}``, ``{"kind": "any", ...}``,
``{"kind": "not", "condition": {...}}``, ``{"kind": "score", "model": "lead", "op": "gte",
"value": 50}`` or ``{"kind": "trait", "name": "country", "op": "eq", "value": "IT"}``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

Comparison = Literal["eq", "neq", "gt", "gte", "lt", "lte"]

_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "neq": operator.ne,
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
}


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


class ScoreAtLeast(_Node):
    kind: Literal["score"]
    model: str = Field(min_length=1)
    op: Comparison
    value: int


class TraitIs(_Node):
    kind: Literal["trait"]
    name: str = Field(min_length=1)
    op: Comparison | Literal["exists", "in", "contains", "starts_with"]
    value: Any = None


Condition = Annotated[AllOf | AnyOf | Not | ScoreAtLeast | TraitIs, Field(discriminator="kind")]
condition_adapter: TypeAdapter[Condition] = TypeAdapter(Condition)


@dataclass(frozen=True)
class Profile:
    """What the segmenter knows of a contact."""

    traits: Mapping[str, Any] = field(default_factory=dict)
    scores: Mapping[str, int] = field(default_factory=dict)


def matches(condition: Condition, profile: Profile) -> bool:
    match condition:
        case AllOf(conditions=children):
            return all(matches(child, profile) for child in children)
        case AnyOf(conditions=children):
            return any(matches(child, profile) for child in children)
        case Not(condition=child):
            return not matches(child, profile)
        case ScoreAtLeast(model=model, op=op, value=value):
            return _COMPARE[op](profile.scores.get(model, 0), value)
        case TraitIs(name=name, op=op, value=value):
            return _trait_matches(profile.traits.get(name), op, value)
    raise AssertionError(f"unknown condition {condition!r}")


def _trait_matches(actual: Any, op: str, expected: Any) -> bool:
    if op == "exists":
        return actual is not None
    if actual is None:
        return op == "neq"
    if op == "in":
        return isinstance(expected, list) and actual in expected
    if op == "contains":
        return isinstance(actual, str | list) and expected in actual
    if op == "starts_with":
        return isinstance(actual, str) and isinstance(expected, str) and actual.startswith(expected)
    try:
        return _COMPARE[op](actual, expected)
    except TypeError:
        return False
