"""The three RFM matrices of the source material (R x F, R x M, F x M), each of 9 named
cells. A score (1-5 quintile) becomes a level on each axis: 1-2 low, 3 medium, 4-5 high.

Shared by the segmenter, which scores contacts, and the segment condition language, which
names cells (``{"kind": "rfm_cell", "matrix": "rf", "cell": "champions"}``)."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal


class Level(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


LEVEL_SCORES: dict[Level, tuple[int, int]] = {
    Level.LOW: (1, 2),
    Level.MEDIUM: (3, 3),
    Level.HIGH: (4, 5),
}
"""The range of scores (inclusive) of each level."""


def level(score: int) -> Level:
    if score <= 2:
        return Level.LOW
    return Level.MEDIUM if score == 3 else Level.HIGH


Matrix = Literal["rf", "rm", "fm"]
Axis = Literal["recency", "frequency", "monetary"]

MATRIX_AXES: dict[Matrix, tuple[Axis, Axis]] = {
    "rf": ("recency", "frequency"),
    "rm": ("recency", "monetary"),
    "fm": ("frequency", "monetary"),
}

_L, _M, _H = Level.LOW, Level.MEDIUM, Level.HIGH

CELL_NAMES: dict[Matrix, dict[tuple[Level, Level], str]] = {
    "rf": {
        (_H, _H): "champions",
        (_H, _M): "potential loyalists",
        (_H, _L): "new customers",
        (_M, _H): "loyal",
        (_M, _M): "need attention",
        (_M, _L): "promising",
        (_L, _H): "at risk",
        (_L, _M): "about to sleep",
        (_L, _L): "hibernating",
    },
    "rm": {
        (_H, _H): "active big spenders",
        (_H, _M): "active mid spenders",
        (_H, _L): "active low spenders",
        (_M, _H): "cooling big spenders",
        (_M, _M): "cooling mid spenders",
        (_M, _L): "cooling low spenders",
        (_L, _H): "lapsed big spenders",
        (_L, _M): "lapsed mid spenders",
        (_L, _L): "lapsed low spenders",
    },
    "fm": {
        (_H, _H): "top customers",
        (_H, _M): "frequent mid spenders",
        (_H, _L): "frequent bargain hunters",
        (_M, _H): "occasional big spenders",
        (_M, _M): "regulars",
        (_M, _L): "occasional low spenders",
        (_L, _H): "one-off big spenders",
        (_L, _M): "one-off mid spenders",
        (_L, _L): "one-off low spenders",
    },
}


def cell_levels(matrix: Matrix, cell: str) -> tuple[Level, Level] | None:
    """The levels on the matrix's two axes of a named cell (None for an unknown name)."""
    for levels, name in CELL_NAMES[matrix].items():
        if name == cell:
            return levels
    return None
