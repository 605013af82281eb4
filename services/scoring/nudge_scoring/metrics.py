"""Scoring's business metrics."""

from __future__ import annotations

from prometheus_client import Counter

EVENTS_STORED = Counter(
    "nudge_scoring_events_stored_total",
    "Events stored for a contact, by Segment call type.",
    ["type"],
)
CONTACTS_CREATED = Counter("nudge_scoring_contacts_created_total", "Contacts created.")
SCORE_CHANGES = Counter(
    "nudge_scoring_score_changes_total", "Score changes applied, by scoring model.", ["model"]
)
