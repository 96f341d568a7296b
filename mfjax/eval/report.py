"""Evaluation outputs: `metrics.json`, `report.md` (system × dimension, mean ± CI) and matplotlib figures.

Figures (Agg backend, English class names so no CJK font is needed):
- `curves_<dimension>.png`: per class, the share per step of real comments and of each system's
  simulated comments (mean over events, 95 % cluster-bootstrap band), warm-up end and intervention
  steps marked;
- `kl_by_method.png`: KL(real ‖ sim) per dimension and system with 95 % CIs, plus the headline mean.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from mfjax.eval import schema

METRICS_SCHEMA_VERSION = 1


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def fmt(est: Mapping | None, digits: int = 3) -> str:
    """"0.123 [0.100, 0.150]" of an estimate dict, "–" when undefined."""
    if not est or not _finite(est.get("mean")):
        return "–"
    if _finite(est.get("lo")) and _finite(est.get("hi")):
        return f"{est['mean']:.{digits}f} [{est['lo']:.{digits}f}, {est['hi']:.{digits}f}]"
    return f"{est['mean']:.{digits}f}"


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _nan_to_none(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, payload: Mapping) -> Path:
    """Write JSON atomically (NaN → null, so any JSON reader can load it)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_nan_to_none(payload), f, ensure_ascii=False, indent=1, default=_json_default)
    os.replace(tmp, path)
    return path


def markdown(payload: Mapping) -> str:
    """The human-readable report."""
    res = payload["results"]
    systems = res["systems"]
    reportable = payload["reportable"]
    lines = ["# Evaluation report", ""]
    lines += [f"- labeler: {', '.join(f'`{v}` ({k})' for k, v in payload['labeler_versions'].items())}",
              f"- runs: {', '.join(f'{s} = `{p}`' for s, p in payload['runs'].items())}",
              f"- events × seeds: {payload['counts']['events']} × {payload['counts']['seeds']} "
              f"({payload['counts']['worlds']} worlds per system)",
              f"- compared rows: {', '.join(payload['settings']['compared_sources'])}; "
              f"KL smoothing α = {payload['settings']['kl_alpha']} per class on both sides; "
              f"CIs: two-stage (event, seed) cluster bootstrap, {payload['settings']['n_bootstrap']} "
              f"resamples, {int(payload['settings']['level'] * 100)} % percentile, seed {payload['settings']['bootstrap_seed']}",
              f"- label coverage: {payload['coverage']['labelled']} of {payload['coverage']['comments']} comments", ""]
    if payload.get("notes"):
        lines += [f"> {n}" for n in payload["notes"]] + [""]
    if not reportable:
        lines += ["**No dimension is reportable with this labeler** (see *Withheld dimensions*): evaluate with "
                  "`--labeler=api`, or validate the labeler (`--validate_labeler`) once reference labels exist.", ""]
        lines += _nll_and_keywords(res, systems) + _withheld_and_rows(payload, res, systems)
        return "\n".join(lines) + "\n"
    lines += ["## KL(real ‖ sim), overall window (mean [95 % CI])", ""]
    head = ["system", "mean over dims"] + list(reportable)
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for s in systems:
        est = res["estimates"][s]
        row = [s, fmt(est["_headline"]["kl_mean_over_dims"])] + [fmt(est[d]["kl"]) for d in reportable]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for metric, title in (("js", "JS divergence (bits)"), ("dtw", "DTW of per-step proportion curves"),
                          ("macro_f1", "agent-aligned macro-F1"), ("macro_f1_chance", "macro-F1 chance line (labels permuted within world)")):
        lines += [f"## {title}", "", "| system | " + " | ".join(reportable) + " |", "|" + "---|" * (len(reportable) + 1)]
        for s in systems:
            lines.append("| " + " | ".join([s] + [fmt(res["estimates"][s][d][metric]) for d in reportable]) + " |")
        lines.append("")
    ordinal = [d for d in reportable if d in schema.ORDINAL]
    if ordinal:
        lines += ["## Wasserstein-1 on ordinal codes", "", "| system | " + " | ".join(ordinal) + " |",
                  "|" + "---|" * (len(ordinal) + 1)]
        for s in systems:
            lines.append("| " + " | ".join([s] + [fmt(res["estimates"][s][d]["wasserstein1"]) for d in ordinal]) + " |")
        lines.append("")
    if res["comparisons"]:
        lines += ["## Paired comparisons (relative KL change, mean over dims)", "",
                  "| comparison | ΔKL | relative change |", "|---|---|---|"]
        for name, c in res["comparisons"].items():
            h = c["headline_kl"]
            lines.append(f"| {name} | {fmt(h['diff'])} | {fmt(h['relative'])} |")
        lines.append("")
    lines += ["## Overall label shares (real → simulated) and nulls", "", "| system | dimension | shares | nulls real / sim |",
              "|---|---|---|---|"]
    for s in systems:
        for d in reportable:
            h = res["histograms"][s][d]
            shares = ", ".join(f"{v} {r:.2f}→{m:.2f}" for v, r, m in zip(h["values"], h["real_share"], h["sim_share"]))
            lines.append(f"| {s} | {d} | {shares} | {h['nulls']['real']} / {h['nulls']['sim']} |")
    lines.append("")
    lines += _nll_and_keywords(res, systems)
    lines += _withheld_and_rows(payload, res, systems)
    for name, section in payload.get("experiments", {}).items():
        lines += ["", f"## Experiment: {name}", "", "```json", json.dumps(_nan_to_none(section), ensure_ascii=False, indent=1)[:6000], "```"]
    if payload.get("figures"):
        lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in payload["figures"]]
    return "\n".join(lines) + "\n"


