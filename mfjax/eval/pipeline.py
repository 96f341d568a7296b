"""From labelled runs to numbers: per-world metrics, bootstrap CIs, curves and the experiments' analyses.

Input: the runs (`mfjax.eval.runs`), the real events, and labels keyed by comment id. Per world
(event × seed) and dimension, the simulated population (rows with source "generated", plus warm-up
with `include_warmup`) is compared with the same agents' real comments: overall KL / JS /
Wasserstein-1, DTW between per-step proportion curves, agent-aligned F1 beside a chance line. Values
are then summarised across events and seeds by the two-stage cluster bootstrap. Dimensions that the
labeler may not report (`mfjax.eval.status`) are withheld with their reason, never computed.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Mapping, Optional, Sequence

import numpy as np

from mfjax.eval import bootstrap, metrics, schema
from mfjax.eval.runs import Run, real_id, sim_id

TREND_TARGETS = (("belief_degree", "doubt"), ("rumor", "counter"), ("stance", "oppose"))
CURVE_RESAMPLES = 400  # CI bands of the plotted curves need less precision than the table


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that changes the numbers (recorded in metrics.json)."""

    kl_alpha: float = 0.5
    n_bootstrap: int = bootstrap.DEFAULT_RESAMPLES
    bootstrap_seed: int = 0
    level: float = bootstrap.DEFAULT_LEVEL
    include_warmup: bool = False
    chance_permutations: int = 20
    horizon_window: int = 5  # steps per window of the long-horizon analysis


def _nested():
    return collections.defaultdict(dict)


def included_sources(settings: Settings) -> tuple:
    """Row sources compared with reality: generated (+ warm-up on request)."""
    return ("generated", "warmup") if settings.include_warmup else ("generated",)


def _labels_of(ids: Sequence[str], labels: Mapping, dim: str) -> list:
    return [labels[i][dim] if i in labels else None for i in ids]


def world_metrics(run: Run, world, labels: Mapping, dims: Sequence[str], settings: Settings,
                  rng: np.random.Generator) -> dict:
    """{dim: {metric: value}} of one world, plus "_keywords" and "_nll"."""
    sources = included_sources(settings)
    rows = [r for r in world.rows if r["source"] in sources]
    sim_ids = [sim_id(run.name, world.event_id, world.seed, r["agent"]) for r in rows]
    real_ids = [real_id(world.event_id, r["agent"]) for r in rows]
    steps = sorted({r["step"] for r in rows})
    groups = [[i for i, r in enumerate(rows) if r["step"] == step] for step in steps]
    out: dict = {}
    for dim in dims:
        real = _labels_of(real_ids, labels, dim)
        sim = _labels_of(sim_ids, labels, dim)
        rc, rnull = metrics.counts(real, dim)
        sc, snull = metrics.counts(sim, dim)
        by_step_real = [[real[i] for i in g] for g in groups]
        by_step_sim = [[sim[i] for i in g] for g in groups]
        k = len(schema.VALUES[dim])
        real_codes, sim_codes = metrics.codes(real, dim), metrics.codes(sim, dim)
        f1 = metrics.f1_from_codes(real_codes, sim_codes, k)
        # Chance line: the same simulated labels assigned to agents at random.
        chance = [metrics.f1_from_codes(real_codes, rng.permutation(sim_codes), k)["macro_f1"]
                  for _ in range(settings.chance_permutations)]
        values = {
            "kl": metrics.kl_divergence(rc, sc, settings.kl_alpha),
            "js": metrics.js_divergence(rc, sc),
            "dtw": metrics.dtw(metrics.per_step_proportions(by_step_real, dim),
                               metrics.per_step_proportions(by_step_sim, dim)),
            "micro_f1": f1["micro_f1"], "macro_f1": f1["macro_f1"],
            "macro_f1_chance": float(np.nanmean(chance)) if chance and np.isfinite(chance).any() else float("nan"),
            "real_null_share": rnull / max(len(rows), 1), "sim_null_share": snull / max(len(rows), 1),
        }
        if dim in schema.ORDINAL:
            values["wasserstein1"] = metrics.wasserstein1(rc, sc)
        out[dim] = values
    out["_keywords"] = {"jaccard_top20": metrics.keyword_jaccard(_labels_of(real_ids, labels, schema.KEYWORDS),
                                                                 _labels_of(sim_ids, labels, schema.KEYWORDS))}
    nll = metrics.nll_summary(world.rows)
    out["_nll"] = {f"{phase}_{k}": v[k] for phase, v in nll.items() for k in ("nll_per_token", "nll_per_char")}
    return out


