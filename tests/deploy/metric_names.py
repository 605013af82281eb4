"""The names of every metric the code exports, as Prometheus sees them."""

from __future__ import annotations

import importlib
import re

from prometheus_client import REGISTRY

METRIC_MODULES = [
    "nudge_common.metrics",
    "nudge_ingest.metrics",
    "nudge_scoring.metrics",
    "nudge_segmenter.metrics",
    "nudge_orchestrator.metrics",
    "nudge_notifier.metrics",
]
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "gauge": ("",),
}
# A metric name not preceded by ':' (recording rule names look like nudge:lag:sum).
METRIC_REFERENCE = re.compile(r"(?<![:\w])(nudge_[a-z0-9_]+)")


def exported_metric_names() -> set[str]:
    for module in METRIC_MODULES:
        importlib.import_module(module)
    names: set[str] = set()
    for family in REGISTRY.collect():
        for suffix in SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def referenced_metric_names(text: str) -> set[str]:
    return set(METRIC_REFERENCE.findall(text))
