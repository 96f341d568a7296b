"""launch/evaluate.py end to end on synthetic run folders built here (no model runs)."""

import json
import os
import subprocess
import sys

import pytest
from eval_fixtures import STEP, make_events, make_run  # tests/ is on sys.path, like the other test helpers

pytest.importorskip("jieba")
pytest.importorskip("pysenti")
pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "launch", "evaluate.py")

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    events_path = root / "events.jsonl"
    events = make_events(events_path)
    make_run(root / "mf", events_path, events, "mf")
    make_run(root / "state", events_path, events, "state")
    make_run(root / "mf_int", events_path, events, "mf", interventions={(2, 1): "真的假的？", (2, 3): "求真相"})
    return root


def pilot_status(path, **pilot_overrides):
    """The shipped status file without its verdicts (the pilot statuses only), so these tests do not change
    whenever a labeler is re-validated; ``pilot_overrides`` replace one family's pilot entry."""
    from mfjax.eval import status

    data = status.load()
    data["verdicts"] = {}
    data["pilot"].update(pilot_overrides)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def launch(*args, cwd=ROOT, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, LAUNCHER, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_end_to_end_writes_sane_metrics_report_and_figures(runs, tmp_path):
    out = tmp_path / "eval"
    status_file = pilot_status(tmp_path / "status.json")
    proc = launch(f"--runs=mf={runs / 'mf'},state={runs / 'state'}", f"--out_dir={out}", "--bootstrap=200",
                  "--experiment=main,trend,horizon", "--horizon_window=2", "--noprogress",
                  f"--status_file={status_file}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert m["results"]["systems"] == ["mf", "state"]
    assert m["counts"] == {"events": 3, "seeds": 2, "worlds": 6}
    assert m["coverage"]["labelled"] == m["coverage"]["comments"] > 0
    assert m["labeler_versions"]["zh"].startswith("rules-zh/")
    # Pilot status of the zh rules: stance, belief, rumor, state, behaviour are withheld with reasons.
    assert set(m["withheld"]) == {"rumor", "sentiment_state", "behavior_type", "stance", "belief_degree"}
    assert m["reportable"] == ["sentiment_tendency", "subjectivity", "intent"]
    for system in ("mf", "state"):
        est = m["results"]["estimates"][system]
        assert set(est) >= set(m["reportable"]) and not set(est) & set(m["withheld"])
        for dim in m["reportable"]:
            kl = est[dim]["kl"]
            assert kl["mean"] >= 0 and kl["lo"] <= kl["mean"] <= kl["hi"]
            assert 0 <= est[dim]["js"]["mean"] <= 1
            assert kl["events"] == 3 and kl["worlds"] == 6
        assert "wasserstein1" in est["sentiment_tendency"]
        # Rows carry nll = 3 + U(0, 1) over 4 tokens.
        assert 3.0 / 4 <= est["_nll"]["rollout_nll_per_token"]["mean"] <= 4.0 / 4
    # Rows by source are counted; warm-up rows are not compared by default.
    assert m["results"]["rows"]["mf"]["rows_by_source"] == {"warmup": 3 * 2 * STEP, "generated": 3 * 2 * 24}
    assert m["results"]["rows"]["mf"]["compared_sources"] == ["generated"]
    assert "mf_vs_state" in m["results"]["comparisons"]
    # Overall histograms pool the compared rows (3 events x 2 seeds x 24 generated agents).
    h = m["results"]["histograms"]["mf"]["intent"]
    assert sum(h["real_counts"]) + h["nulls"]["real"] == sum(h["sim_counts"]) + h["nulls"]["sim"] == 3 * 2 * 24
    assert sum(h["sim_share"]) == pytest.approx(1.0)
    # Per-step and cumulative curves over the 4 steps; the simulated curves start after warm-up.
    curve = m["curves"]["mf"]["dims"]["intent"]
    assert len(curve["sim_cumulative"]["mean"]) == len(m["curves"]["mf"]["steps"]) == 4
    assert all(v is None for v in curve["sim"]["mean"][0]) and sum(curve["sim_cumulative"]["mean"][-1]) == pytest.approx(1.0)
    assert sum(curve["real"]["mean"][0]) == pytest.approx(1.0)
    assert set(m["experiments"]) == {"trend", "horizon"}
    assert m["experiments"]["trend"]["withheld"]  # doubt / counter / oppose are judge-only for the zh rules
    assert list(m["experiments"]["horizon"]["systems"]["mf"]) == ["1", "3"]
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| mf |" in report and "| state |" in report and "Withheld dimensions" in report
    import matplotlib.image

    assert sorted(m["figures"]) == sorted(["curves_sentiment_tendency.png", "curves_subjectivity.png",
                                           "curves_intent.png", "kl_by_method.png"])
    for name in m["figures"]:
        img = matplotlib.image.imread(out / name)
        assert img.shape[0] > 200 and img.shape[1] > 300 and img.std() > 0.01  # not blank
    # The label cache holds the real labels once per event and one file per simulated world.
    label_files = sorted(p.relative_to(out / "labels").as_posix() for p in (out / "labels").rglob("*.jsonl"))
    assert sum(1 for f in label_files if "/real/" in f) == 3
    assert sum(1 for f in label_files if "/mf/" in f) == 6
    # A rerun reuses the cache and gives the same numbers.
    proc = launch(f"--runs=mf={runs / 'mf'},state={runs / 'state'}", f"--out_dir={out}", "--bootstrap=200",
                  "--noprogress", f"--status_file={status_file}")
    assert proc.returncode == 0
    m2 = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert m2["results"]["estimates"]["mf"]["intent"] == m["results"]["estimates"]["mf"]["intent"]


def test_intervention_experiment_pairs_runs(runs, tmp_path):
    proc = launch(f"--runs=with={runs / 'mf_int'},without={runs / 'mf'}", f"--out_dir={tmp_path / 'e'}",
                  "--bootstrap=100", "--experiment=intervention", "--noprogress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((tmp_path / "e" / "metrics.json").read_text(encoding="utf-8"))
    section = m["experiments"]["intervention"]
    assert section["with"] == "with" and section["first_intervention_step"] == 2
    # Same generator seeds in both runs: steps before the intervention match exactly.
    assert section["before_intervention"]["actions_differing"] == 0
    assert section["before_intervention"]["actions_compared"] == 3 * 2 * 2 * STEP
    assert m["results"]["rows"]["with"]["rows_by_source"]["intervention"] == 3 * 2 * 2


def test_bad_inputs_fail_fast_with_one_line_naming_the_file(runs, tmp_path):
    # Missing manifest.
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = launch(f"--runs={empty}", f"--out_dir={tmp_path / 'o'}")
    assert proc.returncode == 2 and f"{empty}/manifest.json: missing" in proc.stderr
    # A world whose mean-field file carries another run's config hash.
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(runs / "mf", broken)
    mf_file = broken / "ev0.seed1.mean_field.json"
    data = json.loads(mf_file.read_text(encoding="utf-8"))
    data["config_hash"] = "other"
    mf_file.write_text(json.dumps(data), encoding="utf-8")
    proc = launch(f"--runs={broken}", f"--out_dir={tmp_path / 'o'}")
    assert proc.returncode == 2 and "ev0.seed1.mean_field.json: config_hash other differs" in proc.stderr
    # A real action that is not the event's text.
    shutil.rmtree(broken)
    shutil.copytree(runs / "mf", broken)
    world = broken / "ev1.seed0.jsonl"
    rows = [json.loads(x) for x in world.read_text(encoding="utf-8").splitlines()]
    rows[5]["real_action"] = "别的文字"
    world.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    proc = launch(f"--runs={broken}", f"--out_dir={tmp_path / 'o'}")
    assert proc.returncode == 2 and "ev1.seed0.jsonl: agent 5: real_action differs" in proc.stderr
    # A malformed row.
    world.write_text("{oops\n", encoding="utf-8")
    proc = launch(f"--runs={broken}", f"--out_dir={tmp_path / 'o'}")
    assert proc.returncode == 2 and "ev1.seed0.jsonl: line 1: malformed JSON" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    # A status file that is not one, refused before any labelling.
    bad_status = tmp_path / "status.json"
    bad_status.write_text("{oops", encoding="utf-8")
    proc = launch(f"--runs={runs / 'mf'}", f"--out_dir={tmp_path / 'o'}", f"--status_file={bad_status}")
    assert proc.returncode == 2 and f"{bad_status}: line 1: malformed JSON" in proc.stderr
    # Runs that cannot share a table.
    proc = launch(f"--runs=a={runs / 'mf'},a={runs / 'state'}", f"--out_dir={tmp_path / 'o'}")
    assert proc.returncode == 2 and "duplicate system names" in proc.stderr


def test_no_flags_without_demo_output_says_what_to_do(tmp_path):
    proc = launch(cwd=tmp_path)
    assert proc.returncode == 2
    assert "no demo output at runs/demo" in proc.stderr and "launch/simulate.py" in proc.stderr


def test_a_labeler_with_nothing_reportable_says_so(tmp_path):
    from mfjax.eval import evaluation, pipeline

    english = ["So sad RIP", "This is a hoax", "Is this true?", "RT @a: big news", "LOL great", "wow omg"]
    events = make_events(tmp_path / "ev.jsonl", n_events=2, comments=english, language="en")
    make_run(tmp_path / "mf", tmp_path / "ev.jsonl", events, "mf", comments=english)
    status_file = pilot_status(tmp_path / "status.json")  # the English rules' pilot: judge-only everywhere
    payload = evaluation.run(evaluation.Options(runs=[str(tmp_path / "mf")], out_dir=str(tmp_path / "out"),
                                                settings=pipeline.Settings(n_bootstrap=50), progress=False,
                                                status_path=str(status_file)))
    # A labeler judge-only on every dimension: nothing is computed from it.
    assert payload["reportable"] == [] and payload["figures"] == []
    assert payload["labeler_versions"]["en"].startswith("rules-en/")
    assert set(payload["results"]["estimates"]["mf"]) == {"_headline", "_keywords", "_nll"}
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "No dimension is reportable" in report and "rollout NLL/token" in report
