"""The JSON response for handlers that build their response by hand (errors, readiness):
encoded with the project's codec."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from nudge_common import codec


class JsonResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return codec.dumps(content)
