"""Every topic the project uses, with its partition count and retention, and the command
that creates them: ``python -m nudge_common.topics ensure``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

from nudge_common.events import Topic
from nudge_common.settings import NudgeSettings

DAY_MS = 24 * 60 * 60 * 1000


@dataclass(frozen=True)
class TopicSpec:
    topic: Topic
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


TOPIC_SPECS: tuple[TopicSpec, ...] = (
    TopicSpec(Topic.EVENTS, 12, {"retention.ms": str(7 * DAY_MS)}),
    TopicSpec(Topic.CONTACTS, 12, {"retention.ms": str(7 * DAY_MS)}),
    TopicSpec(Topic.MEMBERSHIPS, 12, {"retention.ms": str(7 * DAY_MS)}),
    TopicSpec(Topic.NOTIFICATIONS, 12, {"retention.ms": str(7 * DAY_MS)}),
    TopicSpec(Topic.DELIVERIES, 12, {"retention.ms": str(7 * DAY_MS)}),
    TopicSpec(Topic.DEAD_LETTER, 6, {"retention.ms": str(30 * DAY_MS)}),
    TopicSpec(Topic.CONFIG, 6, {"cleanup.policy": "compact"}),
)


async def ensure_topics(
    settings: NudgeSettings,
    *,
    replication_factor: int = 1,
    min_insync_replicas: int | None = None,
    deadline_s: float = 60.0,
) -> list[str]:
    """Create the missing topics; returns the names it created. Waits for the broker.

    On a cluster, ``replication_factor=3, min_insync_replicas=2`` makes an acknowledged
    write (``acks=all``) survive the loss of any one broker, and refuses writes rather than
    acknowledge them on a single copy."""
    extra = {} if min_insync_replicas is None else {"min.insync.replicas": str(min_insync_replicas)}
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await _start_with_deadline(admin, deadline_s)
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(
                name=settings.topic(spec.topic),
                num_partitions=spec.partitions,
                replication_factor=replication_factor,
                topic_configs={**spec.config, **extra},
            )
            for spec in TOPIC_SPECS
            if settings.topic(spec.topic) not in existing
        ]
        if wanted:
            # Another process may create them in between; the goal is met all the same.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
        return [topic.name for topic in wanted]
    finally:
        await admin.close()


async def delete_topics(settings: NudgeSettings) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        names = [settings.topic(s.topic) for s in TOPIC_SPECS]
        await admin.delete_topics([n for n in names if n in existing])
    finally:
        await admin.close()


async def _start_with_deadline(admin: AIOKafkaAdminClient, deadline_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while True:
        try:
            await admin.start()
            return
        except KafkaConnectionError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m nudge_common.topics")
    parser.add_argument("command", choices=["ensure"])
    parser.add_argument("--replication-factor", type=int, default=1)
    parser.add_argument("--min-insync-replicas", type=int, default=None)
    args = parser.parse_args()
    settings = NudgeSettings()
    created = asyncio.run(
        ensure_topics(
            settings,
            replication_factor=args.replication_factor,
            min_insync_replicas=args.min_insync_replicas,
        )
    )
    for spec in TOPIC_SPECS:
        name = settings.topic(spec.topic)
        state = "created" if name in created else "exists"
        print(f"topic {name:<28} partitions={spec.partitions:<3} {state}")


if __name__ == "__main__":
    main()
