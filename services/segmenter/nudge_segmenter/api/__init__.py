"""Segmenter's internal HTTP API: ``/api/v1/segments...`` and
``/api/v1/contacts/{id}/segments`` (fronted by the orchestrator's
authenticated marketer API, workspace in ``X-Nudge-Workspace``) and
``/internal/v1/segments/{id}/members`` (for the orchestrator's broadcasts). It has no
authentication of its own: bind it to a private address."""

from __future__ import annotations

from nudge_segmenter.api.contacts import router as contacts_router
from nudge_segmenter.api.segments import internal, router

routers = [router, contacts_router, internal]
