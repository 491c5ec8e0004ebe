"""benchmarks/compare/stats.py and design.py against scipy.stats and exact arithmetic on known data."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as st

from benchmarks.compare.design import CORNERS, FACTORS, ablation_cells, fractional_design, l16
from benchmarks.compare.stats import (
    NOT_DISTINGUISHABLE,
    fit_main_effects,
    headline_budget,
    paired_difference,
    ranking,
    t_interval,
)


def test_t_interval_and_paired_difference_match_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(10.0, 2.0, 6)
    b = a - 1.5 + rng.normal(0.0, 0.4, 6)
    ref = st.ttest_rel(a, b).confidence_interval(0.95)
    iv = paired_difference(dict(enumerate(a)), dict(enumerate(b)))
    assert iv.estimate == pytest.approx(float(np.mean(a - b)), rel=1e-12)
    assert (iv.lo, iv.hi) == pytest.approx((ref.low, ref.high), rel=1e-10)
    assert iv.df == 5 and iv.n == 6 and iv.excludes_zero
    one = st.ttest_1samp(a, 0.0).confidence_interval(0.9)
    assert (t_interval(a, 0.9).lo, t_interval(a, 0.9).hi) == pytest.approx((one.low, one.high), rel=1e-10)
    # pairs by seed, not by position: shuffled dicts give the same interval; unpaired seeds are dropped
    shuffled_b = {s: b[s] for s in reversed(range(6))} | {99: 1e6}
    assert paired_difference(dict(enumerate(a)), shuffled_b) == iv
    single = t_interval([3.0])
    assert single.df == 0 and not single.excludes_zero and math.isnan(single.lo)
    assert not t_interval([0.01, 0.01, 0.01]).excludes_zero  # zero spread: no t-interval, no ranking


def test_ranking_orders_only_what_the_paired_intervals_separate():
    seeds = range(5)
    noise = np.array([0.3, -0.2, 0.1, -0.4, 0.2])
    fid = {
        "flow": {s: 10.0 + noise[s] for s in seeds},
        "diffusion": {s: 20.0 + noise[s] + 0.05 * (-1) ** s for s in seeds},  # clearly worse than flow
        "score": {s: 20.1 + noise[s] + 0.4 * (-1) ** s for s in seeds},       # tied with diffusion
    }
    r = ranking(fid, lower_is_better=True)
    assert r["order"] == "flow < diffusion ≈ score"
    verdicts = {(p["a"], p["b"]): p["verdict"] for p in r["pairs"]}
    assert verdicts[("flow", "diffusion")] == "flow better"
    assert verdicts[("diffusion", "score")] == NOT_DISTINGUISHABLE
    # higher-is-better metrics: the best name first and the verdict follows the sign convention
    acc = {k: {s: -v for s, v in d.items()} for k, d in fid.items()}
    r = ranking(acc, lower_is_better=False)
    assert r["order"] == "flow > diffusion ≈ score"
    assert {p["verdict"] for p in r["pairs"] if p["a"] == "flow"} == {"flow better"}


def test_main_effects_model_matches_pooled_t_paired_t_and_one_way_anova():
    rng = np.random.default_rng(1)
    # two levels, no blocks: the contrast is the pooled-variance two-sample t-interval
    g0, g1 = rng.normal(0, 1, 7), rng.normal(1.2, 1, 9)
    rows = [{"f": "a", "y": v} for v in g0] + [{"f": "b", "y": v} for v in g1]
    fit = fit_main_effects(rows, {"f": ["a", "b"]}, "y", block=None)
    ref = st.ttest_ind(g1, g0, equal_var=True).confidence_interval(0.95)
    e = fit.effect("f", "b")
    assert e.estimate == pytest.approx(g1.mean() - g0.mean(), rel=1e-10)
    assert (e.lo, e.hi) == pytest.approx((ref.low, ref.high), rel=1e-9)
    # two levels within seed blocks: the additive model is the paired t-test
    a, b = rng.normal(0, 1, 6), rng.normal(0, 1, 6)
    b = a + 0.7 + 0.3 * b
    rows = [{"f": "a", "seed": s, "y": a[s]} for s in range(6)] + [{"f": "b", "seed": s, "y": b[s]} for s in range(6)]
    e = fit_main_effects(rows, {"f": ["a", "b"]}, "y", block="seed").effect("f", "b")
    ref = st.ttest_rel(b, a).confidence_interval(0.95)
    assert (e.lo, e.hi) == pytest.approx((ref.low, ref.high), rel=1e-9)
    # three levels: the factor's F-test is the one-way ANOVA
    groups = [rng.normal(m, 1, 5) for m in (0.0, 0.5, 2.0)]
    rows = [{"f": lvl, "y": v} for lvl, g in zip("abc", groups) for v in g]
    fit = fit_main_effects(rows, {"f": list("abc")}, "y", block=None)
    anova = st.f_oneway(*groups)
    assert fit.factor_tests["f"]["F"] == pytest.approx(anova.statistic, rel=1e-9)
    assert fit.factor_tests["f"]["p"] == pytest.approx(anova.pvalue, rel=1e-7)


def test_fractional_design_is_orthogonal_and_recovers_additive_effects_exactly():
    array = l16()
    for i, j in itertools.combinations(range(5), 2):  # strength 2: every level pair once
        assert len({(r[i], r[j]) for r in array}) == 16
    cells = fractional_design(FACTORS)
    n = len(cells)
    for f, g in itertools.combinations(FACTORS, 2):  # proportional frequencies => orthogonal main effects
        for lf, lg in itertools.product(FACTORS[f], FACTORS[g]):
            nf = sum(c[f] == lf for c in cells)
            ng = sum(c[g] == lg for c in cells)
            assert sum(c[f] == lf and c[g] == lg for c in cells) * n == nf * ng, (f, g, lf, lg)
    all_cells = ablation_cells()
    assert [c["name"] for c in all_cells[:3]] == list(CORNERS)
    assert all(cell in [c["levels"] for c in all_cells] for cell in cells)
    assert len(all_cells) == 18  # score's corner is the array's first row (every reference level)
    assert all(c["objective"] == "score" for c in all_cells[3:])
    # noise-free additive data with seed blocks: every effect and corner difference exactly, df = n - p
    truth = {"prediction": {"velocity": -3.0, "x0": 1.0, "score": 4.0},
             "weighting": {"velocity": -1.0, "likelihood": 2.0, "min_snr": 0.5},
             "time_sampling": {"discrete": 1.5, "logit_normal": -0.5}, "path": {"linear": 0.25},
             "learn_sigma": {True: -2.0}}
    rows = []
    for c in all_cells:
        for seed in range(2):
            y = 20.0 + 0.3 * seed + sum(truth[f].get(lvl, 0.0) for f, lvl in c["levels"].items())
            rows.append({**c["levels"], "seed": seed, "fid": y + 1e-9 * np.sin(len(rows))})  # tiny residual
    fit = fit_main_effects(rows, FACTORS, "fid")
    assert fit.df == len(rows) - (1 + 3 + 3 + 2 + 1 + 1 + 1)
    for f, effects in truth.items():
        for level, value in effects.items():
            assert fit.effect(f, level).estimate == pytest.approx(value, abs=1e-6)
    d = fit.difference(CORNERS["flow"], CORNERS["score"])
    assert d.estimate == pytest.approx(-4.0, abs=1e-6)
    # a design that cannot separate two factors is refused, naming them
    confounded = [{"p": a, "q": a, "y": float(k)} for k, a in enumerate("abab")]
    with pytest.raises(ValueError, match="cannot separate"):
        fit_main_effects(confounded, {"p": ["a", "b"], "q": ["a", "b"]}, "y", block=None)


def test_headline_budget_rule():
    curves = {"flow": {1000: 30.0, 2000: 20.0, 4000: 19.0, 8000: 18.5},
              "score": {1000: 50.0, 2000: 40.0, 4000: 37.0, 8000: 36.0}}
    h = headline_budget(curves, tol=0.10)
    assert h["budget"] == 4000 and h["flattened"]  # 2000 -> 4000: -5% and -7.5%; then -2.6%, -2.7%
    assert h["relative_changes"]["score"][2000] == pytest.approx(0.2)
    h = headline_budget(curves, tol=0.01)
    assert h["budget"] == 8000 and not h["flattened"]
    with pytest.raises(ValueError, match="common"):
        headline_budget({"a": {1: 1.0}, "b": {2: 1.0}}, tol=0.1)
