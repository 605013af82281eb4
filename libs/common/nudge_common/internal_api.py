"""Dependencies of the services' internal HTTP APIs (scoring, segmenter): a session in a
transaction per request, the workspace the orchestrator's authenticated front names
in the ``X-Nudge-Workspace`` header, and the page size of their lists."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Header, Query
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.db import transaction
from nudge_common.service import RuntimeDep


async def get_session(runtime: RuntimeDep) -> AsyncIterator[AsyncSession]:
    async with transaction(runtime.sessionmaker) as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]
WorkspaceDep = Annotated[str, Header(alias="X-Nudge-Workspace", min_length=1, max_length=200)]
PageLimit = Annotated[int, Query(ge=1, le=500)]
NEXT_AFTER_HEADER = "X-Next-After"
"""Where a list answered as a bare JSON array puts its cursor: the ``after`` of the next
page, absent on the last one."""
