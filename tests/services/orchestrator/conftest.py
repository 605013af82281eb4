"""The orchestrator's engine on the real database and broker, in this process: tests hand
messages to the consumer handlers in a transaction (as the consumer runner does), publish
the outputs to this session's topics, and move a hand clock to fire timers. Broadcasts:
the API in this process (through ASGI), the broadcast worker's rounds driven by the hand
clock, and the segmenter's members contract served by a local HTTP server."""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
import sqlalchemy as sa
from aiokafka import AIOKafkaProducer

from nudge_common.db import SessionMaker, transaction
from nudge_common.events import (
    EVENT_RECEIVED,
    SEGMENT_ENTERED,
    ContactSnapshot,
    Envelope,
    MembershipChanged,
    SegmentEvent,
    Topic,
    segment_event_id,
)
from nudge_common.ids import stable_id
from nudge_common.kafka import create_producer, publish
from nudge_common.service import create_service_app
from nudge_common.settings import NudgeSettings
from nudge_devtools.pipeline import read_topic
from nudge_orchestrator import store
from nudge_orchestrator.app import ROUTERS, TITLE
from nudge_orchestrator.consumer import ContactHandler, EventHandler, MembershipHandler
from nudge_orchestrator.domain.workflows import WorkflowDefinition
from nudge_orchestrator.settings import OrchestratorSettings
from nudge_orchestrator.worker import fire_due_timers, send_due_broadcasts
from tests.conftest import StackHandle

T0 = datetime(2030, 3, 4, 12, 0, tzinfo=UTC)
"""A Monday noon in the future: orchestrator processes on the system clock (the end-to-end
tests) never fire these timers."""
_sequence = itertools.count()


@dataclass
class Engine:
    settings: NudgeSettings
    sessionmaker: SessionMaker
    producer: AIOKafkaProducer
    workspace_id: str
    now: datetime = T0
    published: list[Envelope] = field(default_factory=list)

    def clock(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)

    async def workflow(self, definition: dict[str, Any], *, name: str = "wf") -> uuid.UUID:
        workflow_id = uuid.uuid4()
        async with transaction(self.sessionmaker) as session:
            await store.create_workflow(
                session,
                workspace_id=self.workspace_id,
                workflow_id=workflow_id,
                name=name,
                definition=WorkflowDefinition.model_validate(definition),
            )
        return workflow_id

    async def apply(self, handler: Any, envelope: Envelope) -> None:
        async with transaction(self.sessionmaker) as session:
            out = await handler(session, envelope)
            await publish(self.producer, self.settings, out)
        self.published.extend(message.envelope for message in out)

    async def apply_batch(self, handler: Any, envelopes: list[Envelope]) -> None:
        """The envelopes as one consumer batch (the handler's ``handle_batch``)."""
        async with transaction(self.sessionmaker) as session:
            out = await handler.handle_batch(session, envelopes)
            await publish(self.producer, self.settings, out)
        self.published.extend(message.envelope for message in out)

    async def contact(self, user_id: str, **traits: Any) -> uuid.UUID:
        return await self.update(user_id, {}, **traits)

    async def update(
        self,
        user_id: str,
        scores: dict[str, int],
        *,
        tags: dict[str, int] | None = None,
        stages: dict[str, str] | None = None,
        **traits: Any,
    ) -> uuid.UUID:
        """Scoring's ``contact.updated`` for this contact: these traits and scores (and
        tags and stages when given)."""
        envelope = self.updated(user_id, scores, tags=tags, stages=stages, **traits)
        await self.apply(ContactHandler(self.clock), envelope)
        return self.contact_id(user_id)

    def contact_id(self, user_id: str) -> uuid.UUID:
        return stable_id(self.workspace_id, "contact", "user_id", user_id)

    def updated(
        self,
        user_id: str,
        scores: dict[str, int],
        *,
        tags: dict[str, int] | None = None,
        stages: dict[str, str] | None = None,
        **traits: Any,
    ) -> Envelope:
        return Envelope(
            type="contact.updated",
            id=uuid.uuid4(),
            occurred_at=self.now,
            workspace_id=self.workspace_id,
            payload={
                "contact_id": str(self.contact_id(user_id)),
                "user_id": user_id,
                "traits": {"email": f"{user_id}@example.com", **traits},
                "scores": scores,
                "tags": tags or {},
                "stages": stages or {},
                "changed": [
                    "traits",
                    "scores",
                    *(["tags"] if tags is not None else []),
                    *(["stages"] if stages is not None else []),
                ],
            },
        )

    async def track(self, user_id: str, event: str, **properties: Any) -> None:
        await self.apply(EventHandler(self.clock), self.tracked(user_id, event, **properties))

    def tracked(self, user_id: str, event: str, **properties: Any) -> Envelope:
        message_id = f"m-{next(_sequence)}-{uuid.uuid4().hex[:6]}"
        payload = SegmentEvent.model_validate(
            {
                "type": "track",
                "event": event,
                "userId": user_id,
                "properties": properties,
                "messageId": message_id,
                "timestamp": self.now,
                "receivedAt": self.now,
            }
        )
        return EVENT_RECEIVED.envelope(
            workspace_id=self.workspace_id,
            payload=payload,
            occurred_at=self.now,
            id=segment_event_id(self.workspace_id, message_id),
        )

    async def enter_segment(self, segment_id: uuid.UUID, contact_id: uuid.UUID) -> Envelope:
        envelope = SEGMENT_ENTERED.envelope(
            workspace_id=self.workspace_id,
            payload=MembershipChanged(
                segment_id=segment_id,
                segment_name="s",
                contact=ContactSnapshot(contact_id=contact_id, traits={"email": "x@example.com"}),
                at=self.now,
            ),
            occurred_at=self.now,
        )
        await self.apply(MembershipHandler(self.clock), envelope)
        return envelope

    async def fire(self) -> int:
        fired = 0
        while batch := await fire_due_timers(
            self.sessionmaker, self.producer, self.settings, clock=self.clock
        ):
            fired += batch
        return fired

    async def runs(self, workflow_id: uuid.UUID) -> list[Any]:
        async with transaction(self.sessionmaker) as session:
            rows = await session.execute(
                sa.select(store.runs).where(store.runs.c.workflow_id == workflow_id)
            )
            return list(rows)

    async def sent(self, workflow_id: uuid.UUID) -> list[tuple[str, int]]:
        """(channel, step) of every message requested by the workflow, in order."""
        async with transaction(self.sessionmaker) as session:
            rows = await session.execute(
                sa.select(store.sends.c.channel, store.sends.c.step)
                .where(store.sends.c.workflow_id == workflow_id)
                .order_by(store.sends.c.at, store.sends.c.step)
            )
            return [(row.channel, row.step) for row in rows]

    async def timers(self, workflow_id: uuid.UUID) -> list[Any]:
        async with transaction(self.sessionmaker) as session:
            rows = await session.execute(
                sa.select(store.timers)
                .join(store.runs, store.runs.c.id == store.timers.c.run_id)
                .where(store.runs.c.workflow_id == workflow_id)
            )
            return list(rows)


