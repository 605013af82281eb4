"""Deterministic identifiers: the same inputs always give the same UUID."""

from __future__ import annotations

import uuid

NUDGE_NAMESPACE = uuid.UUID("5b0f6c58-3f5e-4f0e-9d8e-6e7564676500")


def stable_id(*parts: str) -> uuid.UUID:
    return uuid.uuid5(NUDGE_NAMESPACE, "\x1f".join(parts))
