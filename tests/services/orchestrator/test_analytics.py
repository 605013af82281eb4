"""Analytics per workflow, step and variant, and per segment, from runs, sends and the
deliveries topic, and the A/B verdict (two-proportion z-test on conversions)."""

from __future__ import annotations

import uuid

import pytest

from nudge_common.db import transaction
from nudge_common.events import (
    DELIVERY_REPORTED,
    SEGMENT_EXITED,
    ContactSnapshot,
    DeliveryReported,
    MembershipChanged,
)
from nudge_orchestrator import store
from nudge_orchestrator.consumer import DeliveryHandler, MembershipHandler
from nudge_orchestrator.domain.analytics import (
    ab_winner,
    grouped_report,
    report,
    two_proportion_z_test,
)
from tests.services.orchestrator.conftest import Engine

TEMPLATE_A, TEMPLATE_B = uuid.uuid4(), uuid.uuid4()


def test_two_proportion_z_test_matches_the_textbook() -> None:
    # 200/1000 vs 150/1000: pooled 0.175, z = 0.05 / sqrt(0.175 * 0.825 * 0.002) = 2.9424
    test = two_proportion_z_test(200, 1000, 150, 1000)
    assert test is not None
    assert test.z == pytest.approx(2.9424, abs=1e-3)
    assert test.p_value == pytest.approx(0.00326, abs=1e-4)
    assert two_proportion_z_test(0, 10, 0, 10) is None  # no variance
    assert two_proportion_z_test(1, 0, 1, 10) is None


def test_a_winner_only_once_significant() -> None:
    assert ab_winner({"a": (200, 1000), "b": (150, 1000)}).winner == "a"
    close = ab_winner({"a": (21, 100), "b": (20, 100), "holdout": (5, 50)})
    assert (close.leader, close.runner_up, close.winner) == ("a", "b", None)
    assert ab_winner({"a": (3, 10)}).winner is None


def test_rates_per_step_and_variant() -> None:
    out = report(
        runs=[("a", "converted", 2), ("a", "completed", 2), ("b", "active", 4)],
        sends=[(0, "a", 4), (0, "b", 4)],
        deliveries=[(0, "a", "delivered", 4), (0, "a", "opened", 2), (0, "a", "clicked", 1)],
    )
    assert (out["entered"], out["completed"], out["converted"], out["requested"]) == (8, 2, 2, 8)
    [step] = out["steps"]
    assert step["open_rate"] == 0.5
    assert step["click_rate"] == 0.25
    assert step["entered"] == 0, "no step_runs given"
    path = report(
        runs=[("a", "converted", 2)],
        sends=[],
        deliveries=[],
        step_runs=[(0, "converted", 2), (0, "exited", 3), (1, "converted", 2), (2, "exited", 3)],
    )["steps"]
    assert [(s["step"], s["entered"], s["completed"], s["converted"]) for s in path] == [
        (0, 5, 3, 2),
        (1, 2, 0, 2),
        (2, 3, 3, 0),
    ]
    assert [s["conversion_rate"] for s in path] == [0.4, 1.0, 0.0]
    a, b = out["variants"]
    assert (a["variant"], a["conversion_rate"], b["conversion_rate"]) == ("a", 0.5, 0.0)


async def test_analytics_of_a_split_workflow_from_runs_and_deliveries(engine: Engine) -> None:
    # (waits far beyond the hand clock's other tests: they count fired timers)
    workflow = await engine.workflow(
        {
            "trigger": {"kind": "event", "event": "Signed Up"},
            "goal": {"event": "Upgraded"},
            "steps": [
                {
                    "kind": "split",
                    "variants": [
                        {"name": "a", "weight": 1, "next": "a"},
                        {"name": "b", "weight": 1, "next": "b"},
                    ],
                },
                {"id": "a", "kind": "send", "channel": "email", "template_id": str(TEMPLATE_A)},
                {"kind": "wait", "seconds": 300 * 86400, "next": "end"},
                {"id": "b", "kind": "send", "channel": "email", "template_id": str(TEMPLATE_B)},
                {"kind": "wait", "seconds": 300 * 86400},
                {"id": "end", "kind": "exit"},
            ],
        }
    )
    users = [f"ana-{i}" for i in range(40)]
    contact_of = {}
    for user in users:
        contact_of[user] = await engine.contact(user)
        await engine.track(user, "Signed Up")
    runs = {run.contact_id: run for run in await engine.runs(workflow)}
    assert len(runs) == 40
    # every email is delivered, a's are opened; contacts in "a" upgrade
    upgraded = 0
    for user in users:
        run = runs[contact_of[user]]
        step = 1 if run.variant == "a" else 3
        for status in (
            ("delivered", "opened", "delivered") if run.variant == "a" else ("delivered",)
        ):
            await engine.apply(
                DeliveryHandler(),
                DELIVERY_REPORTED.envelope(
                    workspace_id=engine.workspace_id,
                    payload=DeliveryReported(
                        idempotency_key=f"{run.id}:{step}",
                        channel="email",
                        status=status,
                        contact_id=run.contact_id,
                    ),
                    occurred_at=engine.now,
                ),
            )
        if run.variant == "a":
            await engine.track(user, "Upgraded")
            upgraded += 1
    async with transaction(engine.sessionmaker) as session:
        counts = await store.workflow_counts(session, workflow_id=workflow)
        step_runs = await store.step_counts(session, workflow_id=workflow)
    out = report(counts.runs, counts.sends, counts.deliveries, step_runs=step_runs)
    assert out["entered"] == 40
    assert out["converted"] == upgraded
    # per step, the runs that executed it: a's conversions count for a's path only
    steps = {s["step"]: s for s in out["steps"]}
    in_b = 40 - upgraded
    assert (steps[0]["entered"], steps[0]["converted"]) == (40, upgraded)
    assert (steps[1]["entered"], steps[1]["converted"], steps[1]["conversion_rate"]) == (
        upgraded,
        upgraded,
        1.0,
    )
    assert (steps[2]["entered"], steps[2]["converted"]) == (upgraded, upgraded)
    assert (steps[3]["entered"], steps[3]["converted"], steps[3]["conversion_rate"]) == (
        in_b,
        0,
        0.0,
    )
    assert (steps[4]["entered"], steps[4]["completed"]) == (in_b, 0), "still waiting"
    assert out["requested"] == out["delivered"] == 40  # a "delivered" reported twice counts once
    variants = {v["variant"]: v for v in out["variants"]}
    assert variants["a"]["open_rate"] == 1.0
    assert variants["b"]["open_rate"] == 0.0
    assert variants["a"]["conversion_rate"] == 1.0
    assert out["ab_test"]["leader"] == "a"
    assert out["ab_test"]["winner"] == "a"


