from __future__ import annotations

from pathlib import Path

from nudge_common.cli import ServiceSpec
from nudge_scoring.settings import ScoringSettings

SPEC = ServiceSpec(
    name="scoring",
    app_factory="nudge_scoring.app:create_app",
    schema="scoring",
    migrations=Path(__file__).parent / "migrations",
    settings=ScoringSettings,
)
