from __future__ import annotations

from pathlib import Path

from nudge_common.cli import ServiceSpec
from nudge_orchestrator.commands import CREATE_API_KEY
from nudge_orchestrator.settings import OrchestratorSettings

SPEC = ServiceSpec(
    name="orchestrator",
    app_factory="nudge_orchestrator.app:create_app",
    schema="orchestrator",
    migrations=Path(__file__).parent / "migrations",
    settings=OrchestratorSettings,
    commands=(CREATE_API_KEY,),
)
