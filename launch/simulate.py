"""Simulate how populations react to events with MF-LLM (the product's main job).

With no flags, runs the embedded demo: the real SmolLM2-135M-Instruct (installed from PyPI, converted
once to a local HF folder) as policy and mean-field model, on the shipped English Twitter sample (the model
writes English), sized to finish on a CPU in a few minutes. With ``--events`` but no ``--policy_model`` the
same model runs on those events with the flags as given. Real runs name their models and data, e.g.::

  python launch/simulate.py --policy_model=/models/Qwen2-1.5B-Instruct --events=/data/Weibo --split=test \
      --alg=mf --num_agents=300 --seeds=0,1,2 --mesh=data=8 --out_dir=runs/mf

Outputs (per event and seed): ``<event>.seed<k>.jsonl`` (one row per agent), ``<event>.seed<k>.mean_field.json``,
and ``manifest.json``. A rerun with the same ``--out_dir`` skips the worlds already written.
"""

from __future__ import annotations

import dataclasses
import json
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
flags.DEFINE_string("events", None, "Events: a JSONL file, a single-event .json file, a rumdect directory or a CED root "
                    "(default: the shipped English Twitter sample).")
flags.DEFINE_enum("events_format", "auto", ["auto", "jsonl", "json", "rumdect", "ced"], "Format of --events.")
flags.DEFINE_string("split", None, "Sub-directory of a rumdect tree to read (e.g. test).")
flags.DEFINE_integer("num_events", None, "Use at most this many events.")
flags.DEFINE_enum("alg", "mf", ["mf", "state", "state_sft", "recent", "popular"], "Group-context algorithm.")
flags.DEFINE_integer("num_agents", 300, "Agents per event (the first responders in time order); a shorter event "
                     "stops at its last agent.")
flags.DEFINE_bool("strict", False, "Fail on an event with no reactions or fewer agents than --num_agents (else warn "
                  "and skip / shorten it).")
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
flags.DEFINE_integer("mf_top_k", None, "Mean-field top-k (default: the checkpoint's generation_config, else HF "
                     "generate's 50, as the reference ran it).")
flags.DEFINE_float("mf_top_p", None, "Mean-field top-p (default: the checkpoint's generation_config, else 1.0).")
flags.DEFINE_float("mf_repetition_penalty", 1.2, "Mean-field repetition penalty.")
flags.DEFINE_integer("mf_max_new_tokens", 200, "Mean-field tokens.")
flags.DEFINE_integer("mf_min_new_tokens", 10, "Mean-field minimum new tokens (the reference's min_length = prompt + 10).")
flags.DEFINE_bool("mf_with_states", False, "Mean-field prompt lines carry the agents' states too.")
flags.DEFINE_integer("max_action_tokens", None, "Optional cap on a real action's tokens (cut at a character "
                     "boundary, counted); by default real actions are read whole.")
flags.DEFINE_enum("chat", "auto", ["auto", "on", "off"], "Wrap prompts in the checkpoint's chat template.")
flags.DEFINE_bool("score_real", True, "Score the real actions under the policy (NLL).")
flags.DEFINE_integer("dump_prompts", 0, "Write the exact prompts of the first N agents and every mean-field update of "
                     "each world to <event>.seed<k>.prompts.jsonl.")
flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"], "Weights and activations (auto: bf16 on accelerators).")
flags.DEFINE_enum("attn_impl", "auto", ["auto", "xla", "cudnn", "jax"], "Attention implementation.")
flags.DEFINE_string("mesh", "data=-1", "Mesh shape, e.g. data=8 or data=2,model=4.")
flags.DEFINE_string("out_dir", "runs/simulate", "Output directory.")
flags.DEFINE_bool("dry_run", False, "Check flags, events, interventions and --out_dir, print the resolved settings "
                  "as JSON and exit without loading model weights.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: coordinator host:port for jax.distributed.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's id.")

FLAGS = flags.FLAGS

# The plain demo (no --policy_model, no --events): sized for a CPU. Applied only to flags left unset.
DEMO = dict(num_agents=48, worlds_per_batch=2, warmup_steps=1, num_events=2, out_dir="runs/demo")


