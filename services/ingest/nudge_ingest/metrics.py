"""Ingest's business metrics."""

from __future__ import annotations

from prometheus_client import Counter

EVENTS_ACCEPTED = Counter(
    "nudge_ingest_events_accepted_total",
    "Events acknowledged by Kafka and answered 200, by Segment call type.",
    ["type"],
)
REQUESTS_REJECTED = Counter(
    "nudge_ingest_requests_rejected_total",
    "Requests refused before publishing, by reason (invalid, unauthorized, too_large, "
    "rate_limited).",
    ["reason"],
)
KAFKA_UNAVAILABLE = Counter(
    "nudge_ingest_kafka_unavailable_total",
    "Requests answered 503 because Kafka did not acknowledge in time.",
)
