"""Workspace messaging settings: frequency caps across all workflows and quiet hours."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from nudge_common.events import Channel
from nudge_orchestrator import store
from nudge_orchestrator.api.deps import Reader, SessionDep, Writer

router = APIRouter(prefix="/api/v1/messaging-settings", tags=["messaging settings"])

HHMM = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"


class QuietHoursIn(BaseModel):
    start: str = Field(pattern=HHMM)
    end: str = Field(pattern=HHMM)


Cap = Annotated[int, Field(ge=0, le=10_000)]
"""Messages per contact and window (0: none on that channel)."""


class MessagingSettings(BaseModel):
    caps: dict[Channel, dict[Literal["per_day", "per_week"], Cap]] = Field(default_factory=dict)
    quiet_hours: QuietHoursIn | None = None


@router.get("")
async def get_settings(db: SessionDep, principal: Reader) -> dict[str, Any]:
    caps, quiet = await store.get_messaging_settings(db, workspace_id=principal.workspace_id)
    return {"caps": caps, "quiet_hours": quiet}


@router.put("")
async def put_settings(
    body: MessagingSettings, db: SessionDep, principal: Writer
) -> dict[str, Any]:
    data = body.model_dump(mode="json")
    await store.put_messaging_settings(
        db, workspace_id=principal.workspace_id, caps=data["caps"], quiet_hours=data["quiet_hours"]
    )
    return data
