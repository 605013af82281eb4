"""Triggers from scoring's contacts topic: a score crossing a threshold, a lifecycle stage
change, and a date trait (a birthday at 9:00 in the contact's timezone, every year) driven
by durable per-contact timers on the hand clock."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa

from nudge_common.db import transaction
from nudge_common.events import CONTACT_STAGE_CHANGED, ContactStageChanged
from nudge_orchestrator import store
from nudge_orchestrator.consumer import ContactHandler
from nudge_orchestrator.domain.workflows import WorkflowDefinition
from tests.services.orchestrator.conftest import Engine

TEMPLATE = uuid.uuid4()
SEND = {"kind": "send", "channel": "email", "template_id": str(TEMPLATE)}


async def test_a_score_crossing_its_threshold_upwards_starts_the_workflow(engine: Engine) -> None:
    workflow = await engine.workflow(
        {
            "trigger": {"kind": "score_crossed", "model": "default", "threshold": 50},
            "entry": {"rule": "every_time"},
            "steps": [SEND],
        }
    )
    contact = await engine.update("hot-1", {"default": 30})
    assert await engine.runs(workflow) == []  # 0 -> 30: below
    await engine.update("hot-1", {"default": 55})
    [run] = await engine.runs(workflow)  # 30 -> 55: crossed
    assert run.contact_id == contact
    await engine.update("hot-1", {"default": 70}, plan="pro")
    assert len(await engine.runs(workflow)) == 1  # 55 -> 70: already above
    await engine.update("hot-1", {"default": 40})
    await engine.update("hot-1", {"default": 50})
    assert len(await engine.runs(workflow)) == 2  # down, then up again: crossed again
    assert await engine.sent(workflow) == [("email", 0), ("email", 0)]


async def test_a_score_crossing_downwards(engine: Engine) -> None:
    workflow = await engine.workflow(
        {
            "trigger": {
                "kind": "score_crossed",
                "model": "engagement",
                "threshold": 20,
                "direction": "down",
            },
            "steps": [SEND],
        }
    )
    await engine.update("cold-1", {"engagement": 25, "default": 5})
    await engine.update("cold-1", {"engagement": 25, "default": 1})
    assert await engine.runs(workflow) == []
    await engine.update("cold-1", {"engagement": 10, "default": 1})
    assert len(await engine.runs(workflow)) == 1


async def test_a_lifecycle_stage_change_starts_the_workflow_for_its_stage(engine: Engine) -> None:
    workflow = await engine.workflow(
        {
            "trigger": {"kind": "stage_changed", "model": "default", "to": "MQL", "from": "lead"},
            "steps": [SEND],
        }
    )
    contact = await engine.contact("stage-1")

    async def stage(previous: str | None, new: str) -> None:
        await engine.apply(
            ContactHandler(engine.clock),
            CONTACT_STAGE_CHANGED.envelope(
                workspace_id=engine.workspace_id,
                payload=ContactStageChanged(
                    contact_id=contact,
                    model="default",
                    previous_stage=previous,
                    stage=new,
                    score=60,
                    at=engine.now,
                ),
                occurred_at=engine.now,
            ),
        )

    await stage(None, "MQL")  # not from "lead"
    await stage("MQL", "SQL")  # not to "MQL"
    assert await engine.runs(workflow) == []
    await stage("lead", "MQL")
    [run] = await engine.runs(workflow)
    assert run.contact_id == contact
    assert await engine.sent(workflow) == [("email", 0)]


async def date_triggers(engine: Engine, workflow: uuid.UUID) -> list[datetime]:
    async with transaction(engine.sessionmaker) as session:
        rows = await session.execute(
            sa.select(store.date_triggers.c.due_at).where(
                store.date_triggers.c.workflow_id == workflow
            )
        )
        return sorted(row.due_at for row in rows)


async def test_a_birthday_workflow_fires_at_nine_local_time_every_year(engine: Engine) -> None:
    # engine.now is Monday 2030-03-04 12:00 UTC
    workflow = await engine.workflow(
        {
            "trigger": {"kind": "date_trait", "trait": "birthday", "hour": 9},
            "entry": {"rule": "every_time"},
            "steps": [SEND],
        }
    )
    await engine.contact("bday-1", birthday="1990-03-09", timezone="America/New_York")
    # learned: the next 9 March, 9:00 in New York (EST, UTC-5)
    assert await date_triggers(engine, workflow) == [datetime(2030, 3, 9, 14, 0, tzinfo=UTC)]
    # the trait changes: rescheduled, not doubled
    await engine.contact("bday-1", birthday="1990-03-11", timezone="America/New_York")
    assert await date_triggers(engine, workflow) == [datetime(2030, 3, 11, 13, 0, tzinfo=UTC)]
    # (13:00 UTC: New York is on daylight time (UTC-4) from 10 March 2030)
    # (other tests' timers share the database: counts are of this workflow's effects)
    engine.now = datetime(2030, 3, 11, 12, 59, tzinfo=UTC)
    await engine.fire()
    assert await engine.sent(workflow) == []
    engine.now = datetime(2030, 3, 11, 13, 0, 5, tzinfo=UTC)
    await engine.fire()
    assert await engine.sent(workflow) == [("email", 0)]
    # rescheduled for next year, and only that
    assert await date_triggers(engine, workflow) == [datetime(2031, 3, 11, 13, 0, tzinfo=UTC)]
    await engine.fire()
    assert len(await engine.sent(workflow)) == 1
    engine.now = datetime(2031, 3, 11, 13, 0, tzinfo=UTC)
    await engine.fire()
    assert [r.status for r in await engine.runs(workflow)] == ["completed", "completed"]
    assert len(await engine.sent(workflow)) == 2


async def test_a_date_workflow_published_later_schedules_known_contacts_with_an_offset(
    engine: Engine,
) -> None:
    await engine.contact("renew-1", renewal_date="2030-04-01T00:00:00Z")
    await engine.contact("renew-2", renewal_date="not a date")
    await engine.contact("renew-3")
    workflow = uuid.uuid4()
    async with transaction(engine.sessionmaker) as session:
        await store.create_workflow(
            session,
            workspace_id=engine.workspace_id,
            workflow_id=workflow,
            name="renewal",
            definition=WorkflowDefinition.model_validate(
                {
                    "trigger": {
                        "kind": "date_trait",
                        "trait": "renewal_date",
                        "offset_days": -7,
                        "hour": 10,
                        "yearly": False,
                    },
                    "steps": [SEND],
                }
            ),
            now=engine.now,
        )
    # seven days before, 10:00 UTC (no timezone trait); one-off: nothing after it fires
    assert await date_triggers(engine, workflow) == [datetime(2030, 3, 25, 10, 0, tzinfo=UTC)]
    engine.now = datetime(2030, 3, 25, 10, 0, tzinfo=UTC)
    await engine.fire()
    assert await engine.sent(workflow) == [("email", 0)]
    assert await date_triggers(engine, workflow) == []
