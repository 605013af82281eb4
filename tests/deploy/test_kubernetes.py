"""The Kubernetes manifests stay in step with the code: every service has a Deployment whose
command is the service's own, whose probes are the routes every service serves, whose port is
the one it listens on, and whose settings are settings the service reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from nudge_common.service import health_router
from nudge_common.settings import NudgeSettings
from nudge_common.topics import TOPIC_SPECS
from nudge_devtools.services import SPECS

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


def documents() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        docs.extend(doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc)
    return docs


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in documents() if doc["kind"] == kind}


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_each_service_deployment_matches_the_code(spec: Any) -> None:
    deployment = of_kind("Deployment")[spec.name]
    service = of_kind("Service")[spec.name]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", f"nudge_{spec.name}", "run"]

    routes = {route.path for route in health_router.routes}  # type: ignore[attr-defined]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz" in routes
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz" in routes

    env = {item["name"]: item["value"] for item in container["env"]}
    [port] = container["ports"]
    assert int(env["NUDGE_HTTP_PORT"]) == port["containerPort"]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["requests"]["memory"]
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 30


def test_settings_in_manifests_are_settings_the_services_read() -> None:
    config = of_kind("ConfigMap")["nudge"]["data"]
    for variable in config:
        assert variable.removeprefix("NUDGE_").lower() in NudgeSettings.model_fields, variable


def test_consumer_replicas_fit_the_partition_count() -> None:
    partitions = min(spec.partitions for spec in TOPIC_SPECS if spec.topic != "deadletter")
    for name, deployment in of_kind("Deployment").items():
        assert deployment["spec"]["replicas"] <= partitions, name
