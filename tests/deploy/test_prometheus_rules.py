"""The alert and recording rules are valid, behave as their unit tests say (promtool), and
name only metrics the code really exports."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.metric_names import exported_metric_names, referenced_metric_names

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = sorted((PROMETHEUS / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("promtool")
    assert executable, "promtool is missing: scripts/test-tools installs it"
    return subprocess.run(
        [executable, *args], capture_output=True, text=True, check=False, cwd=PROMETHEUS
    )


def test_there_are_rules_and_rule_tests() -> None:
    assert RULES
    assert RULE_TESTS


@pytest.mark.parametrize("path", RULES, ids=lambda p: p.name)
def test_rules_are_valid(path: Path) -> None:
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", RULE_TESTS, ids=lambda p: p.name)
def test_rule_unit_tests_pass(path: Path) -> None:
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_prometheus_config_is_valid_and_loads_the_rules() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    assert "rules found" in result.stdout


@pytest.mark.parametrize("path", RULES, ids=lambda p: p.name)
def test_rules_name_only_exported_metrics(path: Path) -> None:
    unknown = referenced_metric_names(path.read_text()) - exported_metric_names()
    assert not unknown, f"{path.name} names metrics the code does not export: {unknown}"
