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
MERGES = Counter(
    "nudge_scoring_merges_total",
    "Contacts merged into another, by reason (identify, alias, email).",
    ["reason"],
)
EVENTS_DROPPED = Counter(
    "nudge_scoring_events_dropped_total",
    "Events not applied, by reason (unknown_contact: nudge-contact:<id> names a contact the "
    "workspace does not have, e.g. an erased one).",
    ["reason"],
)
STAGE_CHANGES = Counter(
    "nudge_scoring_stage_changes_total",
    "Lifecycle stage changes, by scoring model and the stage entered.",
    ["model", "stage"],
)
DECAYS = Counter(
    "nudge_scoring_decays_total", "Decay timers that took points from a contact.", ["model"]
)
TIMERS_FIRED = Counter(
    "nudge_scoring_timers_fired_total", "Durable decay timers claimed and handled when due."
)
IMPORTED_ROWS = Counter(
    "nudge_scoring_imported_rows_total",
    "CSV import rows turned into identify calls (imported) or refused with an error.",
    ["outcome"],
)
