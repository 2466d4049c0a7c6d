"""Paired statistics over seeds, the evidence behind every claim (no torch needed).

A claim compares two methods run on the same seeds (same data, same warmed-up model, same DRSA
subspaces), so the comparison is paired: per seed ``d_i = x_i - y_i``. :func:`paired` reports

* the mean of ``d`` and its sample standard deviation,
* a 95 % confidence interval of the mean difference (Student's t with n - 1 degrees of freedom),
* the one-sided p-value of a paired t-test for the stated direction (H1: mean > 0 for
  ``alternative='greater'``, mean < 0 for ``'less'``),
* how many seeds favour the direction.

With one seed the interval and p-value are undefined (NaN); they are reported, not hidden.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as _st


@dataclass(frozen=True)
class Paired:
    """Summary of paired differences (see the module doc)."""

    mean: float
    std: float
    n: int
    ci_low: float
    ci_high: float
    p: float
    favour: int
    alternative: str = "greater"

    def text(self, digits: int = 3) -> str:
        """``+0.031 [95 % CI -0.012, +0.074], p = 0.08, 7/10 seeds`` (``n/a`` without data)."""
        if self.n == 0:
            return "n/a"
        f = f"{{:+.{digits}f}}"
        if self.n == 1:
            return f"{f.format(self.mean)} (1 seed)"
        return (f"{f.format(self.mean)} [95 % CI {f.format(self.ci_low)}, {f.format(self.ci_high)}], "
                f"{p_text(self.p)}, {self.favour}/{self.n} seeds")


def format_p(p: float) -> str:
    """A p-value with two significant digits (``< 0.001`` below that)."""
    if math.isnan(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.2g}"


def p_text(p: float) -> str:
    """``p = 0.023``, ``p < 0.001`` or ``p = n/a``: a p-value as it reads in a sentence or table."""
    text = format_p(p)
    return f"p {text}" if text.startswith("<") else f"p = {text}"


def clean(values: Sequence[float | None]) -> list[float]:
    """The finite values of ``values`` (None and NaN dropped)."""
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def paired(x: Sequence[float], y: Sequence[float] | None = None, alternative: str = "greater",
           level: float = 0.95) -> Paired:
    """Paired comparison of ``x`` and ``y`` (or of ``x`` against 0 when ``y`` is None).

    Pairs where either value is missing (None or NaN) are dropped.

    Parameters
    ----------
    x, y : sequences of float, one value per seed
    alternative : str
        ``greater`` (H1: mean of x - y > 0) or ``less``.
    level : float
        Confidence level of the two-sided interval.
    """
    if alternative not in ("greater", "less"):
        raise ValueError(f"alternative must be 'greater' or 'less', got {alternative!r}")
    y = [0.0] * len(x) if y is None else y
    if len(x) != len(y):
        raise ValueError(f"paired values need the same number of seeds, got {len(x)} and {len(y)}")
    d = np.asarray([float(a) - float(b) for a, b in zip(x, y)
                    if a is not None and b is not None and not math.isnan(float(a) - float(b))])
    n = int(d.size)
    if n == 0:
        nan = float("nan")
        return Paired(nan, nan, 0, nan, nan, nan, 0, alternative)
    mean = float(d.mean())
    favour = int((d > 0).sum() if alternative == "greater" else (d < 0).sum())
    if n == 1:
        nan = float("nan")
        return Paired(mean, 0.0, 1, nan, nan, nan, favour, alternative)
    std = float(d.std(ddof=1))
    se = std / math.sqrt(n)
    if std <= 1e-12 * max(1.0, abs(mean)):
        # identical differences: the interval is the point and the test is decided by its sign
        sign = 1 if alternative == "greater" else -1
        p = 0.0 if sign * mean > 0 else (1.0 if sign * mean < 0 else 0.5)
        return Paired(mean, std, n, mean, mean, p, favour, alternative)
    tcrit = float(_st.t.ppf(0.5 + level / 2, n - 1))
    t = mean / se
    p = float(_st.t.sf(t, n - 1)) if alternative == "greater" else float(_st.t.cdf(t, n - 1))
    return Paired(mean, std, n, mean - tcrit * se, mean + tcrit * se, p, favour, alternative)


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float, int]:
    """Mean, the t interval's bounds and n of ``values`` (NaN bounds for fewer than 2)."""
    v = clean(values)
    s = paired(v, None, level=level)
    return s.mean, s.ci_low, s.ci_high, s.n


__all__ = ["Paired", "clean", "format_p", "mean_ci", "paired"]
