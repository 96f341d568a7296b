"""Two-stage cluster bootstrap over events, then seeds within each event (EVALUATION.md §6).

Events are the independent units (comments of one event are not independent, and seeds of one event
share its real population), so resampling comments or worlds would understate the uncertainty. A
statistic is the mean over events of the mean over that event's seeds. One resample draws E events
with replacement, then, for each drawn event, its S_e seeds with replacement. CIs are percentile
intervals; system differences resample the same events and seed positions for both systems (paired).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A point estimate with its percentile CI and what it rests on."""

    mean: float
    lo: float
    hi: float
    events: int
    worlds: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _table(values: Mapping) -> tuple[list, np.ndarray, np.ndarray]:
    """(event keys, [E, S_max] value table padded with NaN, seeds per event) from {event: {seed: v}}.

    NaN values (a metric undefined for a world) are dropped; an event left with no value is dropped.
    """
    keys, rows = [], []
    for event in sorted(values):
        seeds = values[event]
        row = [float(seeds[s]) for s in sorted(seeds) if not np.isnan(float(seeds[s]))]
        if row:
            keys.append(event)
            rows.append(row)
    s_max = max((len(r) for r in rows), default=0)
    table = np.full((len(rows), max(s_max, 1)), np.nan)
    for i, r in enumerate(rows):
        table[i, : len(r)] = r
    return keys, table, np.array([len(r) for r in rows], dtype=np.int64)


def _point(table: np.ndarray, n_seeds: np.ndarray) -> float:
    return float(np.mean(np.nanmean(table, axis=1))) if len(table) else float("nan")


def _resample_means(table: np.ndarray, n_seeds: np.ndarray, ev_idx: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Resampled statistics [R] for event picks `ev_idx` [R, E] and uniforms `u` [R, E, S_max]."""
    s = n_seeds[ev_idx]  # [R, E]
    seed_idx = np.minimum((u * s[..., None]).astype(np.int64), s[..., None] - 1)  # [R, E, S_max]
    vals = table[ev_idx[..., None], seed_idx]
    mask = np.arange(table.shape[1])[None, None, :] < s[..., None]
    per_event = np.where(mask, vals, 0.0).sum(axis=2) / s
    return per_event.mean(axis=1)


def _draws(n_events: int, s_max: int, n_resamples: int, rng: np.random.Generator):
    return (rng.integers(0, n_events, size=(n_resamples, n_events)),
            rng.random((n_resamples, n_events, s_max)))


def cluster_bootstrap(values: Mapping, *, n_resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                      seed: int = 0) -> Estimate:
    """Mean over events (of the mean over seeds) with its two-stage bootstrap percentile CI.

    `values` is {event: {seed: value}}; one seed per event makes it a plain event bootstrap. With a
    single event the CI comes from its seeds only (and is (mean, mean) for one world).
    """
    keys, table, n_seeds = _table(values)
    worlds = int(n_seeds.sum())
    if not keys:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, 0)
    mean = _point(table, n_seeds)
    if n_resamples <= 0:
        return Estimate(mean, float("nan"), float("nan"), len(keys), worlds)
    rng = np.random.default_rng(seed)
    ev_idx, u = _draws(len(keys), table.shape[1], n_resamples, rng)
    stats = _resample_means(table, n_seeds, ev_idx, u)
    lo, hi = np.percentile(stats, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return Estimate(mean, float(lo), float(hi), len(keys), worlds)


def paired_bootstrap(values_a: Mapping, values_b: Mapping, *, n_resamples: int = DEFAULT_RESAMPLES,
                     level: float = DEFAULT_LEVEL, seed: int = 0) -> dict:
    """Paired difference A − B and relative change A / B − 1 of two systems' event means, with CIs.

    Only events present in both are used; each resample draws the same events and the same seed
    positions for both systems (seeds matched by sorted seed id, so seed k of A pairs seed k of B).
    """
    common = sorted(set(values_a) & set(values_b))
    a = {e: values_a[e] for e in common}
    b = {e: values_b[e] for e in common}
    ka, ta, sa = _table(a)
    kb, tb, sb = _table(b)
    keep = sorted(set(ka) & set(kb))
    if not keep:
        nan = float("nan")
        return {"diff": Estimate(nan, nan, nan, 0, 0).as_dict(), "relative": Estimate(nan, nan, nan, 0, 0).as_dict()}
    ia = [ka.index(e) for e in keep]
    ib = [kb.index(e) for e in keep]
    ta, sa, tb, sb = ta[ia], sa[ia], tb[ib], sb[ib]
    mean_a, mean_b = _point(ta, sa), _point(tb, sb)
    worlds = int(min(sa.sum(), sb.sum()))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_mean = mean_a / mean_b - 1 if mean_b else float("nan")
    if n_resamples <= 0:
        nan = float("nan")
        return {"diff": Estimate(mean_a - mean_b, nan, nan, len(keep), worlds).as_dict(),
                "relative": Estimate(float(rel_mean), nan, nan, len(keep), worlds).as_dict()}
    rng = np.random.default_rng(seed)
    s_max = max(ta.shape[1], tb.shape[1])
    ev_idx, u = _draws(len(keep), s_max, n_resamples, rng)
    ra = _resample_means(ta, sa, ev_idx, u[..., : ta.shape[1]])
    rb = _resample_means(tb, sb, ev_idx, u[..., : tb.shape[1]])
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    d_lo, d_hi = np.percentile(ra - rb, q)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = ra / rb - 1
    rel = rel[np.isfinite(rel)]  # resamples whose reference mean is 0 have no relative change
    r_lo, r_hi = np.percentile(rel, q) if rel.size else (float("nan"),) * 2
    return {"diff": Estimate(mean_a - mean_b, float(d_lo), float(d_hi), len(keep), worlds).as_dict(),
            "relative": Estimate(float(rel_mean), float(r_lo), float(r_hi), len(keep), worlds).as_dict()}


def clustered_items_ci(groups: Mapping, statistic, *, n_resamples: int = DEFAULT_RESAMPLES,
                       level: float = DEFAULT_LEVEL, seed: int = 0) -> tuple[float, float, float]:
    """(statistic, lo, hi) resampling whole clusters: `groups` is {cluster: [items]} and
    `statistic(items)` a float (e.g. Cohen's κ over annotated comments grouped by event)."""
    keys = sorted(groups)
    items = [groups[k] for k in keys]
    point = statistic([x for g in items for x in g])
    if not keys or n_resamples <= 0:
        return point, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_resamples):
        pick = rng.integers(0, len(keys), size=len(keys))
        stats.append(statistic([x for i in pick for x in items[i]]))
    stats = np.array(stats, dtype=np.float64)
    if not np.isfinite(stats).any():
        return point, float("nan"), float("nan")
    lo, hi = np.nanpercentile(stats, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return point, float(lo), float(hi)


def estimate_or_none(values: Optional[Mapping], **kw) -> Optional[dict]:
    """`cluster_bootstrap(values).as_dict()`, or None for no values."""
    return cluster_bootstrap(values, **kw).as_dict() if values else None
