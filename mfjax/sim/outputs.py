"""Rollout outputs: detokenized after the scan, one JSONL per (event, seed), plus a run manifest.

Each world's file is written to a temporary name and renamed when complete, so a file that exists is a
finished world and a rerun skips it. Agent rows carry no personal data (no uid, no screen name).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from typing import Any, Sequence

import numpy as np

from mfjax.sim import policies, templates
from mfjax.sim.batch import EncodedEvent
from mfjax.sim.types import Source, StepOutputs


def output_name(event_id: str, seed: int) -> str:
    """File name of a world's output (event ids may hold characters unsafe in paths)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in event_id)
    return f"{safe}.seed{seed}.jsonl"


def is_done(out_dir: str, event_id: str, seed: int) -> bool:
    """Whether a world's output was fully written by an earlier run (its rows file exists)."""
    return os.path.exists(os.path.join(out_dir, output_name(event_id, seed)))


def _text(tokenizer, tokens: np.ndarray, length: int) -> str:
    return tokenizer.decode(tokens[:length].tolist())


def world_records(ys: StepOutputs, index: int, enc: EncodedEvent, seed: int, tokenizer,
                  rcfg) -> tuple[list[dict], list[dict]]:
    """(agent rows, mean-field trajectory) of world ``index`` from the stacked step outputs.

    ``ys`` holds host numpy arrays shaped [steps, W, B, ...]. Only the event's own steps are read (a
    shorter event than others in its batch stops at its last agent). The trajectory has one entry per
    step: the mean field written from that step's actions, the last one included (algorithm ``mf``).
    """
    rows, trajectory = [], []
    B = rcfg.step_size
    event = enc.event
    for k in range(min(enc.num_steps, rcfg.num_steps)):
        m = _text(tokenizer, ys.mean_field[k, index], int(ys.mean_field_len[k, index]))
        if policies.ALGORITHMS[rcfg.algorithm].uses_mean_field:
            written = _text(tokenizer, ys.mean_field_out[k, index], int(ys.mean_field_out_len[k, index]))
            trajectory.append({"step": k, "mean_field": written})
        for j in range(B):
            agent = k * B + j
            if agent >= enc.num_agents:
                break
            state = templates.state_text(event.agents[agent], language=event.language)
            rows.append({
                "event_id": event.event_id,
                "seed": seed,
                "step": k,
                "agent": agent,
                "state": state,
                "real_action": event.agents[agent].action,
                "generated_action": _text(tokenizer, ys.generated[k, index, j], int(ys.generated_len[k, index, j])),
                "action": _text(tokenizer, ys.action[k, index, j], int(ys.action_len[k, index, j])),
                "source": Source(int(ys.source[k, index, j])).label,
                "mean_field": m,
                "nll": float(ys.nll[k, index, j]),
                "nll_tokens": int(ys.nll_tokens[k, index, j]),
            })
    return rows, trajectory


def prompt_records(ys: StepOutputs, index: int, enc: EncodedEvent, tokenizer, rcfg, num_agents: int) -> list[dict]:
    """The exact prompt text each model read, decoded from the token buffers it was given: the policy
    prompt of the first ``num_agents`` agents and every mean-field prompt of world ``index``."""
    decode = lambda tokens, n: tokenizer.decode(tokens[:int(n)].tolist(), skip_special_tokens=False)
    out = []
    B = rcfg.step_size
    for k in range(min(enc.num_steps, rcfg.num_steps)):
        prefix = decode(ys.policy_prefix[k, index], ys.policy_prefix_len[k, index])
        for a in range(k * B, min((k + 1) * B, enc.num_agents, num_agents)):
            out.append({"model": "policy", "step": k, "agent": a,
                        "prompt": prefix + tokenizer.decode(enc.agent_part[a], skip_special_tokens=False)})
        if policies.ALGORITHMS[rcfg.algorithm].uses_mean_field:
            out.append({"model": "mean_field", "step": k, "prompt": decode(ys.mf_prompt[k, index],
                                                                           ys.mf_prompt_len[k, index])})
    return out


def _write_atomic(path: str, write) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        write(f)
    os.replace(path + ".tmp", path)


def write_world(out_dir: str, enc: EncodedEvent, seed: int, rows: Sequence[dict], trajectory: Sequence[dict], *,
                config_hash: str | None = None, prompts: Sequence[dict] | None = None) -> str:
    """Writes a world's agent rows (JSONL), mean-field trajectory (JSON, stamped with the run's config hash)
    and, when given, its prompts (JSONL), each atomically; returns the rows' path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, output_name(enc.event.event_id, seed))
    stem = path[: -len(".jsonl")]
    if prompts is not None:
        _write_atomic(stem + ".prompts.jsonl",
                      lambda f: f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts))
    _write_atomic(stem + ".mean_field.json", lambda f: json.dump(
        {"event_id": enc.event.event_id, "seed": seed, "config_hash": config_hash, "trajectory": list(trajectory)},
        f, ensure_ascii=False, indent=1))
    # The JSONL goes last: its existence marks the world as finished.
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)
    return path


MANIFEST = "manifest.json"


def settings_hash(settings: dict[str, Any]) -> str:
    """A short, stable hash of the settings that define a world's output (stamped in every world file)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_resume(out_dir: str, settings: dict[str, Any]) -> None:
    """A rerun into ``out_dir`` resumes only a run of the same settings; otherwise an error names the
    differing keys (finished worlds of other settings would be counted as done)."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f).get("settings")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{path}: unreadable manifest ({e}); use another --out_dir") from None
    if old is None:
        raise ValueError(f"{path}: a manifest without settings (an older mfjax run?); use another --out_dir")
    new = json.loads(json.dumps(settings, default=str))  # as it would be stored
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if differ:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:4])
        raise ValueError(f"{path}: --out_dir holds a run with other settings ({', '.join(differ)}: {shown}); "
                         f"resume it with the same settings or use another --out_dir")


def write_manifest(out_dir: str, settings: dict[str, Any], info: dict[str, Any]) -> str:
    """Writes ``manifest.json``: the settings that define the outputs (and their hash), the run's other
    facts (events, seeds, widths, mesh), and package versions. Event ids and seeds of an earlier run of the
    same settings in ``out_dir`` are kept (a rerun may add events or seeds)."""
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
    path = os.path.join(out_dir, MANIFEST)
    config = {**settings, **info}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f).get("config", {})
        for key in ("event_ids", "seeds"):
            config[key] = list(dict.fromkeys(list(old.get(key, [])) + list(config.get(key, []))))
    manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
                "backend": jax.default_backend(), "devices": jax.device_count(), "versions": versions,
                "config_hash": settings_hash(settings), "settings": settings, "config": config}
    os.makedirs(out_dir, exist_ok=True)
    _write_atomic(path, lambda f: json.dump(manifest, f, ensure_ascii=False, indent=1, default=str))
    return path
