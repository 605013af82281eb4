"""Actions that belong to other services: tags and traits as Segment calls on the events
topic (scoring applies identify ``traits.tags``/``untags`` and traits as any call), score
adjustments as ``score.adjusted`` (applied by scoring's handler here), static-list changes
for the segmenter on the contacts topic, signed webhooks (and notify sales) from a durable
outbox, retried with backoff, delivered to a local HTTP server, and notify sales by
internal email through the notifier to an SMTP server."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from nudge_common.db import transaction
from nudge_common.events import (
    CONTACT_SUMMARY_TEMPLATE_ID,
    EVENT_RECEIVED,
    LIST_CHANGED,
    NOTIFICATION_REQUESTED,
    SCORE_ADJUSTED,
    Envelope,
    SegmentType,
    Topic,
)
from nudge_common.ids import stable_id
from nudge_devtools.pipeline import read_topic
from nudge_devtools.services import free_port
from nudge_devtools.smtp_sink import SmtpSink
from nudge_notifier.consumer import NotificationHandler, Providers
from nudge_notifier.settings import NotifierSettings
from nudge_orchestrator import execution, store
from nudge_orchestrator.consumer import EventHandler
from nudge_orchestrator.settings import OrchestratorSettings
from nudge_orchestrator.worker import deliver_due_webhooks
from nudge_scoring import store as scoring_store
from nudge_scoring.consumer import handle_event as scoring_handler
from nudge_scoring.domain.profile import tags_in
from nudge_scoring.domain.rules import Stage
from tests.services.orchestrator.conftest import Engine
from tests.services.scoring.conftest import segment


class Receiver:
    """A local HTTP server that records every call; answers ``fail`` 500s first."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, str], bytes]] = []
        self.fail = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = 500 if receiver.fail > 0 else 204
                receiver.fail -= 1
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.server.shutdown()


def _decode(record: Any) -> Envelope:
    return Envelope.decode(record.value)


async def test_tags_and_traits_are_segment_calls_and_score_an_adjustment(engine: Engine) -> None:
    workflow = await engine.workflow(
        {
            "trigger": {"kind": "event", "event": "Demo Requested"},
            "steps": [
                {"kind": "tag", "add": ["intent:demo"], "remove": ["stage:cold"]},
                {"kind": "set_traits", "traits": {"demo_requested": True}},
                {"kind": "adjust_score", "model": "default", "points": 15},
            ],
        }
    )
    contact_id = await engine.contact("act-1")
    await engine.track("act-1", "Demo Requested")
    [run] = await engine.runs(workflow)
    assert run.status == "completed"
    prefix = f"nudge-orchestrator:{run.id}:"

    def ours(record: Any) -> bool:
        envelope = _decode(record)
        if envelope.type == SCORE_ADJUSTED.name:
            return SCORE_ADJUSTED.parse(envelope).adjustment_id.startswith(f"{run.id}:")
        return EVENT_RECEIVED.parse(envelope).message_id.startswith(prefix)

    found = await read_topic(engine.settings, Topic.EVENTS, where=ours, expected=3)
    calls = sorted(
        (EVENT_RECEIVED.parse(_decode(r)) for r in found if r.key == b"act-1"),
        key=lambda c: c.message_id,
    )
    tag, traits = calls
    assert tag.type is SegmentType.IDENTIFY
    assert tag.user_id == "act-1"
    # what scoring's consumer reads from an identify call
    assert tags_in(tag.traits) == (["intent:demo"], ["stage:cold"])
    assert traits.traits == {"demo_requested": True}
    [score] = [r for r in found if r.key == str(contact_id).encode()]
    adjustment = SCORE_ADJUSTED.parse(_decode(score))
    assert (adjustment.contact_id, adjustment.model, adjustment.points) == (
        contact_id,
        "default",
        15,
    )
    # a replay of the run's steps would be the same messages (ids from run and step)
    assert adjustment.adjustment_id == f"{run.id}:2"