def _apply_demo_defaults() -> None:
    for name, value in DEMO.items():
        if not FLAGS[name].present:
            setattr(FLAGS, name, value)


class Progress:
    """Per-step progress and summary of the real worlds of a batch (padding worlds are not counted), fed
    from inside the scan by ``jax.debug.callback``."""

    def __init__(self, num_steps: int, warmup_steps: int):
        self.num_steps, self.warmup_steps = num_steps, warmup_steps
        self.batch, self.start, self.real = "", time.time(), 0

    def begin(self, label: str, real: int) -> None:
        self.batch, self.start, self.real = label, time.time(), real

    def __call__(self, step, nll, valid, source):
        import numpy as np

        step = int(step)
        valid = np.asarray(valid)[:self.real]
        n = max(int(valid.sum()), 1)
        generated = int((np.asarray(source)[:self.real] == 0).sum())
        done = step + 1
        bar = "#" * int(20 * done / self.num_steps)
        phase = "warm-up" if step < self.warmup_steps else "rollout"
        print(f"\r[{bar:<20}] {self.batch} step {done}/{self.num_steps} ({phase}) "
              f"real-action NLL/agent {float(np.asarray(nll)[:self.real][valid].sum()) / n:8.2f}  "
              f"generated {generated:4d}  {time.time() - self.start:6.1f}s",
              end="\n" if done == self.num_steps else "", flush=True)


