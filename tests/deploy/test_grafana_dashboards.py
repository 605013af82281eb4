"""The Grafana dashboards: an overview and one per service, every panel query valid PromQL
that names only metrics the code exports and recording rules that exist, all provisioned
by docker-compose."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from nudge_devtools.services import SPECS
from tests.deploy.metric_names import exported_metric_names, referenced_metric_names

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "deploy" / "grafana" / "dashboards"
RULES = REPO / "deploy" / "prometheus" / "rules"


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def queries(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def recorded_names() -> set[str]:
    names: set[str] = set()
    for path in RULES.glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            names.update(rule["record"] for rule in group["rules"] if "record" in rule)
    return names


def test_an_overview_and_one_dashboard_per_service() -> None:
    assert set(dashboards()) == {"overview"} | {spec.name for spec in SPECS}
    uids = [board["uid"] for board in dashboards().values()]
    assert len(uids) == len(set(uids))


@pytest.mark.parametrize("name", sorted(dashboards()))
def test_every_query_names_exported_metrics_and_existing_recording_rules(name: str) -> None:
    exported, recorded = exported_metric_names(), recorded_names()
    for expr in queries(dashboards()[name]):
        assert referenced_metric_names(expr) or re.search(r"nudge:", expr), expr
        assert not referenced_metric_names(expr) - exported, expr
        assert set(re.findall(r"nudge:[a-z0-9_:]+", expr)) <= recorded, expr


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    rules = {
        "groups": [
            {
                "name": name,
                "rules": [
                    {"record": f"dashboard:query:{n}", "expr": expr}
                    for n, expr in enumerate(queries(board))
                ],
            }
            for name, board in dashboards().items()
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: scripts/test-tools installs it"
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_provisions_the_datasource_and_dashboards() -> None:
    grafana = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["grafana"]
    mounts = {volume.split(":")[1] for volume in grafana["volumes"]}
    assert {"/etc/grafana/provisioning", "/var/lib/grafana/dashboards"} <= mounts
    provider = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/dashboards/nudge.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    datasource_uids = {
        panel["datasource"]["uid"] for board in dashboards().values() for panel in board["panels"]
    }
    provisioned = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert datasource_uids == {d["uid"] for d in provisioned["datasources"]}
