"""Broadcasts: the workflows they run, the test group of an A/B broadcast, and when its
winner is chosen. Pure.

A broadcast runs as a hidden workflow with the broadcast's id, one run per member. A plain
broadcast's is one send (with a goal, then a wait of the goal's window, so the goal can
convert the run). An A/B broadcast first runs version 1 for its test group (a
``test_fraction`` of the members, deterministic per contact): a split of the variants
(even weights, deterministic per contact, as a split step) into one send each. Once the
winner is chosen, version 2 is the winner's send, for the members without a run (a member
runs a broadcast's workflow at most once: whoever had a test message gets nothing more).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from nudge_orchestrator.domain.analytics import (
    Verdict,
    ab_winner,
    blank,
    grouped_report,
    rate,
    shown,
)
from nudge_orchestrator.domain.workflows import WorkflowDefinition, unit

Metric = Literal["opened", "clicked", "converted"]


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BroadcastVariant(_Node):
    name: str = Field(min_length=1, max_length=50)
    template_id: uuid.UUID


class ABTest(_Node):
    """Send ``variants`` (templates of the broadcast's channel; named A, B, ... unless
    named) evenly to ``test_fraction`` of the members; the variant with the best
    ``metric`` (share of its members who opened, clicked or converted) wins once a
    two-proportion z-test against the runner-up gives ``p < alpha``, or, at
    ``decide_after_s`` after the last test message, the best so far; the rest of the
    members get the winner."""

    variants: list[BroadcastVariant] = Field(min_length=2, max_length=10)
    test_fraction: float = Field(gt=0, lt=1)
    metric: Metric
    decide_after_s: int = Field(gt=0, le=30 * 86400)
    alpha: float = Field(default=0.05, gt=0, lt=0.5)

    @model_validator(mode="before")
    @classmethod
    def name_the_variants(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("variants"), list):
            data = {
                **data,
                "variants": [
                    {"name": chr(ord("A") + i), **variant}
                    if isinstance(variant, dict) and variant.get("name") is None
                    else variant
                    for i, variant in enumerate(data["variants"])
                ],
            }
        return data

    @model_validator(mode="after")
    def names_unique(self) -> ABTest:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names) or "holdout" in names:
            raise ValueError("variant names must be unique and not 'holdout'")
        return self

    def variant(self, name: str) -> BroadcastVariant:
        return next(v for v in self.variants if v.name == name)


class BroadcastGoal(_Node):
    """Performing ``event`` within ``window_s`` of the message converts the member."""

    event: str = Field(min_length=1, max_length=200)
    window_s: int = Field(gt=0, le=366 * 86400)


def in_test(broadcast_id: uuid.UUID, contact_id: uuid.UUID, fraction: float) -> bool:
    """Whether the member is in the test group: the same contact always is, or is not."""
    return unit(str(broadcast_id), str(contact_id), "test") < fraction


def _definition(steps: list[dict[str, Any]], goal: BroadcastGoal | None) -> WorkflowDefinition:
    return WorkflowDefinition.model_validate(
        {
            "trigger": {"kind": "broadcast"},
            "goal": {"event": goal.event} if goal else None,
            "steps": steps,
        }
    )


def _end(goal: BroadcastGoal | None) -> dict[str, Any]:
    """After the send: stay open for the goal's window (so it converts), or end."""
    if goal is None:
        return {"id": "end", "kind": "exit"}
    return {"id": "end", "kind": "wait", "seconds": goal.window_s}


def send_definition(
    channel: str, template_id: uuid.UUID, goal: BroadcastGoal | None
) -> WorkflowDefinition:
    """One message (a plain broadcast, or the winner of an A/B one)."""
    send = {"kind": "send", "channel": channel, "template_id": str(template_id)}
    return _definition([send, _end(goal)] if goal else [send], goal)