def evaluate(runs: Sequence[Run], labels: Mapping, reportable: Sequence[str], settings: Settings) -> dict:
    """Every system's per-dimension estimates, paired comparisons, curves and counts."""
    rng = np.random.default_rng(settings.bootstrap_seed)
    per_world: dict = {}  # system -> dim -> metric -> event -> seed -> value
    excluded: dict = {}
    histograms = {run.name: overall_histograms(run, labels, reportable, settings) for run in runs}
    for run in runs:
        table = collections.defaultdict(lambda: collections.defaultdict(_nested))
        counted = collections.Counter()
        for world in run.worlds:
            counted.update(r["source"] for r in world.rows)
            values = world_metrics(run, world, labels, reportable, settings, rng)
            for dim, ms in values.items():
                for metric, v in ms.items():
                    table[dim][metric][world.event_id][world.seed] = v
            kls = [values[d]["kl"] for d in reportable if np.isfinite(values[d]["kl"])]
            table["_headline"]["kl_mean_over_dims"][world.event_id][world.seed] = (
                float(np.mean(kls)) if kls else float("nan"))
        per_world[run.name] = table
        excluded[run.name] = {"rows_by_source": dict(counted),
                              "compared_sources": list(included_sources(settings))}
    boot = dict(n_resamples=settings.n_bootstrap, level=settings.level, seed=settings.bootstrap_seed)
    estimates = {name: {dim: {metric: bootstrap.cluster_bootstrap(v, **boot).as_dict() for metric, v in ms.items()}
                        for dim, ms in table.items()}
                 for name, table in per_world.items()}
    return {"systems": [r.name for r in runs], "estimates": estimates, "histograms": histograms,
            "comparisons": comparisons(per_world, runs, reportable, boot), "rows": excluded,
            "per_world": _plain(per_world)}


def overall_histograms(run: Run, labels: Mapping, dims: Sequence[str], settings: Settings) -> dict:
    """Per dimension: class counts and shares of the compared rows, real vs simulated, pooled over worlds,
    with the null counts (the overall-window histograms; per-step ones are the curves)."""
    sources = included_sources(settings)
    out = {}
    for dim in dims:
        real_c = np.zeros(len(schema.VALUES[dim]), dtype=np.int64)
        sim_c = real_c.copy()
        nulls = {"real": 0, "sim": 0}
        for world in run.worlds:
            rows = [r for r in world.rows if r["source"] in sources]
            rc, rn = metrics.counts(_labels_of([real_id(world.event_id, r["agent"]) for r in rows], labels, dim), dim)
            sc, sn = metrics.counts(_labels_of([sim_id(run.name, world.event_id, world.seed, r["agent"])
                                                for r in rows], labels, dim), dim)
            real_c += rc
            sim_c += sc
            nulls["real"] += rn
            nulls["sim"] += sn
        out[dim] = {"values": list(schema.VALUES[dim]), "real_counts": real_c.tolist(), "sim_counts": sim_c.tolist(),
                    "real_share": metrics.proportions(real_c).tolist(), "sim_share": metrics.proportions(sim_c).tolist(),
                    "nulls": nulls}
    return out


def reference_system(names: Sequence[str]) -> str:
    """The system others are compared with: "mf" when present, else the first."""
    return "mf" if "mf" in names else names[0]


def comparisons(per_world: Mapping, runs: Sequence[Run], reportable: Sequence[str], boot: dict) -> dict:
    """Paired ΔKL and relative KL change of the reference system against every other system."""
    names = [r.name for r in runs]
    ref = reference_system(names)
    out = {}
    for other in names:
        if other == ref:
            continue
        entry = {"headline_kl": bootstrap.paired_bootstrap(per_world[ref]["_headline"]["kl_mean_over_dims"],
                                                           per_world[other]["_headline"]["kl_mean_over_dims"], **boot)}
        for dim in reportable:
            entry[dim] = bootstrap.paired_bootstrap(per_world[ref][dim]["kl"], per_world[other][dim]["kl"], **boot)
        out[f"{ref}_vs_{other}"] = entry
    return out


def _plain(obj):
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    return obj


# --- curves for plots -------------------------------------------------------------------------

