"""Two orchestrator processes side by side on the real stack, on a clock the test moves: the
abandoned cart end to end (an order in time cancels the reminder), and a kill -9 of one
replica while due timers fire, with no step lost or doubled; an A/B split of 10,000
contacts; a birthday workflow, frequency caps and quiet hours; branches, goals and
versions. Contacts, events and segment entries reach them through Kafka only."""

from __future__ import annotations

import signal
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from nudge_common.clock import set_file_clock
from nudge_common.db import SessionMaker, transaction
from nudge_common.events import (
    CONTACT_UPDATED,
    EVENT_RECEIVED,
    NOTIFICATION_REQUESTED,
    SEGMENT_ENTERED,
    ContactSnapshot,
    ContactUpdated,
    Envelope,
    MembershipChanged,
    SegmentEvent,
    Topic,
    segment_event_id,
)
from nudge_common.ids import stable_id
from nudge_common.kafka import OutgoingMessage, create_producer, publish
from nudge_devtools.pipeline import eventually, read_topic, wait_until_idle
from nudge_devtools.services import ServiceProcess, free_port
from nudge_orchestrator import store
from nudge_orchestrator.domain.workflows import Split, WorkflowDefinition, assign_variant
from tests.conftest import StackHandle

T0 = datetime(2031, 1, 6, 12, 0, tzinfo=UTC)
CONTACTS = 400
EMAIL, SMS = uuid.uuid4(), uuid.uuid4()


@pytest.fixture
async def replicas(
    stack: StackHandle, tmp_path: Path
) -> AsyncIterator[tuple[list[ServiceProcess], Path]]:
    clock = tmp_path / "clock"
    set_file_clock(clock, T0)
    env = {**stack.env, "NUDGE_CLOCK_FILE": str(clock), "NUDGE_TIMER_BATCH": "10"}
    processes = [
        ServiceProcess(
            "orchestrator", free_port(), dict(env), stack.log_dir / f"orchestrator-replica-{i}.log"
        )
        for i in range(2)
    ]
    for process in processes:
        process.start()
    try:
        for process in processes:
            await process.wait_ready()
        yield processes, clock
    finally:
        for process in processes:
            await process.stop()


def track(workspace_id: str, user_id: str, event: str, at: datetime) -> OutgoingMessage:
    message_id = f"{user_id}-{event}-{uuid.uuid4().hex[:6]}"
    payload = SegmentEvent.model_validate(
        {
            "type": "track",
            "event": event,
            "userId": user_id,
            "messageId": message_id,
            "timestamp": at,
            "receivedAt": at,
        }
    )
    envelope = EVENT_RECEIVED.envelope(
        workspace_id=workspace_id,
        payload=payload,
        occurred_at=at,
        id=segment_event_id(workspace_id, message_id),
    )
    return OutgoingMessage(Topic.EVENTS, key=user_id, envelope=envelope)


def contact_updated(
    workspace_id: str, user_id: str, at: datetime, **traits: Any
) -> OutgoingMessage:
    """Scoring's announcement of a contact (its id derived from the user id, as the
    orchestrator derives it for events of users it does not know yet)."""
    contact_id = _contact(workspace_id, user_id)
    envelope = CONTACT_UPDATED.envelope(
        workspace_id=workspace_id,
        payload=ContactUpdated(
            contact_id=contact_id,
            user_id=user_id,
            traits={"email": f"{user_id}@example.com", **traits},
            changed=["traits"],
        ),
        occurred_at=at,
    )
    return OutgoingMessage(Topic.CONTACTS, key=str(contact_id), envelope=envelope)


async def create(
    sessionmaker: SessionMaker, workspace_id: str, definition: dict[str, Any]
) -> uuid.UUID:
    workflow_id = uuid.uuid4()
    async with transaction(sessionmaker) as session:
        await store.create_workflow(
            session,
            workspace_id=workspace_id,
            workflow_id=workflow_id,
            name="w",
            definition=WorkflowDefinition.model_validate(definition),
        )
    return workflow_id


async def count(sessionmaker: SessionMaker, query: sa.Select[Any]) -> int:
    async with transaction(sessionmaker) as session:
        return await session.scalar(query) or 0


