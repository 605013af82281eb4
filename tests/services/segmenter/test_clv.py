"""BG/NBD and Gamma-Gamma on the public CDNOW sample (see data/README.md): our summary of
the raw transactions matches the published calibration summary, and the fitted parameters
match the published ones within 1%."""

from __future__ import annotations

import csv
from collections import defaultdict
from datetime import date, datetime
from pathlib import Path

import pytest

from nudge_segmenter.domain.clv import (
    BgNbd,
    GammaGamma,
    PurchaseHistory,
    expected_purchases,
    expected_value_per_purchase,
    fit_bg_nbd,
    fit_gamma_gamma,
    lifetime_value,
    probability_alive,
    summarise,
)

DATA = Path(__file__).parent / "data"
CALIBRATION_END = date(1997, 9, 30)  # 39 weeks after 1997-01-01


@pytest.fixture(scope="module")
def purchases() -> dict[int, list[tuple[date, float]]]:
    by_customer: dict[int, list[tuple[date, float]]] = defaultdict(list)
    for line in (DATA / "cdnow_sample.txt").read_text().splitlines():
        _, customer, day, _, value = line.split()
        by_customer[int(customer)].append((datetime.strptime(day, "%Y%m%d").date(), float(value)))
    return by_customer


@pytest.fixture(scope="module")
def histories(purchases: dict[int, list[tuple[date, float]]]) -> dict[int, PurchaseHistory]:
    return {c: summarise(p, cut_off=CALIBRATION_END) for c, p in purchases.items()}


def test_our_calibration_summary_matches_the_published_one(
    histories: dict[int, PurchaseHistory],
) -> None:
    with (DATA / "cdnow_calibration_summary.csv").open() as file:
        published = {int(row["ID"]): row for row in csv.DictReader(file)}
    assert len(histories) == len(published) == 2357
    for customer, row in published.items():
        ours = histories[customer]
        assert ours.frequency == int(row["x"])
        assert ours.recency == pytest.approx(float(row["t_x"]), abs=0.006)
        assert ours.age == pytest.approx(float(row["T"]), abs=0.006)
        assert ours.monetary == pytest.approx(float(row["zbar"]), abs=0.006)


def test_bg_nbd_parameters_match_fader_hardie_lee_2005(
    histories: dict[int, PurchaseHistory],
) -> None:
    fitted = fit_bg_nbd(list(histories.values()))
    published = BgNbd(r=0.243, alpha=4.414, a=0.793, b=2.426)
    for name in ("r", "alpha", "a", "b"):
        assert getattr(fitted, name) == pytest.approx(getattr(published, name), rel=0.01), name


def test_gamma_gamma_parameters_match_fader_hardie_2013(
    histories: dict[int, PurchaseHistory],
) -> None:
    fitted = fit_gamma_gamma(list(histories.values()))
    published = GammaGamma(p=6.25, q=3.74, gamma=15.44)
    for name in ("p", "q", "gamma"):
        assert getattr(fitted, name) == pytest.approx(getattr(published, name), rel=0.01), name


PARAMS = BgNbd(r=0.243, alpha=4.414, a=0.793, b=2.426)


def test_the_39_week_forecast_is_close_to_what_the_cohort_really_bought(
    purchases: dict[int, list[tuple[date, float]]], histories: dict[int, PurchaseHistory]
) -> None:
    holdout_purchase_days = sum(
        len({day for day, _ in p if day > CALIBRATION_END}) for p in purchases.values()
    )
    forecast = sum(expected_purchases(PARAMS, h, 39) for h in histories.values())
    # 2,457 repeat purchases in calibration, as in the paper; 1,882 in the holdout against a
    # forecast of about 1,654: the model under-forecasts this cohort's second year a little,
    # but a wrong formula would miss by far more than 15%.
    assert sum(h.frequency for h in histories.values()) == 2457
    assert forecast == pytest.approx(holdout_purchase_days, rel=0.15)


def test_predictions_behave_as_the_model_says() -> None:
    # Someone who bought often but long ago is less likely alive than a recent buyer.
    lapsed = PurchaseHistory(frequency=5, recency=5.0, age=38.86, monetary=20)
    recent = PurchaseHistory(frequency=5, recency=38.0, age=38.86, monetary=20)
    assert probability_alive(PARAMS, lapsed) < 0.2 < probability_alive(PARAMS, recent)
    assert probability_alive(PARAMS, PurchaseHistory(0, 0.0, 38.86, 0.0)) == 1.0


def test_lifetime_value_adds_up_and_discounts() -> None:
    spend = GammaGamma(p=6.25, q=3.74, gamma=15.44)
    customer = PurchaseHistory(frequency=2, recency=30.43, age=38.86, monetary=22.35)
    undiscounted = lifetime_value(PARAMS, spend, customer, periods=39)
    expected = expected_purchases(PARAMS, customer, 39) * expected_value_per_purchase(
        spend, customer
    )
    assert undiscounted == pytest.approx(expected)
    assert lifetime_value(PARAMS, spend, customer, periods=39, discount_rate=0.01) < undiscounted
    newcomer = PurchaseHistory(frequency=0, recency=0.0, age=1.0, monetary=0.0)
    assert expected_value_per_purchase(spend, newcomer) == pytest.approx(6.25 * 15.44 / 2.74)