async def test_adjust_score_reaches_scoring_once_for_a_contact_without_user_id(
    engine: Engine,
) -> None:
    """Scoring's handler applies the step's ``score.adjusted``: the points land once (a
    replay adds nothing) and move a stage, for a contact scoring knows only anonymously."""
    ws = engine.workspace_id
    await engine.workflow(
        {
            "trigger": {"kind": "event", "event": "Webinar Attended"},
            "steps": [{"kind": "adjust_score", "model": "default", "points": 25}],
        }
    )
    async with transaction(engine.sessionmaker) as session:
        await scoring_store.put_model(
            session,
            workspace_id=ws,
            name="default",
            description="",
            stages=[Stage(name="lead", min_score=0), Stage(name="mql", min_score=20)],
        )
    event = segment(ws, event="Webinar Attended", anonymousId="anon-7")
    async with transaction(engine.sessionmaker) as session:
        await scoring_handler(session, event)
    await engine.apply(EventHandler(engine.clock), event)
    contact_id = stable_id(ws, "contact", "anonymous_id", "anon-7")
    [adjusted] = [e for e in engine.published if e.type == SCORE_ADJUSTED.name]
    for _ in range(2):  # the second is a replay of the same message
        async with transaction(engine.sessionmaker) as session:
            out = await scoring_handler(session, adjusted)
    assert out == []
    async with transaction(engine.sessionmaker) as session:
        assert await scoring_store.scores_of(session, contact_id=contact_id) == {"default": 25}
        assert await scoring_store.stages_of(session, contact_id=contact_id) == {"default": "mql"}


async def webhook_rows(engine: Engine, workflow: uuid.UUID) -> list[Any]:
    async with transaction(engine.sessionmaker) as session:
        rows = await session.execute(
            sa.select(store.webhooks)
            .join(store.runs, store.runs.c.id == store.webhooks.c.run_id)
            .where(store.runs.c.workflow_id == workflow)
        )
        return list(rows)


async def test_signed_webhook_retried_with_backoff_and_notify_sales(
    engine: Engine, receiver: Receiver
) -> None:
    settings = OrchestratorSettings(
        **engine.settings.model_dump(exclude={"service_name", "http_port"}),
        webhook_secret="s3cret",
        webhook_attempts=3,
    )
    workflow = await engine.workflow(
        {
            "trigger": {"kind": "event", "event": "Pricing Viewed"},
            "steps": [
                {"kind": "webhook", "url": receiver.url},
                {"kind": "notify_sales", "url": receiver.url, "note": "hot lead"},
            ],
        }
    )
    await engine.update("hook-1", {"default": 80}, first_name="Ada", company="Acme")
    await engine.track("hook-1", "Pricing Viewed")
    assert len(await webhook_rows(engine, workflow)) == 2
    receiver.fail = 2  # the first two calls get a 500
    async with httpx.AsyncClient(timeout=5) as client:

        async def deliver() -> None:
            while await deliver_due_webhooks(
                engine.sessionmaker, settings, client, clock=engine.clock, limit=1000
            ):
                pass

        await deliver()  # both fail once: retried in 2 s, not before
        assert {row.status for row in await webhook_rows(engine, workflow)} == {"pending"}
        await deliver()
        assert len(receiver.calls) == 2
        engine.advance(seconds=2)
        await deliver()
    rows = await webhook_rows(engine, workflow)
    assert sorted((row.status, row.attempts) for row in rows) == [("delivered", 2)] * 2
    assert len(receiver.calls) == 4
    bodies = {}
    for headers, body in receiver.calls[2:]:
        timestamp, signature = (
            part.split("=", 1)[1] for part in headers["x-nudge-signature"].split(",")
        )
        expected = hmac.new(b"s3cret", f"{timestamp}.".encode() + body, hashlib.sha256)
        assert hmac.compare_digest(signature, expected.hexdigest())
        payload = json.loads(body)
        assert headers["x-nudge-delivery"] == f"{payload['run_id']}:{payload['step']}"
        bodies[payload["kind"]] = payload
    assert bodies["webhook"]["contact"]["traits"]["company"] == "Acme"
    assert bodies["notify_sales"]["summary"] == (
        "Ada - hook-1@example.com - at Acme - scores default 80 - hot lead"
    )


async def test_a_webhook_that_keeps_failing_is_given_up(engine: Engine, receiver: Receiver) -> None:
    settings = OrchestratorSettings(
        **engine.settings.model_dump(exclude={"service_name", "http_port"}), webhook_attempts=2
    )
    workflow = await engine.workflow(
        {
            "trigger": {"kind": "event", "event": "Churn Risk"},
            "steps": [{"kind": "webhook", "url": receiver.url}],
        }
    )
    await engine.contact("hook-2")
    await engine.track("hook-2", "Churn Risk")
    receiver.fail = 10
    async with httpx.AsyncClient(timeout=5) as client:
        for _ in range(3):
            await deliver_due_webhooks(
                engine.sessionmaker, settings, client, clock=engine.clock, limit=1000
            )
            engine.advance(seconds=10)
    [row] = await webhook_rows(engine, workflow)
    assert (row.status, row.attempts, row.next_at) == ("failed", 2, None)
    assert row.last_error == "HTTP 500"


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    sink = SmtpSink(port=free_port())
    sink.start()
    yield sink
    sink.stop()


