"""Customer lifetime value from purchase histories. Pure (numpy and scipy only).

* **BG/NBD** (Fader, Hardie and Lee 2005) models how often a customer buys while "alive"
  and the chance they have silently dropped out after each purchase. From a customer's
  repeat purchases ``x``, the time of the last one ``t_x`` and their age ``T`` (all
  measured from their first purchase) it gives the expected number of purchases in the
  next ``t`` periods and the probability of being alive.
* **Gamma-Gamma** (Fader and Hardie 2013) models the value of a purchase: from the mean
  value of a customer's repeat purchases it gives their expected value per purchase,
  shrunk towards the population mean when they bought rarely.

A customer's CLV over a horizon is expected purchases in each period times expected
value, discounted period by period.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date

import numpy as np
from numpy.typing import NDArray
from scipy import optimize, special

Floats = NDArray[np.float64]


@dataclass(frozen=True)
class PurchaseHistory:
    """One customer's purchases up to a cut-off, in periods (weeks by default)."""

    frequency: int
    """Repeat purchases: days with a purchase after the first purchase day."""
    recency: float
    """From the first purchase to the last one."""
    age: float
    """From the first purchase to the cut-off (``T``)."""
    monetary: float
    """Mean value of the repeat purchases (0 without repeat purchases)."""


def summarise(
    purchases: Iterable[tuple[date, float]], *, cut_off: date, period_days: float = 7.0
) -> PurchaseHistory:
    """Summarise purchases on or before ``cut_off``. Purchases on the same day count as
    one purchase of their total value, as in the BG/NBD literature."""
    by_day: dict[date, float] = defaultdict(float)
    for day, value in purchases:
        if day <= cut_off:
            by_day[day] += value
    if not by_day:
        raise ValueError("a purchase history needs at least one purchase before the cut-off")
    days = sorted(by_day)
    first, repeats = days[0], days[1:]
    return PurchaseHistory(
        frequency=len(repeats),
        recency=(days[-1] - first).days / period_days,
        age=(cut_off - first).days / period_days,
        monetary=float(np.mean([by_day[d] for d in repeats])) if repeats else 0.0,
    )


@dataclass(frozen=True)
class BgNbd:
    r: float
    alpha: float
    a: float
    b: float


@dataclass(frozen=True)
class GammaGamma:
    p: float
    q: float
    gamma: float


class FitError(Exception):
    """The optimiser did not converge: the data cannot support the model."""


def _columns(histories: Sequence[PurchaseHistory]) -> tuple[Floats, Floats, Floats]:
    x = np.array([h.frequency for h in histories], dtype=np.float64)
    t_x = np.array([h.recency for h in histories], dtype=np.float64)
    age = np.array([h.age for h in histories], dtype=np.float64)
    return x, t_x, age


def bg_nbd_log_likelihood(params: BgNbd, histories: Sequence[PurchaseHistory]) -> float:
    x, t_x, age = _columns(histories)
    return float(np.sum(_bg_nbd_individual_ll(params, x, t_x, age)))


def _bg_nbd_individual_ll(params: BgNbd, x: Floats, t_x: Floats, age: Floats) -> Floats:
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    a1 = special.gammaln(r + x) - special.gammaln(r) + r * np.log(alpha)
    a2 = (
        special.gammaln(a + b)
        + special.gammaln(b + x)
        - special.gammaln(b)
        - special.gammaln(a + b + x)
    )
    a3 = -(r + x) * np.log(alpha + age)
    repeat = x > 0
    a4 = np.full_like(x, -np.inf)
    a4[repeat] = (
        np.log(a) - np.log(b + x[repeat] - 1) - (r + x[repeat]) * np.log(alpha + t_x[repeat])
    )
    result: Floats = a1 + a2 + np.logaddexp(a3, a4)
    return result


def fit_bg_nbd(histories: Sequence[PurchaseHistory]) -> BgNbd:
    """Maximum-likelihood BG/NBD parameters for a cohort."""
    x, t_x, age = _columns(histories)

    def negative_ll(log_params: Floats) -> float:
        r, alpha, a, b = np.exp(log_params)
        return -float(np.sum(_bg_nbd_individual_ll(BgNbd(r, alpha, a, b), x, t_x, age)))

    fitted = _minimise(negative_ll, np.zeros(4))
    r, alpha, a, b = np.exp(fitted)
    return BgNbd(float(r), float(alpha), float(a), float(b))


