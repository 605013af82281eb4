"""What ingest does at the edge: the analytics.js settings document, the tracker script,
CORS, client addresses behind trusted proxies, the country lookup and rate limits."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest

from nudge_common.events import EVENT_RECEIVED
from nudge_devtools.seed import SeededWorkspace
from tests.conftest import StackHandle
from tests.services.ingest.conftest import ClientFactory
from tests.services.ingest.test_tracking_api import published

FIXTURE = Path(__file__).parent / "fixtures" / "countries.csv"


async def test_analytics_js_settings_name_ingest_as_the_api_host(
    ingest_client: ClientFactory, workspace: SeededWorkspace
) -> None:
    async with ingest_client() as client:
        response = await client.get(
            f"/v1/projects/{workspace.write_key}/settings", headers={"Host": "nudge.test:8001"}
        )
        unknown = await client.get("/v1/projects/nope/settings")
    assert response.status_code == 200
    segment_io = response.json()["integrations"]["Segment.io"]
    assert segment_io["apiKey"] == workspace.write_key
    assert segment_io["apiHost"] == "nudge.test:8001/v1"
    assert segment_io["protocol"] == "http"
    assert unknown.status_code == 404
    assert unknown.json()["field"] == "writeKey"


async def test_settings_behind_a_trusted_tls_proxy_announce_https_and_the_public_host(
    ingest_client: ClientFactory, workspace: SeededWorkspace
) -> None:
    env = {"NUDGE_TRUSTED_PROXIES": '["10.0.0.0/8"]', "NUDGE_PUBLIC_API_HOST": "t.example/v1"}
    async with ingest_client(peer="10.0.0.2", **env) as client:
        response = await client.get(
            f"/v1/projects/{workspace.write_key}/settings", headers={"X-Forwarded-Proto": "https"}
        )
    segment_io = response.json()["integrations"]["Segment.io"]
    assert (segment_io["apiHost"], segment_io["protocol"]) == ("t.example/v1", "https")


async def test_the_tracker_is_served_with_cors_for_any_origin(
    ingest_client: ClientFactory,
) -> None:
    async with ingest_client() as client:
        script = await client.get("/js/nudge.js")
        preflight = await client.options(
            "/v1/batch",
            headers={
                "Origin": "https://shop.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("application/javascript")
    assert b"sendBeacon" in script.content
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"


async def test_client_ip_and_country_come_from_a_trusted_proxy_headers(
    stack: StackHandle, ingest_client: ClientFactory, workspace: SeededWorkspace
) -> None:
    ids = [str(uuid.uuid4()) for _ in range(3)]
    env = {"NUDGE_TRUSTED_PROXIES": '["10.0.0.0/8"]', "NUDGE_GEOIP_CSV_PATH": str(FIXTURE)}
    call = {"userId": "u-geo", "event": "E"}
    auth = (workspace.write_key, "")
    async with ingest_client(peer="10.0.0.2", **env) as proxied:
        behind = await proxied.post(
            "/v1/track",
            json={**call, "messageId": ids[0]},
            headers={"X-Forwarded-For": "6.6.6.6, 203.0.113.200"},
            auth=auth,
        )
        own_location = await proxied.post(
            "/v1/track",
            json={**call, "messageId": ids[1], "context": {"location": {"country": "IT"}}},
            headers={"X-Forwarded-For": "203.0.113.200"},
            auth=auth,
        )
    async with ingest_client(peer="198.51.100.7", **env) as direct:
        forged = await direct.post(
            "/v1/track",
            json={**call, "messageId": ids[2]},
            headers={"X-Forwarded-For": "203.0.113.200"},
            auth=auth,
        )
    assert [r.status_code for r in (behind, own_location, forged)] == [200] * 3
    events = {
        m: EVENT_RECEIVED.parse(e)
        for m, e in (await published(stack, workspace.workspace_id, ids)).items()
    }
    assert events[ids[0]].context["ip"] == "203.0.113.200"
    assert events[ids[0]].context["location"] == {"country": "DE"}
    assert events[ids[1]].context["location"] == {"country": "IT"}
    assert events[ids[2]].context["ip"] == "198.51.100.7"
    assert events[ids[2]].context["location"] == {"country": "NL"}


async def test_a_write_key_over_its_rate_gets_429_with_retry_after(
    ingest_client: ClientFactory, workspace: SeededWorkspace
) -> None:
    env = {"NUDGE_RATE_LIMIT_PER_S": "0.01", "NUDGE_RATE_LIMIT_BURST": "3"}
    call = {"userId": "u-rl", "event": "E"}
    async with ingest_client(**env) as client:
        answers = [
            await client.post("/v1/track", json=call, auth=(workspace.write_key, ""))
            for _ in range(4)
        ]
        batch = await client.post(
            "/v1/batch", json={"batch": [{**call, "type": "track"}]}, auth=(workspace.write_key, "")
        )
        unknown = await client.post("/v1/track", json=call, auth=("nope", ""))
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert batch.status_code == 429
    assert int(answers[3].headers["retry-after"]) >= 1
    assert answers[3].json()["field"] == "writeKey"
    assert "rate limit" in answers[3].json()["error"]
    assert unknown.status_code == 401  # an unknown key is refused before it is counted


@pytest.mark.parametrize("path", ["/v1/track", "/v1/batch", "/v1/group"])
async def test_openapi_documents_the_request_bodies(client: httpx.AsyncClient, path: str) -> None:
    document = (await client.get("/openapi.json")).json()
    body = document["paths"][path]["post"]["requestBody"]
    assert "application/json" in body["content"]