async def test_notify_sales_by_email_reaches_the_sales_address_once(
    engine: Engine, smtp_sink: SmtpSink
) -> None:
    sales = ["sales-a@example.com", "sales-b@example.com"]
    workflow = await engine.workflow(
        {
            "trigger": {"kind": "event", "event": "Demo Requested"},
            "steps": [{"kind": "notify_sales", "email": sales, "note": "call within the hour"}],
        },
        name="Demo requests",
    )
    contact = await engine.update(
        "lead-7",
        {"default": 85},
        tags={"intent:demo": 1},
        stages={"default": "sql"},
        first_name="Ada",
        last_name="Lovelace",
        company="Acme",
    )
    await engine.track("lead-7", "Demo Requested")
    [run] = await engine.runs(workflow)
    assert run.status == "completed"
    records = await read_topic(
        engine.settings,
        Topic.NOTIFICATIONS,
        where=lambda r: str(run.id).encode() in (r.value or b""),
        expected=2,
    )
    assert {r.key for r in records} == {str(contact).encode()}
    requests = [NOTIFICATION_REQUESTED.parse(_decode(r)) for r in records]
    assert sorted(r.recipient or "" for r in requests) == sales
    assert {r.template_id for r in requests} == {CONTACT_SUMMARY_TEMPLATE_ID}

    # the notifier's handler on what the orchestrator published, twice (a replay)
    settings = NotifierSettings(
        **engine.settings.model_dump(exclude={"service_name", "http_port"}),
        smtp_port=smtp_sink.port,
    )
    providers = Providers(settings)
    handler = NotificationHandler(settings, engine.sessionmaker, providers)
    envelopes = [_decode(r) for r in records]
    try:
        for _ in range(2):
            await handler.prepare(envelopes)
            for envelope in envelopes:
                async with transaction(engine.sessionmaker) as session:
                    await handler(session, envelope)
    finally:
        await providers.close()
    received = await smtp_sink.wait_for(2, to=sales)
    assert sorted(str(m["To"]) for m in received) == sales, "each address once"
    message = received[0]
    assert message["Subject"] == "Lead: Ada Lovelace (Acme)"
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    for shown in (
        "Email: lead-7@example.com",
        "Company: Acme",
        "Score default: 85 (sql)",
        "Tags: intent:demo",
        "Note: call within the hour",
        f"Workflow: Demo requests ({workflow})",
    ):
        assert shown in text
    assert smtp_sink.received(to=["lead-7@example.com"]) == []


async def test_a_list_step_asks_the_segmenter_once_per_step_execution(engine: Engine) -> None:
    listed = uuid.uuid4()
    workflow = await engine.workflow(
        {
            "trigger": {"kind": "event", "event": "Webinar Attended"},
            "entry": {"rule": "every_time"},
            "steps": [
                {"kind": "list", "list_id": str(listed), "action": "add"},
                {"kind": "list", "list_id": str(listed), "action": "remove"},
            ],
        }
    )
    contact = await engine.contact("list-1")
    await engine.track("list-1", "Webinar Attended")
    await engine.track("list-1", "Webinar Attended")  # a second run: its own messages
    runs = await engine.runs(workflow)
    assert len(runs) == 2
    # executing a run's steps again publishes nothing (the steps are recorded)
    async with transaction(engine.sessionmaker) as session:
        [again] = (await store.get_runs(session, run_ids=[runs[0].id])).values()
        definition = await store.version_definition(session, workflow_id=workflow, version=1)
        out = execution.Outputs()
        await execution.advance(
            session, out, run=again, definition=definition, index=0, now=engine.now
        )
    assert out.messages == []
    records = await read_topic(
        engine.settings,
        Topic.CONTACTS,
        where=lambda r: (
            _decode(r).type == LIST_CHANGED.name
            and LIST_CHANGED.parse(_decode(r)).list_id == listed
        ),
        deadline_s=10,
    )
    assert len(records) == 4
    assert {r.key for r in records} == {str(contact).encode()}
    changes = [(_decode(r).id, LIST_CHANGED.parse(_decode(r))) for r in records]
    assert sorted(c.action for _, c in changes) == ["add", "add", "remove", "remove"]
    assert {c.contact_id for _, c in changes} == {contact}
    assert {envelope_id for envelope_id, _ in changes} == {
        stable_id(str(run.id), LIST_CHANGED.name, str(step)) for run in runs for step in (0, 1)
    }
