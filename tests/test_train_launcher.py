"""launch/train.py refuses bad input in one line naming the flag or file (exit status 2), before any model loads,
and resolves its settings with --dry_run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "launch", "train.py")
EVENTS = os.path.join(ROOT, "mfjax", "assets", "events", "twitter_sample.jsonl")


def run(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, env=env, timeout=120, cwd=cwd)


@pytest.mark.parametrize("args, words", [
    (["--stage=mf", "--events=/no/such/events.jsonl"], ["--events=/no/such/events.jsonl", "no events"]),
    (["--stage=mf", "--events=" + EVENTS, "--k=1"], ["--k", "k >= 2"]),
    (["--stage=mf", "--events=" + EVENTS, "--mean_field_lora=/tmp"], ["--mean_field_lora", "stage 2"]),
    (["--stage=mf", "--events=" + EVENTS, "--rel_agents=32"], ["--rel_agents=32", "--batch_size=16"]),
    (["--stage=mf", "--events=" + EVENTS, "--heldout_events=" + EVENTS], ["shares 2 event(s)"]),
])
def test_bad_input_is_one_line_before_any_model(tmp_path, args, words):
    if not any(a.startswith("--out_dir") for a in args):
        args = [*args, f"--out_dir={tmp_path / 'run'}"]
    out = run(*args)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("train.py: error:"), out.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_dry_run_resolves_the_settings(tmp_path):
    out = run("--stage=state_sft", "--events=" + EVENTS, "--heldout_fraction=0.5", f"--out_dir={tmp_path}", "--dry_run")
    assert out.returncode == 0, out.stderr
    settings = json.loads(out.stdout)
    assert settings["train_events"] == 1 and settings["heldout_events"] == 1 and settings["language"] == "en"
    assert settings["config"]["learning_rate"] == 1e-6  # the reference's state-SFT rate
    assert settings["config"]["lora"]["rank"] == settings["config"]["lora"]["alpha"] == 64