def step_curves(runs: Sequence[Run], labels: Mapping, dims: Sequence[str], settings: Settings) -> dict:
    """Per system and dimension: class proportions per step (and cumulative up to each step), real vs
    simulated, mean across events with cluster-bootstrap 95 % bands. Real curves cover every step
    (warm-up included); simulated curves the compared sources only."""
    sources = included_sources(settings)
    boot = dict(n_resamples=min(settings.n_bootstrap, CURVE_RESAMPLES), level=settings.level,
                seed=settings.bootstrap_seed)
    out: dict = {}
    for run in runs:
        steps = sorted({r["step"] for w in run.worlds for r in w.rows})
        marks = {"warmup_end": run.warmup_steps,
                 "interventions": sorted({r["step"] for w in run.worlds for r in w.rows
                                          if r["source"] == "intervention"})}
        per_dim = {}
        for dim in dims:
            k = len(schema.VALUES[dim])
            real_v = collections.defaultdict(_nested)  # (step, class) -> event -> seed -> share
            sim_v = collections.defaultdict(_nested)
            real_cum = collections.defaultdict(_nested)  # the same, over all steps up to this one
            sim_cum = collections.defaultdict(_nested)
            for world in run.worlds:
                by_step = collections.defaultdict(list)
                for r in world.rows:
                    by_step[r["step"]].append(r)
                real_total = np.zeros(k)
                sim_total = np.zeros(k)
                for step in steps:
                    rows = by_step.get(step, [])
                    real = metrics.counts(_labels_of([real_id(world.event_id, r["agent"]) for r in rows],
                                                     labels, dim), dim)[0]
                    sim_rows = [r for r in rows if r["source"] in sources]
                    sim = metrics.counts(_labels_of([sim_id(run.name, world.event_id, world.seed, r["agent"])
                                                     for r in sim_rows], labels, dim), dim)[0]
                    real_total += real
                    sim_total += sim
                    for c in range(k):
                        if real.sum():
                            real_v[(step, c)][world.event_id][0] = real[c] / real.sum()
                        if sim.sum():
                            sim_v[(step, c)][world.event_id][world.seed] = sim[c] / sim.sum()
                        if real_total.sum():
                            real_cum[(step, c)][world.event_id][0] = real_total[c] / real_total.sum()
                        if sim_total.sum():
                            sim_cum[(step, c)][world.event_id][world.seed] = sim_total[c] / sim_total.sum()

            def summarise(table):
                mean = np.full((len(steps), k), np.nan)
                lo, hi = mean.copy(), mean.copy()
                for i, step in enumerate(steps):
                    for c in range(k):
                        if (step, c) in table:
                            e = bootstrap.cluster_bootstrap(table[(step, c)], **boot)
                            mean[i, c], lo[i, c], hi[i, c] = e.mean, e.lo, e.hi
                return {"mean": mean.tolist(), "lo": lo.tolist(), "hi": hi.tolist()}

            per_dim[dim] = {"values": list(schema.VALUES[dim]), "real": summarise(real_v), "sim": summarise(sim_v),
                            "real_cumulative": summarise(real_cum), "sim_cumulative": summarise(sim_cum)}
        out[run.name] = {"steps": steps, "marks": marks, "dims": per_dim}
    return out


# --- experiments ------------------------------------------------------------------------------

def trend(runs: Sequence[Run], labels: Mapping, reportable: Sequence[str], settings: Settings) -> dict:
    """Trend forecasting: after warm-up, per-step shares of doubt / counter / oppose, simulated vs real,
    absolute error per step since warm-up and DTW of the share curves."""
    boot = dict(n_resamples=settings.n_bootstrap, level=settings.level, seed=settings.bootstrap_seed)
    out = {"targets": {}, "withheld": [f"{d}={v}" for d, v in TREND_TARGETS if d not in reportable]}
    for dim, value in TREND_TARGETS:
        if dim not in reportable:
            continue
        target = {}
        for run in runs:
            err = collections.defaultdict(_nested)
            dtws = _nested()
            for world in run.worlds:
                rows = [r for r in world.rows if r["source"] == "generated"]
                steps = sorted({r["step"] for r in rows})
                real_curve, sim_curve = [], []
                for step in steps:
                    rs = [r for r in rows if r["step"] == step]
                    real = _labels_of([real_id(world.event_id, r["agent"]) for r in rs], labels, dim)
                    sim = _labels_of([sim_id(run.name, world.event_id, world.seed, r["agent"]) for r in rs], labels, dim)
                    pr = _share(real, value)
                    ps = _share(sim, value)
                    real_curve.append([pr, 1 - pr])
                    sim_curve.append([ps, 1 - ps])
                    if np.isfinite(pr) and np.isfinite(ps):
                        err[step - run.warmup_steps][world.event_id][world.seed] = abs(ps - pr)
                dtws[world.event_id][world.seed] = metrics.dtw(np.array(real_curve), np.array(sim_curve))
            target[run.name] = {
                "abs_error_by_steps_since_warmup": {str(k): bootstrap.cluster_bootstrap(v, **boot).as_dict()
                                                    for k, v in sorted(err.items())},
                "dtw": bootstrap.cluster_bootstrap(dtws, **boot).as_dict()}
        out["targets"][f"{dim}={value}"] = target
    return out


