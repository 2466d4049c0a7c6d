"""cnp.stats: paired differences over seeds, checked against scipy's own t-test and by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from cnp.stats import clean, format_p, mean_ci, p_text, paired


def test_paired_matches_scipy_ttest_rel():
    rng = np.random.default_rng(0)
    x, y = rng.normal(0.8, 0.1, 10), rng.normal(0.75, 0.1, 10)
    s = paired(x, y)
    ref = st.ttest_rel(x, y, alternative="greater")
    assert s.n == 10 and s.mean == pytest.approx(float(np.mean(x - y)))
    assert s.std == pytest.approx(float(np.std(x - y, ddof=1)))
    assert s.p == pytest.approx(float(ref.pvalue))
    ci = ref.confidence_interval(0.95)
    # scipy's interval for a one-sided test is one-sided; compare with the two-sided one
    two = st.ttest_rel(x, y).confidence_interval(0.95)
    assert (s.ci_low, s.ci_high) == pytest.approx((float(two.low), float(two.high)))
    assert math.isinf(ci.high)
    assert s.favour == int(((x - y) > 0).sum())
    less = paired(x, y, alternative="less")
    assert less.p == pytest.approx(1 - s.p) and less.favour == int(((x - y) < 0).sum())


def test_paired_by_hand():
    # d = 0.1, 0.2, 0.3: mean 0.2, sd 0.1, se 0.1 / sqrt(3), t = 2 sqrt(3)
    s = paired([0.6, 0.7, 0.8], [0.5, 0.5, 0.5])
    assert s.mean == pytest.approx(0.2) and s.std == pytest.approx(0.1)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)       # t(0.975, 2 df)
    assert (s.ci_low, s.ci_high) == pytest.approx((0.2 - half, 0.2 + half))
    assert s.p == pytest.approx(float(st.t.sf(2 * math.sqrt(3), 2)))
    assert s.text() == f"+0.200 [95 % CI {0.2 - half:+.3f}, {0.2 + half:+.3f}], p = {s.p:.2g}, 3/3 seeds"


def test_paired_edge_cases():
    assert paired([], []).n == 0 and paired([], []).text() == "n/a"
    one = paired([0.7], [0.5])
    assert one.n == 1 and math.isnan(one.p) and math.isnan(one.ci_low) and one.text() == "+0.200 (1 seed)"
    same = paired([0.7, 0.8], [0.6, 0.7])              # identical differences: a point interval
    assert same.ci_low == pytest.approx(0.1) and same.ci_high == pytest.approx(0.1) and same.p == 0.0
    # missing values drop their pair; against 0 when y is None
    s = paired([0.1, float("nan"), 0.3, None], [0.0, 0.5, 0.1, 0.2])
    assert s.n == 2 and s.mean == pytest.approx(0.15)
    assert paired([0.1, 0.3]).mean == pytest.approx(0.2)
    with pytest.raises(ValueError, match="same number"):
        paired([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="alternative"):
        paired([1.0], [1.0], alternative="two-sided")


def test_helpers():
    assert clean([1.0, None, float("nan"), 2]) == [1.0, 2.0]
    assert format_p(0.0004) == "< 0.001" and format_p(0.0234) == "0.023" and format_p(float("nan")) == "n/a"
    assert p_text(0.0004) == "p < 0.001" and p_text(0.0234) == "p = 0.023" and p_text(float("nan")) == "p = n/a"
    m, lo, hi, n = mean_ci([1.0, 2.0, 3.0])
    assert (m, n) == (2.0, 3) and lo < 2.0 < hi
