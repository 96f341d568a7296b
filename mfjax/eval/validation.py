"""Labeler validation (EVALUATION.md §7): the rule labelers against the reference labels of the frozen sample.

Reads `experiments/labeler_validation/<lang>/sample.jsonl` and the annotators' `labels_a.jsonl` /
`labels_b.jsonl`; reports inter-annotator agreement, and for the rules on the **test** split Cohen's κ,
Gwet's AC1, macro-F1, accuracy vs the majority class, class recall and confusion matrices, with
event-clustered bootstrap CIs. A dimension whose κ (mean of κ against each annotator) is under its
bar is "judge only"; the verdicts go to `mfjax/eval/status.json` keyed by the labeler version.

Real items are labelled inside their full event population (the first 300 responders, masked as the
sample is), as the evaluator labels them, because English share detection compares comments within
a population. Without the corpora, items are labelled within the sample's own event groups and the
report says so.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path
from typing import Optional

from mfjax.eval import agreement, bootstrap, metrics, schema
from mfjax.eval import status as status_mod
from mfjax.eval.labelers import rules_for
from mfjax.eval.labelers.base import Comment, Population
from mfjax.eval.report import write_json
from mfjax.eval.text import text_hash

LANGUAGES = ("zh", "en")
POPULATION_AGENTS = 300  # the sample's candidates are each event's first 300 responders


class ValidationError(ValueError):
    """Bad sample or label file (the message names the file and line)."""


def read_jsonl(path: Path) -> list:
    """Rows of a JSONL file; a malformed line is an error naming file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValidationError(f"{path}: line {n}: malformed JSON ({e.msg})") from None
    return rows


def read_labels(path: Path, sample_ids: set) -> dict:
    """{id: labels} of an annotator's file; unknown ids, duplicates or out-of-enum values are errors."""
    out = {}
    for n, row in enumerate(read_jsonl(path), 1):
        cid = row.get("id")
        if cid not in sample_ids:
            raise ValidationError(f"{path}: line {n}: id {cid!r} is not in the sample")
        if cid in out:
            raise ValidationError(f"{path}: line {n}: id {cid} labelled twice")
        labels, problems = schema.clean_labels(row)
        bad = [p for p in problems if "not in" in p or "not a list" in p]
        if bad:
            raise ValidationError(f"{path}: line {n}: {bad[0]}")
        out[cid] = labels
    return out


def _event_population(language: str, data: Path, event_id: str):
    from mfjax.data.privacy import mask_personal
    from mfjax.data import twitter, weibo

    if language == "zh":
        event = weibo.read_ced_event(data / "ced", event_id)
    else:
        event, _ = twitter.read_twitter_event(data / "twitter" / "events" / f"{event_id}.json")
    comments = [Comment(f"{event_id}#r{i}", mask_personal(a.action, language), language)
                for i, a in enumerate(event.agents[:POPULATION_AGENTS])]
    return Population(key=f"validation/{event_id}", topic=mask_personal(event.topic, language),
                      language=language, comments=comments)


def rules_labels(language: str, items: list, data: Optional[Path]) -> tuple[dict, str, str]:
    """({id: labels} for the sample items, labeler version, how populations were formed)."""
    labeler = rules_for(language)
    by_event = collections.defaultdict(list)
    for item in items:
        by_event[(item["event_id"], "#s" in item["id"])].append(item)
    use_data = data is not None and (data / ("ced" if language == "zh" else "twitter")).is_dir()
    out = {}
    for (event_id, generated), group in sorted(by_event.items()):
        population = None
        if use_data and not generated:
            population = _event_population(language, data, event_id)
            texts = {c.id: c.text for c in population.comments}
            for item in group:
                if item["id"] not in texts or text_hash(texts[item["id"]]) != text_hash(item["text"]):
                    raise ValidationError(f"sample item {item['id']}: its text differs from the corpus at {data}")
        if population is None:
            population = Population(key=f"validation/{event_id}", topic=group[0]["topic"], language=language,
                                    comments=[Comment(i["id"], i["text"], language, bool(i.get("is_repost")))
                                              for i in group])
        labels = labeler.label(population)
        out.update({item["id"]: labels[item["id"]] for item in group})
    how = "full event populations (first 300 responders)" if use_data else "sample-only event groups (corpus not found)"
    return out, labeler.version, how


def _stats(items: list, reference: dict, other: dict, n_resamples: int, seed: int) -> dict:
    """Per-dimension agreement of `other` with `reference` over the items, with event-clustered CIs."""
    out = {}
    for dim in schema.CATEGORICAL:
        pairs = [(i["event_id"], reference[i["id"]][dim], other[i["id"]][dim])
                 for i in items if i["id"] in reference and i["id"] in other]
        ref = [p[1] for p in pairs]
        oth = [p[2] for p in pairs]
        s = agreement.summary(ref, oth, dim)
        groups = collections.defaultdict(list)
        for e, r, o in pairs:
            groups[e].append((r, o))
        for name, fn in (("kappa", agreement.cohen_kappa), ("ac1", agreement.gwet_ac1),
                         ("macro_f1", agreement.macro_f1)):
            def stat(xs, fn=fn):
                return fn(agreement.confusion([x[0] for x in xs], [x[1] for x in xs], dim))
            _, lo, hi = bootstrap.clustered_items_ci(groups, stat, n_resamples=n_resamples, seed=seed)
            s[f"{name}_ci"] = [lo, hi]
        # Do the two labelings give the same per-event label histograms? (What the metrics compare.)
        js = [metrics.js_divergence(metrics.counts([x[0] for x in g], dim)[0], metrics.counts([x[1] for x in g], dim)[0])
              for g in groups.values()]
        js = [x for x in js if x == x]
        s["per_event_js_mean"] = sum(js) / len(js) if js else float("nan")
        out[dim] = s
    return out