def split_definition(channel: str, ab: ABTest, goal: BroadcastGoal | None) -> WorkflowDefinition:
    """The test group's: an even split into one send per variant."""
    split = {
        "kind": "split",
        "variants": [
            {"name": v.name, "weight": 1, "next": f"send-{i}"} for i, v in enumerate(ab.variants)
        ],
    }
    sends = [
        {
            "id": f"send-{i}",
            "kind": "send",
            "channel": channel,
            "template_id": str(v.template_id),
            "next": "end",
        }
        for i, v in enumerate(ab.variants)
    ]
    return _definition([split, *sends, _end(goal)], goal)


@dataclass(frozen=True)
class Decision:
    winner: str
    reason: Literal["significant", "deadline"]
    verdict: Verdict


def choose(
    groups: dict[str, tuple[int, int]], alpha: float, *, deadline_passed: bool
) -> Decision | None:
    """``groups``: variant -> (members who did the metric, members), in the variants'
    order. The significant leader; at the deadline, the best so far (a tie, or no data,
    goes to the earlier variant); otherwise None (ask again later)."""
    verdict = ab_winner(groups, alpha)
    if verdict.winner is not None:
        return Decision(verdict.winner, "significant", verdict)
    if deadline_passed:
        return Decision(verdict.leader or next(iter(groups)), "deadline", verdict)
    return None


def results(
    runs: list[tuple[str | None, str, int]],
    sends: list[tuple[int, str | None, int]],
    deliveries: list[tuple[int, str | None, str, int]],
) -> tuple[dict[str, Any], dict[str | None, dict[str, Any]]]:
    """An A/B broadcast's counts and rates: in total, and per variant of the test (the
    rest, who got the winner, under None). The workflow's counts: (variant, run status,
    runs), (step, variant, messages), (step, variant, delivery status, messages)."""
    return grouped_report(
        runs,
        [(variant, count) for _, variant, count in sends],
        [(variant, status, count) for _, variant, status, count in deliveries],
    )


def groups(ab: ABTest, per_variant: dict[str | None, dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """variant -> (members who did the metric, members of the variant), in order. One
    message per member, so delivery statuses count members."""
    empty = shown(blank())
    return {
        v.name: (
            per_variant.get(v.name, empty)[ab.metric],
            per_variant.get(v.name, empty)["entered"],
        )
        for v in ab.variants
    }


def ab_report(
    ab: ABTest,
    per_variant: dict[str | None, dict[str, Any]],
    decision: dict[str, Any] | None,
) -> dict[str, Any]:
    """The test's results as the API shows them: per variant the counts, rates and the
    metric's rate (over the variant's members); the live z-test of the leader against the
    runner-up; and the winner once chosen (``decision``, as recorded)."""
    counted = groups(ab, per_variant)
    verdict = ab_winner(counted, ab.alpha)
    empty = shown(blank())
    return {
        "metric": ab.metric,
        "test_fraction": ab.test_fraction,
        "decide_after_s": ab.decide_after_s,
        "alpha": ab.alpha,
        "variants": [
            {
                "variant": v.name,
                "template_id": str(v.template_id),
                **per_variant.get(v.name, empty),
                "metric_rate": rate(*counted[v.name]),
            }
            for v in ab.variants
        ],
        "leader": verdict.leader,
        "runner_up": verdict.runner_up,
        "z": verdict.test.z if verdict.test else None,
        "p_value": verdict.test.p_value if verdict.test else None,
        "significant": verdict.winner is not None,
        "winner": decision["winner"] if decision else None,
        "decision": decision,
    }


def decision_record(
    decision: Decision, groups: dict[str, tuple[int, int]], at: str
) -> dict[str, Any]:
    """What is stored when the winner is chosen: why, and the data it was chosen on."""
    test = decision.verdict.test
    return {
        "winner": decision.winner,
        "reason": decision.reason,
        "at": at,
        "leader": decision.verdict.leader,
        "runner_up": decision.verdict.runner_up,
        "z": test.z if test else None,
        "p_value": test.p_value if test else None,
        "counts": {name: {"did": x, "members": n} for name, (x, n) in groups.items()},
    }
