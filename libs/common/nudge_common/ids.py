"""Deterministic identifiers: the same inputs always give the same UUID."""

from __future__ import annotations

import hashlib
import uuid

NUDGE_NAMESPACE = uuid.UUID("5b0f6c58-3f5e-4f0e-9d8e-6e7564676500")
_NAMESPACE_BYTES = NUDGE_NAMESPACE.bytes


def stable_id(*parts: str) -> uuid.UUID:
    return uuid.uuid5(NUDGE_NAMESPACE, "\x1f".join(parts))


def stable_id_str(*parts: str) -> str:
    """``str(stable_id(*parts))`` without building the :class:`uuid.UUID`: the same uuid5
    (SHA-1 of namespace and name, version and variant bits set), for hot paths."""
    name = _NAMESPACE_BYTES + "\x1f".join(parts).encode()
    digest = bytearray(hashlib.sha1(name, usedforsecurity=False).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
