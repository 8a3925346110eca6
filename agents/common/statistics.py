"""Statistics of comparisons: normal and Student t distributions, two-sample tests, the paired bootstrap.

No SciPy: the t distribution's CDF goes through the regularised incomplete beta
(Numerical Recipes' continued fraction), tested against known values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "POWER",
    "TestResult",
    "BootstrapInterval",
    "bootstrap_intervals",
    "normal_cdf",
    "normal_quantile",
    "paired_bootstrap_lower_bound",
    "paired_bootstrap_means",
    "regularized_incomplete_beta",
    "seed_and_query_bootstrap",
    "sample_size_two_proportions",
    "student_t_cdf",
    "student_t_quantile",
    "two_proportion_z_test",
    "welch_t_test",
]

POWER = 0.8
"""Power at which a report sizes a test when it cannot tell yet."""


# --- distributions ------------------------------------------------------------------------------------------------


def normal_cdf(x: float) -> float:
    """P(Z <= x) for a standard normal Z."""
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _two_sided_normal_p(z: float) -> float:
    # erfc keeps the tail accurate where 1 - cdf would cancel to 0.
    return math.erfc(abs(z) / math.sqrt(2.0))


def normal_quantile(p: float) -> float:
    """The x with P(Z <= x) = p, by bisection on :func:`normal_cdf` (to about 1e-12).

    Raises:
        ValueError: ``p`` outside (0, 1).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"a normal quantile needs a probability in (0, 1); got {p}")
    low, high = -40.0, 40.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if normal_cdf(middle) < p:
            low = middle
        else:
            high = middle
        if high - low < 1e-13:
            break
    return 0.5 * (low + high)


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes ``betacf``)."""
    tiny, max_iterations, tolerance = 1e-300, 10_000, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iterations + 1):
        m2 = 2 * m
        numerator = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + numerator * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + numerator / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        numerator = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + numerator * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + numerator / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < tolerance:
            return h
    raise ArithmeticError(f"the incomplete beta continued fraction did not converge for a={a}, b={b}, x={x}")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function.

    Raises:
        ValueError: ``a`` or ``b`` not positive, or ``x`` outside [0, 1].
    """
    if a <= 0 or b <= 0:
        raise ValueError(f"the incomplete beta function needs a > 0 and b > 0; got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"the incomplete beta function needs x in [0, 1]; got {x}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    # The fraction converges fast for x < (a + 1) / (a + b + 2); beyond, use I_x(a, b) = 1 - I_{1-x}(b, a).
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def _two_sided_t_p(t: float, df: float) -> float:
    return regularized_incomplete_beta(0.5 * df, 0.5, df / (df + t * t))


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` (real, > 0) degrees of freedom.

    Raises:
        ValueError: ``df`` not positive.
    """
    if not df > 0:
        raise ValueError(f"Student's t needs df > 0; got {df}")
    tail = 0.5 * _two_sided_t_p(t, df)
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, by bisection on :func:`student_t_cdf`.

    Raises:
        ValueError: ``p`` outside (0, 1) or ``df`` not positive.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"a t quantile needs a probability in (0, 1); got {p}")
    if not df > 0:
        raise ValueError(f"Student's t needs df > 0; got {df}")
    high = 1.0
    while student_t_cdf(high, df) < max(p, 1.0 - p) and high < 1e12:
        high *= 2.0
    low = -high
    for _ in range(200):
        middle = 0.5 * (low + high)
        if student_t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
        if high - low < 1e-12 * max(1.0, abs(middle)):
            break
    return 0.5 * (low + high)


# --- tests --------------------------------------------------------------------------------------------------------


@dataclass
class TestResult:
    """One two-sample test of B against A."""

    __test__ = False  # not a pytest class

    metric: str
    """``em`` or ``billed_tokens``."""
    test: str
    """The test's name."""
    difference: float
    """B minus A (EM as a proportion, tokens per request)."""
    statistic: float
    """z or t."""
    p_value: float
    """Two-sided p-value."""
    ci_low: float
    """Lower end of the two-sided 1 - alpha interval of the difference."""
    ci_high: float
    """Upper end of it."""
    df: float | None = None
    """Welch-Satterthwaite degrees of freedom (t-test only)."""
    winner: str | None = None
    """``A`` or ``B`` when the difference is significant at alpha, else None."""
    verdict: str = ""
    """The conclusion in words."""
    needed_per_arm: int | None = None
    """EM only: feedback rows per arm to detect the observed difference at 80% power."""


def two_proportion_z_test(successes_a: int, n_a: int, successes_b: int, n_b: int) -> tuple[float, float]:
    """The z statistic and two-sided p of the pooled two-proportion z-test of B against A.

    Raises:
        ValueError: an arm with no trials.
    """
    if n_a < 1 or n_b < 1:
        raise ValueError(f"a two-proportion test needs trials in both arms; got n_a={n_a}, n_b={n_b}")
    p_a, p_b = successes_a / n_a, successes_b / n_b
    pooled = (successes_a + successes_b) / (n_a + n_b)
    variance = pooled * (1.0 - pooled) * (1.0 / n_a + 1.0 / n_b)
    if variance <= 0.0:  # all successes or all failures: the arms cannot differ
        return 0.0, 1.0
    z = (p_b - p_a) / math.sqrt(variance)
    return z, _two_sided_normal_p(z)


def welch_t_test(
    mean_a: float, var_a: float, n_a: int, mean_b: float, var_b: float, n_b: int
) -> tuple[float, float, float]:
    """t, degrees of freedom and two-sided p of Welch's t-test of B against A.

    ``var_*`` are sample variances (ddof 1).

    Raises:
        ValueError: an arm with fewer than two observations.
    """
    if n_a < 2 or n_b < 2:
        raise ValueError(f"Welch's t-test needs at least two observations per arm; got n_a={n_a}, n_b={n_b}")
    share_a, share_b = var_a / n_a, var_b / n_b
    standard_error = math.sqrt(share_a + share_b)
    difference = mean_b - mean_a
    if standard_error == 0.0:  # both arms constant: equal means do not differ, unequal ones certainly do
        return (0.0, float(n_a + n_b - 2), 1.0) if difference == 0 else (math.copysign(math.inf, difference), 0.0, 0.0)
    df = (share_a + share_b) ** 2 / (share_a**2 / (n_a - 1) + share_b**2 / (n_b - 1))
    t = difference / standard_error
    return t, df, _two_sided_t_p(t, df)


def sample_size_two_proportions(p_a: float, p_b: float, alpha: float, power: float = POWER) -> int | None:
    """Trials per arm for a two-sided test at ``alpha`` to detect ``p_b - p_a`` with ``power``.

    Fleiss, Levin & Paik (2003), eq. 4.14 (without continuity correction). None when
    the proportions are equal (no sample size detects a zero difference).
    """
    if p_a == p_b:
        return None
    mean = 0.5 * (p_a + p_b)
    z_alpha, z_power = normal_quantile(1.0 - alpha / 2.0), normal_quantile(power)
    numerator = z_alpha * math.sqrt(2.0 * mean * (1.0 - mean)) + z_power * math.sqrt(
        p_a * (1.0 - p_a) + p_b * (1.0 - p_b)
    )
    return int(math.ceil((numerator / (p_b - p_a)) ** 2))


# --- the paired bootstrap ------------------------------------------------------------------------------------------


def paired_bootstrap_means(values: np.ndarray, resamples: int, seed: int, chunk: int = 256) -> np.ndarray:
    """Means of query resamples, the same resampled query indices for every row (a paired bootstrap).

    Args:
        values: per-query values, shape ``(queries,)`` or ``(rows, queries)``; every row
            is resampled with the same indices, so differences and ratios of rows stay paired.
        resamples: number of bootstrap resamples.
        seed: seed of the resampling (numpy's default generator).
        chunk: resamples drawn at once (bounds memory to ``chunk * queries`` indices).

    Returns:
        The resampled means, shape ``(resamples,)`` or ``(resamples, rows)``.

    Raises:
        ValueError: no queries, or fewer than one resample.
    """
    array = np.asarray(values, dtype=np.float64)
    table = np.atleast_2d(array)
    queries = table.shape[1]
    if queries == 0:
        raise ValueError("the bootstrap needs at least one query")
    if resamples < 1:
        raise ValueError(f"the bootstrap needs at least one resample; got {resamples}")
    rng = np.random.default_rng(seed)
    means = np.empty((resamples, table.shape[0]))
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        indices = rng.integers(0, queries, size=(stop - start, queries))
        means[start:stop] = table[:, indices].mean(axis=2).T
    return means[:, 0] if array.ndim == 1 else means


def paired_bootstrap_lower_bound(
    differences: np.ndarray, confidence: float, resamples: int, seed: int, chunk: int = 256
) -> tuple[float, float]:
    """One-sided percentile bounds of the mean of paired differences.

    Query indices are resampled with replacement (seeded numpy generator); the
    lower bound is the ``1 - confidence`` quantile of the resampled means, the
    upper one the ``confidence`` quantile.

    Args:
        differences: per-query NEW minus OLD values.
        confidence: e.g. 0.95.
        resamples: number of bootstrap resamples.
        seed: seed of the resampling.
        chunk: resamples drawn at once (bounds memory to ``chunk * len(differences)``).

    Returns:
        (lower bound, upper bound).

    Raises:
        ValueError: no differences.
    """
    means = paired_bootstrap_means(np.asarray(differences, dtype=np.float64).ravel(), resamples, seed, chunk)
    return float(np.quantile(means, 1.0 - confidence)), float(np.quantile(means, confidence))


@dataclass(frozen=True)
class BootstrapInterval:
    """A statistic on a split and its two-sided percentile interval over query resamples."""

    value: float
    """The statistic on the split itself."""
    low: float
    high: float

    @property
    def half_width(self) -> float:
        """Half the interval's width: the noise of the statistic on this split."""
        return (self.high - self.low) / 2.0

    def excludes_zero(self) -> bool:
        """Whether the whole interval lies above or below 0."""
        return self.low > 0.0 or self.high < 0.0

    def to_list(self) -> list[float]:
        """``[low, high]``, for JSON."""
        return [self.low, self.high]


def bootstrap_intervals(
    columns: dict[str, np.ndarray],
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
    ratios: dict[str, tuple[str, str]] | None = None,
) -> dict[str, BootstrapInterval]:
    """Two-sided percentile intervals of the means of paired per-query columns (and ratios of them).

    Every column is resampled with the same query indices, so an interval of a
    difference column (policy minus baseline, per query) is a paired comparison, and a
    ratio of two means (gap recovered) is resampled as one statistic.

    Args:
        columns: name -> per-query values, all of one length.
        confidence: two-sided level, e.g. 0.95 for the 2.5% and 97.5% quantiles.
        resamples: bootstrap resamples.
        seed: seed of the resampling.
        ratios: name -> (numerator column, denominator column): the ratio of their
            means; a resample whose denominator is 0 is left out of the quantiles.

    Returns:
        One interval per column and ratio.

    Raises:
        ValueError: no columns, columns of different lengths, or a bad confidence.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence}")
    if not columns:
        raise ValueError("bootstrap_intervals needs at least one column")
    names = list(columns)
    lengths = {name: np.asarray(columns[name]).shape for name in names}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"columns must all hold one value per query; got shapes {lengths}")
    table = np.stack([np.asarray(columns[name], dtype=np.float64) for name in names])
    means = paired_bootstrap_means(table, resamples, seed)
    tail = (1.0 - confidence) / 2.0
    out: dict[str, BootstrapInterval] = {}
    for k, name in enumerate(names):
        low, high = np.quantile(means[:, k], [tail, 1.0 - tail])
        out[name] = BootstrapInterval(float(table[k].mean()), float(low), float(high))
    for name, (top, bottom) in (ratios or {}).items():
        numerator, denominator = means[:, names.index(top)], means[:, names.index(bottom)]
        valid = np.abs(denominator) > 1e-12
        full_bottom = float(table[names.index(bottom)].mean())
        value = float(table[names.index(top)].mean()) / full_bottom if abs(full_bottom) > 1e-12 else math.nan
        if valid.any():
            low, high = np.quantile(numerator[valid] / denominator[valid], [tail, 1.0 - tail])
        else:
            low = high = math.nan
        out[name] = BootstrapInterval(value, float(low), float(high))
    return out


def seed_and_query_bootstrap(
    new: np.ndarray, old: np.ndarray, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> BootstrapInterval:
    """Interval of NEW minus OLD mean per-query values when each comes from several training seeds.

    A two-level bootstrap: every resample draws each method's seeds with replacement (the
    two methods' seeds independently: seed ``i`` of one has nothing to do with seed ``i``
    of the other) and the queries with replacement (the same queries for both, so the
    comparison stays paired). What one seed's luck adds is then inside the interval, which
    a bootstrap over queries alone, of the seeds' per-query mean, leaves out. With few seeds
    the seed level is coarse (3 seeds give 10 distinct seed multisets per method).

    Args:
        new: per-query values, shape ``(seeds, queries)``, one row per seed of the new method.
        old: the same for the old method (its own number of seeds, the same queries).
        confidence: two-sided level.
        resamples: bootstrap resamples.
        seed: seed of the resampling.

    Raises:
        ValueError: not two 2-D arrays over the same queries, or a bad confidence.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence}")
    a, b = np.asarray(new, dtype=np.float64), np.asarray(old, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or a.shape[1] == 0 or not len(a) or not len(b):
        raise ValueError(f"new and old must be (seeds, queries) over the same queries; got {a.shape} and {b.shape}")
    rng = np.random.default_rng(seed)
    queries = a.shape[1]
    means = np.empty(resamples)
    for k in range(resamples):
        weights_a = np.bincount(rng.integers(0, len(a), len(a)), minlength=len(a)) / len(a)
        weights_b = np.bincount(rng.integers(0, len(b), len(b)), minlength=len(b)) / len(b)
        difference = weights_a @ a - weights_b @ b
        means[k] = difference[rng.integers(0, queries, queries)].mean()
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return BootstrapInterval(float(a.mean() - b.mean()), float(low), float(high))
