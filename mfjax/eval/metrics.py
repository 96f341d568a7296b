"""Distances between real and simulated label distributions (SPEC §4, EVALUATION.md §6). Pure numpy.

Every function takes class **counts** (or label lists) in the value order of `schema.VALUES`, so a
class that no one chose still has its slot. Each is tested against an independent computation
(scipy, scikit-learn, brute force or a hand case) in `tests/test_eval_metrics.py`.

Definitions:
- KL(real ‖ sim) in nats on additively smoothed proportions: p_k = (c_k + α) / (n + Kα), α = 0.5 by
  default on both sides (the reference's smoothing was unstated; this one is recorded with results).
- JS in bits (log base 2), unsmoothed: ½ KL₂(p ‖ m) + ½ KL₂(q ‖ m), m = (p + q) / 2; in [0, 1].
- Wasserstein-1 on the ordinal codes 0 … K−1: Σ_k |F_p(k) − F_q(k)|.
- DTW between per-step proportion curves: local cost = total variation ½ Σ |a_t − b_s|, moves
  (1, 0), (0, 1), (1, 1), accumulated cost divided by the real curve's length T.
"""

from __future__ import annotations

import collections
from typing import Iterable, Optional, Sequence

import numpy as np

from mfjax.eval import schema


def counts(labels: Iterable[Optional[str]], dimension: str) -> tuple[np.ndarray, int]:
    """(class counts in `schema.VALUES[dimension]` order, number of nulls)."""
    values = schema.VALUES[dimension]
    index = {v: i for i, v in enumerate(values)}
    out = np.zeros(len(values), dtype=np.int64)
    nulls = 0
    for label in labels:
        if label is None:
            nulls += 1
        else:
            out[index[label]] += 1
    return out, nulls


def proportions(c: np.ndarray, alpha: float = 0.0) -> np.ndarray:
    """(c + α) / (Σc + Kα); NaNs when there is nothing to normalise."""
    c = np.asarray(c, dtype=np.float64) + alpha
    total = c.sum()
    return c / total if total > 0 else np.full_like(c, np.nan)


def kl_divergence(real_counts, sim_counts, alpha: float = 0.5) -> float:
    """KL(real ‖ sim) in nats with additive smoothing α on both sides (NaN when a side is empty and α = 0)."""
    p = proportions(real_counts, alpha)
    q = proportions(sim_counts, alpha)
    if np.isnan(p).any() or np.isnan(q).any():
        return float("nan")
    mask = p > 0
    with np.errstate(divide="ignore"):
        return float(np.sum(p[mask] * (np.log(p[mask]) - np.log(q[mask]))))


def js_divergence(real_counts, sim_counts) -> float:
    """Jensen–Shannon divergence in bits, unsmoothed (NaN when a side is empty)."""
    p = proportions(real_counts)
    q = proportions(sim_counts)
    if np.isnan(p).any() or np.isnan(q).any():
        return float("nan")
    m = (p + q) / 2

    def kl2(a, b):
        mask = a > 0
        return np.sum(a[mask] * np.log2(a[mask] / b[mask]))

    return float(max(0.5 * kl2(p, m) + 0.5 * kl2(q, m), 0.0))


def wasserstein1(real_counts, sim_counts) -> float:
    """Wasserstein-1 distance between two distributions on the codes 0 … K−1 (unit spacing)."""
    p = proportions(real_counts)
    q = proportions(sim_counts)
    if np.isnan(p).any() or np.isnan(q).any():
        return float("nan")
    return float(np.abs(np.cumsum(p) - np.cumsum(q))[:-1].sum())


def total_variation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """½ Σ |a − b| over the last axis."""
    return 0.5 * np.abs(np.asarray(a) - np.asarray(b)).sum(axis=-1)


def dtw(real_curve, sim_curve, band: Optional[int] = None) -> float:
    """DTW between curves shaped [T, K] and [S, K] (class proportions per step), divided by T.

    Local cost: total variation between the steps' proportion vectors. `band` (Sakoe–Chiba) limits
    |t − s| when given. Steps holding NaN (no labelled comment that step) are dropped first.
    """
    a = np.asarray(real_curve, dtype=np.float64)
    b = np.asarray(sim_curve, dtype=np.float64)
    a = a[~np.isnan(a).any(axis=1)]
    b = b[~np.isnan(b).any(axis=1)]
    T, S = len(a), len(b)
    if T == 0 or S == 0:
        return float("nan")
    cost = total_variation(a[:, None, :], b[None, :, :])  # [T, S]
    acc = np.full((T + 1, S + 1), np.inf)
    acc[0, 0] = 0.0
    for t in range(1, T + 1):
        lo, hi = 1, S
        if band is not None:
            lo, hi = max(1, t - band), min(S, t + band)
        for s in range(lo, hi + 1):
            acc[t, s] = cost[t - 1, s - 1] + min(acc[t - 1, s], acc[t, s - 1], acc[t - 1, s - 1])
    return float(acc[T, S] / T)


