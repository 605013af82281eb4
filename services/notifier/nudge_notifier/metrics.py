"""Notifier's business metrics."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from nudge_common.metrics import LATENCY_BUCKETS

MESSAGES = Counter(
    "nudge_notifier_messages_total",
    "Notification requests by channel and outcome (sent, failed, skipped, unknown, duplicate).",
    ["channel", "outcome"],
)
END_TO_END_LATENCY = Histogram(
    "nudge_end_to_end_latency_seconds",
    "From the event's receivedAt at ingest to the message accepted by the provider.",
    ["channel"],
    buckets=LATENCY_BUCKETS,
)
