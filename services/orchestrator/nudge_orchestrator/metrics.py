"""Orchestrator's business metrics."""

from __future__ import annotations

from prometheus_client import Counter

RUNS_STARTED = Counter("nudge_orchestrator_runs_started_total", "Workflow runs started.")
MESSAGES_REQUESTED = Counter(
    "nudge_orchestrator_messages_requested_total",
    "Notification requests published, by channel.",
    ["channel"],
)
