"""Runs on the real database and broker: the abandoned cart (both ways), entry rules, goals,
caps, quiet hours, versions, and two timer workers sharing due timers."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from nudge_common.db import transaction
from nudge_common.events import (
    NOTIFICATION_REQUESTED,
    ContactSnapshot,
    Envelope,
    NotificationRequested,
    Topic,
)
from nudge_common.ids import stable_id
from nudge_devtools.pipeline import read_topic
from nudge_orchestrator import execution, store
from nudge_orchestrator.domain.workflows import WorkflowDefinition
from nudge_orchestrator.worker import fire_due_timers
from tests.services.orchestrator.conftest import Engine, notifications

EMAIL = uuid.uuid4()
SMS = uuid.uuid4()


def abandoned_cart(**extra: Any) -> dict[str, Any]:
    return {
        "trigger": {"kind": "event", "event": "Product Added"},
        "entry": {"rule": "every_time"},
        "goal": {"event": "Order Completed"},
        "steps": [
            {
                "kind": "wait_for_event",
                "event": "Order Completed",
                "timeout_s": 3 * 3600,
                "on_event": "done",
            },
            {"kind": "send", "channel": "email", "template_id": str(EMAIL)},
            {"kind": "wait", "seconds": 86400},
            {
                "kind": "branch",
                "not_performed": ["Order Completed", "Email Link Clicked"],
                "else": "done",
            },
            {"kind": "send", "channel": "sms", "template_id": str(SMS)},
            {"id": "done", "kind": "exit"},
        ],
        **extra,
    }


async def test_abandoned_cart_without_an_order_sends_email_then_sms(engine: Engine) -> None:
    workflow = await engine.workflow(abandoned_cart())
    contact = await engine.contact("cart-1")
    await engine.track("cart-1", "Product Added", sku="A1")
    [run] = await engine.runs(workflow)
    assert run.status == "active"
    assert run.contact_id == contact
    engine.advance(hours=2, minutes=59)
    assert await engine.fire() == 0
    assert await engine.sent(workflow) == []
    engine.advance(minutes=1)
    assert await engine.fire() == 1
    assert await engine.sent(workflow) == [("email", 1)]
    engine.advance(days=1)
    assert await engine.fire() == 1
    assert await engine.sent(workflow) == [("email", 1), ("sms", 4)]
    [run] = await engine.runs(workflow)
    assert run.status == "exited"
    assert await engine.timers(workflow) == []
    # the requests are on Kafka, with keys <run>:<step>
    keys = {f"{run.id}:1", f"{run.id}:4"}
    found = await read_topic(
        engine.settings,
        Topic.NOTIFICATIONS,
        where=lambda r: NOTIFICATION_REQUESTED.parse(_decode(r)).idempotency_key in keys,
        expected=2,
    )
    requests = [NOTIFICATION_REQUESTED.parse(_decode(r)) for r in found]
    assert sorted(r.channel for r in requests) == ["email", "sms"]
    assert all(r.contact.traits["email"] == "cart-1@example.com" for r in requests)


async def test_an_order_in_time_cancels_the_reminder(engine: Engine) -> None:
    workflow = await engine.workflow(abandoned_cart())
    await engine.contact("cart-2")
    await engine.track("cart-2", "Product Added")
    engine.advance(hours=1)
    await engine.track("cart-2", "Order Completed")
    [run] = await engine.runs(workflow)
    assert run.status == "converted"
    assert await engine.timers(workflow) == []
    engine.advance(days=3)
    assert await engine.fire() == 0
    assert await engine.sent(workflow) == []


async def test_a_clicked_email_means_no_sms(engine: Engine) -> None:
    workflow = await engine.workflow(abandoned_cart())
    await engine.contact("cart-3")
    await engine.track("cart-3", "Product Added")
    engine.advance(hours=3)
    await engine.fire()
    engine.advance(hours=2)
    await engine.track("cart-3", "Email Link Clicked")
    engine.advance(days=1)
    await engine.fire()
    assert await engine.sent(workflow) == [("email", 1)]
    [run] = await engine.runs(workflow)
    assert run.status == "exited"


async def test_entry_rules_once_cooldown_and_one_run_at_a_time(engine: Engine) -> None:
    wait_then_send = [
        {"kind": "wait", "seconds": 3600},
        {"kind": "send", "channel": "email", "template_id": str(EMAIL)},
    ]
    once = await engine.workflow(
        {"trigger": {"kind": "event", "event": "Signed Up"}, "steps": wait_then_send}
    )
    every = await engine.workflow(
        {
            "trigger": {"kind": "event", "event": "Signed Up"},
            "entry": {"rule": "every_time"},
            "steps": wait_then_send,
        }
    )
    cooldown = await engine.workflow(
        {
            "trigger": {"kind": "event", "event": "Signed Up"},
            "entry": {"rule": "cooldown", "cooldown_s": 86400},
            "steps": wait_then_send,
        }
    )
    await engine.contact("rules-1")
    await engine.track("rules-1", "Signed Up")
    await engine.track("rules-1", "Signed Up")  # all three runs still active: no second run
    assert [len(await engine.runs(w)) for w in (once, every, cooldown)] == [1, 1, 1]
    engine.advance(hours=2)
    await engine.fire()  # all runs complete
    await engine.track("rules-1", "Signed Up")
    assert [len(await engine.runs(w)) for w in (once, every, cooldown)] == [1, 2, 1]
    engine.advance(days=1)
    await engine.fire()
    await engine.track("rules-1", "Signed Up")
    assert [len(await engine.runs(w)) for w in (once, every, cooldown)] == [1, 3, 2]


async def test_event_trigger_property_filter(engine: Engine) -> None:
    workflow = await engine.workflow(
        {
            "trigger": {
                "kind": "event",
                "event": "Viewed Product",
                "properties": {"kind": "trait", "name": "price", "op": "gte", "value": 100},
            },
            "steps": [{"kind": "send", "channel": "email", "template_id": str(EMAIL)}],
        }
    )
    await engine.contact("filter-1")
    await engine.track("filter-1", "Viewed Product", price=20)
    assert await engine.runs(workflow) == []
    await engine.track("filter-1", "Viewed Product", price=250)
    [run] = await engine.runs(workflow)
    assert run.status == "completed"


async def test_frequency_cap_across_workflows(engine: Engine) -> None:
    async with transaction(engine.sessionmaker) as session:
        await store.put_messaging_settings(
            session,
            workspace_id=engine.workspace_id,
            caps={"email": {"per_day": 1}},
            quiet_hours=None,
        )
    send = [{"kind": "send", "channel": "email", "template_id": str(EMAIL)}]
    first = await engine.workflow({"trigger": {"kind": "event", "event": "A"}, "steps": send})
    second = await engine.workflow({"trigger": {"kind": "event", "event": "B"}, "steps": send})
    await engine.contact("cap-1")
    await engine.track("cap-1", "A")
    await engine.track("cap-1", "B")
    assert await engine.sent(first) == [("email", 0)]
    assert await engine.sent(second) == []
    async with transaction(engine.sessionmaker) as session:
        [outcome] = (
            await session.execute(
                sa.select(store.step_executions.c.outcome)
                .join(store.runs, store.runs.c.id == store.step_executions.c.run_id)
                .where(store.runs.c.workflow_id == second)
            )
        ).scalars()
    assert outcome == "capped"
    engine.advance(days=1, seconds=1)
    await engine.track("cap-1", "B")  # once (default entry): no second run of B
    third = await engine.workflow({"trigger": {"kind": "event", "event": "C"}, "steps": send})
    await engine.track("cap-1", "C")
    assert await engine.sent(third) == [("email", 0)]


async def test_a_weekly_cap_on_push(engine: Engine) -> None:
    async with transaction(engine.sessionmaker) as session:
        await store.put_messaging_settings(
            session,
            workspace_id=engine.workspace_id,
            caps={"push": {"per_week": 2}},
            quiet_hours=None,
        )
    workflow = await engine.workflow(
        {
            "trigger": {"kind": "event", "event": "Ping"},
            "entry": {"rule": "every_time"},
            "steps": [{"kind": "send", "channel": "push", "template_id": str(SMS)}],
        }
    )
    await engine.contact("push-1")
    for _ in range(3):
        await engine.track("push-1", "Ping")
        engine.advance(days=2)
    assert await engine.sent(workflow) == [("push", 0), ("push", 0)], "the third is capped"
    engine.advance(days=1, seconds=1)  # a week after the first
    await engine.track("push-1", "Ping")
    assert len(await engine.sent(workflow)) == 3
    requests = await notifications(engine, workflow)
    assert {NOTIFICATION_REQUESTED.parse(r).channel for r in requests} == {"push"}


async def test_a_paused_workflow_takes_no_one_but_finishes_its_runs_until_resumed(
    engine: Engine,
) -> None:
    workflow = await engine.workflow(
        {
            "trigger": {"kind": "event", "event": "Browsed"},
            "steps": [
                {"kind": "wait", "seconds": 3600},
                {"kind": "send", "channel": "email", "template_id": str(EMAIL)},
            ],
        }
    )
    for user in ("pause-1", "pause-2", "pause-3"):
        await engine.contact(user)
    await engine.track("pause-1", "Browsed")
    async with transaction(engine.sessionmaker) as session:
        await store.update_workflow(session, workflow_id=workflow, status="paused")
    await engine.track("pause-2", "Browsed")
    assert len(await engine.runs(workflow)) == 1, "paused: no new run"
    engine.advance(hours=1)
    await engine.fire()
    assert await engine.sent(workflow) == [("email", 1)], "the run in flight goes on"
    async with transaction(engine.sessionmaker) as session:
        await store.update_workflow(session, workflow_id=workflow, status="active")
    await engine.track("pause-3", "Browsed")
    assert len(await engine.runs(workflow)) == 2
    engine.advance(hours=1)
    await engine.fire()
    assert len(await engine.sent(workflow)) == 2


async def test_wait_until_a_weekday_morning_in_the_contacts_timezone(engine: Engine) -> None:
    workflow = await engine.workflow(
        {
            "trigger": {"kind": "event", "event": "Downloaded"},
            "steps": [
                {"kind": "wait_until", "hour": 9, "minute": 30, "weekdays": [5]},
                {"kind": "send", "channel": "email", "template_id": str(EMAIL)},
            ],
        }
    )
    await engine.contact("weekday-1", timezone="America/New_York")
    await engine.track("weekday-1", "Downloaded")  # Monday 07:00 in New York
    [timer] = await engine.timers(workflow)
    assert timer.due_at.isoformat() == "2030-03-09T14:30:00+00:00"  # Saturday 09:30 EST
    engine.advance(days=5, hours=2, minutes=29)
    await engine.fire()  # (other tests' waits may be due by now)
    assert await engine.sent(workflow) == []
    engine.advance(minutes=1)
    await engine.fire()
    assert await engine.sent(workflow) == [("email", 1)]


async def test_quiet_hours_make_messages_wait(engine: Engine) -> None:
    async with transaction(engine.sessionmaker) as session:
        await store.put_messaging_settings(
            session,
            workspace_id=engine.workspace_id,
            caps={},
            quiet_hours={"start": "21:00", "end": "08:00"},
        )
    workflow = await engine.workflow(
        {
            "trigger": {"kind": "event", "event": "Late"},
            "steps": [{"kind": "send", "channel": "email", "template_id": str(EMAIL)}],
        }
    )
    await engine.contact("quiet-1", timezone="Europe/Rome")
    engine.advance(hours=9, minutes=30)  # 21:30 UTC = 22:30 in Rome
    await engine.track("quiet-1", "Late")
    assert await engine.sent(workflow) == []
    [timer] = await engine.timers(workflow)
    assert timer.kind == "quiet"
    assert timer.due_at.isoformat() == "2030-03-05T07:00:00+00:00"  # 08:00 in Rome
    engine.advance(hours=9, minutes=30)
    assert await engine.fire() == 1
    assert await engine.sent(workflow) == [("email", 0)]


async def test_publishing_a_version_does_not_change_runs_in_flight(engine: Engine) -> None:
    other = uuid.uuid4()
    definition = {
        "trigger": {"kind": "event", "event": "Joined"},
        "entry": {"rule": "every_time", "concurrent": True},
        "steps": [
            {"kind": "wait", "seconds": 600},
            {"kind": "send", "channel": "email", "template_id": str(EMAIL)},
        ],
    }
    workflow = await engine.workflow(definition)
    await engine.contact("version-1")
    await engine.track("version-1", "Joined")
    edited = {
        **definition,
        "steps": [{"kind": "send", "channel": "sms", "template_id": str(other)}],
    }
    async with transaction(engine.sessionmaker) as session:
        await store.update_workflow(
            session, workflow_id=workflow, definition=WorkflowDefinition.model_validate(edited)
        )
        assert await store.publish_workflow(session, workflow_id=workflow) == 2
    await engine.track("version-1", "Joined")  # a new run, on version 2
    engine.advance(minutes=10)
    await engine.fire()
    runs = sorted(await engine.runs(workflow), key=lambda r: r.version)
    assert [(r.version, r.status) for r in runs] == [(1, "completed"), (2, "completed")]
    assert sorted(await engine.sent(workflow)) == [("email", 1), ("sms", 0)]


async def test_branch_on_the_segment_language_and_a_split(engine: Engine) -> None:
    workflow = await engine.workflow(
        {
            "trigger": {"kind": "event", "event": "Visited"},
            "steps": [
                {
                    "kind": "branch",
                    "condition": {"kind": "trait", "name": "plan", "op": "eq", "value": "pro"},
                    "else": "end",
                },
                {
                    "kind": "split",
                    "variants": [
                        {"name": "a", "weight": 1},
                        {"name": "b", "weight": 1, "next": "b"},
                    ],
                },
                {"kind": "send", "channel": "email", "template_id": str(EMAIL), "next": "end"},
                {"id": "b", "kind": "send", "channel": "email", "template_id": str(SMS)},
                {"id": "end", "kind": "exit"},
            ],
        }
    )
    await engine.contact("branch-free", plan="free")
    await engine.track("branch-free", "Visited")
    for i in range(20):
        await engine.contact(f"branch-pro-{i}", plan="pro")
        await engine.track(f"branch-pro-{i}", "Visited")
    runs = await engine.runs(workflow)
    assert len(runs) == 21
    variants = [r.variant for r in runs if r.variant]
    assert len(variants) == 20  # the free contact took the else branch, before the split
    assert {"a", "b"} == set(variants)
    sent_steps = sorted(step for _, step in await engine.sent(workflow))
    assert sent_steps == sorted(2 if v == "a" else 3 for v in variants)


async def test_two_timer_workers_share_due_timers_and_never_double_a_step(engine: Engine) -> None:
    workflow = await engine.workflow(
        {
            "trigger": {"kind": "event", "event": "Bulk"},
            "steps": [
                {"kind": "wait", "seconds": 60},
                {"kind": "send", "channel": "email", "template_id": str(EMAIL)},
            ],
        }
    )
    users = [f"bulk-{i}" for i in range(300)]
    for user in users:
        await engine.track(user, "Bulk")
    engine.advance(minutes=2)

    async def worker() -> int:
        fired = 0
        while batch := await fire_due_timers(
            engine.sessionmaker, engine.producer, engine.settings, clock=engine.clock, limit=25
        ):
            fired += batch
        return fired

    lag = ("nudge_orchestrator_timer_lag_seconds_count", "nudge_orchestrator_timer_lag_seconds_sum")
    before = [REGISTRY.get_sample_value(name) or 0.0 for name in lag]
    counts = await asyncio.gather(worker(), worker())
    assert sum(counts) == 300
    observed, lagged = (
        (REGISTRY.get_sample_value(name) or 0.0) - was
        for name, was in zip(lag, before, strict=True)
    )
    assert observed == 300
    assert lagged == pytest.approx(300 * 60), "each fired a minute after its due time"
    sent = await engine.sent(workflow)
    assert len(sent) == 300
    async with transaction(engine.sessionmaker) as session:
        executions = await session.scalar(
            sa.select(sa.func.count())
            .select_from(store.step_executions)
            .join(store.runs, store.runs.c.id == store.step_executions.c.run_id)
            .where(store.runs.c.workflow_id == workflow)
        )
    assert executions == 600  # (wait, send) once per run


def _decode(record: Any) -> Envelope:
    return Envelope.decode(record.value)


@pytest.mark.parametrize(
    "contact",
    [
        {"user_id": "u-1", "traits": {"email": "a@example.com"}, "scores": {"lead": 60}},
        {
            "user_id": None,
            "traits": {"name": "Zoë", "nested": {"a": [1, 2.5, None, True]}, "n": 3},
            "scores": {},
            "segments": ["Qualified leads", "Été"],
        },
        {"traits": {}, "tags": {"vip": 1}},
    ],
)
def test_a_send_request_is_the_models_envelope_byte_for_byte(contact: dict[str, Any]) -> None:
    """The send's request is built without the models: the same envelope and bytes as
    ``NotificationRequested`` with a ``ContactSnapshot``, dumped."""
    run = store.Run(
        uuid.uuid4(),
        uuid.uuid4(),
        1,
        "ws-1",
        uuid.uuid4(),
        store.ACTIVE,
        None,
        [],
        {},
        datetime.now(UTC),
    )
    now = datetime.now(UTC)
    received = now - timedelta(seconds=1)
    out = execution.Outputs(origins={run.id: received})
    built = execution._notification(run, contact, 2, "email", EMAIL, f"{run.id}:2", now, out)
    expected = NOTIFICATION_REQUESTED.envelope(
        workspace_id="ws-1",
        payload=NotificationRequested(
            idempotency_key=f"{run.id}:2",
            channel="email",
            template_id=EMAIL,
            contact=ContactSnapshot(
                contact_id=run.contact_id,
                user_id=contact.get("user_id"),
                traits=contact.get("traits") or {},
                scores=contact.get("scores") or {},
                segments=contact.get("segments") or [],
            ),
            workflow_id=run.workflow_id,
            run_id=run.id,
            step=2,
        ),
        occurred_at=now,
        id=stable_id(str(run.id), "notification.requested", "2"),
        origin_received_at=received,
    )
    assert built.envelope == expected
    assert built.envelope.encode() == expected.encode()
    assert (built.topic, built.key) == (Topic.NOTIFICATIONS, str(run.contact_id))
