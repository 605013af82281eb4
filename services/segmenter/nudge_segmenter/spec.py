from __future__ import annotations

from pathlib import Path

from nudge_common.cli import ServiceSpec
from nudge_segmenter.settings import SegmenterSettings

SPEC = ServiceSpec(
    name="segmenter",
    app_factory="nudge_segmenter.app:create_app",
    schema="segmenter",
    migrations=Path(__file__).parent / "migrations",
    settings=SegmenterSettings,
)
