"""Segmenter's business metrics."""

from __future__ import annotations

from prometheus_client import Counter

TRANSITIONS = Counter(
    "nudge_segmenter_transitions_total",
    "Segment membership transitions published, by direction (entered, exited).",
    ["direction"],
)
STALE_UPDATES = Counter(
    "nudge_segmenter_stale_updates_total",
    "contact.updated messages ignored because their contact had been merged away before "
    "they arrived.",
)
