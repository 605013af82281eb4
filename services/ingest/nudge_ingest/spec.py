from __future__ import annotations

from pathlib import Path

from nudge_common.cli import ServiceSpec
from nudge_ingest.settings import IngestSettings

SPEC = ServiceSpec(
    name="ingest",
    app_factory="nudge_ingest.app:create_app",
    schema="ingest",
    migrations=Path(__file__).parent / "migrations",
    settings=IngestSettings,
)