def _fail(message: str):
    """Bad input: one line on stderr naming what is wrong, no traceback, exit status 2."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.getLogger("mfjax").setLevel(logging.INFO)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # no "cannot open libtpu" on CPU hosts
    import jax

    if FLAGS.coordinator_address:
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils

    from mfjax import sharding
    from mfjax.config import ModelConfig
    from mfjax.data.events import EventDataError
    from mfjax.data.sources import iter_events
    from mfjax.engine.api import default_attn_impl
    from mfjax.engine.generate import GenerateConfig
    from mfjax.engine.sampling import SamplingConfig
    from mfjax.io.hf import load_hf
    from mfjax.io.tokenizer import Tokenizer
    from mfjax.models.params import unstack_layers
    from mfjax.sim import batch as SB
    from mfjax.sim import lines as LN
    from mfjax.sim import outputs as O
    from mfjax.sim import rollout as R
    from mfjax.sim.prompts import TokenTemplates

    # ---- 1. Flags, events, interventions and the output folder: checked before any model is loaded.
    plain_demo = FLAGS.policy_model is None and FLAGS.events is None
    if plain_demo:
        from mfjax.assets import events_path

        _apply_demo_defaults()
        print("mfjax: no --policy_model or --events given, running the embedded demo: SmolLM2-135M-Instruct on "
              "the shipped English Twitter sample, sized for a CPU. Real runs take --policy_model=<HF dir> (e.g. "
              "Qwen2-1.5B-Instruct) and --events=<dataset>.", flush=True)
        events_source = str(events_path("twitter_sample.jsonl"))
    else:
        events_source = FLAGS.events
        if events_source is None:
            _fail("--events is required with --policy_model")
    for name in ("num_agents", "batch_size", "worlds_per_batch", "max_new_tokens", "mf_max_new_tokens"):
        if FLAGS[name].value < 1:
            _fail(f"--{name} must be >= 1, got {FLAGS[name].value}")
    if FLAGS.warmup_steps < 0 or FLAGS.dump_prompts < 0 or FLAGS.mf_min_new_tokens < 0:
        _fail("--warmup_steps, --dump_prompts and --mf_min_new_tokens must be >= 0")
    if not FLAGS["mf_min_new_tokens"].present:  # the reference's 10, or all of a shorter budget
        FLAGS.mf_min_new_tokens = min(FLAGS.mf_min_new_tokens, FLAGS.mf_max_new_tokens)
    if FLAGS.mf_min_new_tokens > FLAGS.mf_max_new_tokens:
        _fail(f"--mf_min_new_tokens={FLAGS.mf_min_new_tokens} is above --mf_max_new_tokens={FLAGS.mf_max_new_tokens}")
    if FLAGS.max_action_tokens is not None and FLAGS.max_action_tokens < 1:
        _fail(f"--max_action_tokens must be >= 1, got {FLAGS.max_action_tokens}")
    try:
        seeds = [int(s) for s in FLAGS.seeds]
    except ValueError:
        _fail(f"--seeds must be integers, got {','.join(FLAGS.seeds)}")
    try:
        events = list(iter_events(events_source, fmt=FLAGS.events_format, split=FLAGS.split,
                                  limit=FLAGS.num_events))
    except (EventDataError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    empty = [e for e in events if e.num_agents == 0]
    if empty:
        message = f"{len(empty)} event(s) have no reactions, e.g. {empty[0].source_path or empty[0].event_id}"
        if FLAGS.strict:
            _fail(message + " (--strict)")
        logging.warning("%s: skipped (nothing to simulate)", message)
        events = [e for e in events if e.num_agents > 0]
    if not events:
        _fail(f"no events with reactions found in {events_source}")
    short = [e for e in events if e.num_agents < FLAGS.num_agents]
    if short and FLAGS.strict:
        _fail(f"event {short[0].event_id} ({short[0].source_path}) has {short[0].num_agents} agents, fewer than "
              f"--num_agents={FLAGS.num_agents} (--strict)")
    if short:
        logging.warning("%d of %d events have fewer than %d agents; each stops at its last agent", len(short),
                        len(events), FLAGS.num_agents)
    languages = {e.language for e in events}
    if len(languages) > 1:
        _fail(f"events mix languages {sorted(languages)}; one run simulates one language")
    B = FLAGS.batch_size
    agents = {e.event_id: min(e.num_agents, FLAGS.num_agents) for e in events}
    num_steps = -(-max(agents.values()) // B)
    if FLAGS.warmup_steps >= num_steps:
        _fail(f"--warmup_steps={FLAGS.warmup_steps} leaves nothing to simulate: the longest event has {num_steps} "
              f"step(s) of {B} agents")
    if FLAGS.alg == "popular" and all(a.followers_count is None for e in events for a in e.agents):
        logging.warning("--alg=popular: these events carry no follower counts, so 'most followed of the last %d' "
                        "falls back to time order: the %d oldest of the last %d comments", 30, 5, 30)
    overrides = list(SB.REFERENCE_INTERVENTIONS) if FLAGS.reference_interventions else []
    try:
        if FLAGS.interventions:
            overrides += SB.read_overrides(FLAGS.interventions)
        SB.check_overrides(overrides, agents, step_size=B, warmup_steps=FLAGS.warmup_steps)
    except ValueError as e:
        _fail(str(e))

    # ---- 2. Models and tokenizer (the embedded one is converted once, then cached).
    if FLAGS.policy_model is None:
        from mfjax.io.smollm2 import smollm2_hf_dir

        if not plain_demo:
            print("mfjax: no --policy_model given: the embedded SmolLM2-135M-Instruct runs on your events with "
                  "your settings.", flush=True)
        policy_dir = smollm2_hf_dir()
    else:
        policy_dir = FLAGS.policy_model
    mf_dir = FLAGS.mean_field_model or policy_dir
    for name, path in (("policy_model", policy_dir), ("mean_field_model", mf_dir), ("policy_lora", FLAGS.policy_lora),
                       ("mean_field_lora", FLAGS.mean_field_lora)):
        if path is not None and not os.path.isdir(path):
            _fail(f"--{name}={path} is not a directory")

    on_accelerator = jax.default_backend() in ("gpu", "tpu")
    dtype = {"auto": jnp.bfloat16 if on_accelerator else jnp.float32, "float32": jnp.float32,
             "bfloat16": jnp.bfloat16}[FLAGS.dtype]
    attn_impl = default_attn_impl() if FLAGS.attn_impl == "auto" else FLAGS.attn_impl
    try:
        mesh = sharding.make_mesh(sharding.parse_mesh_flag(FLAGS.mesh))
    except ValueError as e:
        _fail(f"--mesh={FLAGS.mesh}: {e}")
    data_size = mesh.shape["data"] * mesh.shape["fsdp"]

    tokenizer = Tokenizer.from_dir(policy_dir)
    if mf_dir != policy_dir:
        mf_tok = Tokenizer.from_dir(mf_dir)
        probe = "当前话题：测试 The topic"
        if mf_tok.vocab_size != tokenizer.vocab_size or mf_tok.encode(probe) != tokenizer.encode(probe):
            _fail(f"--mean_field_model {mf_dir} uses another tokenizer than --policy_model {policy_dir}; the two "
                  f"must share one (actions and the mean field pass as tokens)")
    language = events[0].language
    chat = {"auto": tokenizer.has_chat_template, "on": True, "off": False}[FLAGS.chat]
    if chat and not tokenizer.has_chat_template:
        _fail(f"--chat=on but {policy_dir} has no chat template")

    # Sampling as the paper's code calls generate: the policy's four settings explicit, the mean field's
    # temperature and penalty explicit and the rest from the checkpoint's generation config (else HF's).
    gen_cfg = tokenizer.generation_config
    try:
        policy_sampling = SamplingConfig.from_generation_config(
            gen_cfg, do_sample=FLAGS.temperature > 0, temperature=FLAGS.temperature or None, top_k=FLAGS.top_k,
            top_p=FLAGS.top_p, repetition_penalty=FLAGS.repetition_penalty)
        mf_sampling = SamplingConfig.from_generation_config(
            gen_cfg, do_sample=FLAGS.mf_temperature > 0, temperature=FLAGS.mf_temperature or None,
            top_k=FLAGS.mf_top_k, top_p=FLAGS.mf_top_p, repetition_penalty=FLAGS.mf_repetition_penalty)
    except ValueError as e:
        _fail(f"sampling settings: {e}")

    stop, pad = tokenizer.eos_token_ids, tokenizer.pad_token_id
    policy_gen = GenerateConfig(max_new_tokens=FLAGS.max_new_tokens, sampling=policy_sampling, stop_token_ids=stop,
                                pad_token_id=pad, attn_impl=attn_impl)
    mf_gen = GenerateConfig(max_new_tokens=FLAGS.mf_max_new_tokens, min_new_tokens=FLAGS.mf_min_new_tokens,
                            sampling=mf_sampling, stop_token_ids=stop, pad_token_id=pad, attn_impl=attn_impl)
    settings = {
        "algorithm": FLAGS.alg, "policy_model": os.path.abspath(policy_dir), "mean_field_model": os.path.abspath(mf_dir),
        "policy_lora": FLAGS.policy_lora and os.path.abspath(FLAGS.policy_lora),
        "mean_field_lora": FLAGS.mean_field_lora and os.path.abspath(FLAGS.mean_field_lora),
        "num_agents": FLAGS.num_agents, "step_size": B, "warmup_steps": FLAGS.warmup_steps,
        "policy_generation": dataclasses.asdict(policy_gen), "mean_field_generation": dataclasses.asdict(mf_gen),
        "mf_with_states": FLAGS.mf_with_states, "max_action_tokens": FLAGS.max_action_tokens, "chat": chat,
        "score_real": FLAGS.score_real, "dtype": jnp.dtype(dtype).name,
        "overrides": [{k: v for k, v in dataclasses.asdict(o).items() if k != "origin"} for o in overrides],
    }
    try:
        O.check_resume(FLAGS.out_dir, settings)
    except ValueError as e:
        _fail(str(e))
    if FLAGS.dry_run:
        print(json.dumps({"settings": settings, "events": events_source, "language": language,
                          "event_ids": [e.event_id for e in events], "num_steps": num_steps, "seeds": seeds},
                         ensure_ascii=False, indent=1, default=str))
        return

    tt = TokenTemplates.build(tokenizer, language, chat=chat, step_size=B)
    encoded = [SB.encode_event(e, tokenizer, tt, num_agents=FLAGS.num_agents, step_size=B, algorithm=FLAGS.alg,
                               mf_with_states=FLAGS.mf_with_states, max_action_tokens=FLAGS.max_action_tokens,
                               strict=False) for e in events]
    truncated = sum(enc.truncated_actions for enc in encoded)

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

    lines = LN.build_line_tables(tokenizer, policy_cfg.vocab_size)
    generated_width = LN.clean_width(lines[0], FLAGS.max_new_tokens)
    widths = SB.widths_for(encoded, tt, tokenizer, step_size=B, warmup_steps=FLAGS.warmup_steps,
                           generated_width=generated_width, mf_with_states=FLAGS.mf_with_states, overrides=overrides)
    rcfg = R.RolloutConfig(num_steps=num_steps, algorithm=FLAGS.alg, step_size=B, warmup_steps=FLAGS.warmup_steps,
                           policy=policy_gen, mean_field=mf_gen, mf_with_states=FLAGS.mf_with_states,
                           score_real=FLAGS.score_real, attn_impl=attn_impl, dump_prompts=FLAGS.dump_prompts > 0,
                           **widths)
    progress = Progress(num_steps, rcfg.warmup_steps)
    rollout = R.Rollout(rcfg, tt, policy_cfg, mf_cfg, lines, mesh=mesh, on_step=progress)

    config_hash = O.settings_hash(settings)
    todo = [(enc, seed) for enc in encoded for seed in seeds
            if not SB.is_done(FLAGS.out_dir, enc.event.event_id, seed)]
    skipped = len(encoded) * len(seeds) - len(todo)
    writer = jax.process_index() == 0
    if writer:
        O.write_manifest(FLAGS.out_dir, settings, {
            "events": events_source, "split": FLAGS.split, "event_ids": [e.event_id for e in events], "seeds": seeds,
            "mesh": dict(mesh.shape), "rollout": dataclasses.asdict(rcfg), "embedded_demo": plain_demo,
            "truncated_actions": truncated})
    print(f"mfjax: {len(events)} events × {len(seeds)} seeds, {num_steps} steps of {B} agents, alg={FLAGS.alg}; "
          f"{skipped} worlds already done, {len(todo)} to run"
          + (f"; {truncated} real actions cut by --max_action_tokens" if truncated else ""), flush=True)

    per_batch = -(-FLAGS.worlds_per_batch // data_size) * data_size
    started = time.time()
    total_agents = 0
    for b in range(0, len(todo), per_batch):
        chunk = todo[b:b + per_batch]
        # Padding copies only fill the data-parallel devices (their outputs are discarded).
        padded, real = SB.pad_worlds(list(chunk), data_size)
        inputs = SB.stack_worlds(padded, rcfg, tokenizer, overrides)
        label = f"batch {b // per_batch + 1}/{-(-len(todo) // per_batch)}"
        print(f"mfjax: {label}: {real} worlds (+{len(padded) - real} padding)", flush=True)
        progress.begin(label, real)
        ys, _ = rollout.run(policy_params, mf_params, inputs)
        ys = jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
                          if jax.process_count() > 1 else np.asarray(x), ys)
        for i, (enc, seed) in enumerate(padded[:real]):
            rows, trajectory = O.world_records(ys, i, enc, seed, tokenizer, rcfg)
            total_agents += len(rows)
            if writer:
                prompts = (O.prompt_records(ys, i, enc, tokenizer, rcfg, FLAGS.dump_prompts)
                           if FLAGS.dump_prompts else None)
                path = O.write_world(FLAGS.out_dir, enc, seed, rows, trajectory, config_hash=config_hash,
                                     prompts=prompts)
                nll = [r["nll"] / max(r["nll_tokens"], 1) for r in rows]
                print(f"  wrote {path}: {len(rows)} agents, mean real-action NLL/token "
                      f"{sum(nll) / max(len(nll), 1):.3f}", flush=True)
    elapsed = time.time() - started
    print(f"mfjax: done in {elapsed:.1f}s ({total_agents / max(elapsed, 1e-9):.1f} agent-actions/s incl. compile); "
          f"{rollout.compile_count()} compile(s); outputs in {FLAGS.out_dir}", flush=True)


if __name__ == "__main__":
    app.run(main)
