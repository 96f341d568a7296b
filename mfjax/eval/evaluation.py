"""The evaluation job behind `launch/evaluate.py`: check inputs, label (cached), compute, write outputs.

Order matters: every input is read and checked (runs, manifests, events, real texts) before any
labelling starts, so bad input fails in seconds with one line naming the file or flag; labels are
cached per population as they complete, so an interrupted job resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from mfjax.eval import pipeline, report, schema
from mfjax.eval import status as status_mod
from mfjax.eval.labelers.base import LabelCache, label_populations
from mfjax.eval.runs import (RunDataError, check_comparable, check_real_actions, events_source, load_events,
                             parse_runs_flag, read_run, real_population, sim_population)

logger = logging.getLogger(__name__)
EXPERIMENTS = ("main", "trend", "intervention", "horizon")


class EvaluationError(ValueError):
    """Bad flags or inputs (one line naming the flag or file)."""


@dataclasses.dataclass
class Options:
    """What to evaluate and how (the launcher's flags)."""

    runs: Sequence[str]
    out_dir: str
    labeler: str = "rules"
    events: Optional[str] = None
    settings: pipeline.Settings = dataclasses.field(default_factory=pipeline.Settings)
    experiments: Sequence[str] = ("main",)
    intervention_pair: Optional[str] = None  # "WITH:WITHOUT" system names
    judge_factory: Optional[Callable] = None  # language -> judge labeler (for --labeler=api)
    judge_model: Optional[str] = None
    status_path: Optional[str] = None
    progress: bool = True


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None, lambda n: None
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="labelling", unit="comment", file=sys.stderr)
        return bar, bar.update
    except ImportError:  # plain fallback
        done = [0]

        def update(n):
            done[0] += n
            print(f"\rlabelling {done[0]}/{total} comments", end="", file=sys.stderr, flush=True)

        return None, update


def prepare(options: Options):
    """Read and check everything; returns (runs, events, populations). Raises EvaluationError."""
    unknown = set(options.experiments) - set(EXPERIMENTS)
    if unknown:
        raise EvaluationError(f"--experiment: unknown {sorted(unknown)}; choose from {EXPERIMENTS}")
    if options.labeler not in ("rules", "api"):
        raise EvaluationError(f"--labeler={options.labeler}: choose rules or api")
    if options.labeler == "api" and options.judge_factory is None:
        raise EvaluationError("--labeler=api needs --judge_base_url and --judge_model")
    if options.settings.kl_alpha < 0:
        raise EvaluationError(f"--kl_alpha={options.settings.kl_alpha}: must be >= 0")
    specs = parse_runs_flag(options.runs)
    if not specs:
        raise EvaluationError("--runs: no run folder given")
    try:
        runs = [read_run(path, name) for name, path in specs]
        check_comparable(runs)
        path, split, fmt = events_source(runs, options.events)
        event_ids = {w.event_id for r in runs for w in r.worlds}
        try:
            events = load_events(path, event_ids, split=split, fmt=fmt)
        except (OSError, ValueError) as e:
            raise EvaluationError(f"--events {path}: {e}") from None
        check_real_actions(runs, events)
    except RunDataError as e:
        raise EvaluationError(str(e)) from None
    if options.labeler == "api" and options.judge_model:
        for r in runs:
            for role in ("policy_model", "mean_field_model"):
                model = str(r.config.get(role) or "")
                if model and (model == options.judge_model or Path(model).name == options.judge_model):
                    raise EvaluationError(f"--judge_model={options.judge_model} is run {r.name}'s {role}: "
                                          f"a judge favours its own text; use another model")
    if "intervention" in options.experiments:
        _intervention_pair(runs, options.intervention_pair)
    sources = pipeline.included_sources(options.settings)
    populations = []
    agents_by_event: dict = {}
    for r in runs:
        for w in r.worlds:
            agents_by_event.setdefault(w.event_id, set()).update(row["agent"] for row in w.rows)
    for event_id in sorted(agents_by_event):
        populations.append(real_population(events[event_id], agents_by_event[event_id]))
    for r in runs:
        for w in r.worlds:
            populations.append(sim_population(r, w, events[w.event_id], sources))
    return runs, events, populations


def _intervention_pair(runs, flag: Optional[str]):
    by_name = {r.name: r for r in runs}
    if flag:
        with_name, _, without_name = flag.partition(":")
        if with_name not in by_name or without_name not in by_name:
            raise EvaluationError(f"--intervention_pair={flag}: names must be among the runs {sorted(by_name)}")
        return by_name[with_name], by_name[without_name]
    has = [r for r in runs if any(row["source"] == "intervention" for w in r.worlds for row in w.rows)]
    without = [r for r in runs if r not in has]
    if len(has) != 1 or not without:
        raise EvaluationError("--experiment=intervention needs one run with interventions and one without; "
                              "name them with --intervention_pair=WITH:WITHOUT")
    same = [r for r in without if r.algorithm == has[0].algorithm]
    return has[0], (same or without)[0]


