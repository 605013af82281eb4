"""Workflow analytics: rates and the A/B significance test. Pure.

Counts come from the orchestrator's tables (runs, sends) and the deliveries topic (what
became of each message); this module turns them into rates and decides a split's winner
with a two-proportion z-test on conversions (pooled, two-sided).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

K = TypeVar("K", bound=Hashable)

STATUSES = ("sent", "delivered", "opened", "clicked", "unsubscribed", "bounced", "complained")


def rate(numerator: int, denominator: int) -> float | None:
    return round(numerator / denominator, 4) if denominator else None


def rates(counts: dict[str, int]) -> dict[str, float | None]:
    """Open rate and CTR over delivered messages (over sent ones when no provider reports
    delivery), conversion rate over entered runs."""
    base = counts.get("delivered") or counts.get("sent", 0)
    return {
        "open_rate": rate(counts.get("opened", 0), base),
        "click_rate": rate(counts.get("clicked", 0), base),
        "conversion_rate": rate(counts.get("converted", 0), counts.get("entered", 0)),
    }


@dataclass(frozen=True)
class ZTest:
    z: float
    p_value: float


def two_proportion_z_test(x1: int, n1: int, x2: int, n2: int) -> ZTest | None:
    """Is x1/n1 different from x2/n2? Pooled two-proportion z-test, two-sided p-value.
    None when a group is empty or the pooled proportion is 0 or 1 (no variance)."""
    if n1 == 0 or n2 == 0:
        return None
    pooled = (x1 + x2) / (n1 + n2)
    variance = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    if variance <= 0:
        return None
    z = (x1 / n1 - x2 / n2) / math.sqrt(variance)
    return ZTest(round(z, 4), round(math.erfc(abs(z) / math.sqrt(2)), 6))


@dataclass(frozen=True)
class Verdict:
    leader: str | None
    runner_up: str | None
    test: ZTest | None
    winner: str | None
    """The leader once its conversion rate differs from the runner-up's at ``alpha``."""


def ab_winner(groups: dict[str, tuple[int, int]], alpha: float = 0.05) -> Verdict:
    """``groups``: variant -> (conversions, contacts). The holdout is a group like any
    other, so a variant must also beat doing nothing."""
    ranked = sorted(
        ((name, x, n) for name, (x, n) in groups.items() if n > 0),
        key=lambda g: g[1] / g[2],
        reverse=True,
    )
    if len(ranked) < 2:
        return Verdict(ranked[0][0] if ranked else None, None, None, None)
    (leader, x1, n1), (second, x2, n2) = ranked[0], ranked[1]
    test = two_proportion_z_test(x1, n1, x2, n2)
    won = test is not None and test.p_value < alpha and x1 / n1 > x2 / n2
    return Verdict(leader, second, test, leader if won else None)


FINISHED = {"completed": "completed", "exited": "completed", "converted": "converted"}


def blank() -> dict[str, int]:
    return {
        "entered": 0,
        "completed": 0,
        "converted": 0,
        "requested": 0,
        **dict.fromkeys(STATUSES, 0),
    }


def shown(counts: dict[str, int]) -> dict[str, Any]:
    """Counts with their rates."""
    return {**counts, **rates(counts)}


def report(
    runs: list[tuple[str | None, str, int]],
    sends: list[tuple[int, str | None, int]],
    deliveries: list[tuple[int, str | None, str, int]],
    alpha: float = 0.05,
    step_runs: Sequence[tuple[int, str, int]] = (),
) -> dict[str, Any]:
    """The analytics of one workflow: totals, per step, per variant, and the A/B verdict
    on conversions (a run that reached the end without converting is ``completed``). A
    step's ``entered``, ``completed`` and ``converted`` count the runs that executed it
    (``step_runs``: (step, run status, runs)), so a conversion counts for every step of the
    path the run took."""
    total = blank()
    steps: dict[int, dict[str, int]] = {}
    variants: dict[str, dict[str, int]] = {}
    for variant, status, count in runs:
        for bucket in (total, variants.setdefault(variant, blank()) if variant else None):
            if bucket is None:
                continue
            bucket["entered"] += count
            if status in FINISHED:
                bucket[FINISHED[status]] += count
    for step, status, count in step_runs:
        bucket = steps.setdefault(step, blank())
        bucket["entered"] += count
        if status in FINISHED:
            bucket[FINISHED[status]] += count
    for step, variant, count in sends:
        for bucket in (
            total,
            steps.setdefault(step, blank()),
            variants.setdefault(variant, blank()) if variant else None,
        ):
            if bucket is not None:
                bucket["requested"] += count
    for step, variant, status, count in deliveries:
        if status not in STATUSES:
            continue
        for bucket in (
            total,
            steps.setdefault(step, blank()),
            variants.setdefault(variant, blank()) if variant else None,
        ):
            if bucket is not None:
                bucket[status] += count

    verdict = ab_winner(
        {name: (c["converted"], c["entered"]) for name, c in variants.items()}, alpha
    )
    return {
        **shown(total),
        "steps": [{"step": step, **shown(steps[step])} for step in sorted(steps)],
        "variants": [{"variant": name, **shown(variants[name])} for name in sorted(variants)],
        "ab_test": None
        if not variants
        else {
            "metric": "conversion_rate",
            "leader": verdict.leader,
            "runner_up": verdict.runner_up,
            "z": verdict.test.z if verdict.test else None,
            "p_value": verdict.test.p_value if verdict.test else None,
            "alpha": alpha,
            "winner": verdict.winner,
        },
    }


def grouped_report(
    runs: list[tuple[K, str, int]],
    sends: list[tuple[K, int]],
    deliveries: list[tuple[K, str, int]],
) -> tuple[dict[str, Any], dict[K, dict[str, Any]]]:
    """The same counts and rates, in total and per group (e.g. the workflows a segment
    started): runs (group, status, n), sends (group, n), deliveries (group, status, n)."""
    total = blank()
    groups: dict[K, dict[str, int]] = {}
    for group, status, count in runs:
        for bucket in (total, groups.setdefault(group, blank())):
            bucket["entered"] += count
            if status in FINISHED:
                bucket[FINISHED[status]] += count
    for group, count in sends:
        for bucket in (total, groups.setdefault(group, blank())):
            bucket["requested"] += count
    for group, status, count in deliveries:
        if status in STATUSES:
            for bucket in (total, groups.setdefault(group, blank())):
                bucket[status] += count
    return shown(total), {group: shown(counts) for group, counts in groups.items()}
