"""Analytics across workflows: per segment (or static list), what the runs it started did,
whichever workflow or broadcast they belong to. Per workflow, step and variant:
``GET /api/v1/workflows/{id}/analytics``."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter

from nudge_orchestrator import store
from nudge_orchestrator.api.deps import Reader, SessionDep
from nudge_orchestrator.domain import analytics

router = APIRouter(prefix="/api/v1/analytics", tags=["analytics"])


@router.get("/segments/{segment_id}")
async def segment_analytics(
    segment_id: uuid.UUID, db: SessionDep, principal: Reader
) -> dict[str, Any]:
    """Runs started by entering or leaving the segment (segment triggers) or by a broadcast
    to it: entered, completed, converted; messages requested, sent, delivered, opened,
    clicked, unsubscribed, bounced, complained; open rate, CTR, conversion rate; in total
    and per workflow (``kind``: ``workflow`` or ``broadcast``). A segment nothing ran for
    has zeros."""
    counts = await store.segment_counts(
        db, workspace_id=principal.workspace_id, segment_id=segment_id
    )
    total, per_workflow = analytics.grouped_report(counts.runs, counts.sends, counts.deliveries)
    workflows = []
    for workflow_id, (name, kind) in sorted(counts.workflows.items(), key=lambda i: i[1][0]):
        broadcast = kind == "broadcast"
        workflows.append(
            {
                "workflow_id": None if broadcast else str(workflow_id),
                "broadcast_id": str(workflow_id) if broadcast else None,
                "kind": "broadcast" if broadcast else "workflow",
                "name": name.removeprefix("broadcast: ") if broadcast else name,
                **per_workflow[workflow_id],
            }
        )
    return {"segment_id": str(segment_id), **total, "workflows": workflows}
