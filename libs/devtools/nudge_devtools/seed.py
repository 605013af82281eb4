"""A workspace with the walking skeleton's definitions: a write key, the rule
"Viewed Pricing = +20" in the "lead" model, the segment "lead score >= 50", a welcome
email template and the workflow "on entering the segment, send the welcome email".

Each definition is written through the store of the service that owns it."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from nudge_common.conditions import ScoreAtLeast
from nudge_common.db import create_engine, create_sessionmaker, transaction
from nudge_common.ids import stable_id
from nudge_common.settings import NudgeSettings
from nudge_ingest import store as ingest_store
from nudge_notifier import store as notifier_store
from nudge_notifier.domain.templates import Template
from nudge_orchestrator import store as orchestrator_store
from nudge_orchestrator.domain.workflows import SegmentEntered, SendMessage, WorkflowDefinition
from nudge_scoring import store as scoring_store
from nudge_scoring.domain.scoring import Rule
from nudge_segmenter import store as segmenter_store

PRICING_POINTS = 20
QUALIFIED_SCORE = 50

WELCOME_HTML = """<html><body>
<p>Hello {{ contact.traits.name | default("there") }},</p>
<p>You have been looking at our pricing: here is what our plans can do for you.</p>
</body></html>"""
WELCOME_TEXT = """Hello {{ contact.traits.name | default("there") }},

You have been looking at our pricing: here is what our plans can do for you.
"""


@dataclass(frozen=True)
class SeededWorkspace:
    workspace_id: str
    write_key: str
    rule_id: uuid.UUID
    segment_id: uuid.UUID
    template_id: uuid.UUID
    workflow_id: uuid.UUID


async def seed_workspace(
    settings: NudgeSettings, workspace_id: str, write_key: str
) -> SeededWorkspace:
    seeded = SeededWorkspace(
        workspace_id=workspace_id,
        write_key=write_key,
        rule_id=stable_id(workspace_id, "rule", "viewed-pricing"),
        segment_id=stable_id(workspace_id, "segment", "qualified-leads"),
        template_id=stable_id(workspace_id, "template", "welcome"),
        workflow_id=stable_id(workspace_id, "workflow", "welcome-qualified-leads"),
    )
    engine = create_engine(settings)
    sessionmaker = create_sessionmaker(engine)
    try:
        async with transaction(sessionmaker) as session:
            await ingest_store.put_write_key(session, key=write_key, workspace_id=workspace_id)
            await scoring_store.create_rule(
                session,
                workspace_id=workspace_id,
                rule=Rule(seeded.rule_id, "lead", "Viewed Pricing", PRICING_POINTS),
            )
            await segmenter_store.create_segment(
                session,
                workspace_id=workspace_id,
                segment_id=seeded.segment_id,
                name="Qualified leads",
                condition=ScoreAtLeast(kind="score", model="lead", op="gte", value=QUALIFIED_SCORE),
            )
            await notifier_store.create_template(
                session,
                workspace_id=workspace_id,
                template=Template(
                    id=seeded.template_id,
                    name="welcome",
                    channel="email",
                    subject='Welcome, {{ contact.traits.name | default("there") }}!',
                    html=WELCOME_HTML,
                    text=WELCOME_TEXT,
                ),
            )
            await orchestrator_store.create_workflow(
                session,
                workspace_id=workspace_id,
                workflow_id=seeded.workflow_id,
                name="Welcome qualified leads",
                definition=WorkflowDefinition(
                    trigger=SegmentEntered(kind="segment_entered", segment_id=seeded.segment_id),
                    steps=[
                        SendMessage(kind="send", channel="email", template_id=seeded.template_id)
                    ],
                ),
            )
    finally:
        await engine.dispose()
    return seeded
