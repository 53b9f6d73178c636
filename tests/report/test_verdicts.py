"""The report's verdict rules, against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from textkeep.report.verdicts import (
    log_ppl_difference,
    paired_bootstrap,
    shift_verdict,
    sign_test_verdict,
    table1,
    verdict_from_interval,
)


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


def test_log_ppl_difference_is_the_log_ratio_of_token_weighted_perplexities():
    rng = np.random.default_rng(0)
    n = rng.integers(5, 40, size=60).astype(float)
    a, b = n * rng.uniform(2.0, 3.0, size=60), n * rng.uniform(1.0, 1.5, size=60)  # a: worse everywhere
    d = log_ppl_difference(a, b, n)
    ppl = lambda loss: np.exp(loss.sum() / n.sum())  # noqa: E731
    assert d["diff"] == pytest.approx(np.log(ppl(a) / ppl(b)))
    assert 0 < d["ci95"][0] < d["diff"] < d["ci95"][1]
    assert verdict_from_interval(log_ppl_difference(b, b, n)["ci95"]) == "inconclusive"


def _deactivation(top, random, bottom, base, n):
    per = {
        c: {"losses": list(v * n), "n_tokens": list(n)}
        for c, v in zip(("top", "random", "bottom", "base"), (top, random, bottom, base))
    }
    return {"percent": 3.0, "per_example": {"text": per}}


@pytest.mark.parametrize(
    "levels,expected",
    [
        ((9.0, 3.0, 2.0, 2.0), "reproduced"),  # top > random > bottom
        ((9.0, 2.0, 3.0, 2.0), "not reproduced"),  # random below bottom
        ((3.0, 3.0, 2.0, 2.0), "inconclusive"),  # top no worse than random
    ],
)
def test_table1_verdict_rests_on_intervals_over_examples(levels, expected):
    rng = np.random.default_rng(2)
    n = rng.integers(5, 40, size=50).astype(float)
    noise = rng.uniform(0.97, 1.03, size=50)  # shared: the conditions differ by their levels alone
    noisy = [lv * noise for lv in levels]
    found, intervals = table1(_deactivation(*noisy, n=n))
    assert [v for _, _, v in found] == [expected]
    assert set(intervals["text"]) == {"top vs random", "random vs bottom", "bottom vs base"}
