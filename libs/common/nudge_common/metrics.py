"""Metrics every service shares (HTTP, consumer runner), the ``/metrics`` route, and the
ASGI middleware that times requests by route template. Each service declares its own
business metrics in its ``metrics.py``; all names start with ``nudge_``."""

from __future__ import annotations

import os
import time

from fastapi import APIRouter, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
if os.environ.get(MULTIPROC_DIR_VARIABLE):
    # Multiprocess mode writes each metric to a file there as soon as it is declared.
    os.makedirs(os.environ[MULTIPROC_DIR_VARIABLE], exist_ok=True)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HTTP_REQUESTS = Counter(
    "nudge_http_requests_total",
    "HTTP requests answered, by route template and status code.",
    ["method", "route", "status"],
)
HTTP_REQUEST_DURATION = Histogram(
    "nudge_http_request_duration_seconds",
    "Time from request received to response sent, by route template.",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
)

CONSUMER_MESSAGES = Counter(
    "nudge_consumer_messages_total",
    "Messages a consumer handled, by outcome: applied, duplicate (already applied before), "
    "dead_lettered, passed_over (a type the consumer does not read).",
    ["consumer", "topic", "outcome"],
)
CONSUMER_BATCH_SIZE = Histogram(
    "nudge_consumer_batch_size",
    "Records per polled batch.",
    ["consumer"],
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
)
CONSUMER_BATCH_DURATION = Histogram(
    "nudge_consumer_batch_duration_seconds",
    "Time to apply one batch: decode, effects, produce, database commit, offset commit.",
    ["consumer"],
    buckets=LATENCY_BUCKETS,
)
CONSUMER_RECORD_AGE = Histogram(
    "nudge_consumer_record_age_seconds",
    "How long the oldest record of a batch had been on its topic (by the timestamp its "
    "producer gave it) when the consumer took the batch: how far behind real time the "
    "consumer is, backlog included.",
    ["consumer"],
    buckets=(*LATENCY_BUCKETS, 30.0, 60.0, 300.0, 900.0, 3600.0),
)
CONSUMER_RETRIES = Counter(
    "nudge_consumer_retries_total",
    "Batches retried after a transient failure (back-pressure), by error type.",
    ["consumer", "error"],
)
CONSUMER_BATCH_FALLBACKS = Counter(
    "nudge_consumer_batch_fallbacks_total",
    "Batches a batch handler could not apply as a whole, applied message by message instead "
    "(a bad message in the batch, usually), by error type.",
    ["consumer", "error"],
)
CONSUMER_LAG = Gauge(
    "nudge_consumer_lag_messages",
    "Messages on the partition not yet committed by this consumer.",
    ["consumer", "topic", "partition"],
)
DEAD_LETTERS = Counter(
    "nudge_dead_letters_total",
    "Messages sent to the dead-letter topic, by source topic and error type.",
    ["consumer", "topic", "error"],
)

DB_QUERY_DURATION = Histogram(
    "nudge_db_query_duration_seconds",
    "Time of one SQL statement, from sent to result, by statement kind (select, insert, ...).",
    ["statement"],
    buckets=LATENCY_BUCKETS,
)
DB_POOL_CHECKED_OUT = Gauge(
    "nudge_db_pool_checked_out_connections",
    "Connections of the service's pool in use right now.",
    multiprocess_mode="livesum",
)
DB_POOL_SIZE = Gauge(
    "nudge_db_pool_size_connections",
    "Connections the pool holds open (in use or idle).",
    multiprocess_mode="livesum",
)

metrics_router = APIRouter()


def multiprocess_mode() -> bool:
    """Several worker processes serve one port (``run --workers N``): each writes its
    metrics to files in ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` adds them all up."""
    return bool(os.environ.get(MULTIPROC_DIR_VARIABLE))


@metrics_router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    registry = REGISTRY
    if multiprocess_mode():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class HttpMetricsMiddleware:
    """Counts and times every HTTP request by its route template (``/v1/track``, not the
    concrete path, so label cardinality stays bounded)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            method = scope["method"]
            HTTP_REQUESTS.labels(method, template, str(status)).inc()
            HTTP_REQUEST_DURATION.labels(method, template).observe(time.perf_counter() - started)
