from __future__ import annotations

import uuid

from nudge_orchestrator.domain.workflows import WorkflowDefinition, run_steps


def test_each_send_step_gets_a_key_unique_to_run_and_step() -> None:
    template = uuid.uuid4()
    definition = WorkflowDefinition.model_validate(
        {
            "trigger": {"kind": "segment_entered", "segment_id": str(uuid.uuid4())},
            "steps": [
                {"kind": "send", "channel": "email", "template_id": str(template)},
                {"kind": "send", "channel": "email", "template_id": str(template)},
            ],
        }
    )
    run = uuid.uuid4()
    sends = run_steps(definition, run)
    assert [s.idempotency_key for s in sends] == [f"{run}:0", f"{run}:1"]
    assert run_steps(definition, run) == sends
