"""RFM: recency, frequency and monetary scores, and the three matrices of the source
material (R x F, R x M, F x M), each of 9 named cells. Pure.

Scores are quintiles from 1 to 5 among the workspace's customers with a purchase in the
window, 5 being the best (most recent, most frequent, highest spend). A score is
``ceil(5 * cume_dist)``: customers with equal values always get the same score, and the
same rule is expressible in SQL (``cume_dist() OVER (ORDER BY ...)``) for set-based
computation over millions of contacts.

For the matrices each score becomes a level: 1-2 low, 3 medium, 4-5 high.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Literal, TypeVar


@dataclass(frozen=True)
class CustomerValue:
    last_purchase_at: datetime
    orders: int
    revenue: float


@dataclass(frozen=True)
class RfmScores:
    recency: int
    frequency: int
    monetary: int


class Level(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


def level(score: int) -> Level:
    if score <= 2:
        return Level.LOW
    return Level.MEDIUM if score == 3 else Level.HIGH


Matrix = Literal["rf", "rm", "fm"]

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


@dataclass(frozen=True)
class RfmCells:
    rf: str
    rm: str
    fm: str


def cells(scores: RfmScores) -> RfmCells:
    r, f, m = level(scores.recency), level(scores.frequency), level(scores.monetary)
    return RfmCells(
        rf=CELL_NAMES["rf"][(r, f)], rm=CELL_NAMES["rm"][(r, m)], fm=CELL_NAMES["fm"][(f, m)]
    )


K = TypeVar("K", bound=Hashable)


def score_customers(customers: Mapping[K, CustomerValue]) -> dict[K, RfmScores]:
    """Quintile scores of every customer among the given ones."""
    recency = quintiles({k: c.last_purchase_at.timestamp() for k, c in customers.items()})
    frequency = quintiles({k: float(c.orders) for k, c in customers.items()})
    monetary = quintiles({k: c.revenue for k, c in customers.items()})
    return {k: RfmScores(recency[k], frequency[k], monetary[k]) for k in customers}


def quintiles(values: Mapping[K, float]) -> dict[K, int]:
    """``ceil(5 * cume_dist)``: the share of values at or below each value, in fifths."""
    ordered: Sequence[float] = sorted(values.values())
    total = len(ordered)
    return {
        key: max(1, math.ceil(5 * bisect.bisect_right(ordered, value) / total))
        for key, value in values.items()
    }
