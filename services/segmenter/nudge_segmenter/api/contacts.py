"""What the segmenter knows of one contact, for the 360 view: the segments and lists it is
in, its customer value (orders, revenue, RFM scores and cells, CLV)."""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException

from nudge_common.internal_api import SessionDep, WorkspaceDep
from nudge_common.rfm import CELL_NAMES, MATRIX_AXES, level
from nudge_segmenter import store

router = APIRouter(prefix="/api/v1", tags=["contacts"])


@router.get("/contacts/{contact_id}/segments")
async def contact_segments(
    contact_id: uuid.UUID, session: SessionDep, workspace: WorkspaceDep
) -> dict[str, Any]:
    contact = (
        await session.execute(
            sa.select(store.contacts).where(
                store.contacts.c.contact_id == contact_id,
                store.contacts.c.workspace_id == workspace,
            )
        )
    ).first()
    if contact is None:
        raise HTTPException(404, detail=f"contact_id: the segmenter knows no contact {contact_id}")
    rows = await session.execute(
        sa.select(
            store.segments.c.id,
            store.segments.c.name,
            store.segments.c.kind,
            store.memberships.c.entered_at,
        )
        .join(store.segments, store.segments.c.id == store.memberships.c.segment_id)
        .where(store.memberships.c.contact_id == contact_id)
        .order_by(store.memberships.c.entered_at)
    )
    rfm = (
        {
            "recency": contact.rfm_recency,
            "frequency": contact.rfm_frequency,
            "monetary": contact.rfm_monetary,
        }
        if contact.rfm_recency is not None
        else None
    )
    return {
        "contact_id": contact_id,
        "segments": [
            {"id": r.id, "name": r.name, "kind": r.kind, "entered_at": r.entered_at} for r in rows
        ],
        "value": {
            "orders": contact.orders,
            "revenue": contact.revenue,
            "average_order_value": contact.revenue / contact.orders if contact.orders else None,
            "first_order_at": contact.first_order_at,
            "last_order_at": contact.last_order_at,
            "rfm": rfm,
            "rfm_cells": None
            if rfm is None
            else {
                matrix: CELL_NAMES[matrix][(level(rfm[x]), level(rfm[y]))]
                for matrix, (x, y) in MATRIX_AXES.items()
            },
            "clv": contact.clv,
            "p_alive": contact.p_alive,
            "expected_purchases": contact.expected_purchases,
        },
        "last_seen_at": contact.last_seen_at,
    }
