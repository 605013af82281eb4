"""Segmenter's business metrics."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

TRANSITIONS = Counter(
    "nudge_segmenter_transitions_total",
    "Segment membership transitions published, by direction (entered, exited).",
    ["direction"],
)
STALE_UPDATES = Counter(
    "nudge_segmenter_stale_updates_total",
    "Messages about a contact ignored because it had been merged away before they arrived.",
)
RECHECK_LAG = Histogram(
    "nudge_segmenter_recheck_lag_seconds",
    "From a time-driven recheck's due time to its re-evaluation.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
BACKFILL_SECONDS = Histogram(
    "nudge_segmenter_backfill_seconds",
    "Duration of a segment's backfill, from staging to hand-over.",
    buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 900),
)
