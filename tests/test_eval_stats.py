"""Bootstrap CIs and agreement statistics of mfjax.eval against scipy, scikit-learn and hand tables."""

import numpy as np
import pytest
from scipy import stats

from mfjax.eval import agreement, bootstrap


def test_one_level_bootstrap_matches_scipy_percentile_within_monte_carlo_tolerance():
    rng = np.random.default_rng(1)
    x = rng.gamma(2.0, 1.0, size=40)
    ours = bootstrap.cluster_bootstrap({f"e{i}": {0: v} for i, v in enumerate(x)}, n_resamples=4000, seed=3)
    ref = stats.bootstrap((x,), np.mean, n_resamples=4000, method="percentile", confidence_level=0.95,
                          random_state=np.random.default_rng(4)).confidence_interval
    assert ours.mean == pytest.approx(x.mean())
    se = x.std(ddof=1) / np.sqrt(len(x))
    # Two independent Monte-Carlo runs of 4,000 resamples: their percentile ends agree to a small
    # fraction of the standard error (sd of a 2.5 % quantile estimate ≈ 0.05 se at this size).
    assert ours.lo == pytest.approx(ref.low, abs=0.2 * se)
    assert ours.hi == pytest.approx(ref.high, abs=0.2 * se)
    assert ours.events == 40 and ours.worlds == 40


def test_between_event_variance_gives_wider_ci_than_an_item_bootstrap():
    rng = np.random.default_rng(2)
    # 10 events with very different levels, 5 seeds each with almost no within-event spread.
    values = {f"e{e}": {s: e * 1.0 + rng.normal(0, 0.01) for s in range(5)} for e in range(10)}
    clustered = bootstrap.cluster_bootstrap(values, n_resamples=2000, seed=0)
    flat = np.array([v for seeds in values.values() for v in seeds.values()])
    items = stats.bootstrap((flat,), np.mean, n_resamples=2000, method="percentile",
                            random_state=np.random.default_rng(0)).confidence_interval
    assert (clustered.hi - clustered.lo) > 1.8 * (items.high - items.low)  # √5 ≈ 2.2 in theory


def test_seed_stage_resamples_within_event():
    # One event: the CI comes from its seeds only.
    est = bootstrap.cluster_bootstrap({"e": {0: 1.0, 1: 3.0}}, n_resamples=2000, seed=0)
    assert est.mean == 2.0 and est.lo == pytest.approx(1.0) and est.hi == pytest.approx(3.0)
    # Unequal seed counts: the point is the mean of event means, not of worlds.
    est = bootstrap.cluster_bootstrap({"a": {0: 0.0}, "b": {0: 1.0, 1: 1.0, 2: 1.0}}, n_resamples=10)
    assert est.mean == pytest.approx(0.5)
    assert bootstrap.cluster_bootstrap({"a": {0: float("nan")}}).events == 0


def test_paired_bootstrap_difference_and_relative_change():
    rng = np.random.default_rng(5)
    base = {f"e{e}": {s: 1.0 + e + rng.normal(0, 0.05) for s in range(3)} for e in range(12)}
    better = {e: {s: v * 0.5 for s, v in seeds.items()} for e, seeds in base.items()}
    out = bootstrap.paired_bootstrap(better, base, n_resamples=1000, seed=0)
    # Pairing removes the (large) between-event spread: the ratio is exactly 0.5 in every resample.
    assert out["relative"]["mean"] == pytest.approx(-0.5)
    assert out["relative"]["lo"] == pytest.approx(-0.5) and out["relative"]["hi"] == pytest.approx(-0.5)
    assert out["diff"]["hi"] < 0
    # A constant shift under a large between-event spread: the paired difference's CI is narrow,
    # far narrower than either system's own CI.
    shifted = {e: {s: v - 0.3 + rng.normal(0, 0.01) for s, v in seeds.items()} for e, seeds in base.items()}
    out = bootstrap.paired_bootstrap(shifted, base, n_resamples=1000, seed=0)
    own = bootstrap.cluster_bootstrap(base, n_resamples=1000)
    assert out["diff"]["lo"] <= -0.3 <= out["diff"]["hi"] + 0.01
    assert out["diff"]["hi"] - out["diff"]["lo"] < 0.05 * (own.hi - own.lo)