def f1_scores(real: Sequence[Optional[str]], sim: Sequence[Optional[str]], dimension: str) -> dict:
    """Micro- and macro-F1 of agent-aligned labels (pairs with a null on either side are skipped).

    Micro-F1 equals accuracy for single-label data; macro averages per-class F1 over the classes
    present in either list.
    """
    if len(real) != len(sim):
        raise ValueError("real and sim must be aligned (same length)")
    r, s = codes(real, dimension), codes(sim, dimension)
    out = f1_from_codes(r, s, len(schema.VALUES[dimension]))
    return dict(out, skipped_null=int(len(real) - out["n"]))


def codes(labels: Sequence[Optional[str]], dimension: str) -> np.ndarray:
    """Integer codes of labels, -1 for null."""
    index = {v: i for i, v in enumerate(schema.VALUES[dimension])}
    return np.array([-1 if x is None else index[x] for x in labels], dtype=np.int64)


def f1_from_codes(real: np.ndarray, sim: np.ndarray, k: int) -> dict:
    """Micro / macro-F1 from aligned code arrays (-1 = null, skipped), through a confusion matrix."""
    keep = (real >= 0) & (sim >= 0)
    n = int(keep.sum())
    if n == 0:
        return {"n": 0, "micro_f1": float("nan"), "macro_f1": float("nan")}
    m = np.bincount(real[keep] * k + sim[keep], minlength=k * k).reshape(k, k)
    tp = np.diag(m).astype(np.float64)
    denom = 2 * tp + (m.sum(axis=0) - tp) + (m.sum(axis=1) - tp)
    present = denom > 0  # classes absent from both sides do not count
    return {"n": n, "micro_f1": float(tp.sum() / n), "macro_f1": float(np.mean(2 * tp[present] / denom[present]))}


def nll_summary(rows: Iterable[dict]) -> dict:
    """NLL of the real actions: per token (one tokenizer) and per character (across backbones).

    Rows are simulator output rows (`nll`, `nll_tokens`, `real_action`, `source`); warm-up and
    rollout rows are summarised apart. Rows without a score (nll_tokens 0) are counted and skipped.
    """
    groups: dict = collections.defaultdict(lambda: {"nll": 0.0, "tokens": 0, "chars": 0, "rows": 0, "unscored": 0})
    for row in rows:
        g = groups["warmup" if row.get("source") == "warmup" else "rollout"]
        tokens = int(row.get("nll_tokens") or 0)
        if tokens <= 0:
            g["unscored"] += 1
            continue
        g["nll"] += float(row["nll"])
        g["tokens"] += tokens
        g["chars"] += len(row.get("real_action") or "")
        g["rows"] += 1
    out = {}
    for name, g in groups.items():
        out[name] = {"rows": g["rows"], "unscored": g["unscored"], "tokens": g["tokens"],
                     "nll_per_token": g["nll"] / g["tokens"] if g["tokens"] else float("nan"),
                     "nll_per_char": g["nll"] / g["chars"] if g["chars"] else float("nan"),
                     "nll_per_action": g["nll"] / g["rows"] if g["rows"] else float("nan")}
    return out


def top_keywords(keyword_lists: Iterable[Optional[Sequence[str]]], top: int = 20) -> list:
    """The `top` most frequent keywords (ties: alphabetical), case-folded."""
    c = collections.Counter(k.strip().lower() for ks in keyword_lists if ks for k in ks if k.strip())
    return [k for k, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]


def keyword_jaccard(real_lists, sim_lists, top: int = 20) -> float:
    """Jaccard index of the top-`top` keyword sets of two populations (NaN when both are empty)."""
    a, b = set(top_keywords(real_lists, top)), set(top_keywords(sim_lists, top))
    if not a and not b:
        return float("nan")
    return len(a & b) / len(a | b)


def per_step_proportions(labels_by_step: Sequence[Sequence[Optional[str]]], dimension: str,
                         cumulative: bool = False) -> np.ndarray:
    """[T, K] class proportions per step (NaN rows for steps with no labelled comment)."""
    rows = [counts(step, dimension)[0] for step in labels_by_step]
    c = np.array(rows, dtype=np.float64).reshape(len(rows), len(schema.VALUES[dimension]))
    if cumulative:
        c = np.cumsum(c, axis=0)
    return np.array([proportions(r) for r in c]).reshape(c.shape)
