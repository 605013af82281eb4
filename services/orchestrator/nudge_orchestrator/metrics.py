"""Orchestrator's business metrics, each with its meaning."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RUNS_STARTED = Counter("nudge_orchestrator_runs_started_total", "Workflow runs started.")
ENTRIES_REFUSED = Counter(
    "nudge_orchestrator_entries_refused_total",
    "Triggers that did not start a run: the entry rule (once, cooldown, one at a time) refused.",
)
RUNS_FINISHED = Counter(
    "nudge_orchestrator_runs_finished_total",
    "Runs that ended, by how: completed, exited, converted (goal), cancelled.",
    ["status"],
)
MESSAGES_REQUESTED = Counter(
    "nudge_orchestrator_messages_requested_total",
    "Notification requests published, by channel.",
    ["channel"],
)
MESSAGES_CAPPED = Counter(
    "nudge_orchestrator_messages_capped_total",
    "Send steps skipped because the contact reached a frequency cap, by channel.",
    ["channel"],
)
MESSAGES_DEFERRED = Counter(
    "nudge_orchestrator_messages_deferred_total",
    "Send steps postponed to the end of the contact's quiet hours.",
)
TIMERS_SCHEDULED = Counter(
    "nudge_orchestrator_timers_scheduled_total",
    "Waits written to the timers table, by step kind.",
    ["kind"],
)
TIMERS_FIRED = Counter(
    "nudge_orchestrator_timers_fired_total",
    "Due timers claimed and executed, by timer kind (wait, event timeout, quiet).",
    ["kind"],
)
TIMER_LAG = Histogram(
    "nudge_orchestrator_timer_lag_seconds",
    "From a timer's due time to its execution.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)
ACTIONS = Counter(
    "nudge_orchestrator_actions_total",
    "Action steps executed (tag, set_traits, adjust_score, webhook, notify_sales), by outcome:"
    " requested, or no_user_id (a Segment call needs the contact's user id).",
    ["action", "outcome"],
)
WEBHOOK_ATTEMPTS = Counter(
    "nudge_orchestrator_webhook_attempts_total",
    "Webhook calls attempted, by result: delivered, retry (will try again), failed (gave up).",
    ["result"],
)
BROADCAST_MEMBERS = Counter(
    "nudge_orchestrator_broadcast_members_total",
    "Members of a broadcast's segment or list handed to its workflow (a message each, unless"
    " capped, deferred by quiet hours, or the member was handed over before).",
)
BROADCAST_WINNERS = Counter(
    "nudge_orchestrator_broadcast_winners_total",
    "A/B broadcasts whose winner was chosen, by reason: significant (the z-test), deadline"
    " (decide_after_s passed: the best so far).",
    ["reason"],
)
