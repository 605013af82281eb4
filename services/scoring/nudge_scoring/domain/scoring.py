"""Profile traits as pure functions of events; rules and points live in
:mod:`nudge_scoring.domain.rules` (re-exported here for existing callers)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nudge_common.events import SegmentEvent, SegmentType
from nudge_scoring.domain.rules import Rule, ScoreDelta, score_event

__all__ = ["Rule", "ScoreDelta", "incoming_traits", "merge_traits", "score_event"]


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
