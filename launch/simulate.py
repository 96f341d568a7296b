"""Simulate how populations react to events with MF-LLM (the product's main job).

With no flags, runs the embedded demo: the real SmolLM2-135M-Instruct (installed from PyPI, converted
once to a local HF folder) as policy and mean-field model, on the shipped fixture events, sized to finish
on a CPU in a few minutes. Real runs name their models and data, e.g.::

  python launch/simulate.py --policy_model=/models/Qwen2-1.5B-Instruct --events=/data/Weibo --split=test \
      --alg=mf --num_agents=300 --seeds=0,1,2 --mesh=data=8 --out_dir=runs/mf

Outputs (per event and seed): ``<event>.seed<k>.jsonl`` (one row per agent), ``<event>.seed<k>.mean_field.json``,
and ``manifest.json``. A rerun with the same ``--out_dir`` skips the worlds already written.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time

if __package__ in (None, ""):
    # Run as a script from a source checkout: make the package importable without installing it.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

flags.DEFINE_string("policy_model", None, "HF model directory of the policy π (default: the embedded demo model).")
flags.DEFINE_string("mean_field_model", None, "HF model directory of the mean-field model μ (default: the policy's).")
flags.DEFINE_string("policy_lora", None, "Optional PEFT LoRA adapter directory merged into the policy.")
flags.DEFINE_string("mean_field_lora", None, "Optional PEFT LoRA adapter directory merged into the mean-field model.")
flags.DEFINE_string("events", None, "Events: a JSONL file, a rumdect directory or a CED root (default: the fixture).")
flags.DEFINE_enum("events_format", "auto", ["auto", "jsonl", "rumdect", "ced"], "Format of --events.")
flags.DEFINE_string("split", None, "Sub-directory of a rumdect tree to read (e.g. test).")
flags.DEFINE_integer("num_events", None, "Use at most this many events.")
flags.DEFINE_enum("alg", "mf", ["mf", "state", "state_sft", "recent", "popular"], "Group-context algorithm.")
flags.DEFINE_integer("num_agents", 300, "Agents per event (the first responders in time order).")
flags.DEFINE_bool("strict_agents", False, "Fail on an event with fewer agents than --num_agents (else warn).")
flags.DEFINE_integer("batch_size", 16, "Agents per step (B).")
flags.DEFINE_integer("warmup_steps", 3, "Steps that use the real actions (3 × 16 = the reference's 48 agents).")
flags.DEFINE_string("interventions", None, "JSON file of interventions and key nodes (see mfjax.sim.batch).")
flags.DEFINE_bool("reference_interventions", False, "Apply the reference's step-4 interventions.")
flags.DEFINE_list("seeds", ["0"], "Seeds; each event is simulated once per seed.")
flags.DEFINE_integer("worlds_per_batch", 8, "Worlds (event × seed) simulated together in one scan.")
flags.DEFINE_float("temperature", 0.8, "Policy sampling temperature (0 = greedy).")
flags.DEFINE_float("top_p", 0.85, "Policy top-p.")
flags.DEFINE_integer("top_k", 50, "Policy top-k (0 = off).")
flags.DEFINE_float("repetition_penalty", 1.2, "Policy repetition penalty.")
flags.DEFINE_integer("max_new_tokens", 50, "Policy tokens per action.")
flags.DEFINE_float("mf_temperature", 0.1, "Mean-field sampling temperature (0 = greedy).")
flags.DEFINE_integer("mf_top_k", 50, "Mean-field top-k (HF generate's default when unset).")
flags.DEFINE_float("mf_repetition_penalty", 1.2, "Mean-field repetition penalty.")
flags.DEFINE_integer("mf_max_new_tokens", 200, "Mean-field tokens.")
flags.DEFINE_bool("mf_with_states", False, "Mean-field prompt lines carry the agents' states too.")
flags.DEFINE_integer("max_action_tokens", 64, "Buffer for an action; longer real actions are cut.")
flags.DEFINE_enum("chat", "auto", ["auto", "on", "off"], "Wrap prompts in the checkpoint's chat template.")
flags.DEFINE_bool("score_real", True, "Score the real actions under the policy (NLL).")
flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"], "Weights and activations (auto: bf16 on accelerators).")
flags.DEFINE_enum("attn_impl", "auto", ["auto", "xla", "cudnn", "jax"], "Attention implementation.")
flags.DEFINE_string("mesh", "data=-1", "Mesh shape, e.g. data=8 or data=2,model=4.")
flags.DEFINE_string("out_dir", "runs/simulate", "Output directory.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: coordinator host:port for jax.distributed.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's id.")

FLAGS = flags.FLAGS

# The embedded demo: small enough for a CPU in a few minutes. Applied only to flags left unset.
DEMO = dict(num_agents=48, worlds_per_batch=2, warmup_steps=1, max_new_tokens=24, mf_max_new_tokens=48,
            max_action_tokens=48, num_events=2, out_dir="runs/demo")


def _apply_demo_defaults() -> None:
    for name, value in DEMO.items():
        if not FLAGS[name].present:
            setattr(FLAGS, name, value)


class Progress:
    """Per-step progress and summary, fed from inside the scan by ``jax.debug.callback``."""

    def __init__(self, num_steps: int, warmup_steps: int):
        self.num_steps, self.warmup_steps = num_steps, warmup_steps
        self.batch, self.start = "", time.time()

    def begin(self, label: str) -> None:
        self.batch, self.start = label, time.time()

    def __call__(self, step, nll, valid, source):
        import numpy as np

        step = int(step)
        valid = np.asarray(valid)
        n = max(int(valid.sum()), 1)
        generated = int((np.asarray(source) == 0).sum())
        done = step + 1
        bar = "#" * int(20 * done / self.num_steps)
        phase = "warm-up" if step < self.warmup_steps else "rollout"
        print(f"\r[{bar:<20}] {self.batch} step {done}/{self.num_steps} ({phase}) "
              f"real-action NLL/agent {float(np.asarray(nll)[valid].sum()) / n:8.2f}  generated {generated:4d}  "
              f"{time.time() - self.start:6.1f}s", end="\n" if done == self.num_steps else "", flush=True)


def main(argv):
    del argv
    logging.getLogger("mfjax").setLevel(logging.INFO)
    import jax

    if FLAGS.coordinator_address:
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils

    from mfjax import sharding
    from mfjax.config import ModelConfig
    from mfjax.data.sources import iter_events
    from mfjax.engine.api import default_attn_impl
    from mfjax.engine.generate import GenerateConfig
    from mfjax.engine.sampling import SamplingConfig
    from mfjax.io.hf import load_hf
    from mfjax.io.tokenizer import Tokenizer
    from mfjax.models.params import unstack_layers
    from mfjax.sim import batch as SB
    from mfjax.sim import outputs as O
    from mfjax.sim import rollout as R
    from mfjax.sim.prompts import TokenTemplates, newline_table

    embedded = FLAGS.policy_model is None
    if embedded:
        from mfjax.assets import events_path
        from mfjax.io.smollm2 import smollm2_hf_dir

        _apply_demo_defaults()
        print("mfjax: no --policy_model given, running the embedded demo: SmolLM2-135M-Instruct on the shipped "
              "fixture events, sized for a CPU. Real runs take --policy_model=<HF dir> (e.g. Qwen2-1.5B-Instruct) "
              "and --events=<dataset>.", flush=True)
        policy_dir = smollm2_hf_dir()
        events_source = str(events_path("ced_sample.jsonl")) if FLAGS.events is None else FLAGS.events
    else:
        policy_dir = FLAGS.policy_model
        if FLAGS.events is None:
            raise app.UsageError("--events is required with --policy_model")
        events_source = FLAGS.events
    mf_dir = FLAGS.mean_field_model or policy_dir

    on_accelerator = jax.default_backend() in ("gpu", "tpu")
    dtype = {"auto": jnp.bfloat16 if on_accelerator else jnp.float32, "float32": jnp.float32,
             "bfloat16": jnp.bfloat16}[FLAGS.dtype]
    attn_impl = default_attn_impl() if FLAGS.attn_impl == "auto" else FLAGS.attn_impl
    mesh = sharding.make_mesh(sharding.parse_mesh_flag(FLAGS.mesh))
    data_size = mesh.shape["data"] * mesh.shape["fsdp"]

    tokenizer = Tokenizer.from_dir(policy_dir)
    if mf_dir != policy_dir:
        mf_tok = Tokenizer.from_dir(mf_dir)
        probe = "当前话题：测试 The topic"
        if mf_tok.vocab_size != tokenizer.vocab_size or mf_tok.encode(probe) != tokenizer.encode(probe):
            raise app.UsageError(f"--mean_field_model {mf_dir} uses another tokenizer than --policy_model "
                                 f"{policy_dir}; the two must share one (actions and the mean field pass as tokens)")

    def load(model_dir, lora_dir):
        # Straight onto the mesh (each device receives only its shards), then the decode layout.
        cfg = ModelConfig.from_hf(model_dir)
        cfg, params = load_hf(model_dir, dtype=dtype, shardings=sharding.param_shardings(cfg, mesh))
        if lora_dir:
            from mfjax.models.lora import merge_peft_adapter

            params = merge_peft_adapter(cfg, params, lora_dir)
        params = unstack_layers(params)
        return cfg, jax.device_put(params, sharding.param_shardings(cfg, mesh, layers_unstacked=True))

    policy_cfg, policy_params = load(policy_dir, FLAGS.policy_lora)
    if mf_dir == policy_dir and FLAGS.mean_field_lora == FLAGS.policy_lora:
        mf_cfg, mf_params = policy_cfg, policy_params  # one copy of the weights serves both roles
    else:
        mf_cfg, mf_params = load(mf_dir, FLAGS.mean_field_lora)

    events = list(iter_events(events_source, fmt=FLAGS.events_format, split=FLAGS.split, limit=FLAGS.num_events))
    if not events:
        raise app.UsageError(f"no events found in {events_source}")
    language = events[0].language
    chat = {"auto": tokenizer.has_chat_template, "on": True, "off": False}[FLAGS.chat]
    if chat and not tokenizer.has_chat_template:
        raise app.UsageError(f"--chat=on but {policy_dir} has no chat template")
    B = FLAGS.batch_size
    num_steps = -(-FLAGS.num_agents // B)
    tt = TokenTemplates.build(tokenizer, language, chat=chat, step_size=B)
    encoded = [SB.encode_event(e, tokenizer, tt, num_agents=FLAGS.num_agents, step_size=B,
                               max_action_tokens=FLAGS.max_action_tokens, algorithm=FLAGS.alg,
                               mf_with_states=FLAGS.mf_with_states, strict=FLAGS.strict_agents) for e in events]

    stop = tokenizer.eos_token_ids
    pad = tokenizer.pad_token_id
    policy_sampling = SamplingConfig(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                                     repetition_penalty=FLAGS.repetition_penalty)
    mf_sampling = SamplingConfig(temperature=FLAGS.mf_temperature, top_k=FLAGS.mf_top_k,
                                 repetition_penalty=FLAGS.mf_repetition_penalty)
    rcfg = R.RolloutConfig(
        num_steps=num_steps, algorithm=FLAGS.alg, step_size=B, warmup_steps=min(FLAGS.warmup_steps, num_steps),
        max_action_tokens=FLAGS.max_action_tokens, mean_field_tokens=FLAGS.mf_max_new_tokens,
        policy=GenerateConfig(max_new_tokens=FLAGS.max_new_tokens, sampling=policy_sampling, stop_token_ids=stop,
                              pad_token_id=pad, attn_impl=attn_impl),
        mean_field=GenerateConfig(max_new_tokens=FLAGS.mf_max_new_tokens, sampling=mf_sampling, stop_token_ids=stop,
                                  pad_token_id=pad, attn_impl=attn_impl),
        mf_with_states=FLAGS.mf_with_states, score_real=FLAGS.score_real, attn_impl=attn_impl,
        **SB.widths_for(encoded))
    progress = Progress(num_steps, rcfg.warmup_steps)
    rollout = R.Rollout(rcfg, tt, policy_cfg, mf_cfg, newline_table(tokenizer, policy_cfg.vocab_size), mesh=mesh,
                        on_step=progress)

    overrides = list(SB.REFERENCE_INTERVENTIONS) if FLAGS.reference_interventions else []
    if FLAGS.interventions:
        overrides += SB.read_overrides(FLAGS.interventions)
    seeds = [int(s) for s in FLAGS.seeds]
    writer = jax.process_index() == 0
    if writer:
        O.write_manifest(FLAGS.out_dir, {
            "policy_model": policy_dir, "mean_field_model": mf_dir, "policy_lora": FLAGS.policy_lora,
            "mean_field_lora": FLAGS.mean_field_lora, "events": events_source, "split": FLAGS.split,
            "event_ids": [e.event_id for e in events], "seeds": seeds, "chat": chat, "dtype": jnp.dtype(dtype).name,
            "mesh": dict(mesh.shape), "overrides": [dataclasses.asdict(o) for o in overrides],
            "rollout": dataclasses.asdict(rcfg), "embedded_demo": embedded,
        })
    todo = [(enc, seed) for enc in encoded for seed in seeds
            if not SB.is_done(FLAGS.out_dir, enc.event.event_id, seed)]
    skipped = len(encoded) * len(seeds) - len(todo)
    print(f"mfjax: {len(events)} events × {len(seeds)} seeds, {num_steps} steps of {B} agents, alg={FLAGS.alg}; "
          f"{skipped} worlds already done, {len(todo)} to run", flush=True)

    per_batch = -(-FLAGS.worlds_per_batch // data_size) * data_size
    started = time.time()
    total_agents = 0
    for b in range(0, len(todo), per_batch):
        chunk = todo[b:b + per_batch]
        # Every batch has the same number of worlds, so the whole run compiles once.
        padded, real = SB.pad_worlds(list(chunk), per_batch)
        inputs = SB.stack_worlds(padded, rcfg, tokenizer, overrides)
        progress.begin(f"batch {b // per_batch + 1}/{-(-len(todo) // per_batch)}")
        ys, _ = rollout.run(policy_params, mf_params, inputs)
        ys = jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
                          if jax.process_count() > 1 else np.asarray(x), ys)
        for i, (enc, seed) in enumerate(padded[:real]):
            rows, trajectory = O.world_records(ys, i, enc, seed, tokenizer, rcfg)
            total_agents += len(rows)
            if writer:
                path = O.write_world(FLAGS.out_dir, enc, seed, rows, trajectory)
                nll = [r["nll"] / max(r["nll_tokens"], 1) for r in rows]
                print(f"  wrote {path}: {len(rows)} agents, mean real-action NLL/token "
                      f"{sum(nll) / max(len(nll), 1):.3f}", flush=True)
    elapsed = time.time() - started
    print(f"mfjax: done in {elapsed:.1f}s ({total_agents / max(elapsed, 1e-9):.1f} agent-actions/s incl. compile); "
          f"{rollout.compile_count()} compile(s); outputs in {FLAGS.out_dir}", flush=True)


if __name__ == "__main__":
    app.run(main)
