"""Two processes on one machine, as on two hosts: the same worlds and seeds give exactly the outputs of one
process over the same eight devices (global arrays built from each process's own data, JAX's CPU
collectives through gloo, process 0 writing every world)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys


from mfjax.assets import events_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    return {**os.environ, "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
            "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}


def _outputs(out_dir):
    rows = {}
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".jsonl"):
            rows[name] = (out_dir / name).read_text(encoding="utf-8")
        if name.endswith(".mean_field.json"):
            rows[name] = json.loads((out_dir / name).read_text(encoding="utf-8"))["trajectory"]
    return rows


def test_two_processes_equal_one(tiny_llama_dir, tmp_path):
    flags = [os.path.join(REPO, "launch", "simulate.py"), f"--policy_model={tiny_llama_dir}",
             f"--events={events_path('ced_sample.jsonl')}", "--num_agents=8", "--batch_size=4", "--warmup_steps=1",
             "--max_new_tokens=4", "--mf_max_new_tokens=6", "--seeds=0,1", "--worlds_per_batch=8", "--mesh=data=8",
             "--temperature=0.8"]
    single = subprocess.run([sys.executable, *flags, f"--out_dir={tmp_path / 'one'}"], capture_output=True,
                            text=True, env=_env(8), cwd=REPO, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]

    port = _free_port()
    procs = [subprocess.Popen([sys.executable, *flags, f"--out_dir={tmp_path / 'two'}",
                               f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(4), cwd=REPO)
             for i in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    assert "4 worlds (+4 padding)" in results[0][0]  # 2 events x 2 seeds over 8 devices in 2 processes

    one, two = _outputs(tmp_path / "one"), _outputs(tmp_path / "two")
    assert len([k for k in one if k.endswith(".jsonl")]) == 4
    assert one.keys() == two.keys()
    for name in one:
        assert one[name] == two[name], name
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["devices"] == 8
