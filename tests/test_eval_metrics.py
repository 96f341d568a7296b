"""Metrics of mfjax.eval against independent computations: scipy, scikit-learn, brute force, hand cases."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon

from mfjax.eval import metrics, schema

RNG = np.random.default_rng(0)


def test_counts_follow_schema_order_and_count_nulls():
    c, nulls = metrics.counts(["support", None, "oppose", "support"], "stance")
    assert c.tolist() == [1, 0, 2]  # oppose, neutral, support
    assert nulls == 1


@pytest.mark.parametrize("alpha", [0.5, 1.0, 0.1])
def test_kl_matches_scipy_entropy_on_smoothed_vectors(alpha):
    for _ in range(20):
        k = int(RNG.integers(2, 7))
        p_c = RNG.integers(0, 20, size=k)
        q_c = RNG.integers(0, 20, size=k)
        p = (p_c + alpha) / (p_c.sum() + k * alpha)
        q = (q_c + alpha) / (q_c.sum() + k * alpha)
        assert metrics.kl_divergence(p_c, q_c, alpha) == pytest.approx(stats.entropy(p, q), rel=1e-12, abs=1e-12)


def test_kl_hand_case():
    # real = [3, 1], sim = [1, 3], α = 0.5: p = [3.5/5, 1.5/5] = [0.7, 0.3], q = [0.3, 0.7].
    expected = 0.7 * math.log(0.7 / 0.3) + 0.3 * math.log(0.3 / 0.7)
    assert metrics.kl_divergence([3, 1], [1, 3], alpha=0.5) == pytest.approx(expected)
    assert metrics.kl_divergence([2, 2], [2, 2]) == 0.0
    # A class absent in the simulation is finite only thanks to the smoothing.
    assert math.isinf(metrics.kl_divergence([1, 1], [2, 0], alpha=0.0))
    assert math.isfinite(metrics.kl_divergence([1, 1], [2, 0], alpha=0.5))


def test_js_matches_scipy_base2():
    for _ in range(30):
        k = int(RNG.integers(2, 7))
        p_c = RNG.integers(0, 10, size=k)
        q_c = RNG.integers(0, 10, size=k)
        if p_c.sum() == 0 or q_c.sum() == 0:
            continue
        expected = jensenshannon(p_c / p_c.sum(), q_c / q_c.sum(), base=2) ** 2
        assert metrics.js_divergence(p_c, q_c) == pytest.approx(expected, abs=1e-12)
    assert metrics.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    assert math.isnan(metrics.js_divergence([0, 0], [1, 1]))


def test_wasserstein_matches_scipy_with_weights():
    for _ in range(30):
        k = int(RNG.integers(2, 6))
        p_c = RNG.integers(0, 10, size=k) + 1
        q_c = RNG.integers(0, 10, size=k) + 1
        codes = np.arange(k)
        expected = stats.wasserstein_distance(codes, codes, u_weights=p_c, v_weights=q_c)
        assert metrics.wasserstein1(p_c, q_c) == pytest.approx(expected, abs=1e-12)
    # All mass moved from "oppose" (0) to "support" (2) costs 2.
    assert metrics.wasserstein1([5, 0, 0], [0, 0, 5]) == pytest.approx(2.0)


def _brute_force_dtw(a, b):
    """Minimum over every monotone warping path from (0, 0) to (T−1, S−1), by enumeration."""
    T, S = len(a), len(b)
    best = math.inf
    moves = [(1, 0), (0, 1), (1, 1)]

    def walk(t, s, total):
        nonlocal best
        total += 0.5 * np.abs(a[t] - b[s]).sum()
        if (t, s) == (T - 1, S - 1):
            best = min(best, total)
            return
        for dt, ds in moves:
            if t + dt < T and s + ds < S:
                walk(t + dt, s + ds, total)

    walk(0, 0, 0.0)
    return best / T


@pytest.mark.parametrize("T,S", [(1, 1), (2, 3), (3, 3), (4, 2), (5, 5), (5, 4)])
def test_dtw_equals_brute_force_over_all_paths(T, S):
    for _ in range(5):
        a = RNG.dirichlet(np.ones(3), size=T)
        b = RNG.dirichlet(np.ones(3), size=S)
        assert metrics.dtw(a, b) == pytest.approx(_brute_force_dtw(a, b), abs=1e-12)


def test_dtw_hand_case_and_shift_invariance():
    # b is a delayed by one step: DTW aligns the shared shape, leaving only the first step's gap.
    a = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    b = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # path (0,0) (0,1) (1,2) (2,2): costs 0 + 0 + 0 + 0 = 0.
    assert metrics.dtw(a, b) == pytest.approx(0.0)
    c = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    # a vs c: best path pays the first step once (TV 1), over T = 3.
    assert metrics.dtw(a, c) == pytest.approx(1 / 3)
    # A band of 0 forces the diagonal.
    assert metrics.dtw(a, b, band=0) == pytest.approx((0 + 1 + 0) / 3)


def test_f1_hand_confusion_and_sklearn():
    real = ["question", "opinion", "opinion", "promotion", "opinion", None]
    sim = ["question", "opinion", "question", "opinion", "opinion", "opinion"]
    out = metrics.f1_scores(real, sim, "intent")
    # question: tp 1, fp 1, fn 0 -> 2/3; opinion: tp 2, fp 1, fn 1 -> 2/3; promotion: tp 0, fn 1 -> 0.
    assert out["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert out["micro_f1"] == pytest.approx(3 / 5)
    assert out["skipped_null"] == 1
    sklearn = pytest.importorskip("sklearn.metrics")
    pairs = [(r, s) for r, s in zip(real, sim) if r is not None]
    r, s = zip(*pairs)
    assert out["macro_f1"] == pytest.approx(sklearn.f1_score(r, s, average="macro"))
    assert out["micro_f1"] == pytest.approx(sklearn.f1_score(r, s, average="micro"))


def test_nll_summary_hand_case():
    rows = [
        {"source": "warmup", "nll": 4.0, "nll_tokens": 2, "real_action": "abcd"},
        {"source": "generated", "nll": 6.0, "nll_tokens": 3, "real_action": "abc"},
        {"source": "generated", "nll": 2.0, "nll_tokens": 1, "real_action": "a"},
        {"source": "generated", "nll": 0.0, "nll_tokens": 0, "real_action": "unscored"},
    ]
    out = metrics.nll_summary(rows)
    assert out["warmup"]["nll_per_token"] == pytest.approx(2.0)
    assert out["rollout"]["nll_per_token"] == pytest.approx(8.0 / 4)
    assert out["rollout"]["nll_per_char"] == pytest.approx(8.0 / 4)
    assert out["rollout"]["nll_per_action"] == pytest.approx(4.0)
    assert out["rollout"]["unscored"] == 1


def test_keyword_jaccard_hand_case():
    real = [["Rumour", "police"], ["police"], ["city"]]
    sim = [["police", "fire"], ["fire"]]
    # top-2: real {police, city} (ties alphabetical: city < rumour), sim {fire, police}
    assert metrics.top_keywords(real, 2) == ["police", "city"]
    assert metrics.keyword_jaccard(real, sim, top=2) == pytest.approx(1 / 3)
    assert math.isnan(metrics.keyword_jaccard([[]], [None]))


def test_per_step_proportions_and_cumulative():
    steps = [["spread", "spread"], ["counter", None], []]
    p = metrics.per_step_proportions(steps, "rumor")
    assert p[0].tolist() == [1.0, 0.0] and p[1].tolist() == [0.0, 1.0]
    assert np.isnan(p[2]).all()
    c = metrics.per_step_proportions(steps, "rumor", cumulative=True)
    assert c[2].tolist() == pytest.approx([2 / 3, 1 / 3])
    assert len(schema.VALUES["rumor"]) == p.shape[1]


def test_every_categorical_dimension_has_codes():
    for dim in schema.CATEGORICAL:
        for i, v in enumerate(schema.VALUES[dim]):
            assert schema.code(dim, v) == i
    assert set(itertools.chain(schema.ORDINAL)) <= set(schema.CATEGORICAL)
