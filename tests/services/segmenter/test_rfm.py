from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from nudge_common.rfm import CELL_NAMES, Level, level
from nudge_segmenter.domain.rfm import (
    CustomerValue,
    RfmScores,
    cells,
    quintiles,
    score_customers,
)

NOW = datetime(2026, 11, 23, tzinfo=UTC)


def test_quintiles_split_ten_distinct_values_two_per_score() -> None:
    scores = quintiles({i: float(i) for i in range(10)})
    assert [scores[i] for i in range(10)] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_equal_values_always_share_a_score() -> None:
    scores = quintiles({"a": 1.0, "b": 1.0, "c": 1.0, "d": 9.0})
    assert scores["a"] == scores["b"] == scores["c"] == 4
    assert scores["d"] == 5


def test_best_customers_score_five_on_every_axis() -> None:
    customers = {
        i: CustomerValue(NOW - timedelta(days=100 - i), orders=i + 1, revenue=10.0 * (i + 1))
        for i in range(100)
    }
    scores = score_customers(customers)
    assert scores[99] == RfmScores(5, 5, 5)
    assert scores[0] == RfmScores(1, 1, 1)
    assert sorted({s.recency for s in scores.values()}) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("scores", "rf", "rm", "fm"),
    [
        (RfmScores(5, 5, 5), "champions", "active big spenders", "top customers"),
        (RfmScores(1, 5, 4), "at risk", "lapsed big spenders", "top customers"),
        (RfmScores(1, 1, 1), "hibernating", "lapsed low spenders", "one-off low spenders"),
        (RfmScores(3, 3, 3), "need attention", "cooling mid spenders", "regulars"),
    ],
)
def test_cells_have_readable_names(scores: RfmScores, rf: str, rm: str, fm: str) -> None:
    named = cells(scores)
    assert (named.rf, named.rm, named.fm) == (rf, rm, fm)


def test_three_matrices_of_nine_distinct_cells_make_27_segments() -> None:
    names = [name for matrix in CELL_NAMES.values() for name in matrix.values()]
    assert len(names) == len(set(names)) == 27
    assert all(len(matrix) == 9 for matrix in CELL_NAMES.values())
    assert [level(s) for s in range(1, 6)] == [
        Level.LOW,
        Level.LOW,
        Level.MEDIUM,
        Level.HIGH,
        Level.HIGH,
    ]
