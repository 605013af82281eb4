"""Lead scoring and profile traits as pure functions of rules and events."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from nudge_common.events import SegmentEvent, SegmentType


@dataclass(frozen=True)
class Rule:
    id: uuid.UUID
    model: str
    event: str
    points: int


@dataclass(frozen=True)
class ScoreDelta:
    rule_id: uuid.UUID
    model: str
    points: int


def score_event(rules: Iterable[Rule], event: SegmentEvent) -> list[ScoreDelta]:
    """The points each behavioural rule gives (or takes) for one event."""
    if event.type is not SegmentType.TRACK or not event.event:
        return []
    return [
        ScoreDelta(rule.id, rule.model, rule.points) for rule in rules if rule.event == event.event
    ]


def incoming_traits(event: SegmentEvent) -> dict[str, Any]:
    """Traits an event teaches us: identify's traits, and the ``context.traits`` that
    analytics.js attaches to every call."""
    context_traits = event.context.get("traits")
    traits = dict(context_traits) if isinstance(context_traits, dict) else {}
    if event.type is SegmentType.IDENTIFY:
        traits.update(event.traits)
    return traits


def merge_traits(current: Mapping[str, Any], incoming: Mapping[str, Any]) -> dict[str, Any] | None:
    """The merged traits, or None when nothing would change."""
    if all(current.get(key) == value for key, value in incoming.items()):
        return None
    return {**current, **incoming}