async def test_abandoned_cart_on_two_replicas_survives_a_kill_9(
    stack: StackHandle,
    sessionmaker: SessionMaker,
    replicas: tuple[list[ServiceProcess], Path],
) -> None:
    processes, clock = replicas
    workspace_id = f"ws-{uuid.uuid4().hex[:10]}"
    workflow_id = uuid.uuid4()
    definition = WorkflowDefinition.model_validate(
        {
            "trigger": {"kind": "event", "event": "Product Added"},
            "entry": {"rule": "every_time"},
            "goal": {"event": "Order Completed"},
            "steps": [
                {
                    "kind": "wait_for_event",
                    "event": "Order Completed",
                    "timeout_s": 10800,
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
        }
    )
    async with transaction(sessionmaker) as session:
        await store.create_workflow(
            session,
            workspace_id=workspace_id,
            workflow_id=workflow_id,
            name="cart",
            definition=definition,
        )
    users = [f"shopper-{i}" for i in range(CONTACTS)]
    buyers = set(users[::2])  # half of them complete the order within the 3 hours
    producer = create_producer(stack.settings)
    await producer.start()
    try:
        await publish(
            producer, stack.settings, [track(workspace_id, u, "Product Added", T0) for u in users]
        )
        runs = sa.select(sa.func.count()).where(store.runs.c.workflow_id == workflow_id)
        waits = (
            sa.select(sa.func.count())
            .select_from(store.timers)
            .join(store.runs, store.runs.c.id == store.timers.c.run_id)
            .where(store.runs.c.workflow_id == workflow_id)
        )
        await eventually(
            lambda: _equals(sessionmaker, waits, CONTACTS), deadline_s=60, what="every run waiting"
        )
        set_file_clock(clock, T0 + timedelta(hours=1))
        await publish(
            producer,
            stack.settings,
            [
                track(workspace_id, u, "Order Completed", T0 + timedelta(hours=1))
                for u in sorted(buyers)
            ],
        )
        await eventually(
            lambda: _equals(sessionmaker, waits, CONTACTS - len(buyers)),
            deadline_s=60,
            what="buyers converted",
        )
    finally:
        await producer.stop()

    sends = (
        sa.select(sa.func.count())
        .select_from(store.sends)
        .where(store.sends.c.workflow_id == workflow_id)
    )
    set_file_clock(clock, T0 + timedelta(hours=3))  # the timeouts fire, 10 per transaction
    await eventually(lambda: _at_least(sessionmaker, sends, 20), deadline_s=60, what="first emails")
    processes[0].signal(signal.SIGKILL)  # mid-run: its transaction in hand is lost
    await processes[0].wait_exit()
    await eventually(
        lambda: _equals(sessionmaker, sends, CONTACTS - len(buyers)),
        deadline_s=60,
        what="every email",
    )
    set_file_clock(clock, T0 + timedelta(hours=3, days=1))
    await eventually(
        lambda: _equals(sessionmaker, sends, 2 * (CONTACTS - len(buyers))),
        deadline_s=60,
        what="every sms",
    )
    await wait_until_idle(stack.settings, consumers={"orchestrator-events": (Topic.EVENTS,)})

    async with transaction(sessionmaker) as session:
        statuses: dict[str, int] = dict(
            (
                await session.execute(
                    sa.select(store.runs.c.status, sa.func.count())
                    .where(store.runs.c.workflow_id == workflow_id)
                    .group_by(store.runs.c.status)
                )
            ).all()
        )
        per_step: dict[int, int] = dict(
            (
                await session.execute(
                    sa.select(store.step_executions.c.step, sa.func.count())
                    .join(store.runs, store.runs.c.id == store.step_executions.c.run_id)
                    .where(store.runs.c.workflow_id == workflow_id)
                    .group_by(store.step_executions.c.step)
                )
            ).all()
        )
    assert await count(sessionmaker, runs) == CONTACTS
    assert statuses == {"converted": len(buyers), "exited": CONTACTS - len(buyers)}
    # every step once per run (the primary key forbids a second row; none is missing either)
    assert per_step == {0: CONTACTS, 1: 200, 2: 200, 3: 200, 4: 200, 5: 200}

    # on Kafka: one idempotency key per (run, send step); a request re-published after the
    # kill carries the same envelope id, which the notifier counts once
    records = await read_topic(
        stack.settings,
        Topic.NOTIFICATIONS,
        where=lambda r: Envelope.decode(r.value or b"").workspace_id == workspace_id,
    )
    requests = [Envelope.decode(r.value or b"") for r in records]
    keys = {NOTIFICATION_REQUESTED.parse(e).idempotency_key: e.id for e in requests}
    assert len(keys) == 2 * (CONTACTS - len(buyers))
    assert len({e.id for e in requests}) == len(keys)
    buyer_contacts = {str(_contact(workspace_id, u)) for u in buyers}
    assert not any(
        str(NOTIFICATION_REQUESTED.parse(e).contact.contact_id) in buyer_contacts for e in requests
    )


def _contact(workspace_id: str, user_id: str) -> uuid.UUID:
    return stable_id(workspace_id, "contact", "user_id", user_id)


async def _equals(sessionmaker: SessionMaker, query: sa.Select[Any], expected: int) -> bool:
    return await count(sessionmaker, query) == expected


async def _at_least(sessionmaker: SessionMaker, query: sa.Select[Any], expected: int) -> bool:
    return await count(sessionmaker, query) >= expected


def runs_of(workflow_id: uuid.UUID) -> sa.Select[Any]:
    return sa.select(sa.func.count()).where(store.runs.c.workflow_id == workflow_id)


def sends_of(workflow_id: uuid.UUID) -> sa.Select[Any]:
    return (
        sa.select(sa.func.count())
        .select_from(store.sends)
        .where(store.sends.c.workflow_id == workflow_id)
    )


async def sent_to(
    sessionmaker: SessionMaker, workflow_id: uuid.UUID
) -> list[tuple[uuid.UUID, str, int]]:
    """(contact, channel, step) of every message the workflow requested."""
    async with transaction(sessionmaker) as session:
        rows = await session.execute(
            sa.select(store.sends.c.contact_id, store.sends.c.channel, store.sends.c.step).where(
                store.sends.c.workflow_id == workflow_id
            )
        )
        return sorted((r.contact_id, r.channel, r.step) for r in rows)


async def test_an_ab_split_of_ten_thousand_contacts_on_two_replicas(
    stack: StackHandle,
    sessionmaker: SessionMaker,
    replicas: tuple[list[ServiceProcess], Path],
) -> None:
    workspace_id = f"ws-{uuid.uuid4().hex[:10]}"
    segment = uuid.uuid4()
    workflow_id = await create(
        sessionmaker,
        workspace_id,
        {
            "trigger": {"kind": "segment_entered", "segment_id": str(segment)},
            # (the variants wait rather than send: 10,000 requests on the session's topic
            # would be work for every notifier started after this test; long waits, which
            # no other test's clock reaches)
            "steps": [
                {
                    "kind": "split",
                    "holdout": 0.1,
                    "variants": [
                        {"name": "a", "weight": 2},
                        {"name": "b", "weight": 1, "next": "b"},
                    ],
                },
                {"kind": "wait", "seconds": 300 * 86400, "next": "end"},
                {"id": "b", "kind": "wait", "seconds": 301 * 86400},
                {"id": "end", "kind": "exit"},
            ],
        },
    )
    contacts = [uuid.uuid4() for _ in range(10_000)]
    entries = [
        OutgoingMessage(
            Topic.MEMBERSHIPS,
            key=str(contact),
            envelope=SEGMENT_ENTERED.envelope(
                workspace_id=workspace_id,
                payload=MembershipChanged(
                    segment_id=segment,
                    segment_name="everyone",
                    contact=ContactSnapshot(contact_id=contact),
                    at=T0,
                ),
                occurred_at=T0,
            ),
        )
        for contact in contacts
    ]
    producer = create_producer(stack.settings)
    await producer.start()
    try:
        await publish(producer, stack.settings, entries)
    finally:
        await producer.stop()
    await eventually(
        lambda: _equals(sessionmaker, runs_of(workflow_id), 10_000),
        deadline_s=180,
        what="a run per contact",
    )
    async with transaction(sessionmaker) as session:
        rows = (
            await session.execute(
                sa.select(store.runs.c.contact_id, store.runs.c.variant).where(
                    store.runs.c.workflow_id == workflow_id
                )
            )
        ).all()
        definition = await store.version_definition(session, workflow_id=workflow_id, version=1)
    split = definition.steps[0]
    assert isinstance(split, Split)
    variants = {row.contact_id: row.variant for row in rows}
    assert len(variants) == 10_000, "one run per contact"
    assert all(
        variant == assign_variant(split, workflow_id, contact, 0)
        for contact, variant in variants.items()
    ), "the variant is the contact's, whichever replica ran it"
    shares = {name: sum(v == name for v in variants.values()) for name in ("holdout", "a", "b")}
    for name, expected in (("holdout", 0.1), ("a", 0.6), ("b", 0.3)):
        sigma = (10_000 * expected * (1 - expected)) ** 0.5
        assert abs(shares[name] - 10_000 * expected) < 4 * sigma, shares
    async with transaction(sessionmaker) as session:
        waits = dict(
            (
                await session.execute(
                    sa.select(store.timers.c.run_id, store.timers.c.step)
                    .join(store.runs, store.runs.c.id == store.timers.c.run_id)
                    .where(store.runs.c.workflow_id == workflow_id)
                )
            ).all()
        )
    assert sorted(waits.values()) == sorted(
        1 if v == "a" else 2 for v in variants.values() if v != "holdout"
    ), "each variant's path, the holdout's run ended at the split"


async def test_a_birthday_caps_and_quiet_hours_on_two_replicas(
    stack: StackHandle,
    sessionmaker: SessionMaker,
    replicas: tuple[list[ServiceProcess], Path],
) -> None:
    _, clock = replicas
    workspace_id = f"ws-{uuid.uuid4().hex[:10]}"
    async with transaction(sessionmaker) as session:
        await store.put_messaging_settings(
            session,
            workspace_id=workspace_id,
            caps={"email": {"per_day": 1}},
            quiet_hours={"start": "21:00", "end": "08:00"},
        )
    birthday = await create(
        sessionmaker,
        workspace_id,
        {
            "trigger": {"kind": "date_trait", "trait": "birthday", "hour": 9},
            "entry": {"rule": "every_time"},
            "steps": [{"kind": "send", "channel": "email", "template_id": str(EMAIL)}],
        },
    )
    signed_up = await create(
        sessionmaker,
        workspace_id,
        {
            "trigger": {"kind": "event", "event": "Signed Up"},
            "steps": [{"kind": "send", "channel": "email", "template_id": str(EMAIL)}],
        },
    )
    # T0 is 12:00 UTC on 6 January: 21:00 in Tokyo (quiet), 13:00 in Paris
    people = {
        "tokyo": {"birthday": "1990-01-07", "timezone": "Asia/Tokyo"},
        "paris": {"birthday": "1985-01-07", "timezone": "Europe/Paris"},
        "late": {"timezone": "Asia/Tokyo"},
    }
    producer = create_producer(stack.settings)
    await producer.start()
    try:
        await publish(
            producer,
            stack.settings,
            [contact_updated(workspace_id, user, T0, **traits) for user, traits in people.items()],
        )
        dates = (
            sa.select(sa.func.count())
            .select_from(store.date_triggers)
            .where(store.date_triggers.c.workflow_id == birthday)
        )
        await eventually(lambda: _equals(sessionmaker, dates, 2), what="two birthdays scheduled")
        # paris signs up and gets its email today; late signs up at 21:00 in Tokyo
        await publish(
            producer,
            stack.settings,
            [track(workspace_id, user, "Signed Up", T0) for user in ("paris", "late")],
        )
        await eventually(lambda: _equals(sessionmaker, runs_of(signed_up), 2), what="sign-ups")
    finally:
        await producer.stop()
    await eventually(lambda: _equals(sessionmaker, sends_of(signed_up), 1), what="one email")
    tokyo, paris, late = (_contact(workspace_id, u) for u in people)
    assert [c for c, _, _ in await sent_to(sessionmaker, signed_up)] == [paris]
    timers = (
        sa.select(sa.func.count())
        .select_from(store.timers)
        .join(store.runs, store.runs.c.id == store.timers.c.run_id)
        .where(store.runs.c.workflow_id == signed_up, store.timers.c.kind == "quiet")
    )
    assert await count(sessionmaker, timers) == 1, "late's email waits for the morning"

    set_file_clock(clock, T0 + timedelta(hours=11))  # 08:00 in Tokyo on 7 January
    await eventually(lambda: _equals(sessionmaker, sends_of(signed_up), 2), what="late's email")
    assert sorted(c for c, _, _ in await sent_to(sessionmaker, signed_up)) == sorted([paris, late])
    assert await count(sessionmaker, runs_of(birthday)) == 0, "not before 09:00"
    set_file_clock(clock, T0 + timedelta(hours=12))  # 09:00 in Tokyo
    await eventually(lambda: _equals(sessionmaker, runs_of(birthday), 1), what="Tokyo's birthday")
    await eventually(lambda: _equals(sessionmaker, sends_of(birthday), 1), what="its email")
    assert await sent_to(sessionmaker, birthday) == [(tokyo, "email", 0)]

    # 09:00 in Paris: its birthday comes, within a day of its sign-up email: capped
    set_file_clock(clock, T0 + timedelta(hours=20))
    await eventually(lambda: _equals(sessionmaker, runs_of(birthday), 2), what="Paris' birthday")
    async with transaction(sessionmaker) as session:
        outcomes = dict(
            (
                await session.execute(
                    sa.select(store.runs.c.contact_id, store.step_executions.c.outcome)
                    .join(store.step_executions, store.step_executions.c.run_id == store.runs.c.id)
                    .where(store.runs.c.workflow_id == birthday)
                )
            ).all()
        )
        next_year = dict(
            (
                await session.execute(
                    sa.select(store.date_triggers.c.contact_id, store.date_triggers.c.due_at).where(
                        store.date_triggers.c.workflow_id == birthday
                    )
                )
            ).all()
        )
    assert outcomes == {tokyo: "requested", paris: "capped"}
    assert next_year == {
        tokyo: datetime(2032, 1, 7, 0, 0, tzinfo=UTC),
        paris: datetime(2032, 1, 7, 8, 0, tzinfo=UTC),
    }


async def test_branches_goals_and_versions_on_two_replicas(
    stack: StackHandle,
    sessionmaker: SessionMaker,
    replicas: tuple[list[ServiceProcess], Path],
) -> None:
    _, clock = replicas
    workspace_id = f"ws-{uuid.uuid4().hex[:10]}"
    definition: dict[str, Any] = {
        "trigger": {"kind": "event", "event": "Trial Started"},
        "goal": {"event": "Upgraded"},
        "steps": [
            {"kind": "wait", "seconds": 3600},
            {
                "kind": "branch",
                "condition": {"kind": "trait", "name": "plan", "op": "eq", "value": "team"},
                "else": "solo",
            },
            {"kind": "send", "channel": "email", "template_id": str(EMAIL), "next": "end"},
            {"id": "solo", "kind": "send", "channel": "sms", "template_id": str(SMS)},
            {"id": "end", "kind": "exit"},
        ],
    }
    workflow_id = await create(sessionmaker, workspace_id, definition)
    people = {"team": {"plan": "team"}, "solo": {"plan": "solo"}, "buyer": {"plan": "team"}}
    producer = create_producer(stack.settings)
    await producer.start()
    try:
        await publish(
            producer,
            stack.settings,
            [contact_updated(workspace_id, user, T0, **traits) for user, traits in people.items()],
        )
        known = (
            sa.select(sa.func.count())
            .select_from(store.contacts)
            .where(store.contacts.c.workspace_id == workspace_id)
        )
        await eventually(lambda: _equals(sessionmaker, known, 3), what="the contacts' copies")
        await publish(
            producer,
            stack.settings,
            [track(workspace_id, user, "Trial Started", T0) for user in people],
        )
        await eventually(lambda: _equals(sessionmaker, runs_of(workflow_id), 3), what="3 runs")
        # version 2 while the three wait: a later trial gets push, theirs stay on version 1
        edited = {
            **definition,
            "steps": [{"kind": "send", "channel": "push", "template_id": str(SMS)}],
        }
        async with transaction(sessionmaker) as session:
            await store.update_workflow(
                session,
                workflow_id=workflow_id,
                definition=WorkflowDefinition.model_validate(edited),
            )
            assert await store.publish_workflow(session, workflow_id=workflow_id) == 2
        await publish(
            producer,
            stack.settings,
            [
                contact_updated(workspace_id, "late", T0),
                track(workspace_id, "late", "Trial Started", T0),
                track(workspace_id, "buyer", "Upgraded", T0 + timedelta(minutes=5)),
            ],
        )
        await eventually(lambda: _equals(sessionmaker, runs_of(workflow_id), 4), what="v2 run")
        await eventually(
            lambda: _equals(sessionmaker, sends_of(workflow_id), 1), what="v2's push at once"
        )
    finally:
        await producer.stop()
    team, solo, buyer, late = (_contact(workspace_id, u) for u in ("team", "solo", "buyer", "late"))
    set_file_clock(clock, T0 + timedelta(hours=1))
    await eventually(lambda: _equals(sessionmaker, sends_of(workflow_id), 3), what="the waits")
    assert await sent_to(sessionmaker, workflow_id) == sorted(
        [(late, "push", 0), (team, "email", 2), (solo, "sms", 3)]
    )
    async with transaction(sessionmaker) as session:
        runs = {
            row.contact_id: (row.version, row.status)
            for row in await session.execute(
                sa.select(store.runs).where(store.runs.c.workflow_id == workflow_id)
            )
        }
    assert runs == {
        team: (1, "exited"),
        solo: (1, "exited"),
        buyer: (1, "converted"),
        late: (2, "completed"),
    }
