"""RFM: recency, frequency and monetary scores, and the three matrices of the source
material (R x F, R x M, F x M), each of 9 named cells. Pure.

Scores are quintiles from 1 to 5 among the workspace's customers with a purchase in the
window, 5 being the best (most recent, most frequent, highest spend). A score is
``ceil(5 * cume_dist)``: customers with equal values always get the same score, and the
same rule is expressible in SQL (``cume_dist() OVER (ORDER BY ...)``) for set-based
computation over millions of contacts.

The matrices and their cell names are in :mod:`nudge_common.rfm`, shared with the condition
language.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from nudge_common.rfm import CELL_NAMES, level


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