def _nll_and_keywords(res: Mapping, systems) -> list:
    lines = ["## NLL of real actions and keywords", "", "| system | rollout NLL/token | rollout NLL/char | warm-up NLL/token | keyword Jaccard (top 20) |",
              "|---|---|---|---|---|"]
    for s in systems:
        est = res["estimates"][s]
        nll = est.get("_nll", {})
        lines.append(f"| {s} | {fmt(nll.get('rollout_nll_per_token'))} | {fmt(nll.get('rollout_nll_per_char'))} | "
                     f"{fmt(nll.get('warmup_nll_per_token'))} | {fmt(est['_keywords']['jaccard_top20'])} |")
    lines.append("")
    return lines


def _withheld_and_rows(payload: Mapping, res: Mapping, systems) -> list:
    lines = []
    if payload["withheld"]:
        lines += ["## Withheld dimensions", ""]
        lines += [f"- `{d}`: {r}" for d, r in payload["withheld"].items()]
        lines.append("")
    lines += ["## Rows", ""]
    for s in systems:
        lines.append(f"- {s}: {res['rows'][s]['rows_by_source']} (compared: {', '.join(res['rows'][s]['compared_sources'])})")
    return lines


def plot_curves(curves: Mapping, out_dir: str | os.PathLike, dims) -> list:
    """One PNG per dimension: class shares per step, real vs every system, with CI bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (integer step ticks)

    files = []
    systems = list(curves)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for dim in dims:
        values = schema.VALUES[dim]
        fig, axes = plt.subplots(1, len(values), figsize=(3.2 * len(values), 3.0), squeeze=False, sharey=True)
        for c, value in enumerate(values):
            ax = axes[0, c]
            first = curves[systems[0]]
            steps = np.array(first["steps"])
            real = first["dims"][dim]["real"]
            _band(ax, steps, real, c, "black", "real")
            for i, s in enumerate(systems):
                cur = curves[s]
                _band(ax, np.array(cur["steps"]), cur["dims"][dim]["sim"], c, colors[i % len(colors)], s)
            marks = first["marks"]
            if marks["warmup_end"]:
                ax.axvline(marks["warmup_end"] - 0.5, color="grey", ls="--", lw=1)
            for t in marks["interventions"]:
                ax.axvline(t, color="red", ls=":", lw=1)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.set_title(f"{value}", fontsize=10)
            ax.set_xlabel("step")
            ax.set_ylim(-0.02, 1.02)
        axes[0, 0].set_ylabel(f"share ({dim})")
        axes[0, -1].legend(fontsize=7, loc="best")
        fig.suptitle(f"{dim}: real vs simulated share per step (95 % band; dashed: warm-up end, red: interventions)",
                     fontsize=9)
        fig.tight_layout()
        name = f"curves_{dim}.png"
        fig.savefig(Path(out_dir) / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def _band(ax, steps, curve, c, color, label):
    mean = np.array(curve["mean"], dtype=float)
    if mean.size == 0 or np.isnan(mean[:, c]).all():
        return
    lo = np.array(curve["lo"], dtype=float)[:, c]
    hi = np.array(curve["hi"], dtype=float)[:, c]
    ok = ~np.isnan(mean[:, c])
    ax.plot(steps[ok], mean[ok, c], color=color, marker="o", ms=3, lw=1.5, label=label)
    band = ok & ~np.isnan(lo) & ~np.isnan(hi)
    if band.any():
        ax.fill_between(steps[band], lo[band], hi[band], color=color, alpha=0.15)


def plot_kl_bars(results: Mapping, reportable, out_dir: str | os.PathLike) -> str:
    """Grouped bars of KL per dimension (and the mean over dimensions) per system, with CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = results["systems"]
    groups = ["mean over dims"] + list(reportable)
    width = 0.8 / max(len(systems), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(groups) + 1), 3.6))
    x = np.arange(len(groups))
    for i, s in enumerate(systems):
        est = results["estimates"][s]
        items = [est["_headline"]["kl_mean_over_dims"]] + [est[d]["kl"] for d in reportable]
        means = np.array([e["mean"] if _finite(e["mean"]) else np.nan for e in items])
        lo = np.array([e["mean"] - e["lo"] if _finite(e["lo"]) else 0 for e in items])
        hi = np.array([e["hi"] - e["mean"] if _finite(e["hi"]) else 0 for e in items])
        ax.bar(x + (i - (len(systems) - 1) / 2) * width, np.nan_to_num(means), width,
               yerr=np.vstack([np.maximum(lo, 0), np.maximum(hi, 0)]), capsize=2, label=s)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("KL(real ‖ sim), nats")
    ax.set_title("KL per method (overall window, 95 % CI over events × seeds)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    name = "kl_by_method.png"
    fig.savefig(Path(out_dir) / name, dpi=110)
    plt.close(fig)
    return name
