"""The settings document analytics.js loads from ``/v1/projects/{writeKey}/settings``
(Segment's CDN settings): Nudge is announced as the "Segment.io" destination's API host, and
no other destination is enabled, so the browser sends every call to Nudge only."""

from __future__ import annotations

from typing import Any


def settings_document(*, write_key: str, api_host: str, protocol: str) -> dict[str, Any]:
    """``api_host`` is ``host[:port]/v1``, without the scheme, as analytics.js expects."""
    return {
        "integrations": {
            "Segment.io": {
                "apiKey": write_key,
                "apiHost": api_host,
                "protocol": protocol,
                "unbundledIntegrations": [],
                "addBundledMetadata": True,
                "maybeBundledConfigIds": {},
                "versionSettings": {"version": "4.4.7", "componentTypes": ["browser"]},
            }
        },
        "plan": {
            "track": {"__default": {"enabled": True, "integrations": {}}},
            "identify": {"__default": {"enabled": True}},
            "group": {"__default": {"enabled": True}},
        },
        "edgeFunction": {},
        "analyticsNextEnabled": True,
        "middlewareSettings": {},
        "enabledMiddleware": {},
        "metrics": {"sampleRate": 0},
        "legacyVideoPluginsEnabled": False,
        "remotePlugins": [],
    }
