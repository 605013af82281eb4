"""Ingest as a process, driven by real clients: the official Segment Python SDK, schema-driven
fuzzing from ingest's own OpenAPI document, and, with the whole fleet, an SDK retry that
must count once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import schemathesis
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from segment.analytics.client import Client

from nudge_common.db import SessionMaker
from nudge_common.events import Topic, segment_event_id
from nudge_devtools.pipeline import read_topic, wait_until_idle
from nudge_devtools.seed import SeededWorkspace
from nudge_devtools.services import Fleet, ServiceProcess
from nudge_ingest.app import create_app
from nudge_scoring import store as scoring_store
from tests.conftest import StackHandle
from tests.services.ingest.processes import events_of, ingest_process


@pytest.fixture(scope="module")
async def ingest(stack: StackHandle) -> AsyncIterator[ServiceProcess]:
    service = ingest_process(stack.env, stack.log_dir)
    service.start()
    try:
        await service.wait_ready()
        yield service
    finally:
        await service.stop()


def _segment_calls(client: Client, run: str) -> list[dict[str, Any]]:
    """One call of each kind; the messages as the SDK built and sent them."""
    when = datetime(2026, 11, 20, 9, 30, tzinfo=UTC)
    context = {"app": {"name": "shop", "version": "1.2"}, "locale": "fr-FR"}
    calls = [
        client.track(
            user_id=f"u-{run}",
            event="Order Completed",
            properties={"total": 42.5, "items": [{"sku": "a-1", "qty": 2}], "coupon": None},
            context=context,
            timestamp=when,
            integrations={"All": True},
        ),
        client.identify(
            user_id=f"u-{run}", traits={"email": "ada@example.com", "plan": "pro"}, context=context
        ),
        client.page(
            anonymous_id=f"a-{run}", category="Docs", name="Install", properties={"path": "/i"}
        ),
        client.group(user_id=f"u-{run}", group_id="acme", traits={"employees": 12}),
        client.alias(previous_id=f"a-{run}", user_id=f"u-{run}"),
    ]
    sent = []
    for queued, message in calls:
        assert queued
        sent.append(message)
    return sent


def _assert_as_sent(sent: dict[str, Any], stored: dict[str, Any]) -> None:
    for field, value in sent.items():
        if field in {"timestamp", "sentAt"}:
            continue  # the timestamp is corrected for clock skew from sentAt
        if field == "context":
            assert stored["context"] == {**stored["context"], **value}, field
            continue
        assert stored[field] == value, field


async def test_the_segment_python_sdk_lands_every_call_in_kafka_as_sent(
    stack: StackHandle, ingest: ServiceProcess, workspace: SeededWorkspace
) -> None:
    errors: list[Exception] = []
    one_by_one = Client(
        workspace.write_key,
        host=ingest.url,
        sync_mode=True,
        on_error=lambda error, _: errors.append(error),
        max_retries=0,
    )
    batched = Client(
        workspace.write_key,
        host=ingest.url,
        upload_size=100,
        gzip=True,
        on_error=lambda error, _: errors.append(error),
        max_retries=0,
    )
    sent = await asyncio.to_thread(_segment_calls, one_by_one, "sync")
    batch = await asyncio.to_thread(_segment_calls, batched, "batch")
    batch += [batched.track(user_id="u-batch", event=f"E{i}")[1] for i in range(200)]
    await asyncio.to_thread(batched.flush)
    await asyncio.to_thread(batched.shutdown)
    assert errors == []
    expected = {m["messageId"]: m for m in sent + batch}

    events = await events_of(stack.settings, workspace.workspace_id, expected=len(expected))
    stored = {e.message_id: e.model_dump(mode="json", by_alias=True) for e in events}
    assert stored.keys() == expected.keys()
    for message_id, message in expected.items():
        _assert_as_sent(message, stored[message_id])
    track = stored[sent[0]["messageId"]]
    assert track["originalTimestamp"] == "2026-11-20T09:30:00Z"
    assert track["context"]["library"]["name"] == "analytics-python"


def _fuzz_cases(ingest_url: str, write_key: str) -> list[int]:
    document = create_app().openapi()
    schema = schemathesis.openapi.from_dict(document)
    operations = [
        schema[path][method]
        for path, methods in document["paths"].items()
        for method in methods
        if path != "/metrics"
    ]
    statuses: list[int] = []
    auth_styles = st.sampled_from(
        [{"Authorization": f"Bearer {write_key}"}, {}, {"Authorization": "Bearer nope"}]
    )

    for operation in operations:

        @settings(
            max_examples=40,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(), headers=auth_styles)
        def fuzz(case: schemathesis.Case[Any], headers: dict[str, str]) -> None:
            response = case.call(base_url=ingest_url, headers=headers, timeout=15)
            assert response.status_code < 500, (case.path, case.body, response.text)
            if response.status_code >= 400 and case.path.startswith("/v1/"):
                # the tracking API's refusals are Segment-style JSON naming the problem
                assert response.json()["success"] is False
            statuses.append(response.status_code)

        fuzz()
    return statuses


async def test_fuzzing_from_the_openapi_document_finds_no_500_and_no_hang(
    ingest: ServiceProcess, workspace: SeededWorkspace
) -> None:
    statuses = await asyncio.to_thread(_fuzz_cases, ingest.url, workspace.write_key)
    assert 200 in statuses  # valid calls went through,
    assert {400, 401} <= set(statuses)  # and invalid ones were refused with a clear 4xx


async def test_an_sdk_retry_of_the_same_message_id_is_stored_once(
    stack: StackHandle,
    fleet: Fleet,
    sessionmaker: SessionMaker,
    workspace: SeededWorkspace,
) -> None:
    message_id = f"retry-{uuid.uuid4()}"
    call = {"userId": "u-dup", "event": "Viewed Pricing", "messageId": message_id}
    async with httpx.AsyncClient(base_url=fleet["ingest"].url) as client:
        first = await client.post("/v1/track", json=call, auth=(workspace.write_key, ""))
        retry = await client.post(
            "/v1/batch",
            json={"batch": [{**call, "type": "track"}]},
            auth=(workspace.write_key, ""),
        )
    assert (first.status_code, retry.status_code) == (200, 200)
    envelope_id = str(segment_event_id(workspace.workspace_id, message_id)).encode()
    copies = await read_topic(
        stack.settings,
        Topic.EVENTS,
        expected=2,
        where=lambda r: r.value is not None and envelope_id in r.value,
    )
    assert len(copies) == 2  # both reached Kafka with the same envelope id
    await wait_until_idle(stack.settings)

    events = scoring_store.events
    async with sessionmaker() as session:
        stored = (
            await session.execute(
                sa.select(sa.func.count())
                .select_from(events)
                .where(
                    events.c.workspace_id == workspace.workspace_id,
                    events.c.message_id == message_id,
                )
            )
        ).scalar_one()
    assert stored == 1