def _table(title: str, stats: dict, confusions: bool = False) -> list:
    lines = [f"### {title}", "", "| dimension | n | κ [95 % CI] | AC1 [95 % CI] | macro-F1 | accuracy | majority | "
             "per-event JS |", "|---|---|---|---|---|---|---|---|"]
    for dim, s in stats.items():
        def ci(name):
            v, (lo, hi) = s[name], s[f"{name}_ci"]
            return "–" if v != v else f"{v:.2f} [{lo:.2f}, {hi:.2f}]" if lo == lo else f"{v:.2f}"
        lines.append(f"| {dim} | {s['n']} | {ci('kappa')} | {ci('ac1')} | {s['macro_f1']:.2f} | "
                     f"{s['accuracy']:.2f} | {s['majority_accuracy']:.2f} | {s['per_event_js_mean']:.3f} |")
    lines.append("")
    if confusions:
        for dim, s in stats.items():
            values = s["values"]
            lines += [f"{dim} (rows: reference, columns: rules)", "", "| | " + " | ".join(values) + " |",
                      "|" + "---|" * (len(values) + 1)]
            lines += [f"| {v} | " + " | ".join(str(x) for x in row) + " |" for v, row in zip(values, s["confusion"])]
            lines.append("")
    return lines


def validate_language(language: str, sample_dir: Path, data: Optional[Path], n_resamples: int, seed: int):
    """(report dict, markdown lines, verdict or None) for one language."""
    folder = sample_dir / language
    sample_path = folder / "sample.jsonl"
    if not sample_path.is_file():
        return None, [f"{language}: no validation sample at {sample_path}; skipped"], None
    items = read_jsonl(sample_path)
    ids = {i["id"] for i in items}
    annotators = {name: folder / f"labels_{name}.jsonl" for name in ("a", "b")}
    refs = {name: read_labels(p, ids) for name, p in annotators.items() if p.is_file()}
    if not refs:
        message = (f"{language}: no reference labels yet ({annotators['a']} and {annotators['b']} are missing); "
                   f"the sample waits for annotators (see {sample_dir / 'GUIDELINES.md'}); nothing validated")
        return None, [message], None
    test = [i for i in items if i["split"] == "test"]
    rules, version, how = rules_labels(language, items, data)
    report = {"language": language, "labeler_version": version, "populations": how,
              "created": time.strftime("%Y-%m-%d"), "items": {"all": len(items), "test": len(test)},
              "annotators": {n: len(r) for n, r in refs.items()}}
    lines = [f"## {language}: `{version}`", "", f"- items: {len(test)} test of {len(items)}; annotators: "
             + ", ".join(f"{n} ({len(r)} labelled)" for n, r in refs.items()) + f"; rules labelled within {how}", ""]
    if len(refs) == 2:
        report["inter_annotator_test"] = _stats(test, refs["a"], refs["b"], n_resamples, seed)
        lines += _table("Annotator A vs annotator B (test split)", report["inter_annotator_test"])
    for name, ref in refs.items():
        report[f"rules_vs_{name}_test"] = _stats(test, ref, rules, n_resamples, seed)
        lines += _table(f"Rules vs annotator {name.upper()} (test split)", report[f"rules_vs_{name}_test"],
                        confusions=True)
    bars = status_mod.load()["bars"]
    verdict = {"validated_on": report["created"], "ranking_checked": False, "dimensions": {}}
    for dim in schema.CATEGORICAL:
        kappas = [report[f"rules_vs_{n}_test"][dim]["kappa"] for n in refs]
        kappas = [k for k in kappas if k == k]
        kappa = sum(kappas) / len(kappas) if kappas else float("nan")
        passed = kappa == kappa and kappa >= bars[dim]
        verdict["dimensions"][dim] = {"verdict": status_mod.PASS if passed else status_mod.JUDGE_ONLY,
                                      "kappa": kappa, "bar": bars[dim]}
    lines += ["### Verdicts (κ = mean over annotators; bars of EVALUATION.md §7)", "",
              "| dimension | κ | bar | verdict |", "|---|---|---|---|"]
    lines += [f"| {d} | {v['kappa']:.2f} | {v['bar']} | {v['verdict']} |" for d, v in verdict["dimensions"].items()]
    lines += ["", "The system-ranking bar (same sign of ΔKL under the rules and the judge) needs judge labels of "
              "runs; it is not checked here (`ranking_checked: false`).", ""]
    write_json(folder / "validation_report.json", report)
    (folder / "validation_report.md").write_text("\n".join(lines), encoding="utf-8")
    return report, lines, (version, verdict)


def main(sample_dir, data, *, write_status: bool = True, n_resamples: int = 2000, seed: int = 0) -> int:
    """Validate both languages; print the tables; record verdicts. Returns a process exit code."""
    sample_dir = Path(sample_dir)
    data_path = Path(data) if data else None
    verdicts = []
    try:
        for language in LANGUAGES:
            _, lines, verdict = validate_language(language, sample_dir, data_path, n_resamples, seed)
            print("\n".join(lines))
            if verdict:
                verdicts.append(verdict)
    except ValidationError as e:
        print(f"mfjax: {e}")
        return 2
    if verdicts and write_status:
        status = status_mod.load()
        for version, verdict in verdicts:
            status["verdicts"][version] = verdict
        write_json(status_mod.STATUS_PATH, status)
        print(f"mfjax: verdicts for {', '.join(v for v, _ in verdicts)} written to {status_mod.STATUS_PATH}")
    return 0
