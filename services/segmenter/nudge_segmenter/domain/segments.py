"""Which segments a change can affect, in which order to evaluate them, and which
definitions to refuse. Pure.

A segment depends on *facts*: ``traits``, ``scores``, ``tags``, ``stages``, ``consent``,
``value`` (orders, revenue, RFM, CLV), ``activity`` (last seen), ``event:<name>`` and
``segment:<id>``. A change names the facts it touched; only the segments depending on one
of them are re-evaluated, and a segment's transition touches ``segment:<id>`` in turn.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

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
    Profile,
    RfmCell,
    RfmScore,
    ScoreAtLeast,
    StageIs,
    TraitDate,
    TraitIs,
    ValueIs,
    compile_check,
    leaves,
)

MAX_LEAVES = 64
MAX_DEPTH = 8
ALL_FACTS = frozenset({"traits", "scores", "tags", "stages", "consent", "value", "activity"})
TIME = "time"
"""The fact of every segment whose answer time alone can change: what a recheck touches."""


def facts_of(condition: Condition) -> frozenset[str]:
    facts: set[str] = set()
    for leaf in leaves(condition):
        match leaf:
            case TraitIs() | TraitDate() | Age():
                facts.add("traits")
            case ScoreAtLeast():
                facts.add("scores")
            case StageIs():
                facts.add("stages")
            case HasTag():
                facts.add("tags")
            case Consents():
                facts.add("consent")
            case ValueIs() | RfmScore() | RfmCell():
                facts.add("value")
            case LastSeen():
                facts.add("activity")
            case Performed(event=event):
                facts.add(f"event:{event}")
            case InSegment(segment_id=segment_id):
                facts.add(f"segment:{segment_id}")
    if is_timed(condition):
        facts.add(TIME)
    return frozenset(facts)


def is_timed(condition: Condition) -> bool:
    return any(
        isinstance(leaf, TraitDate | Age | LastSeen)
        or (isinstance(leaf, Performed) and leaf.within_days is not None)
        for leaf in leaves(condition)
    )


def event_names(condition: Condition) -> set[str]:
    return {leaf.event for leaf in leaves(condition) if isinstance(leaf, Performed)}


def referenced_segments(condition: Condition) -> set[uuid.UUID]:
    return {leaf.segment_id for leaf in leaves(condition) if isinstance(leaf, InSegment)}


def depth(condition: Condition) -> int:
    match condition:
        case AllOf(conditions=children) | AnyOf(conditions=children):
            return 1 + max(depth(child) for child in children)
        case Not(condition=child):
            return 1 + depth(child)
    return 1


@dataclass(frozen=True)
class Problem:
    loc: tuple[str | int, ...]
    message: str


def problems(
    condition: Condition,
    *,
    segment_id: uuid.UUID,
    others: Mapping[uuid.UUID, Condition | None],
) -> list[Problem]:
    """What makes a definition unacceptable beyond its shape: references to segments that
    do not exist (``others`` are the workspace's other segments and lists, None for a
    list), a cycle of references, and a size that real-time evaluation cannot afford."""
    found: list[Problem] = []
    for path, leaf in _paths(condition, ("condition",)):
        if isinstance(leaf, InSegment) and leaf.segment_id not in others:
            if leaf.segment_id == segment_id:
                found.append(Problem((*path, "segment_id"), "a segment cannot contain itself"))
            else:
                found.append(Problem((*path, "segment_id"), "no such segment or list"))
    if any(p.message == "no such segment or list" for p in found):
        return found
    graph = {s: referenced_segments(c) if c else set() for s, c in others.items()}
    graph[segment_id] = referenced_segments(condition)
    if _reaches(graph, start=segment_id):
        found.append(Problem(("condition",), "segment references form a cycle"))
    count = len(leaves(condition))
    if count > MAX_LEAVES:
        found.append(
            Problem(("condition",), f"{count} conditions; at most {MAX_LEAVES} per segment")
        )
    if depth(condition) > MAX_DEPTH:
        found.append(Problem(("condition",), f"nested deeper than {MAX_DEPTH} levels"))
    return found


def _paths(
    condition: Condition, at: tuple[str | int, ...]
) -> Iterable[tuple[tuple[str | int, ...], Condition]]:
    match condition:
        case AllOf(conditions=children) | AnyOf(conditions=children):
            for index, child in enumerate(children):
                yield from _paths(child, (*at, "conditions", index))
        case Not(condition=child):
            yield from _paths(child, (*at, "condition"))
        case _:
            yield at, condition


def _reaches(graph: Mapping[uuid.UUID, set[uuid.UUID]], *, start: uuid.UUID) -> bool:
    seen: set[uuid.UUID] = set()
    stack = list(graph.get(start, ()))
    while stack:
        node = stack.pop()
        if node == start:
            return True
        if node not in seen:
            seen.add(node)
            stack.extend(graph.get(node, ()))
    return False


@dataclass(frozen=True)
class Indexed:
    id: uuid.UUID
    condition: Condition
    facts: frozenset[str]
    timed: bool
    """Whether time alone can change its answer (it has date, age, window or last-seen
    leaves): only such segments have rechecks."""
    check: Callable[[Profile, datetime], tuple[bool, datetime | None]]
    """The condition compiled once (``conditions.compile_check``): whether a profile
    matches, and its recheck time."""


@dataclass(frozen=True)
class Needed:
    """What evaluating after a change needs loaded: the memberships of ``segments`` (those
    evaluated and those they reference) and the events named ``events``."""

    segments: frozenset[uuid.UUID]
    events: frozenset[str]


class SegmentIndex:
    """A workspace's live segments by the facts they depend on, in an order where a
    segment comes after the segments it references."""

    def __init__(self, segments: Sequence[tuple[uuid.UUID, Condition]]) -> None:
        self.ordered = [
            Indexed(s, c, facts_of(c), is_timed(c), compile_check(c))
            for s, c in _dependency_order(segments)
        ]
        self.by_fact: dict[str, list[Indexed]] = {}
        for segment in self.ordered:
            for fact in segment.facts:
                self.by_fact.setdefault(fact, []).append(segment)
        self.position = {segment.id: index for index, segment in enumerate(self.ordered)}
        self._dependents = {
            segment.id: self.by_fact.get(f"segment:{segment.id}", []) for segment in self.ordered
        }
        self._affected: dict[frozenset[str], list[int]] = {}
        self._needed: dict[str, Needed] = {}

    def affected_positions(self, facts: frozenset[str]) -> list[int]:
        """The positions in ``ordered`` of :meth:`affected`, ascending, remembered per set
        of facts (a copy: callers use it as a heap)."""
        found = self._affected.get(facts)
        if found is None:
            if len(self._affected) > 10_000:  # facts name events: bound the memory
                self._affected.clear()
            found = self._affected[facts] = [self.position[s.id] for s in self.affected(facts)]
        return found.copy()

    def needed(self, facts: Iterable[str]) -> Needed:
        """What changes touching ``facts`` can lead to evaluating (the affected segments
        and, transitively, those referencing them), and what evaluating those reads."""
        segments: set[uuid.UUID] = set()
        events: set[str] = set()
        for fact in facts:
            if fact not in self.by_fact:
                continue
            one = self._needed.get(fact)
            if one is None:
                evaluated = self.reachable(s.id for s in self.by_fact[fact])
                conditions = [self.ordered[self.position[s]].condition for s in evaluated]
                one = self._needed[fact] = Needed(
                    frozenset(evaluated.union(*(referenced_segments(c) for c in conditions))),
                    frozenset(n for c in conditions for n in event_names(c)),
                )
            segments |= one.segments
            events |= one.events
        return Needed(frozenset(segments), frozenset(events))

    def affected(self, facts: Iterable[str]) -> list[Indexed]:
        """The segments depending on any of ``facts``, in evaluation order."""
        found: dict[uuid.UUID, Indexed] = {}
        for fact in facts:
            for segment in self.by_fact.get(fact, ()):
                found[segment.id] = segment
        return sorted(found.values(), key=lambda s: self.position[s.id])

    def dependents(self, segment_id: uuid.UUID) -> list[Indexed]:
        found = self._dependents.get(segment_id)
        return self.by_fact.get(f"segment:{segment_id}", []) if found is None else found

    def reachable(self, segment_ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
        """The segments and, transitively, those referencing them (what a transition of
        one of them may lead to evaluating)."""
        found = set(segment_ids)
        stack = list(found)
        while stack:
            for dependent in self.dependents(stack.pop()):
                if dependent.id not in found:
                    found.add(dependent.id)
                    stack.append(dependent.id)
        return found


def _dependency_order(
    segments: Sequence[tuple[uuid.UUID, Condition]],
) -> list[tuple[uuid.UUID, Condition]]:
    by_id = dict(segments)
    ordered: list[tuple[uuid.UUID, Condition]] = []
    placed: set[uuid.UUID] = set()

    def place(segment_id: uuid.UUID, visiting: frozenset[uuid.UUID]) -> None:
        if segment_id in placed or segment_id in visiting or segment_id not in by_id:
            return
        for reference in sorted(referenced_segments(by_id[segment_id])):
            place(reference, visiting | {segment_id})
        placed.add(segment_id)
        ordered.append((segment_id, by_id[segment_id]))

    for segment_id, _ in segments:
        place(segment_id, frozenset())
    return ordered