def expected_purchases(params: BgNbd, history: PurchaseHistory, periods: float) -> float:
    """Expected purchases in the next ``periods`` (FHL 2005, equation 10)."""
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    x, age = history.frequency, history.age
    hypergeometric = special.hyp2f1(r + x, b + x, a + b + x - 1, periods / (alpha + age + periods))
    numerator = (
        (a + b + x - 1)
        / (a - 1)
        * (1 - ((alpha + age) / (alpha + age + periods)) ** (r + x) * hypergeometric)
    )
    return float(numerator / _dropout_odds(params, history))


def probability_alive(params: BgNbd, history: PurchaseHistory) -> float:
    return float(1 / _dropout_odds(params, history))


def _dropout_odds(params: BgNbd, history: PurchaseHistory) -> float:
    x = history.frequency
    if x == 0:
        return 1.0
    ratio = (params.alpha + history.age) / (params.alpha + history.recency)
    return float(1 + params.a / (params.b + x - 1) * ratio ** (params.r + x))


def fit_gamma_gamma(histories: Sequence[PurchaseHistory]) -> GammaGamma:
    """Maximum-likelihood Gamma-Gamma parameters from customers with repeat purchases."""
    repeaters = [h for h in histories if h.frequency > 0 and h.monetary > 0]
    if not repeaters:
        raise FitError("the Gamma-Gamma model needs customers with repeat purchases")
    x = np.array([h.frequency for h in repeaters], dtype=np.float64)
    m = np.array([h.monetary for h in repeaters], dtype=np.float64)

    def negative_ll(log_params: Floats) -> float:
        p, q, gamma = np.exp(log_params)
        ll = (
            special.gammaln(p * x + q)
            - special.gammaln(p * x)
            - special.gammaln(q)
            + q * np.log(gamma)
            + (p * x - 1) * np.log(m)
            + p * x * np.log(x)
            - (p * x + q) * np.log(x * m + gamma)
        )
        return -float(np.sum(ll))

    fitted = _minimise(negative_ll, np.zeros(3))
    p, q, gamma = np.exp(fitted)
    return GammaGamma(float(p), float(q), float(gamma))


def expected_value_per_purchase(params: GammaGamma, history: PurchaseHistory) -> float:
    """The customer's expected value per purchase; the population mean without repeats."""
    p, q, gamma = params.p, params.q, params.gamma
    population_mean = p * gamma / (q - 1)
    if history.frequency == 0:
        return population_mean
    x, m = history.frequency, history.monetary
    return (gamma + m * x) * p / (p * x + q - 1)


def lifetime_value(
    bg_nbd: BgNbd,
    gamma_gamma: GammaGamma,
    history: PurchaseHistory,
    *,
    periods: int,
    discount_rate: float = 0.0,
) -> float:
    """Expected value of the next ``periods`` periods, discounted by ``discount_rate`` per
    period: the sum over periods of the purchases expected in it times the expected value
    of a purchase."""
    value = expected_value_per_purchase(gamma_gamma, history)
    total, before = 0.0, 0.0
    for period in range(1, periods + 1):
        cumulative = expected_purchases(bg_nbd, history, period)
        total += (cumulative - before) * value / (1 + discount_rate) ** period
        before = cumulative
    return total


def _minimise(objective: Callable[[Floats], float], start: Floats) -> Floats:
    """Minimise over log-parameters, bounded (e^-12 to e^12): a cohort the model fits
    badly drives a parameter towards 0 or infinity, and an unbounded search would wander
    there for ever instead of stopping at the boundary."""
    result = optimize.minimize(
        objective,
        start,
        method="L-BFGS-B",
        bounds=[(-12.0, 12.0)] * len(start),
        options={"ftol": 1e-13, "gtol": 1e-9, "maxiter": 10_000},
    )
    # "ABNORMAL_TERMINATION_IN_LNSRCH": the line search found nothing better along a
    # numerical gradient, i.e. the optimum to floating-point precision; accepted.
    stalled = "ABNORMAL" in str(result.message) and bool(np.isfinite(result.fun))
    if not result.success and not stalled:
        raise FitError(f"the fit did not converge: {result.message}")
    fitted: Floats = result.x
    return fitted
