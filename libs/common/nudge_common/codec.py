"""The JSON codec used on every wire: Kafka values and HTTP bodies alike."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel

JSONDecodeError = orjson.JSONDecodeError


def dumps(value: Any) -> bytes:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", by_alias=True, exclude_none=True)
    return orjson.dumps(value, option=orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS)


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)
