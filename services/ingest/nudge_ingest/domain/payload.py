"""Values JSON can carry but the stores downstream cannot: the NUL character (PostgreSQL
text and JSONB refuse it) and integers beyond 64 bits. Refused at the edge with the field
named, rather than dead-lettered later. Pure."""

from __future__ import annotations

from typing import Any

from nudge_ingest.domain.calls import FieldError

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
_DIGITS_AS_ZERO = bytes.maketrans(b"0123456789", b"0000000000")
_LONG_NUMBER = b"0" * 19
"""19 digits in a row, once every digit reads ``0``: any integer beyond 64 bits has them."""


def unstorable(raw: bytes, body: Any) -> FieldError | None:
    """The first unstorable value of ``body`` (parsed from ``raw``), if any. The raw bytes
    are searched first, so the common body costs a few byte scans and no walk (a
    translation and a substring search: a regular expression was ten times slower)."""
    if b"\\u0000" not in raw and _LONG_NUMBER not in raw.translate(_DIGITS_AS_ZERO):
        return None
    return _walk(body, "")


def _walk(value: Any, path: str) -> FieldError | None:
    if isinstance(value, str):
        if "\x00" in value:
            return FieldError(path or "body", f"{path or 'body'}: the NUL character is not allowed")
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            return FieldError(path or "body", f"{path or 'body'}: integer outside 64-bit range")
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if "\x00" in str(key):
                return FieldError(where, f"{where}: the NUL character is not allowed in keys")
            found = _walk(item, where)
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _walk(item, f"{path}.{index}" if path else str(index))
            if found:
                return found
    return None
