"""Agreement between two labelings of the same comments (EVALUATION.md §7): κ, AC1, F1, confusion.

Pairs where either side is null are left out of every statistic and counted. Cohen's κ corrects
accuracy for chance agreement from the two marginals; it collapses on heavy skews (80–95 % of one
class, as belief and behaviour have), where Gwet's AC1 stays interpretable, so both are reported.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from mfjax.eval import schema


def confusion(reference: Sequence[Optional[str]], other: Sequence[Optional[str]], dimension: str) -> np.ndarray:
    """[K, K] counts: rows = reference value, columns = other value (non-null pairs only)."""
    if len(reference) != len(other):
        raise ValueError("the two labelings must be aligned (same length)")
    values = schema.VALUES[dimension]
    index = {v: i for i, v in enumerate(values)}
    m = np.zeros((len(values), len(values)), dtype=np.int64)
    for r, o in zip(reference, other):
        if r is not None and o is not None:
            m[index[r], index[o]] += 1
    return m


def cohen_kappa(m: np.ndarray) -> float:
    """Cohen's κ of a confusion matrix (NaN when chance agreement is 1 or there are no pairs)."""
    m = np.asarray(m, dtype=np.float64)
    n = m.sum()
    if n == 0:
        return float("nan")
    po = np.trace(m) / n
    pe = float((m.sum(axis=1) / n) @ (m.sum(axis=0) / n))
    return float("nan") if pe >= 1 else float((po - pe) / (1 - pe))


def gwet_ac1(m: np.ndarray) -> float:
    """Gwet's AC1 for two raters over the K categories of the matrix.

    pe = Σ_k π_k (1 − π_k) / (K − 1), π_k = mean of the two raters' shares of category k.
    """
    m = np.asarray(m, dtype=np.float64)
    n = m.sum()
    k = m.shape[0]
    if n == 0 or k < 2:
        return float("nan")
    po = np.trace(m) / n
    pi = (m.sum(axis=1) + m.sum(axis=0)) / (2 * n)
    pe = float(np.sum(pi * (1 - pi)) / (k - 1))
    return float("nan") if pe >= 1 else float((po - pe) / (1 - pe))


def macro_f1(m: np.ndarray) -> float:
    """Macro-F1 of the other labeling against the reference, over classes present on either side."""
    m = np.asarray(m, dtype=np.float64)
    f1s = []
    for k in range(m.shape[0]):
        tp = m[k, k]
        fp = m[:, k].sum() - tp
        fn = m[k, :].sum() - tp
        if tp + fp + fn > 0:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else float("nan")


def accuracy(m: np.ndarray) -> float:
    """Share of pairs that agree."""
    n = m.sum()
    return float(np.trace(m) / n) if n else float("nan")


def majority_accuracy(m: np.ndarray) -> float:
    """Accuracy of always answering the reference's most frequent class."""
    n = m.sum()
    return float(m.sum(axis=1).max() / n) if n else float("nan")


def class_recall(m: np.ndarray, dimension: str) -> dict:
    """{value: recall of the other labeling on the reference's items of that value} (None if absent)."""
    out = {}
    for k, v in enumerate(schema.VALUES[dimension]):
        support = m[k, :].sum()
        out[v] = float(m[k, k] / support) if support else None
    return out


def summary(reference: Sequence[Optional[str]], other: Sequence[Optional[str]], dimension: str) -> dict:
    """All statistics of one dimension (without CIs)."""
    m = confusion(reference, other, dimension)
    return {"n": int(m.sum()),
            "null_pairs": int(sum(1 for r, o in zip(reference, other) if r is None or o is None)),
            "kappa": cohen_kappa(m), "ac1": gwet_ac1(m), "macro_f1": macro_f1(m), "accuracy": accuracy(m),
            "majority_accuracy": majority_accuracy(m), "recall": class_recall(m, dimension),
            "confusion": m.tolist(), "values": list(schema.VALUES[dimension])}
