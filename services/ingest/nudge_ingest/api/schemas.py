"""The request bodies of the tracking API as OpenAPI schemas. The routes read their bodies
by hand (JSON or text/plain, gzip or not), so FastAPI cannot infer them; these documents
tell clients, and schema-driven fuzzing, what a call looks like."""

from __future__ import annotations

from typing import Any

from nudge_common.events import SegmentType

_ID = {"type": "string", "minLength": 1, "maxLength": 255}
_OBJECT = {"type": "object", "additionalProperties": True}
_TIME = {"type": "string", "format": "date-time"}

_COMMON: dict[str, Any] = {
    "messageId": _ID,
    "userId": _ID,
    "anonymousId": _ID,
    "context": _OBJECT,
    "integrations": _OBJECT,
    "timestamp": _TIME,
    "sentAt": _TIME,
    "writeKey": {"type": "string"},
}
_BY_TYPE: dict[SegmentType, tuple[dict[str, Any], list[str]]] = {
    SegmentType.TRACK: ({"event": _ID, "properties": _OBJECT}, ["event"]),
    SegmentType.IDENTIFY: ({"traits": _OBJECT}, []),
    SegmentType.PAGE: ({"name": _ID, "category": _ID, "properties": _OBJECT}, []),
    SegmentType.SCREEN: ({"name": _ID, "category": _ID, "properties": _OBJECT}, []),
    SegmentType.GROUP: ({"groupId": _ID, "traits": _OBJECT}, ["groupId"]),
    SegmentType.ALIAS: ({"previousId": _ID}, ["previousId"]),
}


def call_schema(call_type: SegmentType) -> dict[str, Any]:
    own, required = _BY_TYPE[call_type]
    return {
        "type": "object",
        "description": "userId or anonymousId is required.",
        "properties": {**_COMMON, **own},
        "required": required,
    }


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        }
    }


def call_body(call_type: SegmentType) -> dict[str, Any]:
    return _body(call_schema(call_type))


def batch_body() -> dict[str, Any]:
    item = {
        "oneOf": [
            {
                **call_schema(call_type),
                "properties": {
                    **call_schema(call_type)["properties"],
                    "type": {"type": "string", "enum": [call_type.value]},
                },
                "required": ["type", *call_schema(call_type)["required"]],
            }
            for call_type in _BY_TYPE
        ]
    }
    return _body(
        {
            "type": "object",
            "properties": {
                "batch": {"type": "array", "items": item, "minItems": 1, "maxItems": 2500},
                "context": _OBJECT,
                "sentAt": _TIME,
                "writeKey": {"type": "string"},
            },
            "required": ["batch"],
        }
    )
