from __future__ import annotations

from nudge_common.settings import NudgeSettings


class SegmenterSettings(NudgeSettings):
    service_name: str = "segmenter"
    http_port: int = 8003
