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

import json
import logging
import os
import sys

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
flags.DEFINE_enum("preset", "paper", ["paper"], "Generation settings of both models (mfjax.sim.presets); the flags "
                  "below override single values.")
flags.DEFINE_float("temperature", None, "Policy sampling temperature (0 = greedy; preset: 0.8).")
flags.DEFINE_float("top_p", None, "Policy top-p (preset: 0.85).")
flags.DEFINE_integer("top_k", None, "Policy top-k (0 = off; preset: 50).")
flags.DEFINE_float("repetition_penalty", None, "Policy repetition penalty (preset: 1.2).")
flags.DEFINE_integer("max_new_tokens", None, "Policy tokens per action (preset: 50).")
flags.DEFINE_float("mf_temperature", None, "Mean-field sampling temperature (0 = greedy; preset: 0.1).")
flags.DEFINE_integer("mf_top_k", None, "Mean-field top-k (default: the checkpoint's generation_config, else HF "
                     "generate's 50, as the reference ran it).")
flags.DEFINE_float("mf_top_p", None, "Mean-field top-p (default: the checkpoint's generation_config, else 1.0).")
flags.DEFINE_float("mf_repetition_penalty", None, "Mean-field repetition penalty (preset: 1.2).")
flags.DEFINE_integer("mf_max_new_tokens", None, "Mean-field tokens (preset: 200).")
flags.DEFINE_integer("mf_min_new_tokens", None, "Mean-field minimum new tokens (preset: the reference's 10).")
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
        if FLAGS.num_processes is None or FLAGS.process_id is None:
            _fail("--coordinator_address needs --num_processes and --process_id")
        if jax.config.jax_platforms in (None, "", "cpu") and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
            # Several CPU processes (a test of the multi-host path on one machine) talk through gloo.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    import jax.numpy as jnp

    from mfjax import sharding
    from mfjax.data.events import EventDataError
    from mfjax.data.sources import iter_events
    from mfjax.io.hf import load_model
    from mfjax.io.tokenizer import Tokenizer
    from mfjax.models.weights import weight_shardings
    from mfjax.sim import batch as batching
    from mfjax.sim.simulate import Simulation, SimulationConfig, SimulationError

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
    try:
        seeds = tuple(int(s) for s in FLAGS.seeds)
    except ValueError:
        _fail(f"--seeds must be integers, got {','.join(FLAGS.seeds)}")
    try:
        events = list(iter_events(events_source, fmt=FLAGS.events_format, split=FLAGS.split,
                                  limit=FLAGS.num_events))
    except (EventDataError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    overrides = list(batching.REFERENCE_INTERVENTIONS) if FLAGS.reference_interventions else []
    if FLAGS.interventions:
        try:
            overrides += batching.read_overrides(FLAGS.interventions)
        except ValueError as e:
            _fail(str(e))

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
    try:
        mesh = sharding.make_mesh(sharding.parse_mesh_flag(FLAGS.mesh))
    except ValueError as e:
        _fail(f"--mesh={FLAGS.mesh}: {e}")

    tokenizer = Tokenizer.from_dir(policy_dir)
    if mf_dir != policy_dir:
        mf_tok = Tokenizer.from_dir(mf_dir)
        probe = "当前话题：测试 The topic"
        if mf_tok.vocab_size != tokenizer.vocab_size or mf_tok.encode(probe) != tokenizer.encode(probe):
            _fail(f"--mean_field_model {mf_dir} uses another tokenizer than --policy_model {policy_dir}; the two "
                  f"must share one (actions and the mean field pass as tokens)")
    config = SimulationConfig(
        algorithm=FLAGS.alg, num_agents=FLAGS.num_agents, step_size=FLAGS.batch_size, warmup_steps=FLAGS.warmup_steps,
        seeds=seeds, worlds_per_batch=FLAGS.worlds_per_batch, preset=FLAGS.preset, temperature=FLAGS.temperature,
        top_k=FLAGS.top_k, top_p=FLAGS.top_p, repetition_penalty=FLAGS.repetition_penalty,
        policy_new_tokens=FLAGS.max_new_tokens, mf_temperature=FLAGS.mf_temperature, mf_top_k=FLAGS.mf_top_k,
        mf_top_p=FLAGS.mf_top_p, mf_repetition_penalty=FLAGS.mf_repetition_penalty,
        mf_new_tokens=FLAGS.mf_max_new_tokens, mf_min_new_tokens=FLAGS.mf_min_new_tokens,
        mf_with_states=FLAGS.mf_with_states, max_action_tokens=FLAGS.max_action_tokens,
        chat={"auto": None, "on": True, "off": False}[FLAGS.chat], score_real=FLAGS.score_real,
        dump_prompts=FLAGS.dump_prompts, strict=FLAGS.strict,
        attn_impl=None if FLAGS.attn_impl == "auto" else FLAGS.attn_impl)
    models = {"policy_model": os.path.abspath(policy_dir), "mean_field_model": os.path.abspath(mf_dir),
              "policy_lora": FLAGS.policy_lora and os.path.abspath(FLAGS.policy_lora),
              "mean_field_lora": FLAGS.mean_field_lora and os.path.abspath(FLAGS.mean_field_lora)}
    try:
        sim = Simulation(events, tokenizer, config, overrides=overrides, out_dir=FLAGS.out_dir, models=models,
                         dtype=jnp.dtype(dtype).name, source=events_source)
    except SimulationError as e:
        _fail(str(e))
    if FLAGS.dry_run:
        print(json.dumps({"settings": sim.settings, "events": events_source, "language": sim.language,
                          "event_ids": [e.event_id for e in sim.events], "num_steps": sim.num_steps,
                          "seeds": list(seeds)}, ensure_ascii=False, indent=1, default=str))
        return

    # ---- 2. Models: straight onto the mesh (each device receives only its shards), adapters merged.
    def load(model_dir, lora_dir):
        from mfjax.config import ModelConfig

        cfg = ModelConfig.from_hf(model_dir)
        model = load_model(model_dir, dtype=dtype, shardings=weight_shardings(cfg, mesh),
                           attn_impl=sim.rcfg.attn_impl)
        if lora_dir:
            from mfjax.io.peft import merge_peft_adapter
            from mfjax.models.module import CausalLM

            model = CausalLM(model.cfg, merge_peft_adapter(model.cfg, model.weights(), lora_dir),
                             attn_impl=sim.rcfg.attn_impl)
        return model

    policy = load(policy_dir, FLAGS.policy_lora)
    same = mf_dir == policy_dir and FLAGS.mean_field_lora == FLAGS.policy_lora
    mean_field = policy if same else load(mf_dir, FLAGS.mean_field_lora)  # one copy serves both roles
    sim.run(policy, mean_field, mesh=mesh, progress=True)


if __name__ == "__main__":
    app.run(main)
