"""launch/simulate.py end to end on a tiny model: outputs per world, the manifest, resuming, bad flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

from mfjax.assets import events_path
from mfjax.config import ModelConfig
from mfjax.io.hf import save_hf
from mfjax.models.params import init_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_model_dir(smollm2_dir, tmp_path_factory):
    """A tiny random Llama saved as an HF folder with SmolLM2's tokenizer and chat template."""
    cfg = ModelConfig(model_type="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True, eos_token_ids=(2,),
                      bos_token_id=1)
    out = str(tmp_path_factory.mktemp("tiny_llama"))
    save_hf(out, cfg, init_params(cfg, jax.random.key(0), std=0.05), tokenizer_dir=smollm2_dir)
    return out


def simulate(*flags, check=True):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "simulate.py"), *flags],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"simulate failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def test_simulate_writes_worlds_and_resumes(tiny_model_dir, tmp_path):
    out_dir = tmp_path / "run"
    overrides = tmp_path / "overrides.json"
    overrides.write_text(json.dumps({"interventions": [{"step": 1, "position": 2, "text": "求真相"}],
                                     "key_nodes": [{"step": 1, "position": 0}]}), encoding="utf-8")
    flags = [f"--policy_model={tiny_model_dir}", f"--events={events_path('ced_sample.jsonl')}", "--num_events=1",
             "--num_agents=8", "--batch_size=4", "--warmup_steps=1", "--max_new_tokens=4", "--mf_max_new_tokens=6",
             "--max_action_tokens=16", "--seeds=0,1", "--worlds_per_batch=2", "--mesh=data=1",
             f"--interventions={overrides}", f"--out_dir={out_dir}"]
    proc = simulate(*flags)
    assert "step 2/2" in proc.stdout and "1 compile(s)" in proc.stdout
    files = sorted(os.listdir(out_dir))
    jsonl = [f for f in files if f.endswith(".jsonl")]
    assert len(jsonl) == 2 and "manifest.json" in files
    assert sum(f.endswith(".mean_field.json") for f in files) == 2
    rows = [json.loads(line) for line in (out_dir / jsonl[0]).read_text(encoding="utf-8").splitlines()]
    assert [r["agent"] for r in rows] == list(range(8))
    assert [r["source"] for r in rows] == ["warmup"] * 4 + ["key_node", "generated", "intervention", "generated"]
    assert rows[6]["action"] == "求真相"
    assert rows[4]["real_action"].startswith(rows[4]["action"])  # real actions are cut to --max_action_tokens
    assert all(r["nll"] > 0 and r["nll_tokens"] > 0 for r in rows)
    assert set(rows[0]) >= {"step", "agent", "state", "real_action", "generated_action", "action", "mean_field", "nll"}
    assert "uid" not in rows[0]  # no personal identifiers in outputs
    manifest = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["config"]["seeds"] == [0, 1] and manifest["config"]["rollout"]["num_steps"] == 2
    assert manifest["versions"]["jax"] == jax.__version__
    # A rerun finds both worlds finished and runs nothing.
    again = simulate(*flags)
    assert "2 worlds already done, 0 to run" in again.stdout


def test_simulate_bad_interventions_file_names_it(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"interventions": [{"step": 1}]}), encoding="utf-8")
    proc = simulate(f"--policy_model={tiny_model_dir}", f"--events={events_path('ced_sample.jsonl')}",
                    "--num_events=1", "--num_agents=8", "--batch_size=4", f"--interventions={bad}",
                    f"--out_dir={tmp_path / 'o'}", check=False)
    assert proc.returncode != 0
    assert str(bad) in proc.stderr and "interventions[0]" in proc.stderr