def _share(labels: Sequence[Optional[str]], value: str) -> float:
    known = [x for x in labels if x is not None]
    return sum(1 for x in known if x == value) / len(known) if known else float("nan")


def horizon(runs: Sequence[Run], labels: Mapping, reportable: Sequence[str], settings: Settings) -> dict:
    """Long-horizon drift: KL (mean over reportable dimensions) and DTW per window of steps."""
    boot = dict(n_resamples=settings.n_bootstrap, level=settings.level, seed=settings.bootstrap_seed)
    w = settings.horizon_window
    out = {"window_steps": w, "systems": {}}
    for run in runs:
        kl = collections.defaultdict(_nested)
        dt = collections.defaultdict(_nested)
        for world in run.worlds:
            rows = [r for r in world.rows if r["source"] == "generated"]
            for start in range(run.warmup_steps, max((r["step"] for r in rows), default=-1) + 1, w):
                win = [r for r in rows if start <= r["step"] < start + w]
                if not win:
                    continue
                kls, dtws = [], []
                for dim in reportable:
                    real = _labels_of([real_id(world.event_id, r["agent"]) for r in win], labels, dim)
                    sim = _labels_of([sim_id(run.name, world.event_id, world.seed, r["agent"]) for r in win], labels, dim)
                    kls.append(metrics.kl_divergence(metrics.counts(real, dim)[0], metrics.counts(sim, dim)[0],
                                                     settings.kl_alpha))
                    steps = sorted({r["step"] for r in win})
                    by = lambda labs: [[labs[i] for i, r in enumerate(win) if r["step"] == s] for s in steps]  # noqa: E731
                    dtws.append(metrics.dtw(metrics.per_step_proportions(by(real), dim),
                                            metrics.per_step_proportions(by(sim), dim)))
                kl[start][world.event_id][world.seed] = float(np.nanmean(kls)) if kls else float("nan")
                dt[start][world.event_id][world.seed] = float(np.nanmean(dtws)) if dtws else float("nan")
        out["systems"][run.name] = {str(s): {"kl": bootstrap.cluster_bootstrap(kl[s], **boot).as_dict(),
                                             "dtw": bootstrap.cluster_bootstrap(dt[s], **boot).as_dict()}
                                    for s in sorted(kl)}
    return out


def intervention(with_run: Run, without_run: Run, labels: Mapping, reportable: Sequence[str],
                 settings: Settings) -> dict:
    """Intervention planning: shares of doubt / counter / oppose after the first intervention step, with
    vs without (same events and seeds, paired), and whether earlier steps match in both runs."""
    boot = dict(n_resamples=settings.n_bootstrap, level=settings.level, seed=settings.bootstrap_seed)
    steps = sorted({r["step"] for w in with_run.worlds for r in w.rows if r["source"] == "intervention"})
    if not steps:
        return {"error": f"run {with_run.name} has no intervention rows"}
    t0 = steps[0]
    without = {(w.event_id, w.seed): w for w in without_run.worlds}
    mismatched, compared = 0, 0
    shares = {name: collections.defaultdict(_nested) for name in (with_run.name, without_run.name)}
    for world in with_run.worlds:
        other = without.get((world.event_id, world.seed))
        if other is None:
            continue
        before_a = {r["agent"]: r["action"] for r in world.rows if r["step"] < t0}
        before_b = {r["agent"]: r["action"] for r in other.rows if r["step"] < t0}
        compared += len(before_a)
        mismatched += sum(1 for a, t in before_a.items() if before_b.get(a) != t)
        for run, w in ((with_run, world), (without_run, other)):
            rows = [r for r in w.rows if r["step"] > t0 and r["source"] == "generated"]
            ids = [sim_id(run.name, w.event_id, w.seed, r["agent"]) for r in rows]
            for dim, value in TREND_TARGETS:
                if dim in reportable:
                    shares[run.name][f"{dim}={value}"][w.event_id][w.seed] = _share(_labels_of(ids, labels, dim), value)
    effects = {}
    for key in shares[with_run.name]:
        effects[key] = {"with": bootstrap.cluster_bootstrap(shares[with_run.name][key], **boot).as_dict(),
                        "without": bootstrap.cluster_bootstrap(shares[without_run.name][key], **boot).as_dict(),
                        "paired": bootstrap.paired_bootstrap(shares[with_run.name][key],
                                                             shares[without_run.name][key], **boot)}
    return {"with": with_run.name, "without": without_run.name, "first_intervention_step": t0,
            "before_intervention": {"actions_compared": compared, "actions_differing": mismatched},
            "effects": effects, "withheld": [f"{d}={v}" for d, v in TREND_TARGETS if d not in reportable]}
