"""A consumer batch of segment entries goes through the set-based path: the same effects as
one message at a time (entry rules, caps counted within the batch, one run per contact),
and a replay of the batch changes nothing."""

from __future__ import annotations

import uuid
from collections import Counter

import sqlalchemy as sa

from nudge_common.db import transaction
from nudge_common.events import SEGMENT_ENTERED, ContactSnapshot, Envelope, MembershipChanged
from nudge_common.kafka import publish
from nudge_orchestrator import store
from nudge_orchestrator.consumer import ContactHandler, EventHandler, MembershipHandler
from tests.services.orchestrator.conftest import Engine

TEMPLATE = uuid.uuid4()


def flow(segment: uuid.UUID) -> dict[str, object]:
    return {
        "trigger": {"kind": "segment_entered", "segment_id": str(segment)},
        "steps": [
            {"kind": "send", "channel": "email", "template_id": str(TEMPLATE)},
            {"kind": "wait", "seconds": 3600},
            {"kind": "send", "channel": "email", "template_id": str(TEMPLATE)},
        ],
    }


def entered(engine: Engine, segment: uuid.UUID, contact_id: uuid.UUID) -> Envelope:
    return SEGMENT_ENTERED.envelope(
        workspace_id=engine.workspace_id,
        payload=MembershipChanged(
            segment_id=segment,
            segment_name="s",
            contact=ContactSnapshot(contact_id=contact_id, traits={"email": "x@example.com"}),
            at=engine.now,
        ),
        occurred_at=engine.now,
    )


async def apply_batch(engine: Engine, envelopes: list[Envelope]) -> int:
    handler = MembershipHandler(engine.clock)
    async with transaction(engine.sessionmaker) as session:
        out = await handler.handle_batch(session, envelopes)
        await publish(engine.producer, engine.settings, out)
    return len(out)


async def test_a_batch_of_entries_equals_one_at_a_time_and_a_replay_changes_nothing(
    engine: Engine,
) -> None:
    segment = uuid.uuid4()
    first = await engine.workflow(flow(segment))
    second = await engine.workflow(flow(segment))
    async with transaction(engine.sessionmaker) as session:
        await store.put_messaging_settings(
            session,
            workspace_id=engine.workspace_id,
            caps={"email": {"per_day": 1}},
            quiet_hours=None,
        )
    contacts = [uuid.uuid4() for _ in range(40)]
    batch = [entered(engine, segment, c) for c in contacts]
    # one contact twice in the batch: entered once ("once" rule), in order
    batch.append(entered(engine, segment, contacts[0]))
    assert await apply_batch(engine, batch) == 40  # the cap: one email per contact per day
    for workflow in (first, second):
        runs = await engine.runs(workflow)
        assert sorted(r.contact_id for r in runs) == sorted(contacts)
        assert {r.status for r in runs} == {"active"}
        assert len(await engine.timers(workflow)) == 40
    async with transaction(engine.sessionmaker) as session:
        outcomes = (
            await session.execute(
                sa.select(store.step_executions.c.outcome, sa.func.count())
                .join(store.runs, store.runs.c.id == store.step_executions.c.run_id)
                .where(store.runs.c.workflow_id.in_([first, second]))
                .where(store.step_executions.c.step == 0)
                .group_by(store.step_executions.c.outcome)
            )
        ).all()
    assert dict(outcomes) == {"requested": 40, "capped": 40}
    # the same batch again (a replay after a crash): no run, step or message more
    assert await apply_batch(engine, batch) == 0
    assert len(await engine.runs(first)) == len(await engine.runs(second)) == 40
    # the waits fire together, one more email each... capped within the day
    engine.advance(hours=1)
    assert await engine.fire() == 80
    assert len(await engine.sent(first)) + len(await engine.sent(second)) == 40


