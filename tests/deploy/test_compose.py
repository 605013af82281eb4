"""docker-compose.yml stays in step with the code: it parses, every Nudge command in it is a
real command of the code, every NUDGE_ variable it sets is a setting the service reads, and
its Kafka image is the version the local stack pins."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from nudge_common.cli import ServiceSpec
from nudge_devtools.services import SPECS

REPO = Path(__file__).resolve().parents[2]
SPEC_BY_MODULE: dict[str, ServiceSpec] = {f"nudge_{spec.name}": spec for spec in SPECS}


def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def nudge_commands() -> list[list[str]]:
    """Every `python -m <module> ...` invocation in the compose file."""
    commands: list[list[str]] = []
    for service in compose()["services"].values():
        command = service.get("command")
        if command is None:
            continue
        text = command[-1] if command[:2] == ["sh", "-c"] else shlex.join(command)
        for part in re.split(r"&&", text):
            words = shlex.split(part)
            if words[:2] == ["python", "-m"]:
                commands.append(words[2:])
    return commands


def test_compose_parses_and_names_every_service() -> None:
    services = compose()["services"]
    assert {spec.name for spec in SPECS} <= set(services)
    assert {"kafka", "postgres", "prometheus", "grafana"} <= set(services)


@pytest.mark.parametrize("command", nudge_commands(), ids=lambda c: " ".join(c))
def test_every_command_exists_in_the_code(command: list[str]) -> None:
    module, *args = command
    result = subprocess.run(
        [sys.executable, "-m", module, *args, "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_every_nudge_variable_is_a_setting_of_its_service() -> None:
    for name, service in compose()["services"].items():
        spec = SPEC_BY_MODULE.get(f"nudge_{name}")
        if spec is None:
            continue
        fields = set(spec.settings.model_fields)
        for variable in service.get("environment", {}):
            assert variable.startswith("NUDGE_"), variable
            assert variable.removeprefix("NUDGE_").lower() in fields, f"{name}: {variable}"


def test_kafka_image_matches_the_pinned_broker() -> None:
    pom = (REPO / "deploy" / "kafka" / "pom.xml").read_text()
    match = re.search(r"<kafka.version>([^<]+)</kafka.version>", pom)
    assert match is not None
    assert compose()["services"]["kafka"]["image"] == f"apache/kafka:{match.group(1)}"