def test_clustered_items_ci_resamples_clusters():
    groups = {"a": [1, 1, 1], "b": [0, 0, 0]}
    point, lo, hi = bootstrap.clustered_items_ci(groups, lambda xs: float(np.mean(xs)), n_resamples=500)
    assert point == 0.5 and lo == 0.0 and hi == 1.0


# --- agreement -------------------------------------------------------------------------------

def test_kappa_hand_table():
    # Classic 2x2: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no (n = 50).
    m = np.array([[20, 5], [10, 15]])
    po = 35 / 50
    pe = (25 / 50) * (30 / 50) + (25 / 50) * (20 / 50)
    assert agreement.cohen_kappa(m) == pytest.approx((po - pe) / (1 - pe))  # 0.4
    assert agreement.cohen_kappa(m) == pytest.approx(0.4)


def test_kappa_matches_sklearn():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    values = ["angry", "calm", "happy", "sad", "fear", "surprise"]
    a = list(rng.choice(values, 200))
    b = [x if rng.random() < 0.6 else rng.choice(values) for x in a]
    m = agreement.confusion(a, b, "sentiment_state")
    assert agreement.cohen_kappa(m) == pytest.approx(sklearn.cohen_kappa_score(a, b))
    assert agreement.macro_f1(m) == pytest.approx(sklearn.f1_score(a, b, average="macro"))


def test_ac1_hand_tables():
    # Gwet (2008)-style skewed table where κ collapses and AC1 does not.
    m = np.array([[118, 5], [2, 0]])  # n = 125
    n = 125
    pa = 118 / n
    pi_yes = (123 / n + 120 / n) / 2
    pe = 2 * pi_yes * (1 - pi_yes) / 1  # K − 1 = 1
    assert agreement.gwet_ac1(m) == pytest.approx((pa - pe) / (1 - pe))
    assert agreement.cohen_kappa(m) < 0.0 < 0.9 < agreement.gwet_ac1(m)
    # Three categories, by hand: pa = 14/20, π = (8, 6, 6)/20, pe = Σπ(1−π)/(K−1).
    m3 = np.array([[6, 1, 1], [1, 4, 1], [1, 1, 4]])
    # raters' shares: rows (8, 6, 6)/20, cols (8, 6, 6)/20
    pi = np.array([8, 6, 6]) / 20
    pe3 = float(np.sum(pi * (1 - pi)) / 2)
    assert agreement.gwet_ac1(m3) == pytest.approx((14 / 20 - pe3) / (1 - pe3))


def test_summary_counts_nulls_and_majority():
    ref = ["doubt", "believe", "believe", None, "believe"]
    other = ["doubt", "believe", "doubt", "believe", None]
    s = agreement.summary(ref, other, "belief_degree")
    assert s["n"] == 3 and s["null_pairs"] == 2
    assert s["accuracy"] == pytest.approx(2 / 3)
    assert s["majority_accuracy"] == pytest.approx(2 / 3)
    assert s["recall"] == {"doubt": 1.0, "believe": 0.5}
    assert s["confusion"] == [[1, 0], [1, 1]]


def test_no_resamples_gives_points_without_cis():
    a = {"e0": {0: 1.0}, "e1": {0: 3.0}}
    b = {"e0": {0: 2.0}, "e1": {0: 2.0}}
    est = bootstrap.cluster_bootstrap(a, n_resamples=0)
    assert est.mean == 2.0 and np.isnan(est.lo) and np.isnan(est.hi)
    out = bootstrap.paired_bootstrap(a, b, n_resamples=0)
    assert out["diff"]["mean"] == 0.0 and np.isnan(out["diff"]["lo"])
    assert out["relative"]["mean"] == 0.0
