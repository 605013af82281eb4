"""The sunset job: addresses whose silence rule falls due (no open or click for the
configured days over the configured sends) are sunset. Durable and shared by every
replica: the due time is a column (``address_health.silence_due_at``, indexed), set as
sends are recorded and cleared by engagement; each round takes the due rows with
``SKIP LOCKED`` in one transaction and publishes the events before committing."""

from __future__ import annotations

from datetime import UTC, datetime

from nudge_common.db import transaction
from nudge_common.kafka import publish
from nudge_common.service import Runtime
from nudge_common.worker import PollingWorker
from nudge_notifier import feedback
from nudge_notifier.settings import NotifierSettings


async def sunset_round(runtime: Runtime, settings: NotifierSettings) -> int:
    async with transaction(runtime.sessionmaker) as session:
        looked_at, messages = await feedback.sunset_due(
            session, settings, datetime.now(UTC), settings.sunset_batch
        )
        await publish(runtime.producer, runtime.settings, messages)
    return looked_at


def sunset_worker(runtime: Runtime, settings: NotifierSettings) -> PollingWorker:
    return PollingWorker(
        "notifier-sunset",
        lambda: sunset_round(runtime, settings),
        idle_s=settings.sunset_interval_s,
    )
