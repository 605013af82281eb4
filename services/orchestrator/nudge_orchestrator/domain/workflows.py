"""Workflow definitions (trigger -> steps) and what a run does. Pure.

The walking skeleton knows one trigger (a segment entered) and one step (send a message);
waits, branches and the rest of the step vocabulary build on the same shapes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from nudge_common.events import Channel


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SegmentEntered(_Node):
    kind: Literal["segment_entered"]
    segment_id: uuid.UUID


Trigger = Annotated[SegmentEntered, Field(discriminator="kind")]


class SendMessage(_Node):
    kind: Literal["send"]
    channel: Channel
    template_id: uuid.UUID


Step = Annotated[SendMessage, Field(discriminator="kind")]


class WorkflowDefinition(_Node):
    trigger: Trigger
    steps: list[Step] = Field(min_length=1)


@dataclass(frozen=True)
class Send:
    """A message the run must request, under a key the notifier sends at most once."""

    step: int
    idempotency_key: str
    channel: Channel
    template_id: uuid.UUID


def run_steps(definition: WorkflowDefinition, run_id: uuid.UUID) -> list[Send]:
    return [
        Send(index, idempotency_key(run_id, index), step.channel, step.template_id)
        for index, step in enumerate(definition.steps)
    ]


def idempotency_key(run_id: uuid.UUID, step: int) -> str:
    return f"{run_id}:{step}"
