"""One OpenAPI document for the whole public API: the orchestrator's own operations and
those it fronts (``api/fronted.py``), taken from the owners' own FastAPI routers so that
their bodies, parameters and answers are described where they are defined.

Each owner's document is built from its routers, restricted to the paths the orchestrator
fronts, and rewritten as the orchestrator serves it: the notifier's
``/api/v1/workspaces/{workspace_id}`` prefix and path parameter, and the
``X-Nudge-Workspace`` header of scoring and the segmenter, go (the workspace is the key's);
every ``/api/v1`` operation requires the bearer key. A component schema named as another
one of a different content is renamed ``<Owner><Name>``, and its ``$ref``s with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi

from nudge_notifier.api import internal as notifier_api
from nudge_scoring.api import routers as scoring_routers
from nudge_segmenter.api import routers as segmenter_routers

REF = "#/components/schemas/"
SECURITY_SCHEME = "bearer"
WORKSPACE_HEADER = "x-nudge-workspace"


@dataclass(frozen=True)
class Owner:
    name: str
    routers: Sequence[APIRouter]
    prefixes: tuple[str, ...]
    """The public paths fronted: an owner's path is kept when it starts with one."""
    internal_prefix: str = "/api/v1"
    tag: str | None = None
    """Replaces the owner's tags (the notifier's read ``internal``)."""


OWNERS = (
    Owner("scoring", scoring_routers, ("/api/v1/contacts", "/api/v1/models")),
    Owner(
        "segmenter",
        segmenter_routers,
        ("/api/v1/segments", "/api/v1/contacts/{contact_id}/segments"),
    ),
    Owner(
        "notifier",
        [notifier_api.router],
        ("/api/v1/suppressions", "/api/v1/consents", "/api/v1/hygiene"),
        internal_prefix="/api/v1/workspaces/{workspace_id}",
        tag="suppression and consent",
    ),
)
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "A retry with the same key gets the first 2xx answer again, "
    "with `Idempotent-Replayed: true`; the owner is called once.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 200},
}
CONTACT_360 = (
    "Served by the orchestrator with `segments` (the segments and lists the contact is in) "
    "and `value` (RFM, CLV) from the segmenter added; `segments` is null when the segmenter "
    "does not answer."
)


def install(app: FastAPI) -> None:
    """Make ``app.openapi()`` (and ``/openapi.json``) the merged document."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            own = get_openapi(title=app.title, version=app.version, routes=app.routes)
            app.openapi_schema = merged(own, OWNERS)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def owner_document(owner: Owner) -> dict[str, Any]:
    app = FastAPI()
    for router in owner.routers:
        app.include_router(router)
    return app.openapi()


def merged(own: dict[str, Any], owners: Sequence[Owner]) -> dict[str, Any]:
    document = dict(own)
    paths: dict[str, Any] = dict(document.get("paths", {}))
    components = dict(document.get("components", {}))
    schemas: dict[str, Any] = dict(components.get("schemas", {}))
    operation_ids = {
        op["operationId"] for item in paths.values() for op in item.values() if "operationId" in op
    }
    for owner in owners:
        theirs = owner_document(owner)
        renames: dict[str, str] = {}
        for name, schema in theirs.get("components", {}).get("schemas", {}).items():
            if name in schemas and schemas[name] != schema:
                renames[name] = f"{owner.name.capitalize()}{name}"
        rename = _ref_renamer(renames)
        kept: dict[str, Any] = {}
        for internal_path, item in theirs["paths"].items():
            if not internal_path.startswith(owner.internal_prefix):
                continue
            path = "/api/v1" + internal_path.removeprefix(owner.internal_prefix)
            if not path.startswith(owner.prefixes):
                continue
            if path in paths:
                raise ValueError(f"{owner.name} and another owner both serve {path}")
            kept[path] = {
                method: _public(owner, path, method, rename(operation), operation_ids)
                for method, operation in item.items()
            }
        paths.update(kept)
        theirs_schemas = {
            renames.get(name, name): rename(schema)
            for name, schema in theirs.get("components", {}).get("schemas", {}).items()
        }
        for name in _referenced(kept, theirs_schemas):
            schemas[name] = theirs_schemas[name]
    view = paths.get("/api/v1/contacts/{contact_id}", {}).get("get")
    if view is not None:
        view["description"] = f"{view.get('description', '')}\n\n{CONTACT_360}".strip()
    for path, item in paths.items():
        if path.startswith("/api/v1/"):
            for operation in item.values():
                operation["security"] = [{SECURITY_SCHEME: []}]
    components["schemas"] = schemas
    components["securitySchemes"] = {
        SECURITY_SCHEME: {
            "type": "http",
            "scheme": "bearer",
            "description": "A secret API key of the workspace: `Authorization: Bearer nsk_...`",
        }
    }
    document["paths"] = paths
    document["components"] = components
    return document


def _public(
    owner: Owner, path: str, method: str, operation: dict[str, Any], operation_ids: set[str]
) -> dict[str, Any]:
    operation = dict(operation)
    parameters = [
        p
        for p in operation.get("parameters", [])
        if not (p["in"] == "header" and p["name"].lower() == WORKSPACE_HEADER)
        and not (p["in"] == "path" and "{" + p["name"] + "}" not in path)
    ]
    if method == "post":
        parameters.append(IDEMPOTENCY_KEY)
    if parameters:
        operation["parameters"] = parameters
    else:
        operation.pop("parameters", None)
    if owner.tag:
        operation["tags"] = [owner.tag]
    if "operationId" in operation:
        if operation["operationId"] in operation_ids:
            operation["operationId"] = f"{owner.name}_{operation['operationId']}"
        operation_ids.add(operation["operationId"])
    return operation


def _ref_renamer(renames: dict[str, str]) -> Callable[[Any], Any]:
    def rename(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                key: (
                    REF + renames.get(value.removeprefix(REF), value.removeprefix(REF))
                    if key == "$ref" and isinstance(value, str) and value.startswith(REF)
                    else rename(value)
                )
                for key, value in node.items()
            }
        if isinstance(node, list):
            return [rename(value) for value in node]
        return node

    return rename


def _referenced(node: Any, schemas: dict[str, Any]) -> set[str]:
    """The names of the schemas ``node`` refers to, directly or through other schemas."""
    found: set[str] = set()
    pending = [node]
    while pending:
        current = pending.pop()
        if isinstance(current, dict):
            ref = current.get("$ref")
            if isinstance(ref, str) and ref.startswith(REF):
                name = ref.removeprefix(REF)
                if name not in found and name in schemas:
                    found.add(name)
                    pending.append(schemas[name])
            pending.extend(current.values())
        elif isinstance(current, list):
            pending.extend(current)
    return found