@pytest.fixture
async def engine(stack: StackHandle, sessionmaker: SessionMaker) -> AsyncIterator[Engine]:
    producer = create_producer(stack.settings)
    await producer.start()
    try:
        yield Engine(stack.settings, sessionmaker, producer, f"ws-{uuid.uuid4().hex[:12]}")
    finally:
        await producer.stop()


class FakeSegmenter:
    """``GET /internal/v1/segments/{id}/members?workspace_id=&after=&limit=`` served from
    ``segments[(workspace, segment id)]`` (members sorted by contact id), as the segmenter
    does; 404 for a segment the workspace does not have."""

    def __init__(self) -> None:
        self.segments: dict[tuple[str, uuid.UUID], list[uuid.UUID]] = {}
        self.pages = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                parts = url.path.strip("/").split("/")
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                key = (query.get("workspace_id", ""), uuid.UUID(parts[3]))
                if parts[:3] != ["internal", "v1", "segments"] or key not in fake.segments:
                    self.answer(404, {"detail": "segment not found"})
                    return
                fake.pages += 1
                members = sorted(fake.segments[key], key=str)
                after = query.get("after")
                if after:
                    members = [m for m in members if str(m) > after]
                limit = int(query["limit"])
                page = members[:limit]
                more = len(members) > limit
                self.answer(
                    200,
                    {
                        "members": [str(m) for m in page],
                        "next_after": str(page[-1]) if more else None,
                    },
                )

            def answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def segments() -> Iterator[FakeSegmenter]:
    fake = FakeSegmenter()
    yield fake
    fake.server.shutdown()


class Broadcasts:
    """The API as a client with a key of the engine's workspace, and the worker's rounds."""

    def __init__(self, engine: Engine, settings: OrchestratorSettings, api: httpx.AsyncClient):
        self.engine = engine
        self.settings = settings
        self.api = api

    async def key(self, *scopes: str, workspace_id: str | None = None) -> dict[str, str]:
        async with transaction(self.engine.sessionmaker) as session:
            _, secret = await store.create_api_key(
                session,
                workspace_id=workspace_id or self.engine.workspace_id,
                name="test",
                scopes=list(scopes),
            )
        return {"Authorization": f"Bearer {secret}"}

    async def template(self, channel: str = "email") -> uuid.UUID:
        template_id = uuid.uuid4()
        async with transaction(self.engine.sessionmaker) as session:
            await store.put_template(
                session,
                workspace_id=self.engine.workspace_id,
                template_id=template_id,
                name="news",
                channel=channel,
                definition={"subject": "News", "text": "Hi"},
            )
        return template_id

    async def round(self) -> int:
        async with httpx.AsyncClient() as client:
            return await send_due_broadcasts(
                self.engine.sessionmaker,
                self.engine.producer,
                self.settings,
                client,
                clock=self.engine.clock,
            )

    async def drain(self) -> int:
        """Rounds until nothing is due now; members handed over."""
        total = 0
        while sent := await self.round():
            total += sent
        return total


@asynccontextmanager
async def serve(engine: Engine, segmenter_url: str, page: int = 1000) -> AsyncIterator[Broadcasts]:
    """The orchestrator's API in this process (no consumers: the test drives the worker)."""
    settings = OrchestratorSettings(
        **engine.settings.model_dump(exclude={"service_name", "http_port"}),
        segmenter_url=segmenter_url,
        broadcast_page=page,
    )
    app = create_service_app(settings=settings, routers=ROUTERS, title=TITLE)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as api:
            yield Broadcasts(engine, settings, api)


@pytest.fixture
async def broadcasts(engine: Engine, segments: FakeSegmenter) -> AsyncIterator[Broadcasts]:
    async with serve(engine, segments.url) as served:
        yield served


async def notifications(
    engine: Engine, workflow_id: uuid.UUID, deadline_s: float = 10
) -> list[Envelope]:
    """The notification requests the workflow (or broadcast) published, from the topic."""
    records = await read_topic(
        engine.settings,
        Topic.NOTIFICATIONS,
        where=lambda r: str(workflow_id).encode() in (r.value or b""),
        deadline_s=deadline_s,
    )
    return [Envelope.decode(r.value) for r in records if r.value]