async def test_the_holdout_stays_open_for_the_goal_and_counts_its_conversions(
    engine: Engine,
) -> None:
    workflow = await engine.workflow(
        {
            "trigger": {"kind": "event", "event": "Trial Started"},
            "goal": {"event": "Subscribed"},
            "steps": [
                {
                    "kind": "split",
                    "variants": [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}],
                    "holdout": 0.5,
                    "holdout_window_s": 300 * 86400,
                },
                {"kind": "send", "channel": "email", "template_id": str(TEMPLATE_A)},
            ],
        }
    )
    users = [f"hold-{i}" for i in range(30)]
    for user in users:
        await engine.contact(user)
        await engine.track(user, "Trial Started")
    runs = await engine.runs(workflow)
    held = [run for run in runs if run.variant == "holdout"]
    assert held, "with 30 contacts and a 0.5 holdout, some are held out"
    assert {run.status for run in held} == {"active"}  # open, sending nothing
    for user in users:
        await engine.track(user, "Subscribed")
    async with transaction(engine.sessionmaker) as session:
        counts = await store.workflow_counts(session, workflow_id=workflow)
    out = report(counts.runs, counts.sends, counts.deliveries)
    variants = {v["variant"]: v for v in out["variants"]}
    assert variants["holdout"]["entered"] == len(held)
    assert variants["holdout"]["converted"] == len(held)  # the goal reached them
    assert variants["holdout"]["requested"] == 0
    assert out["requested"] == len(runs) - len(held)


async def test_analytics_per_segment_count_the_runs_the_segment_started(engine: Engine) -> None:
    segment, other = uuid.uuid4(), uuid.uuid4()
    onboarding = await engine.workflow(
        {
            "trigger": {"kind": "segment_entered", "segment_id": str(segment)},
            "steps": [{"kind": "send", "channel": "email", "template_id": str(TEMPLATE_A)}],
        },
        name="Onboarding",
    )
    winback = await engine.workflow(
        {
            "trigger": {"kind": "segment_exited", "segment_id": str(segment)},
            "steps": [{"kind": "send", "channel": "email", "template_id": str(TEMPLATE_B)}],
        },
        name="Win-back",
    )
    elsewhere = await engine.workflow(
        {
            "trigger": {"kind": "segment_entered", "segment_id": str(other)},
            "steps": [{"kind": "send", "channel": "email", "template_id": str(TEMPLATE_A)}],
        }
    )
    contacts = [await engine.contact(f"seg-{i}") for i in range(6)]
    for contact in contacts:
        await engine.enter_segment(segment, contact)
        await engine.enter_segment(other, contact)
    for contact in contacts[:2]:
        await engine.apply(
            MembershipHandler(engine.clock),
            SEGMENT_EXITED.envelope(
                workspace_id=engine.workspace_id,
                payload=MembershipChanged(
                    segment_id=segment,
                    segment_name="s",
                    contact=ContactSnapshot(contact_id=contact),
                    at=engine.now,
                ),
                occurred_at=engine.now,
            ),
        )
    runs = {run.contact_id: run for run in await engine.runs(onboarding)}
    for contact in contacts[:4]:  # delivered; half of them opened
        for status in ("delivered", "opened") if contact in contacts[:2] else ("delivered",):
            await engine.apply(
                DeliveryHandler(),
                DELIVERY_REPORTED.envelope(
                    workspace_id=engine.workspace_id,
                    payload=DeliveryReported(
                        idempotency_key=f"{runs[contact].id}:0",
                        channel="email",
                        status=status,
                        contact_id=contact,
                    ),
                    occurred_at=engine.now,
                ),
            )
    async with transaction(engine.sessionmaker) as session:
        counts = await store.segment_counts(
            session, workspace_id=engine.workspace_id, segment_id=segment
        )
        elsewhere_counts = await store.segment_counts(
            session, workspace_id="another", segment_id=segment
        )
    assert counts.workflows == {
        onboarding: ("Onboarding", "segment_entered"),
        winback: ("Win-back", "segment_exited"),
    }
    assert elsewhere not in counts.workflows
    assert elsewhere_counts.runs == []
    total, per_workflow = grouped_report(counts.runs, counts.sends, counts.deliveries)
    assert (total["entered"], total["requested"], total["delivered"]) == (8, 8, 4)
    assert per_workflow[onboarding]["open_rate"] == 0.5
    assert (per_workflow[winback]["entered"], per_workflow[winback]["opened"]) == (2, 0)
