from __future__ import annotations

from pydantic import Field

from nudge_common.settings import NudgeSettings


class ScoringSettings(NudgeSettings):
    service_name: str = "scoring"
    http_port: int = 8002
    consumer_batch_max_records: int = Field(default=1000, ge=1)
    """Up to 1,000 events a batch (500 elsewhere): with a backlog, a batch of 1,000 cost
    ~20% less PostgreSQL CPU per event than one of 500 and ~5% less in the process (the
    batch's statements and commit are shared by twice the events); 2,000 saved no more."""
    events_consumers: int = Field(default=4, ge=1)
    """Consumers of the events topic in one process, members of the one ``scoring`` group:
    while some wait for PostgreSQL or Kafka, another applies its batch. With two, the
    event loop was idle a third of the time (both waiting at once); four took 150,000
    events at 5,112-5,119 events/s instead of 4,445-4,634 (three: 4,990), the same CPU
    per event, no lock waits between them."""
    gc_young_threshold: int = Field(default=500_000, ge=1)
    """Ten times the other services': a batch of 1,000 events allocates a few hundred
    thousand containers, most of them alive until the batch ends (rows, states, outputs) and
    then freed by reference counting. At 50,000 the collector walked the batch in hand
    several times a batch, ~10% of the CPU per event (``gc.callbacks``, in process); at
    500,000, about once every two batches."""
