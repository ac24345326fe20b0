"""Statistics for experiment analysis, in NumPy only (no SciPy at runtime).

Ratio metrics (CTR = clicks / exposures, NDCG per request, latency per request) are ratios of per-unit
sums. Units (the randomisation unit) are independent; the rows inside a unit are not, so the variance
comes from the delta method over unit totals (Deng et al., "Applying the Delta Method in Metric
Analytics", 2018), which is the cluster-robust variance of the ratio:

    R = sum(Y) / sum(N),  Var(R) ~= (s_Y^2 - 2 R s_YN + R^2 s_N^2) / (n * mean(N)^2)

Per-unit means (conversions per unit) are the special case N = 1. Arms are independent, so the
variance of a difference is the sum; the relative lift R_t / R_c - 1 uses the delta method again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def normal_quantile(p: float) -> float:
    """Inverse standard normal CDF (Acklam's rational approximation, refined by one Newton step)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    a = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02, 1.383577518672690e02,
         -3.066479806614716e01, 2.506628277459239e00)  # fmt: skip
    b = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01,
         -1.328068155288572e01)  # fmt: skip
    c = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00, -2.549732539343734e00,
         4.374664141464968e00, 2.938163982698783e00)  # fmt: skip
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
    lo = 0.02425
    if p < lo:
        q = math.sqrt(-2 * math.log(p))
        x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1)
    elif p > 1 - lo:
        return -normal_quantile(1 - p)
    else:
        q = p - 0.5
        r = q * q
        x = (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q / (
            ((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1
        )
    err = 0.5 * math.erfc(-x / math.sqrt(2)) - p  # Newton refinement
    return x - err * math.sqrt(2 * math.pi) * math.exp(x * x / 2)


def chi2_sf(x: float, df: int) -> float:
    """P(X > x) for chi-square with integer df (closed-form series; exact up to rounding)."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if x <= 0:
        return 1.0
    h = x / 2.0
    if df % 2 == 0:  # exp(-h) * sum_{i < df/2} h^i / i!
        term = total = math.exp(-h)
        for i in range(1, df // 2):
            term *= h / i
            total += term
        return min(1.0, total)
    # odd: erfc(sqrt(h)) + exp(-h) * sum_{i=1}^{(df-1)/2} h^(i-1/2) / Gamma(i + 1/2)
    total = math.erfc(math.sqrt(h))
    if df > 1:
        term = math.exp(-h) * math.sqrt(h) / math.gamma(1.5)
        total += term
        for i in range(2, (df + 1) // 2):
            term *= h / (i - 0.5)
            total += term
    return min(1.0, total)


@dataclass(frozen=True)
class RatioEstimate:
    value: float  # sum(y) / sum(n)
    var: float  # delta-method variance of `value`
    units: int

    @property
    def se(self) -> float:
        return math.sqrt(self.var)


def ratio(y: np.ndarray, n: np.ndarray) -> RatioEstimate:
    """Ratio of per-unit totals y [units] / n [units] with its clustered (delta-method) variance."""
    y = np.asarray(y, np.float64)
    n = np.asarray(n, np.float64)
    k = len(y)
    if k == 0 or n.sum() <= 0:
        return RatioEstimate(math.nan, math.nan, k)
    mean_n = n.mean()
    r = y.sum() / n.sum()
    if k < 2:
        return RatioEstimate(float(r), math.nan, k)
    cov = np.cov(np.vstack([y, n]), ddof=1)
    var = (cov[0, 0] - 2 * r * cov[0, 1] + r * r * cov[1, 1]) / (k * mean_n**2)
    return RatioEstimate(float(r), float(max(var, 0.0)), k)


@dataclass(frozen=True)
class Comparison:
    control: float
    treatment: float
    abs_lift: float
    abs_ci: tuple[float, float]
    rel_lift: float
    rel_ci: tuple[float, float]
    p_value: float


def compare(treatment: RatioEstimate, control: RatioEstimate, alpha: float = 0.05) -> Comparison:
    """Absolute and relative lift of treatment over control with (1 - alpha) intervals (normal)."""
    z = normal_quantile(1 - alpha / 2)
    t, c = treatment.value, control.value
    diff = t - c
    se = math.sqrt(treatment.var + control.var)
    if c != 0 and math.isfinite(c):
        rel = t / c - 1
        se_rel = math.sqrt(treatment.var / c**2 + t**2 * control.var / c**4)
    else:
        rel, se_rel = math.nan, math.nan
    p = 2 * normal_sf(abs(diff) / se) if se > 0 else (1.0 if diff == 0 else 0.0)
    return Comparison(
        control=c,
        treatment=t,
        abs_lift=diff,
        abs_ci=(diff - z * se, diff + z * se),
        rel_lift=rel,
        rel_ci=(rel - z * se_rel, rel + z * se_rel),
        p_value=float(min(1.0, p)) if math.isfinite(p) else math.nan,
    )


@dataclass(frozen=True)
class SrmResult:
    observed: dict[str, int]
    expected_share: dict[str, float]
    chi2: float
    df: int
    p_value: float
    alpha: float

    @property
    def mismatch(self) -> bool:
        return self.p_value < self.alpha


def srm_check(observed: dict[str, int], expected_share: dict[str, float], alpha: float = 0.001) -> SrmResult:
    """Sample-ratio mismatch: Pearson chi-square of unit counts against the configured weights. A tiny
    p-value means assignment or logging is broken, and no other result of the experiment is trustworthy."""
    names = list(expected_share)
    counts = np.array([observed.get(k, 0) for k in names], np.float64)
    total = counts.sum()
    share = np.array([expected_share[k] for k in names], np.float64)
    share = share / share.sum()
    if total == 0 or len(names) < 2:
        return SrmResult({k: int(observed.get(k, 0)) for k in names}, dict(expected_share), 0.0, 0, 1.0, alpha)
    expected = total * share
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    df = len(names) - 1
    return SrmResult({k: int(v) for k, v in zip(names, counts, strict=True)}, dict(expected_share), chi2, df, chi2_sf(chi2, df), alpha)
