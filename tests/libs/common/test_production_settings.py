"""Production refuses the development defaults that would make it unsafe: the development
database, the published tracking and webhook secrets, a test clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from nudge_common.settings import NudgeSettings
from nudge_common.tracking import TrackingSettings
from nudge_notifier.settings import NotifierSettings
from nudge_orchestrator.settings import OrchestratorSettings
from nudge_segmenter.settings import SegmenterSettings

SAFE: dict[str, Any] = {
    "environment": "production",
    "database_url": "postgresql+asyncpg://nudge:secret@db.internal:5432/nudge",
}


@pytest.mark.parametrize(
    ("settings", "values", "message"),
    [
        (NudgeSettings, {"environment": "production"}, "NUDGE_DATABASE_URL"),
        (TrackingSettings, {"environment": "production"}, "NUDGE_TRACKING_SECRET"),
        (NotifierSettings, SAFE, "NUDGE_TRACKING_SECRET"),
        (OrchestratorSettings, SAFE, "NUDGE_WEBHOOK_SECRET"),
        (SegmenterSettings, {**SAFE, "clock_file": Path("clock")}, "clock_file"),
    ],
)
def test_production_refuses_development_defaults(
    settings: type[Any], values: dict[str, Any], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (
        "NUDGE_ENVIRONMENT",
        "NUDGE_DATABASE_URL",
        "NUDGE_TRACKING_SECRET",
        "NUDGE_WEBHOOK_SECRET",
    ):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValidationError, match=message):
        settings(**values)


def test_production_with_its_own_secrets_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NUDGE_TRACKING_SECRET", "a-real-secret")
    assert TrackingSettings(environment="production").tracking_secret.get_secret_value()
    assert NotifierSettings(**SAFE).environment == "production"
