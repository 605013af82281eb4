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
PROVIDER_CALLS = Counter(
    "nudge_notifier_provider_calls_total",
    "Messages handed to a provider by outcome (sent, transient, permanent, unknown), after "
    "the in-batch retries.",
    ["provider", "outcome"],
)
PROVIDER_ATTEMPTS = Histogram(
    "nudge_notifier_provider_attempts",
    "Attempts a sent message needed within its batch (1 = first try).",
    ["provider"],
    buckets=(1, 2, 3, 5, 8),
)
SEND_DURATION = Histogram(
    "nudge_notifier_send_duration_seconds",
    "From the first attempt to the provider's acceptance, waits for limits included.",
    ["provider"],
    buckets=LATENCY_BUCKETS,
)
ENGAGEMENT = Counter(
    "nudge_notifier_engagement_total",
    "Feedback handled by the notifier: unsubscribed, bounced, complained, stop, delivered.",
    ["channel", "kind"],
)
