"""launch/simulate.py end to end on a tiny model: outputs per world, prompts, the manifest, resuming, and
bad input refused in one line before any model is loaded."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import pytest

from mfjax.assets import events_path, read_fixture_events
from mfjax.data.jsonl import event_to_dict, write_jsonl
from mfjax.io.tokenizer import Tokenizer
from mfjax.sim import templates

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CED = str(events_path("ced_sample.jsonl"))


def simulate(*flags, check=True):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "simulate.py"), *flags],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"simulate failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def dry_run(*flags):
    proc = simulate("--dry_run", *flags)
    return json.loads(proc.stdout[proc.stdout.index("{"):]), proc


def refused(*flags):
    """Runs with bad input: a non-zero exit and one line of error on stderr, no traceback."""
    proc = simulate(*flags, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_simulate_writes_worlds_prompts_and_resumes(tiny_llama_dir, tmp_path):
    out_dir = tmp_path / "run"
    overrides = tmp_path / "overrides.json"
    overrides.write_text(json.dumps({"interventions": [{"step": 1, "position": 2, "text": "求真相"}],
                                     "key_nodes": [{"step": 1, "position": 0}]}), encoding="utf-8")
    flags = [f"--policy_model={tiny_llama_dir}", f"--events={CED}", "--num_events=1", "--num_agents=8",
             "--batch_size=4", "--warmup_steps=1", "--max_new_tokens=4", "--mf_max_new_tokens=6", "--seeds=0,1",
             "--worlds_per_batch=8", "--mesh=data=1", f"--interventions={overrides}", "--dump_prompts=5",
             f"--out_dir={out_dir}"]
    proc = simulate(*flags)
    assert "step 2/2" in proc.stdout and "1 compile(s)" in proc.stdout
    # Two worlds in a batch of up to 8 on one device: no padding worlds, and progress counts the two only.
    assert "2 worlds (+0 padding)" in proc.stdout
    files = sorted(os.listdir(out_dir))
    worlds = [f for f in files if f.endswith(".jsonl") and not f.endswith(".prompts.jsonl")]
    assert len(worlds) == 2 and "manifest.json" in files
    manifest = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["config"]["seeds"] == [0, 1] and manifest["config"]["rollout"]["num_steps"] == 2
    assert manifest["versions"]["jax"] == jax.__version__
    mf_sampling = manifest["settings"]["mean_field_generation"]
    assert mf_sampling["min_new_tokens"] == 6 and mf_sampling["sampling"]["temperature"] == 0.1

    event = read_fixture_events("ced_sample.jsonl")[0]
    rows = _read_jsonl(out_dir / worlds[0])
    assert [r["agent"] for r in rows] == list(range(8))
    assert [r["source"] for r in rows] == ["warmup"] * 4 + ["key_node", "generated", "intervention", "generated"]
    assert rows[6]["action"] == "求真相"
    assert rows[4]["action"] == rows[4]["real_action"] == event.agents[4].action  # read whole
    assert all(r["nll"] > 0 and r["nll_tokens"] > 0 for r in rows)
    assert all("\n" not in r["action"] for r in rows if r["source"] == "generated")
    assert "uid" not in rows[0]  # no personal identifiers in outputs
    trajectory = json.loads((out_dir / worlds[0].replace(".jsonl", ".mean_field.json")).read_text(encoding="utf-8"))
    assert trajectory["config_hash"] == manifest["config_hash"]
    assert [t["step"] for t in trajectory["trajectory"]] == [0, 1]  # one update per step, the last included
    assert rows[4]["mean_field"] == trajectory["trajectory"][0]["mean_field"]

    # The prompt dump holds exactly the SPEC text each model read.
    tok = Tokenizer.from_dir(tiny_llama_dir)
    head, tail = tok.chat_template_parts()
    prompts = _read_jsonl(out_dir / worlds[0].replace(".jsonl", ".prompts.jsonl"))
    policy = [p for p in prompts if p["model"] == "policy"]
    assert [p["agent"] for p in policy] == [0, 1, 2, 3, 4]
    for p in policy:
        m = rows[p["agent"]]["mean_field"]
        state = templates.state_text(event.agents[p["agent"]])
        assert p["prompt"] == head + templates.full_text(templates.policy_segments(event.topic, state, templates.mf_context(m))) + tail
    mean_field = [p for p in prompts if p["model"] == "mean_field"]
    assert [p["step"] for p in mean_field] == [0, 1]
    for p in mean_field:
        step_rows = [r for r in rows if r["step"] == p["step"]]
        m_prev = step_rows[0]["mean_field"]
        expected = templates.mean_field_segments(event.topic, m_prev, [r["action"] for r in step_rows])
        assert p["prompt"] == head + templates.full_text(expected) + tail

    # A rerun finds both worlds finished and runs nothing; other settings in the same folder are refused.
    again = simulate(*flags)
    assert "2 worlds already done, 0 to run" in again.stdout
    error = refused(*[f for f in flags if not f.startswith("--dump")], "--alg=state")
    assert "other settings" in error and "algorithm" in error and "mf" in error


@pytest.mark.parametrize("case", ["warmup", "position", "event_id", "strict_empty", "warmup_steps", "seeds",
                                  "missing_events"])
def test_bad_input_is_refused_before_loading(tiny_llama_dir, tmp_path, case):
    base = [f"--policy_model={tiny_llama_dir}", f"--events={CED}", "--num_agents=8", "--batch_size=4",
            "--warmup_steps=1", f"--out_dir={tmp_path / 'o'}"]
    spec = {"warmup": {"interventions": [{"step": 0, "position": 1, "text": "x"}]},
            "position": {"key_nodes": [{"step": 1, "position": 4}]},
            "event_id": {"key_nodes": [{"step": 1, "position": 0, "event_id": "no-such-event"}]}}
    if case in spec:
        path = tmp_path / "overrides.json"
        path.write_text(json.dumps(spec[case]), encoding="utf-8")
        error = refused(*base, f"--interventions={path}")
        assert str(path) in error
        assert {"warmup": "warm-up step", "position": "outside", "event_id": "no-such-event"}[case] in error
    elif case == "strict_empty":
        events = tmp_path / "events.jsonl"
        first = read_fixture_events("ced_sample.jsonl")[0]
        write_jsonl([first, dataclasses.replace(first, event_id="empty", agents=())], events)
        error = refused(*base[:1], f"--events={events}", *base[2:], "--strict")
        assert "no reactions" in error
        settings, proc = dry_run(*base[:1], f"--events={events}", *base[2:])
        assert settings["event_ids"] == [first.event_id] and "skipped" in proc.stderr
    elif case == "warmup_steps":
        assert "nothing to simulate" in refused(*base, "--warmup_steps=2")
    elif case == "seeds":
        assert "--seeds" in refused(*base, "--seeds=0,x")
    else:
        assert str(tmp_path / "nope") in refused(*base[:1], f"--events={tmp_path / 'nope'}", *base[2:])


def test_settings_resolved_before_loading(tiny_llama_dir, tmp_path):
    """The plain demo, the embedded model on the user's events, a single-event .json file, the mean field's
    sampling from the checkpoint's generation config, and the popular baseline's fallback warning."""
    demo, _ = dry_run(f"--out_dir={tmp_path / 'demo'}")
    assert demo["language"] == "en" and demo["settings"]["num_agents"] == 48 and len(demo["event_ids"]) == 2
    user, proc = dry_run(f"--events={CED}", f"--out_dir={tmp_path / 'user'}")
    assert user["language"] == "zh" and user["settings"]["num_agents"] == 300  # the user's settings, not the demo's
    assert user["settings"]["warmup_steps"] == 3 and len(user["event_ids"]) == 2 and "your events" in proc.stdout

    one = tmp_path / "one_event.json"
    one.write_text(json.dumps(event_to_dict(read_fixture_events("ced_sample.jsonl")[1]), ensure_ascii=False),
                   encoding="utf-8")
    single, _ = dry_run(f"--policy_model={tiny_llama_dir}", f"--events={one}", "--num_agents=32", "--warmup_steps=1",
                        f"--out_dir={tmp_path / 'one'}")
    assert single["event_ids"] == [read_fixture_events("ced_sample.jsonl")[1].event_id]

    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_llama_dir, tuned)
    (tuned / "generation_config.json").write_text(json.dumps({"top_k": 20, "top_p": 0.8, "temperature": 0.7,
                                                              "do_sample": True}), encoding="utf-8")
    resolved, proc = dry_run(f"--policy_model={tuned}", f"--events={CED}", "--num_agents=32", "--warmup_steps=1", "--alg=popular",
                             f"--out_dir={tmp_path / 'tuned_out'}")
    mf = resolved["settings"]["mean_field_generation"]
    assert mf["sampling"] == {"temperature": 0.1, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.2, "min_p": None}
    assert mf["min_new_tokens"] == 10
    policy = resolved["settings"]["policy_generation"]["sampling"]
    assert (policy["temperature"], policy["top_k"], policy["top_p"]) == (0.8, 50, 0.85)  # the paper's, explicit
    assert proc.stderr.count("no follower counts") == 1 and "oldest" in proc.stderr
