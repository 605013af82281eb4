"""The Segment HTTP tracking API: ``/v1/track`` and friends, their short analytics.js
paths, and ``/v1/batch``. A 200 means Kafka acknowledged every event of the request."""

from __future__ import annotations

import asyncio
import zlib
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiokafka.errors import KafkaError
from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from nudge_common import codec
from nudge_common.events import EVENT_RECEIVED, SegmentType, Topic, encode_segment_event
from nudge_common.kafka import EncodedRecord, send_all
from nudge_common.service import Runtime, get_runtime
from nudge_ingest.api.auth import authenticate
from nudge_ingest.api.deps import IngestState, get_ingest_state
from nudge_ingest.api.errors import IngestError
from nudge_ingest.api.schemas import batch_body, call_body
from nudge_ingest.domain.calls import FieldError, SegmentCall, check_call, normalised_payload
from nudge_ingest.domain.network import client_ip
from nudge_ingest.domain.payload import unstorable
from nudge_ingest.metrics import EVENTS_ACCEPTED, KAFKA_UNAVAILABLE, REQUESTS_REJECTED
from nudge_ingest.settings import IngestSettings

MAX_EVENT_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024
MAX_BATCH_EVENTS = 2500
RETRY_AFTER_S = "2"

router = APIRouter(tags=["tracking"])


SUCCESS = b'{"success":true}'

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "invalid request; the body names the field"},
    401: {"description": "missing, unknown or disabled write key"},
    413: {"description": "body over the size limit"},
    429: {"description": "write key over its rate limit; see Retry-After"},
    503: {"description": "Kafka did not acknowledge in time; see Retry-After"},
}


# The hot paths avoid what costs per request without doing anything: the runtime and the
# ingest state are looked up directly, not declared as FastAPI dependencies (FastAPI runs a
# plain-function dependency in its thread pool, a thread hop per request), and the answer is
# prebuilt bytes. A request's parsed body, calls and payloads are dropped once its events are
# encoded (``*_records`` return): only bytes wait for Kafka's acknowledgement.


def _single(call_type: SegmentType) -> Any:
    async def endpoint(request: Request) -> Response:
        await publish_records(get_runtime(request), await single_records(request, call_type))
        return Response(SUCCESS, media_type="application/json")

    endpoint.__name__ = call_type.value
    return endpoint


for _type, _short in [
    (SegmentType.TRACK, "t"),
    (SegmentType.IDENTIFY, "i"),
    (SegmentType.PAGE, "p"),
    (SegmentType.SCREEN, "s"),
    (SegmentType.GROUP, "g"),
    (SegmentType.ALIAS, "a"),
]:
    _endpoint = _single(_type)
    router.add_api_route(
        f"/v1/{_type.value}",
        _endpoint,
        methods=["POST"],
        openapi_extra=call_body(_type),
        responses=ERROR_RESPONSES,
        response_model=dict[str, bool],
    )
    router.add_api_route(f"/v1/{_short}", _endpoint, methods=["POST"], include_in_schema=False)


@router.post(
    "/v1/batch",
    openapi_extra=batch_body(),
    responses=ERROR_RESPONSES,
    response_model=dict[str, bool],
)
@router.post("/v1/b", include_in_schema=False)
async def batch(request: Request) -> Response:
    """A batch is accepted or refused whole: one bad event refuses the request with the
    index and field of every bad event, so the sender knows exactly what to fix."""
    await publish_records(get_runtime(request), await batch_records(request))
    return Response(SUCCESS, media_type="application/json")


@dataclass(frozen=True)
class Records:
    """A request's events encoded for Kafka: (key, value) pairs, and a count per type."""

    pairs: list[tuple[bytes, bytes]]
    types: Counter[str]


async def single_records(request: Request, call_type: SegmentType) -> Records:
    runtime, state = get_runtime(request), get_ingest_state(request)
    body = await read_json_object(request, limit=MAX_EVENT_BYTES)
    call = parse_call(body, call_type)
    workspace_id = await authenticate(
        request, call.write_key, state.write_keys, runtime.sessionmaker, state.rate_limiter
    )
    return encode_events(workspace_id, [(call, call_type)], sender(request, state))


async def batch_records(request: Request) -> Records:
    runtime, state = get_runtime(request), get_ingest_state(request)
    body = await read_json_object(request, limit=MAX_BATCH_BYTES)
    items = body.get("batch")
    if not isinstance(items, list) or not items:
        raise _invalid("batch must be a non-empty array", "batch")
    if len(items) > MAX_BATCH_EVENTS:
        REQUESTS_REJECTED.labels("too_large").inc()
        raise IngestError(
            400,
            f"a batch holds at most {MAX_BATCH_EVENTS} events",
            reason="too_large",
            field="batch",
        )
    shared = body.get("context")
    shared_context: dict[str, Any] = shared if isinstance(shared, dict) else {}
    calls: list[tuple[SegmentCall, SegmentType]] = []
    errors: list[dict[str, str | int]] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            errors.append({"index": index, "field": "batch", "message": "must be an object"})
            continue
        if len(codec.dumps(item)) > MAX_EVENT_BYTES:
            errors.append({"index": index, "field": "batch", "message": "event over 32 KB"})
            continue
        try:
            call_type = SegmentType(str(item.get("type")))
            own_context = item.get("context")
            context = {**shared_context, **(own_context if isinstance(own_context, dict) else {})}
            call = SegmentCall.model_validate({**item, "context": context})
        except ValueError as error:
            errors.extend({"index": index, **e} for e in _describe(error, "type"))
            continue
        errors.extend(
            {"index": index, "field": e.field, "message": e.message}
            for e in check_call(call, call_type)
        )
        calls.append((call, call_type))
    if errors:
        REQUESTS_REJECTED.labels("invalid").inc()
        raise IngestError(400, "invalid events in batch", reason="invalid", details=errors)
    body_key = body.get("writeKey") if isinstance(body.get("writeKey"), str) else None
    workspace_id = await authenticate(
        request, body_key, state.write_keys, runtime.sessionmaker, state.rate_limiter
    )
    return encode_events(workspace_id, calls, sender(request, state))