async def test_contact_updates_in_one_batch_each_compare_with_the_one_before(
    engine: Engine,
) -> None:
    workflow = await engine.workflow(
        {
            "trigger": {"kind": "score_crossed", "model": "default", "threshold": 50},
            "entry": {"rule": "every_time"},
            "steps": [{"kind": "send", "channel": "email", "template_id": str(TEMPLATE)}],
        }
    )
    await engine.update("batch-cold", {"default": 60})  # stored before the batch
    await engine.apply_batch(
        ContactHandler(engine.clock),
        [
            engine.updated("batch-hot", {"default": 30}, tags={"vip": 5}),
            engine.updated("batch-hot", {"default": 55}),  # crossed
            engine.updated("batch-cold", {"default": 40}),
            engine.updated("batch-hot", {"default": 70}, plan="pro"),
            engine.updated("batch-hot", {"default": 40}),
            engine.updated("batch-hot", {"default": 50}),  # crossed again
            engine.updated("batch-cold", {"default": 45}),
        ],
    )
    runs = Counter(run.contact_id for run in await engine.runs(workflow))
    # cold: one run from its update before the batch (0 -> 60), none in it (60 -> 40 -> 45)
    assert runs == {engine.contact_id("batch-hot"): 2, engine.contact_id("batch-cold"): 1}
    async with transaction(engine.sessionmaker) as session:
        copies = await store.get_contacts(
            session,
            contact_ids=[engine.contact_id("batch-hot"), engine.contact_id("batch-cold")],
        )
    hot, cold = copies[engine.contact_id("batch-hot")], copies[engine.contact_id("batch-cold")]
    assert (hot["scores"], hot["tags"], hot["traits"].get("plan")) == (
        {"default": 50},
        {"vip": 5},
        None,
    )
    assert cold["scores"] == {"default": 45}


async def test_track_events_in_one_batch_reach_the_run_an_earlier_one_started(
    engine: Engine,
) -> None:
    workflow = await engine.workflow(
        {
            "trigger": {"kind": "event", "event": "Product Added"},
            "goal": {"event": "Order Completed"},
            "steps": [
                {"kind": "wait", "seconds": 3600},
                {"kind": "send", "channel": "email", "template_id": str(TEMPLATE)},
            ],
        }
    )
    merged = uuid.uuid4()  # a contact scoring merged: its id is not the user id's own
    async with transaction(engine.sessionmaker) as session:
        await store.upsert_contacts(
            session,
            [
                store.ContactCopy(
                    merged, engine.workspace_id, "batch-merged", {}, {}, tags=None, stages=None
                )
            ],
        )
    await engine.apply_batch(
        EventHandler(engine.clock),
        [
            engine.tracked("batch-merged", "Product Added", sku="C3"),
            engine.tracked("batch-buyer", "Page Viewed"),
            engine.tracked("batch-buyer", "Product Added", sku="A1"),
            engine.tracked("batch-browser", "Product Added", sku="B2"),
            engine.tracked("batch-buyer", "Order Completed"),
            engine.tracked("batch-nobody", "Order Completed"),
        ],
    )
    runs = {run.contact_id: run for run in await engine.runs(workflow)}
    assert set(runs) == {
        engine.contact_id("batch-buyer"),
        engine.contact_id("batch-browser"),
        merged,
    }
    assert runs[engine.contact_id("batch-buyer")].status == "converted"
    assert runs[engine.contact_id("batch-buyer")].performed == ["Order Completed"]
    assert runs[engine.contact_id("batch-browser")].status == "active"


async def test_a_later_batch_keeps_the_entry_rule_of_earlier_runs(engine: Engine) -> None:
    """The entry states come with the batch's one read of workflows and copies: contacts
    who entered a "once" workflow before are refused in a later batch, the others enter."""
    segment = uuid.uuid4()
    one_send = {  # its runs end at once
        **flow(segment),
        "steps": [{"kind": "send", "channel": "email", "template_id": str(TEMPLATE)}],
    }
    workflow = await engine.workflow(one_send)
    contacts = [uuid.uuid4() for _ in range(3)]
    assert await apply_batch(engine, [entered(engine, segment, c) for c in contacts[:2]]) == 2
    assert await apply_batch(engine, [entered(engine, segment, c) for c in contacts]) == 1
    runs = await engine.runs(workflow)
    assert sorted(run.contact_id for run in runs) == sorted(contacts)
