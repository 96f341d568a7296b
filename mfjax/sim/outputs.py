"""Rollout outputs: detokenized after the scan, one JSONL per (event, seed), plus a run manifest.

Each world's file is written to a temporary name and renamed when complete, so a file that exists is a
finished world and a rerun skips it. Agent rows carry no personal data (no uid, no screen name).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Any, Sequence

import numpy as np

from mfjax.sim import rollout as R
from mfjax.sim import templates as T
from mfjax.sim.batch import EncodedEvent, output_name


def _text(tokenizer, tokens: np.ndarray, length: int) -> str:
    return tokenizer.decode(tokens[:length].tolist())


def world_records(ys: R.StepOutputs, index: int, enc: EncodedEvent, seed: int, tokenizer,
                  rcfg: R.RolloutConfig) -> tuple[list[dict], list[dict]]:
    """(agent rows, mean-field trajectory) of world ``index`` from the stacked step outputs.

    ``ys`` holds host numpy arrays shaped [steps, W, B, ...].
    """
    rows, trajectory = [], []
    B = rcfg.step_size
    event = enc.event
    for k in range(rcfg.num_steps):
        m = _text(tokenizer, ys.mean_field[k, index], int(ys.mean_field_len[k, index]))
        trajectory.append({"step": k, "mean_field": m})
        for j in range(B):
            agent = k * B + j
            if agent >= enc.num_agents:
                break
            state = T.state_text(event.agents[agent], language=event.language)
            rows.append({
                "event_id": event.event_id,
                "seed": seed,
                "step": k,
                "agent": agent,
                "state": state,
                "real_action": event.agents[agent].action,
                "generated_action": _text(tokenizer, ys.generated[k, index, j], int(ys.generated_len[k, index, j])),
                "action": _text(tokenizer, ys.action[k, index, j], int(ys.action_len[k, index, j])),
                "source": R.SOURCE_NAMES[int(ys.source[k, index, j])],
                "mean_field": m,
                "nll": float(ys.nll[k, index, j]),
                "nll_tokens": int(ys.nll_tokens[k, index, j]),
            })
    return rows, trajectory


def write_world(out_dir: str, enc: EncodedEvent, seed: int, rows: Sequence[dict], trajectory: Sequence[dict]) -> str:
    """Writes a world's agent rows (JSONL) and mean-field trajectory (JSON) atomically; returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, output_name(enc.event.event_id, seed))
    traj_path = path[: -len(".jsonl")] + ".mean_field.json"
    with open(traj_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"event_id": enc.event.event_id, "seed": seed, "trajectory": list(trajectory)}, f,
                  ensure_ascii=False, indent=1)
    os.replace(traj_path + ".tmp", traj_path)
    # The JSONL goes last: its existence marks the world as finished.
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)
    return path


def write_manifest(out_dir: str, config: dict[str, Any]) -> str:
    """Writes ``manifest.json``: the run's settings, seeds, model dirs and package versions."""
    import jax
    import transformers

    import mfjax

    versions = {"mfjax": mfjax.__version__, "jax": jax.__version__, "transformers": transformers.__version__,
                "python": sys.version.split()[0]}
    try:
        import flax

        versions["flax"] = flax.__version__
    except ImportError:  # pragma: no cover - flax is a dependency
        pass
    manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
                "backend": jax.default_backend(), "devices": jax.device_count(), "versions": versions,
                "config": config}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "manifest.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(manifest, f, ensure_ascii=False, indent=1, default=str)
    os.replace(path + ".tmp", path)
    return path
