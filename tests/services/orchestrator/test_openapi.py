"""One OpenAPI document for the public API: the orchestrator's operations and those it
fronts, as the marketer calls them (no workspace parameter, the bearer key), with every
``$ref`` resolving."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from nudge_orchestrator.api import openapi
from nudge_orchestrator.app import create_app

REF = "#/components/schemas/"


def refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {v.removeprefix(REF) for k, v in node.items() if k == "$ref"}
        return found.union(*(refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(refs(v) for v in node))
    return set()


def request_schema(operation: dict[str, Any]) -> str:
    ref: str = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    return ref.removeprefix(REF)


def test_the_fronted_operations_are_in_the_orchestrators_document() -> None:
    document = create_app().openapi()
    paths, schemas = document["paths"], document["components"]["schemas"]
    assert request_schema(paths["/api/v1/segments"]["post"]) == "SegmentIn"
    assert request_schema(paths["/api/v1/workflows"]["post"]) == "WorkflowCreate"
    assert request_schema(paths["/api/v1/contacts/{contact_id}/tags"]["post"]) == "TagsPost"
    assert request_schema(paths["/api/v1/models/{name}/rules"]["post"]) == "RuleCreate"
    put = paths["/api/v1/suppressions/{channel}/{address}"]["put"]
    assert request_schema(put) == "SuppressionIn"
    assert [p["name"] for p in put["parameters"]] == ["channel", "address"]
    assert "segments" in paths["/api/v1/contacts/{contact_id}"]["get"]["description"]
    assert {"get", "delete"} <= paths["/api/v1/contacts/{contact_id}"].keys()
    for path in (
        "/api/v1/contacts",
        "/api/v1/contacts/{contact_id}/segments",
        "/api/v1/models",
        "/api/v1/segments/{segment_id}/members",
        "/api/v1/suppressions",
        "/api/v1/consents/{channel}/{address}",
        "/api/v1/hygiene/report",
    ):
        assert path in paths
    listed = [p["name"] for p in paths["/api/v1/segments"]["get"]["parameters"]]
    assert listed == ["kind", "after", "limit"]
    assert not [p for p in paths if not p.startswith(("/api/v1/", "/healthz", "/readyz"))]
    assert not [p for p in paths if p.startswith(("/api/v1/workspaces", "/api/v1/settings"))]
    operation_ids = []
    for path, item in paths.items():
        for operation in item.values():
            operation_ids.append(operation["operationId"])
            names = {(p["in"], p["name"].lower()) for p in operation.get("parameters", [])}
            assert ("header", "x-nudge-workspace") not in names, path
            assert ("path", "workspace_id") not in names, path
            if path.startswith("/api/v1/"):
                assert operation["security"] == [{"bearer": []}], path
    assert len(operation_ids) == len(set(operation_ids))
    assert "Idempotency-Key" in [p["name"] for p in paths["/api/v1/segments"]["post"]["parameters"]]
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert refs(document) <= schemas.keys()
    assert "SettingsPut" not in schemas  # scoring's, on a route not fronted


class WorkflowCreate(BaseModel):
    """Named as one of the orchestrator's schemas, with another content."""

    colour: str


def test_a_schema_named_as_another_is_renamed_with_its_refs() -> None:
    router = APIRouter(prefix="/api/v1")

    @router.post("/paints")
    async def paint(body: WorkflowCreate) -> WorkflowCreate:
        return body

    own = create_app()
    document = openapi.merged(
        get_openapi(title=own.title, version=own.version, routes=own.routes),
        [openapi.Owner("painter", [router], ("/api/v1/paints",))],
    )
    schemas = document["components"]["schemas"]
    assert request_schema(document["paths"]["/api/v1/paints"]["post"]) == "PainterWorkflowCreate"
    assert "colour" in schemas["PainterWorkflowCreate"]["properties"]
    assert "definition" in schemas["WorkflowCreate"]["properties"]
    assert refs(document) <= schemas.keys()


def test_the_document_is_built_once() -> None:
    app = create_app()
    assert app.openapi() is app.openapi()