def _load_status(path: Optional[str]) -> dict:
    """The reportability file, or an EvaluationError naming it."""
    try:
        status = status_mod.load(path)
    except OSError as e:
        raise EvaluationError(f"{path}: cannot read the status file ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise EvaluationError(f"{path}: line {e.lineno}: malformed JSON") from None
    if not isinstance(status, dict) or not isinstance(status.get("pilot", {}), dict) \
            or not isinstance(status.get("verdicts", {}), dict):
        raise EvaluationError(f"{path}: not a status file ('pilot' and 'verdicts' must be objects)")
    return status


def run(options: Options) -> dict:
    """The whole job; returns the metrics payload (also written to `<out_dir>/metrics.json`)."""
    started = time.time()
    status = _load_status(options.status_path)  # before any labelling: a bad file fails in one line
    runs, events, populations = prepare(options)
    out_dir = Path(options.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labelers: dict = {}

    def labeler_for(language):
        if language not in labelers:
            if options.labeler == "rules":
                from mfjax.eval.labelers import rules_for

                labelers[language] = rules_for(language)
            else:
                labelers[language] = options.judge_factory(language)
        return labelers[language]

    total = sum(len(p.comments) for p in populations)
    bar, update = _progress_bar(total, options.progress)
    try:
        labels, versions = label_populations(labeler_for, populations, LabelCache(out_dir / "labels"), update)
    finally:
        if bar is not None:
            bar.close()
    withheld: dict = {}
    dim_status: dict = {}
    for language, version in versions.items():
        rep = status_mod.reportable(version, status)
        for dim, reason in rep["withheld"].items():
            withheld.setdefault(dim, f"{version}: {reason}")
        dim_status[version] = rep["status"]
    labelled = sum(1 for p in populations for c in p.comments if c.id in labels)
    notes = []
    if labelled < total:
        # The judge stopped early (budget): nothing is computed on a subset.
        for dim in schema.CATEGORICAL:
            withheld.setdefault(dim, f"labels incomplete ({labelled}/{total}); rerun to resume from the cache")
        notes.append(f"labelling incomplete: {labelled} of {total} comments; every dimension withheld")
    reportable = [d for d in schema.CATEGORICAL if d not in withheld]
    provisional = [d for d in reportable if any(s.get(d) == status_mod.PROVISIONAL for s in dim_status.values())]
    if provisional:
        notes.append(f"provisional (pilot status, not yet validated): {', '.join(provisional)}")
    settings = options.settings
    results = pipeline.evaluate(runs, labels, reportable, settings)
    curves = pipeline.step_curves(runs, labels, reportable, settings)
    experiments = {}
    if "trend" in options.experiments:
        experiments["trend"] = pipeline.trend(runs, labels, reportable, settings)
    if "horizon" in options.experiments:
        experiments["horizon"] = pipeline.horizon(runs, labels, reportable, settings)
    if "intervention" in options.experiments:
        with_run, without_run = _intervention_pair(runs, options.intervention_pair)
        experiments["intervention"] = pipeline.intervention(with_run, without_run, labels, reportable, settings)
    seeds = sorted({w.seed for r in runs for w in r.worlds})
    payload = {
        "schema_version": report.METRICS_SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "labeler": options.labeler,
        "labeler_versions": versions,
        "judge_model": options.judge_model,
        "dimension_status": dim_status,
        "runs": {r.name: r.path for r in runs},
        "algorithms": {r.name: r.algorithm for r in runs},
        "models": {r.name: {"policy": r.config.get("policy_model"), "mean_field": r.config.get("mean_field_model")}
                   for r in runs},
        "settings": dict(dataclasses.asdict(settings), compared_sources=list(pipeline.included_sources(settings))),
        "counts": {"events": len(events), "seeds": len(seeds), "worlds": len(runs[0].worlds)},
        "coverage": {"comments": total, "labelled": labelled},
        "reportable": reportable,
        "withheld": withheld,
        "notes": notes,
        "results": results,
        "curves": curves,
        "experiments": experiments,
    }
    figures = []
    if reportable:
        figures += report.plot_curves(curves, out_dir, reportable)
        figures.append(report.plot_kl_bars(results, reportable, out_dir))
    payload["figures"] = figures
    payload["elapsed_s"] = round(time.time() - started, 1)
    report.write_json(out_dir / "metrics.json", payload)
    (out_dir / "report.md").write_text(report.markdown(payload), encoding="utf-8")
    return payload