async def read_json_object(request: Request, *, limit: int) -> dict[str, Any]:
    """The body as a JSON object, whether sent as application/json or text/plain (what
    sendBeacon sends), gzipped or not, refusing anything over ``limit`` bytes."""
    raw = await request.body()
    if request.headers.get("content-encoding", "").lower() == "gzip":
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            raw = inflater.decompress(raw, limit + 1)
        except zlib.error as error:
            raise _invalid(f"body is not valid gzip: {error}", "body") from error
    if len(raw) > limit:
        REQUESTS_REJECTED.labels("too_large").inc()
        raise IngestError(
            413, f"request body over {limit // 1024} KB", reason="too_large", field="body"
        )
    try:
        body = codec.loads(raw)
    except codec.JSONDecodeError as error:
        raise _invalid(f"body is not valid JSON: {error}", "body") from error
    if not isinstance(body, dict):
        raise _invalid("body must be a JSON object", "body")
    problem = unstorable(raw, body)
    if problem:
        raise _invalid(problem.message, problem.field)
    return body


def parse_call(body: dict[str, Any], call_type: SegmentType) -> SegmentCall:
    try:
        call = SegmentCall.model_validate(body)
    except ValidationError as error:
        details = _describe(error, "body")
        REQUESTS_REJECTED.labels("invalid").inc()
        raise IngestError(
            400,
            str(details[0]["message"]),
            reason="invalid",
            field=str(details[0]["field"]),
            details=details,
        ) from error
    problems = check_call(call, call_type)
    if problems:
        raise _invalid_fields(problems)
    return call


@dataclass(frozen=True)
class Sender:
    """What ingest knows of a request's sender, worked out once per request."""

    received_at: datetime
    ip: str | None
    user_agent: str | None
    country: str | None


def sender(request: Request, state: IngestState) -> Sender:
    headers = request.headers
    ip = client_ip(
        request.client.host if request.client else None,
        forwarded_for=headers.get("x-forwarded-for"),
        real_ip=headers.get("x-real-ip"),
        trusted_proxies=state.settings.trusted_proxies,
    )
    return Sender(
        received_at=datetime.now(UTC),
        ip=ip,
        user_agent=headers.get("user-agent"),
        country=state.countries.country(ip) if state.countries else None,
    )


def encode_events(
    workspace_id: str, calls: list[tuple[SegmentCall, SegmentType]], who: Sender
) -> Records:
    """Each checked call enriched and encoded as its ``event.received`` envelope, keyed by
    the contact identity (``userId``, else ``anonymousId``). The envelope is encoded straight
    from the payload (``encode_segment_event``): the bytes the ``Envelope`` model would give,
    without building the models."""
    pairs = []
    for call, call_type in calls:
        event = normalised_payload(
            call,
            call_type,
            received_at=who.received_at,
            client_ip=who.ip,
            user_agent=who.user_agent,
            country=who.country,
        )
        identity: str = event["userId"] or event["anonymousId"]
        pairs.append((identity.encode(), encode_segment_event(workspace_id, event)))
    return Records(pairs, Counter(call_type.value for _, call_type in calls))


async def publish_records(runtime: Runtime, records: Records) -> None:
    """Send the records and return once Kafka acknowledged every one; 503 when it does not
    within the produce timeout."""
    settings = runtime.settings
    assert isinstance(settings, IngestSettings)
    topic = settings.topic(Topic.EVENTS)
    producer = runtime.producer
    try:
        async with asyncio.timeout(settings.produce_timeout_s):
            await send_all(
                producer,
                [
                    EncodedRecord(topic, key, value, EVENT_RECEIVED.name)
                    for key, value in records.pairs
                ],
            )
    except (TimeoutError, KafkaError) as error:
        KAFKA_UNAVAILABLE.inc()
        raise IngestError(
            503,
            "events could not be stored right now, retry later",
            reason="unavailable",
            headers={"Retry-After": RETRY_AFTER_S},
        ) from error
    for call_type, count in records.types.items():
        EVENTS_ACCEPTED.labels(call_type).inc(count)


def _describe(error: ValueError, default_field: str) -> list[dict[str, str | int]]:
    if isinstance(error, ValidationError):
        return [
            {
                "field": ".".join(str(part) for part in item["loc"]) or default_field,
                "message": f"{'.'.join(str(p) for p in item['loc']) or default_field}: "
                f"{item['msg']}",
            }
            for item in error.errors()
        ]
    return [{"field": default_field, "message": f"{default_field}: {error}"}]


def _invalid(message: str, field: str) -> IngestError:
    REQUESTS_REJECTED.labels("invalid").inc()
    return IngestError(400, message, reason="invalid", field=field)


def _invalid_fields(problems: list[FieldError]) -> IngestError:
    REQUESTS_REJECTED.labels("invalid").inc()
    return IngestError(
        400,
        problems[0].message,
        reason="invalid",
        field=problems[0].field,
        details=[{"field": p.field, "message": p.message} for p in problems],
    )
