from __future__ import annotations

from pathlib import Path

from nudge_common.cli import ServiceSpec
from nudge_notifier.settings import NotifierSettings

SPEC = ServiceSpec(
    name="notifier",
    app_factory="nudge_notifier.app:create_app",
    schema="notifier",
    migrations=Path(__file__).parent / "migrations",
    settings=NotifierSettings,
)
