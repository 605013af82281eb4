"""Two orchestrator processes side by side on the real stack, on a clock the test moves: the
abandoned cart end to end (an order in time cancels the reminder), and a kill -9 of one
replica while due timers fire, with no step lost or doubled."""

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
    EVENT_RECEIVED,
    NOTIFICATION_REQUESTED,
    Envelope,
    SegmentEvent,
    Topic,
    segment_event_id,
)
from nudge_common.ids import stable_id
from nudge_common.kafka import OutgoingMessage, create_producer, publish
from nudge_devtools.pipeline import eventually, read_topic, wait_until_idle
from nudge_devtools.services import ServiceProcess, free_port
from nudge_orchestrator import store
from nudge_orchestrator.domain.workflows import WorkflowDefinition
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
