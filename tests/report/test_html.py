"""The report's verdict rules, against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from textkeep.report.html import paired_bootstrap, shift_verdict, sign_test_verdict, verdict_from_interval


@pytest.mark.parametrize("n", [5, 7, 10])
def test_sign_test_matches_scipy(n):
    for wins in range(n + 1):
        up = binomtest(wins, n, 0.5, alternative="greater").pvalue < 0.05
        down = binomtest(wins, n, 0.5, alternative="less").pvalue < 0.05
        expected = "reproduced" if up else "not reproduced" if down else "inconclusive"
        assert sign_test_verdict(wins, n) == expected, (wins, n)


def test_seven_modules_need_all_seven():
    assert sign_test_verdict(7, 7) == "reproduced" and sign_test_verdict(6, 7) == "inconclusive"


@pytest.mark.parametrize(
    "margin,noise,expected",
    [
        (0.004, 0.001, "reproduced"),
        (-0.004, 0.001, "not reproduced"),
        (0.0005, 0.001, "inconclusive"),
        (-0.0005, 0.001, "inconclusive"),
        (0.004, None, "inconclusive"),
    ],
)
def test_shift_counts_only_beyond_the_noise_floor(margin, noise, expected):
    assert shift_verdict(margin, noise) == expected


def test_paired_bootstrap_interval_brackets_the_difference_and_decides():
    rng = np.random.default_rng(1)
    ids = [f"q{i}" for i in range(400)]
    a = {i: bool(rng.random() < 0.6) for i in ids}
    b = {i: a[i] and bool(rng.random() < 0.7) for i in ids}  # b answers a subset of a's questions: a is better
    d = paired_bootstrap(a, b)
    assert d["diff"] == pytest.approx(np.mean([a[i] - b[i] for i in ids]))
    assert d["ci95"][0] < d["diff"] < d["ci95"][1]
    assert verdict_from_interval(d["ci95"]) == "reproduced"
    assert verdict_from_interval(paired_bootstrap(a, a)["ci95"]) == "inconclusive"
