"""Dependencies of the services' internal HTTP APIs (scoring, segmenter): a session in a
transaction per request, and the workspace the orchestrator's authenticated front names
in the ``X-Nudge-Workspace`` header."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Header
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.db import transaction
from nudge_common.service import RuntimeDep


async def get_session(runtime: RuntimeDep) -> AsyncIterator[AsyncSession]:
    async with transaction(runtime.sessionmaker) as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]
WorkspaceDep = Annotated[str, Header(alias="X-Nudge-Workspace", min_length=1, max_length=200)]
