"""The notifier app in this process (its consumer on the real broker and database, its
routes through an ASGI client), sending to a scripted SMTP server and local HTTP provider
servers with its real clients."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from aiokafka import AIOKafkaProducer
from py_vapid import Vapid02

from nudge_common.codec import loads
from nudge_common.consumer import Record
from nudge_common.db import SessionMaker, transaction
from nudge_common.events import (
    NOTIFICATION_REQUESTED,
    Channel,
    ContactSnapshot,
    Envelope,
    NotificationRequested,
    Topic,
)
from nudge_common.kafka import OutgoingMessage, create_producer, publish
from nudge_common.topics import delete_topics, ensure_topics
from nudge_devtools.pipeline import eventually, read_topic
from nudge_notifier import store
from nudge_notifier.app import create_app
from nudge_notifier.domain.templates import Template
from nudge_notifier.settings import NotifierSettings
from tests.conftest import StackHandle
from tests.services.notifier.fakes import FakeProviders, ScriptedSmtp

SETTLED = ("sent", "failed", "skipped", "unknown", "bounced")


@pytest.fixture(scope="module")
def smtp() -> Iterator[ScriptedSmtp]:
    server = ScriptedSmtp(pipelining=True)  # as real MTAs (test_smtp_pipelining: without)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
async def providers() -> AsyncIterator[FakeProviders]:
    fake = FakeProviders()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture(scope="module")
def vapid() -> Vapid02:
    key = Vapid02()
    key.generate_keys()
    return key


@dataclass
class Notifier:
    stack: StackHandle
    settings: NotifierSettings
    client: httpx.AsyncClient
    producer: AIOKafkaProducer
    sessionmaker: SessionMaker

    async def template(
        self,
        workspace_id: str,
        channel: Channel = "email",
        *,
        subject: str = "Hello {{ contact.traits.name | default('there') }}",
        html: str = '<p>Hi</p><a href="https://example.com/pricing?a=1&amp;b=2">pricing</a>',
        text: str = "Hi {{ contact.traits.name | default('there') }}",
        topic: str = "marketing",
    ) -> uuid.UUID:
        template_id = uuid.uuid4()
        async with transaction(self.sessionmaker) as session:
            await store.create_template(
                session,
                workspace_id=workspace_id,
                template=Template(template_id, "t", channel, subject, html, text, topic),
            )
        return template_id

    async def request(
        self,
        workspace_id: str,
        template_id: uuid.UUID,
        traits: dict[str, Any],
        *,
        channel: Channel = "email",
        key: str | None = None,
        user_id: str | None = None,
        scores: dict[str, int] | None = None,
    ) -> str:
        key = key or f"k-{uuid.uuid4().hex}"
        await self.publish_requests(
            workspace_id,
            [
                NotificationRequested(
                    idempotency_key=key,
                    channel=channel,
                    template_id=template_id,
                    contact=ContactSnapshot(
                        contact_id=uuid.uuid4(),
                        user_id=user_id,
                        traits=traits,
                        scores=scores or {},
                    ),
                )
            ],
        )
        return key

    async def publish_requests(
        self, workspace_id: str, requests: list[NotificationRequested]
    ) -> None:
        from datetime import UTC, datetime

        await publish(
            self.producer,
            self.settings,
            [
                OutgoingMessage(
                    Topic.NOTIFICATIONS,
                    key=str(r.contact.contact_id),
                    envelope=NOTIFICATION_REQUESTED.envelope(
                        workspace_id=workspace_id, payload=r, occurred_at=datetime.now(UTC)
                    ),
                )
                for r in requests
            ],
        )

    async def ledger(self, keys: list[str]) -> dict[str, sa.Row[Any]]:
        async with transaction(self.sessionmaker) as session:
            rows = await session.execute(
                sa.select(store.deliveries).where(store.deliveries.c.idempotency_key.in_(keys))
            )
            return {row.idempotency_key: row for row in rows}

    async def settled(self, keys: list[str], deadline_s: float = 30.0) -> dict[str, sa.Row[Any]]:
        async def done() -> bool:
            rows = await self.ledger(keys)
            return len(rows) == len(keys) and all(r.status in SETTLED for r in rows.values())

        await eventually(done, deadline_s=deadline_s, what=f"{len(keys)} deliveries settled")
        return await self.ledger(keys)


async def topic_envelopes(
    settings: NotifierSettings, topic: Topic, workspace_id: str, *, expected: int | None = None
) -> list[Envelope]:
    def mine(record: Record) -> bool:
        return record.value is not None and loads(record.value).get("workspace_id") == workspace_id

    records = await read_topic(settings, topic, where=mine, expected=expected)
    return [Envelope.decode(r.value) for r in records if r.value]


@pytest.fixture(scope="module")
async def notifier(
    stack: StackHandle,
    smtp: ScriptedSmtp,
    providers: FakeProviders,
    vapid: Vapid02,
    sessionmaker: SessionMaker,
) -> AsyncIterator[Notifier]:
    env = {
        **stack.env,
        # topics of its own: other modules' tests leave notification requests for templates
        # this notifier does not know, whose dead letters would stop it
        "NUDGE_TOPIC_PREFIX": f"{stack.settings.topic_prefix}notifier-{uuid.uuid4().hex[:6]}.",
        "NUDGE_SMTP_PORT": str(smtp.port),
        "NUDGE_SMTP_MAX_CONNECTIONS": "4",
        "NUDGE_SMS_API_URL": providers.url,
        "NUDGE_SMS_ACCOUNT_SID": "AC123",
        "NUDGE_SMS_AUTH_TOKEN": "secret-token",
        "NUDGE_SMS_RATE_PER_S": "0",
        "NUDGE_FCM_API_URL": providers.url,
        "NUDGE_FCM_ACCESS_TOKEN": "fcm-token",
        "NUDGE_FCM_PROJECT_ID": "demo",
        "NUDGE_PUSH_RATE_PER_S": "0",
        "NUDGE_VAPID_PRIVATE_KEY": vapid.private_pem().decode(),
        "NUDGE_RETRY_BASE_DELAY_S": "0.01",
        "NUDGE_RETRY_MAX_DELAY_S": "0.05",
        "NUDGE_MAX_BATCH_ATTEMPTS": "2",
        "NUDGE_UNENGAGED_SUNSET_MIN_SENDS": "2",
        "NUDGE_SUNSET_INTERVAL_S": "0.2",
        "NUDGE_PUBLIC_URL": "http://notifier.test",
        "NUDGE_TRACKING_URL": "http://ingest.test",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        settings = NotifierSettings()
        await ensure_topics(settings)
        app = create_app()
        producer = create_producer(settings)
        await producer.start()
        try:
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(
                    transport=transport, base_url="http://notifier.test"
                ) as client:
                    yield Notifier(stack, settings, client, producer, sessionmaker)
        finally:
            await producer.stop()
            await delete_topics(settings)
