"""``make demo``: the five services as processes on the local stack, a fresh workspace,
sample events from three people, and the chain they caused, read back from Kafka and from
the SMTP sink that stands in for the mail provider."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from nudge_common import codec
from nudge_common.events import (
    CONTACT_UPDATED,
    DELIVERY_REPORTED,
    NOTIFICATION_REQUESTED,
    SEGMENT_ENTERED,
    SEGMENT_EXITED,
    Envelope,
    EventType,
    Topic,
)
from nudge_common.settings import NudgeSettings
from nudge_common.topics import ensure_topics
from nudge_devtools.pipeline import read_topic, wait_until_idle
from nudge_devtools.seed import PRICING_POINTS, QUALIFIED_SCORE, SeededWorkspace, seed_workspace
from nudge_devtools.services import Fleet, free_port, migrate_all
from nudge_devtools.smtp_sink import SmtpSink

REPO = Path(__file__).resolve().parents[3]
PEOPLE = [
    # user id, name, email, how many times they look at the pricing page
    ("ada", "Ada Lovelace", "ada@example.com", 3),
    ("grace", "Grace Hopper", "grace@example.com", 2),
    ("alan", "Alan Turing", "alan@example.com", 4),
]


def address(email: str, run: str) -> str:
    """The person's address in this run (``ada+<run>@example.com``): a sink shared by several
    runs tells their emails apart."""
    local, domain = email.split("@")
    return f"{local}+{run}@{domain}"


def sample_calls(run: str) -> list[dict[str, Any]]:
    """Each person browses anonymously, identifies with a form, then keeps browsing."""
    calls: list[dict[str, Any]] = []
    for user_id, name, email, pricing_views in PEOPLE:
        anonymous_id = f"anon-{user_id}-{run}"
        calls.append({"type": "page", "anonymousId": anonymous_id, "name": "Home"})
        calls.append(
            {
                "type": "identify",
                "userId": f"{user_id}-{run}",
                "anonymousId": anonymous_id,
                "traits": {"name": name, "email": address(email, run)},
            }
        )
        calls += [
            {"type": "track", "userId": f"{user_id}-{run}", "event": "Viewed Pricing"}
            for _ in range(pricing_views)
        ]
    return calls


async def run_demo(settings: NudgeSettings) -> None:
    run = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    workspace = await seed_workspace(settings, f"demo-{run}", write_key=f"demo-key-{run}")
    print(
        f"workspace {workspace.workspace_id}: rule 'Viewed Pricing' = +{PRICING_POINTS}, "
        f"segment 'Qualified leads' = lead score >= {QUALIFIED_SCORE}, "
        "workflow 'on entering it, send the welcome email'"
    )

    sink = SmtpSink(port=free_port())
    sink.start()
    fleet = Fleet({"NUDGE_SMTP_PORT": str(sink.port)}, REPO / ".data" / "demo-logs")
    try:
        started = time.perf_counter()
        await fleet.start()
        print(
            f"services up in {time.perf_counter() - started:.1f}s: "
            + ", ".join(f"{name} {svc.url}" for name, svc in fleet.services.items())
        )
        await demonstrate(settings, fleet, sink, workspace, run)
    finally:
        await fleet.stop()
        sink.stop()


async def demonstrate(
    settings: NudgeSettings, fleet: Fleet, sink: SmtpSink, workspace: SeededWorkspace, run: str
) -> None:
    """Post the sample events to the running fleet, wait for the emails they cause and for
    the pipeline to settle, then print the chain (``tests/e2e/test_demo.py`` runs this)."""
    calls = sample_calls(run)
    posted = time.perf_counter()
    async with httpx.AsyncClient(
        base_url=fleet["ingest"].url, auth=(workspace.write_key, "")
    ) as client:
        for call in calls:
            response = await client.post(f"/v1/{call['type']}", json=call)
            response.raise_for_status()
    print(f"posted {len(calls)} events to ingest (each answered 200 after Kafka acknowledged it)")

    qualified = [
        address(email, run)
        for _, _, email, views in PEOPLE
        if views * PRICING_POINTS >= QUALIFIED_SCORE
    ]
    await sink.wait_for(len(qualified), to=set(qualified))
    elapsed = time.perf_counter() - posted
    print(f"{len(qualified)} emails at the SMTP sink {elapsed:.2f}s after the first event")
    await wait_until_idle(settings)
    emails = {address(email, run) for _, _, email, _ in PEOPLE}
    await print_chain(settings, workspace.workspace_id, sink, emails)


async def print_chain(
    settings: NudgeSettings, workspace_id: str, sink: SmtpSink, emails: set[str]
) -> None:
    def ours(record: Any) -> bool:
        return bool(record.value) and codec.loads(record.value).get("workspace_id") == workspace_id

    async def envelopes(topic: Topic, *types: EventType[Any]) -> list[Envelope]:
        """The workspace's envelopes of these types (a topic carries several)."""
        names = {event_type.name for event_type in types}
        records = await read_topic(settings, topic, where=ours)
        decoded = [Envelope.decode(record.value) for record in records if record.value]
        return [envelope for envelope in decoded if envelope.type in names]

    latest: dict[uuid.UUID, Any] = {}
    for envelope in await envelopes(Topic.CONTACTS, CONTACT_UPDATED):
        update = CONTACT_UPDATED.parse(envelope)
        latest[update.contact_id] = update
    section("scoring: contacts and lead scores (topic contacts)")
    for update in latest.values():
        print(
            f"  {update.traits.get('name', '?'):<14} {update.traits.get('email', '-'):<36} "
            f"lead score {update.scores.get('lead', 0)}"
        )

    section("segmenter: segment entries and exits (topic memberships)")
    for envelope in await envelopes(Topic.MEMBERSHIPS, SEGMENT_ENTERED, SEGMENT_EXITED):
        change = SEGMENT_ENTERED.parse(envelope)
        verb = "entered" if envelope.type == SEGMENT_ENTERED.name else "left"
        print(f"  {change.contact.traits.get('name'):<14} {verb} '{change.segment_name}'")

    section("orchestrator: notification requests (topic notifications)")
    for envelope in await envelopes(Topic.NOTIFICATIONS, NOTIFICATION_REQUESTED):
        request = NOTIFICATION_REQUESTED.parse(envelope)
        print(
            f"  {request.contact.traits.get('name'):<14} {request.channel} "
            f"idempotency key {request.idempotency_key}"
        )

    section("notifier: deliveries (topic deliveries)")
    for envelope in await envelopes(Topic.DELIVERIES, DELIVERY_REPORTED):
        report = DELIVERY_REPORTED.parse(envelope)
        print(f"  {report.recipient:<36} {report.status} {report.provider_message_id or ''}")

    section("SMTP sink: emails received")
    for message in sink.received(to=emails):
        print(f"  to {message['To']:<36} subject {message['Subject']!r}")


def section(title: str) -> None:
    print(f"\n== {title}")


def main() -> None:
    settings = NudgeSettings()
    asyncio.run(ensure_topics(settings))
    migrate_all(settings)
    asyncio.run(run_demo(settings))


if __name__ == "__main__":
    main()
