"""The tracking API in-process, against the real broker and database: what a 200 puts in
Kafka, and the clear 4xx every kind of bad request gets."""

from __future__ import annotations

import gzip
import uuid

import httpx
import pytest

from nudge_common import codec
from nudge_common.events import EVENT_RECEIVED, Envelope, Topic, segment_event_id
from nudge_devtools.pipeline import read_topic
from nudge_devtools.seed import SeededWorkspace
from tests.conftest import StackHandle


async def published(
    stack: StackHandle, workspace_id: str, message_ids: list[str]
) -> dict[str, Envelope]:
    wanted = {str(segment_event_id(workspace_id, m)) for m in message_ids}
    records = await read_topic(
        stack.settings,
        Topic.EVENTS,
        expected=len(wanted),
        where=lambda r: r.value is not None and str(codec.loads(r.value)["id"]) in wanted,
    )
    found: dict[str, Envelope] = {}
    for record in records:
        assert record.value is not None
        envelope = Envelope.decode(record.value)
        event = EVENT_RECEIVED.parse(envelope)
        assert record.key == event.identity.encode()
        found[event.message_id] = envelope
    return found


async def test_a_track_call_is_in_kafka_when_answered_200(
    stack: StackHandle, client: httpx.AsyncClient, workspace: SeededWorkspace
) -> None:
    message_id = str(uuid.uuid4())
    call = {
        "userId": "u-1",
        "event": "Viewed Pricing",
        "messageId": message_id,
        "properties": {"plan": "pro"},
        "timestamp": "2026-11-23T10:00:00Z",
        "sentAt": "2026-11-23T10:00:01Z",
    }
    response = await client.post("/v1/track", json=call, auth=(workspace.write_key, ""))
    assert response.status_code == 200
    assert response.json() == {"success": True}

    envelope = (await published(stack, workspace.workspace_id, [message_id]))[message_id]
    event = EVENT_RECEIVED.parse(envelope)
    assert envelope.workspace_id == workspace.workspace_id
    assert event.event == "Viewed Pricing"
    assert event.properties == {"plan": "pro"}
    assert event.context["ip"] == "127.0.0.7"
    assert (event.received_at - event.timestamp).total_seconds() == pytest.approx(1, abs=0.001)


async def test_every_auth_style_and_body_encoding_is_accepted(
    stack: StackHandle, client: httpx.AsyncClient, workspace: SeededWorkspace
) -> None:
    ids = [str(uuid.uuid4()) for _ in range(4)]
    key = workspace.write_key
    bearer = await client.post(
        "/v1/identify",
        json={"userId": "u-2", "messageId": ids[0], "traits": {"name": "Bo"}},
        headers={"Authorization": f"Bearer {key}"},
    )
    in_body = await client.post(
        "/v1/p", json={"anonymousId": "a-2", "messageId": ids[1], "name": "Home", "writeKey": key}
    )
    beacon = await client.post(
        "/v1/t",
        content=codec.dumps(
            {"anonymousId": "a-2", "event": "Scrolled", "messageId": ids[2], "writeKey": key}
        ),
        headers={"Content-Type": "text/plain"},
    )
    gzipped = await client.post(
        "/v1/batch",
        content=gzip.compress(
            codec.dumps(
                {"batch": [{"type": "track", "userId": "u-2", "event": "E", "messageId": ids[3]}]}
            )
        ),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        auth=(key, ""),
    )
    assert [r.status_code for r in (bearer, in_body, beacon, gzipped)] == [200] * 4
    assert set(await published(stack, workspace.workspace_id, ids)) == set(ids)


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        ("/v1/track", {"userId": "u"}, 400, "event"),
        ("/v1/track", {"event": "E"}, 400, "userId"),
        ("/v1/track", {"userId": "u", "event": "E", "properties": "nope"}, 400, "properties"),
        ("/v1/track", {"userId": "u", "event": "E", "timestamp": "yesterday"}, 400, "timestamp"),
        ("/v1/group", {"userId": "u"}, 400, "groupId"),
        (
            "/v1/track",
            {"userId": "u", "event": "E", "properties": {"x": "y" * 40_000}},
            413,
            "body",
        ),
        ("/v1/batch", {"batch": []}, 400, "batch"),
    ],
)
async def test_bad_requests_get_a_4xx_naming_the_field(
    client: httpx.AsyncClient,
    workspace: SeededWorkspace,
    path: str,
    body: dict[str, object],
    status: int,
    field: str,
) -> None:
    response = await client.post(path, json=body, auth=(workspace.write_key, ""))
    assert response.status_code == status
    assert response.json()["success"] is False
    assert response.json()["field"] == field


async def test_a_batch_with_a_bad_event_is_refused_whole_naming_each_bad_event(
    client: httpx.AsyncClient, workspace: SeededWorkspace
) -> None:
    batch = [
        {"type": "track", "userId": "u", "event": "ok"},
        {"type": "track", "userId": "u"},
        {"type": "bogus", "userId": "u"},
    ]
    response = await client.post("/v1/batch", json={"batch": batch}, auth=(workspace.write_key, ""))
    assert response.status_code == 400
    errors = response.json()["errors"]
    assert [(e["index"], e["field"]) for e in errors] == [(1, "event"), (2, "type")]


async def test_invalid_json_and_unknown_keys_are_refused(
    client: httpx.AsyncClient, workspace: SeededWorkspace
) -> None:
    not_json = await client.post("/v1/track", content=b"{nope", auth=(workspace.write_key, ""))
    assert not_json.status_code == 400
    assert not_json.json()["field"] == "body"
    unknown = await client.post("/v1/track", json={"userId": "u", "event": "E"}, auth=("who", ""))
    assert unknown.status_code == 401
    assert unknown.json() == {
        "success": False,
        "error": "unknown or disabled write key",
        "field": "writeKey",
    }
    missing = await client.post("/v1/track", json={"userId": "u", "event": "E"})
    assert missing.status_code == 401
