"""Scoring's internal HTTP API under ``/api/v1``.

Internal: it has no authentication of its own and trusts the ``X-Nudge-Workspace`` header.
It is meant to sit behind the orchestrator's authenticated marketer API (issue 7), which
will authenticate the marketer, resolve the workspace and forward here. Until then, bind it
to a private address only.
"""

from __future__ import annotations

from nudge_scoring.api.contacts import router as contacts_router
from nudge_scoring.api.models import router as models_router

routers = [models_router, contacts_router]
