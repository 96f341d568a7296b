"""IB-Tune: train the mean-field model (stage 1), then the policy (stage 2), with LoRA; or the state-SFT baseline.

  # stage 1: the mean-field model μ's LoRA (relevance through a score-function estimator, KL to the prior)
  python launch/train.py --stage=mf --model=/models/Qwen2-1.5B-Instruct --events=/data/rumdect/Weibo --split=train \
      --out_dir=runs/ibtune_mf
  # stage 2: the policy π's LoRA on (state + m) prompts, m written by the frozen stage-1 μ
  python launch/train.py --stage=policy --model=/models/Qwen2-1.5B-Instruct --events=/data/rumdect/Weibo --split=train \
      --mean_field_lora=runs/ibtune_mf/adapter --out_dir=runs/ibtune_policy
  # simulate with both adapters
  python launch/simulate.py --policy_model=/models/Qwen2-1.5B-Instruct --policy_lora=runs/ibtune_policy/adapter \
      --mean_field_lora=runs/ibtune_mf/adapter --events=... --out_dir=runs/mf_ibtuned

Each run writes ``<out_dir>/metrics.jsonl`` (a row per optimizer step; TensorBoard under ``tb/`` when tensorboardX
is installed), ``checkpoints/`` (orbax: LoRA, optimizer, data-walk cursor, mean-field carry, settings), the PEFT
adapter ``adapter/`` and ``summary.json`` (the held-out NLL of real actions before and after). Run the same
command again and it resumes from the newest checkpoint. Without ``--model`` the embedded SmolLM2-135M-Instruct
is used. Bad input is refused in one line (exit status 2) before any model is loaded.
"""

from __future__ import annotations

import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

flags.DEFINE_enum("stage", None, ["mf", "policy", "state_sft"], "mf: the mean-field model (stage 1); policy: the policy "
                  "on state + m (stage 2); state_sft: the baseline, SFT on state-only prompts.")
flags.DEFINE_string("model", None, "HF model directory (policy and mean-field backbone; default: the embedded "
                    "SmolLM2-135M-Instruct).")
flags.DEFINE_string("mean_field_lora", None, "Stage 2: the stage-1 PEFT adapter of the frozen mean-field model.")
flags.DEFINE_string("events", None, "Training events: a JSONL file, a rumdect directory or a CED root.")
flags.DEFINE_enum("events_format", "auto", ["auto", "jsonl", "json", "rumdect", "ced"], "Format of --events.")
flags.DEFINE_string("split", None, "Sub-directory of a rumdect tree to read (e.g. train).")
flags.DEFINE_integer("num_events", None, "Read at most this many events from --events.")
flags.DEFINE_string("heldout_events", None, "Held-out events for the NLL of real actions (a separate source; default: "
                    "--heldout_fraction of --events, chosen by a seeded hash of the event id).")
flags.DEFINE_string("heldout_split", None, "Sub-directory of a rumdect --heldout_events tree (e.g. test).")
flags.DEFINE_float("heldout_fraction", 0.1, "Share of --events held out when --heldout_events is not given.")
flags.DEFINE_integer("num_heldout", None, "Held-out events to evaluate, at most (the first ones of the held-out set).")
flags.DEFINE_integer("num_agents", 300, "Agents per event (the first responders in time order).")
flags.DEFINE_integer("batch_size", 16, "Agents per chunk (the simulator's step).")
flags.DEFINE_integer("slots", 16, "Events walked side by side (E): agents per micro-step = slots × batch_size.")
flags.DEFINE_integer("grad_accum", 1, "Micro-steps per optimizer step (global batch = slots × batch_size × grad_accum; "
                     "the paper's 256 agents = 16 × 16 × 1).")
flags.DEFINE_integer("epochs", 1, "Passes over the training events.")
flags.DEFINE_integer("max_steps", None, "Stop after this many optimizer steps (the schedule spans them).")
flags.DEFINE_integer("seed", 0, "Seeds the LoRA init, the event order, the split and every sample.")
flags.DEFINE_integer("max_action_tokens", None, "Optional cap on a real action's tokens (whole characters, counted).")
flags.DEFINE_bool("mf_with_states", False, "Mean-field prompt lines carry the agents' states (as in simulation).")
flags.DEFINE_integer("lora_rank", 64, "LoRA rank r (paper: 64).")
flags.DEFINE_float("lora_alpha", None, "LoRA alpha (default: the rank, as the paper's r = α = 64).")
flags.DEFINE_list("lora_targets", ["q", "k", "v", "o", "gate", "up", "down"], "Projections that get a LoRA.")
flags.DEFINE_bool("rslora", False, "rsLoRA scaling α/√r.")
flags.DEFINE_float("lr", None, "Peak learning rate (default: the reference's 5e-7, 1e-6 for state_sft; a LoRA usually "
                   "needs 1e-5–1e-4).")
flags.DEFINE_float("warmup_fraction", 0.2, "Warm-up share of the cosine schedule.")
flags.DEFINE_enum("estimator", "rloo", ["rloo", "best_of_k", "reference"], "Stage 1's estimator: rloo (score function, "
                  "leave-one-out baseline; unbiased), best_of_k (SFT on the best sample), reference (the reference "
                  "code's compression-only loss).")
flags.DEFINE_integer("k", 4, "Stage 1: mean fields sampled per chunk.")
flags.DEFINE_float("lam", 2.0, "Stage 1: weight λ of the relevance CE.")
flags.DEFINE_float("beta", 1.0, "Stage 1: weight β of the KL to the prior.")
flags.DEFINE_float("train_temperature", 1.0, "Stage 1: sampling temperature of the k mean fields.")
flags.DEFINE_integer("rel_agents", 4, "Stage 1: agents of the next chunk whose real actions score each mean field.")
flags.DEFINE_integer("mf_max_new_tokens", 200, "Mean-field token budget M (as the simulator's).")
flags.DEFINE_enum("remat", "full", ["none", "full", "dots", "dots_no_batch"], "Rematerialisation of the layer scan.")
flags.DEFINE_enum("attn_impl", "auto", ["auto", "xla", "cudnn", "jax"], "Attention implementation.")
flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"], "Base weights' dtype (auto: bf16 on accelerators); "
                  "LoRA, optimizer state and losses are float32.")
flags.DEFINE_string("mesh", "data=-1", "Mesh shape, e.g. data=8 or data=2,model=4 (slots split over data).")
flags.DEFINE_string("out_dir", None, "Run folder: metrics, checkpoints, adapter, summary.")
flags.DEFINE_bool("resume", True, "Resume from --out_dir's newest checkpoint when it holds one.")
flags.DEFINE_integer("save_every", 10, "Optimizer steps between checkpoints.")
flags.DEFINE_integer("keep", 3, "Checkpoints kept.")
flags.DEFINE_integer("eval_every", 0, "Optimizer steps between held-out NLL evaluations (0: at the start and end).")
flags.DEFINE_integer("eval_worlds", 8, "Events per teacher-forced rollout batch (evaluation, stage 2's m).")
flags.DEFINE_bool("log_ib_gain", True, "Stage 2: also score the real actions under the state-only π₀ (the IB gain).")
flags.DEFINE_bool("export_merged", False, "Also write the base model with the LoRA merged, as an HF folder.")
flags.DEFINE_bool("tensorboard", True, "Write TensorBoard events too (needs tensorboardX).")
flags.DEFINE_string("compilation_cache_dir", None, "JAX's persistent compilation cache (a resumed run then skips "
                    "compiling).")
flags.DEFINE_bool("dry_run", False, "Check flags and data, print the resolved settings and exit without loading weights.")

FLAGS = flags.FLAGS


def _fail(message: str):
    """Bad input: one line on stderr naming what is wrong, exit status 2."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _positive(name: str, minimum: int = 1):
    value = getattr(FLAGS, name)
    if value is not None and value < minimum:
        _fail(f"--{name} must be >= {minimum}, got {value}")


def _read(path, fmt, split, limit, flag):
    from mfjax.data.events import EventDataError
    from mfjax.data.sources import iter_events

    try:
        return list(iter_events(path, fmt=fmt, split=split, limit=limit))
    except (EventDataError, FileNotFoundError, ValueError) as e:
        _fail(f"--{flag}={path}: {e}")


def _config(events_count: int):
    from mfjax.models.lora import LoraSpec
    from mfjax.train.loop import TrainConfig
    from mfjax.train.step import MeanFieldSettings

    lr = FLAGS.lr if FLAGS.lr is not None else (1e-6 if FLAGS.stage == "state_sft" else 5e-7)
    try:
        spec = LoraSpec(rank=FLAGS.lora_rank, alpha=FLAGS.lora_alpha if FLAGS.lora_alpha else float(FLAGS.lora_rank),
                        targets=tuple(FLAGS.lora_targets), use_rslora=FLAGS.rslora)
    except ValueError as e:
        _fail(f"--lora_rank / --lora_targets: {e}")
    try:
        mf = MeanFieldSettings(estimator=FLAGS.estimator, k=FLAGS.k, temperature=FLAGS.train_temperature,
                               lam=FLAGS.lam, beta=FLAGS.beta, rel_agents=FLAGS.rel_agents)
    except ValueError as e:
        _fail(f"--estimator / --k / --rel_agents / --train_temperature: {e}")
    if FLAGS.rel_agents > FLAGS.batch_size:
        _fail(f"--rel_agents={FLAGS.rel_agents} is more than a chunk's --batch_size={FLAGS.batch_size}")
    try:
        return TrainConfig(
            stage=FLAGS.stage, out_dir=FLAGS.out_dir, num_agents=FLAGS.num_agents, step_size=FLAGS.batch_size,
            slots=FLAGS.slots, accumulate=FLAGS.grad_accum, epochs=FLAGS.epochs, max_steps=FLAGS.max_steps,
            seed=FLAGS.seed, max_action_tokens=FLAGS.max_action_tokens, mf_with_states=FLAGS.mf_with_states, lora=spec,
            remat=None if FLAGS.remat == "none" else FLAGS.remat,
            attn_impl="xla" if FLAGS.attn_impl == "auto" else FLAGS.attn_impl, learning_rate=lr,
            warmup_fraction=FLAGS.warmup_fraction, mean_field=mf, mf_new_tokens=FLAGS.mf_max_new_tokens,
            eval_every=FLAGS.eval_every, eval_worlds=FLAGS.eval_worlds, save_every=FLAGS.save_every, keep=FLAGS.keep,
            log_ib_gain=FLAGS.log_ib_gain, export_merged=FLAGS.export_merged, tensorboard=FLAGS.tensorboard,
            mean_field_source=os.path.abspath(FLAGS.mean_field_lora) if FLAGS.mean_field_lora else None)
    except ValueError as e:
        _fail(str(e))


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    import logging

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's per-save INFO lines would bury the progress lines
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    if FLAGS.stage is None:
        _fail("--stage is required (mf, policy or state_sft)")
    if FLAGS.events is None:
        _fail("--events is required")
    if FLAGS.out_dir is None:
        _fail("--out_dir is required")
    for name in ("num_agents", "batch_size", "slots", "grad_accum", "epochs", "max_steps", "lora_rank", "k",
                 "rel_agents", "mf_max_new_tokens", "save_every", "keep", "eval_worlds", "num_events", "num_heldout",
                 "max_action_tokens"):
        _positive(name)
    _positive("eval_every", 0)
    if not 0 <= FLAGS.heldout_fraction < 1:
        _fail(f"--heldout_fraction must be in [0, 1), got {FLAGS.heldout_fraction}")
    if FLAGS.mean_field_lora and FLAGS.stage != "policy":
        _fail(f"--mean_field_lora is stage 2's frozen mean-field model; --stage={FLAGS.stage} does not read it")
    for name in ("model", "mean_field_lora"):
        path = getattr(FLAGS, name)
        if path is not None and not os.path.isdir(path):
            _fail(f"--{name}={path} is not a directory")
    if FLAGS.mean_field_lora:
        for required in ("adapter_config.json", "adapter_model.safetensors"):
            if not os.path.exists(os.path.join(FLAGS.mean_field_lora, required)):
                _fail(f"--mean_field_lora={FLAGS.mean_field_lora} has no {required} (not a PEFT adapter folder)")

    # ---- 1. Data and settings, checked before any model is loaded.
    from mfjax.train.data import split_events

    events = _read(FLAGS.events, FLAGS.events_format, FLAGS.split, FLAGS.num_events, "events")
    events = [e for e in events if e.num_agents > 0]
    if not events:
        _fail(f"--events={FLAGS.events}: no events with reactions")
    if FLAGS.heldout_events:
        train = events
        held = _read(FLAGS.heldout_events, "auto", FLAGS.heldout_split, None, "heldout_events")
        overlap = {e.event_id for e in train} & {e.event_id for e in held}
        if overlap:
            _fail(f"--heldout_events shares {len(overlap)} event(s) with --events, e.g. {sorted(overlap)[0]}")
    else:
        train, held = split_events(events, heldout=FLAGS.heldout_fraction, seed=FLAGS.seed)
    held = [e for e in held if e.num_agents > 0][:FLAGS.num_heldout]
    if not train:
        _fail(f"no training events left after holding out {len(held)} (--heldout_fraction={FLAGS.heldout_fraction})")
    languages = sorted({e.language for e in train + held})
    if len(languages) > 1:
        _fail(f"the events mix languages {languages}; train on one language")
    config = _config(len(train))
    from mfjax import sharding

    try:
        mesh_shape = sharding.parse_mesh_flag(FLAGS.mesh)
    except ValueError as e:
        _fail(f"--mesh={FLAGS.mesh}: {e}")
    ckpt_dir = os.path.join(FLAGS.out_dir, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        if not FLAGS.resume:
            _fail(f"--out_dir={FLAGS.out_dir} holds a checkpoint; pass --resume or another --out_dir")
        from mfjax.train.checkpoint import TrainCheckpointer
        from mfjax.train.loop import check_resume

        try:
            meta = TrainCheckpointer(ckpt_dir).read_meta()
            check_resume(meta, config, meta["events"], None)
        except (ValueError, FileNotFoundError, KeyError) as e:
            _fail(f"--out_dir={FLAGS.out_dir}: {e}")
    settings = {"config": config.to_json(), "train_events": len(train), "heldout_events": len(held),
                "language": languages[0], "model": FLAGS.model or "embedded SmolLM2-135M-Instruct"}
    if FLAGS.dry_run:
        print(json.dumps(settings, indent=1, default=str))
        return

    # ---- 2. The model, then training.
    import jax
    import jax.numpy as jnp

    if FLAGS.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir)
    from mfjax.io.hf import load_hf
    from mfjax.io.tokenizer import Tokenizer
    from mfjax.train.loop import fit

    if FLAGS.model is None:
        from mfjax.io.smollm2 import smollm2_hf_dir

        model_dir = smollm2_hf_dir()
    else:
        model_dir = FLAGS.model
    try:
        mesh = sharding.make_mesh(mesh_shape)
    except ValueError as e:
        _fail(f"--mesh={FLAGS.mesh}: {e}")
    on_accelerator = jax.default_backend() in ("gpu", "tpu")
    dtype = {"auto": jnp.bfloat16 if on_accelerator else jnp.float32, "float32": jnp.float32,
             "bfloat16": jnp.bfloat16}[FLAGS.dtype]
    tokenizer = Tokenizer.from_dir(model_dir)
    cfg, weights = load_hf(model_dir, dtype=dtype)
    mu = None
    if FLAGS.mean_field_lora:
        from mfjax.io.peft import merge_peft_adapter

        mu = merge_peft_adapter(cfg, weights, FLAGS.mean_field_lora)
    elif config.stage == "policy":
        print("mfjax train: no --mean_field_lora: stage 2 reads the untuned mean-field model's m", file=sys.stderr)
    one_device = mesh.size == 1
    result = fit(config, cfg, weights, tokenizer, train, held, mean_field_weights=mu, model_dir=model_dir,
                 mesh=None if one_device else mesh)
    print(json.dumps({"out_dir": result.out_dir, "adapter": result.adapter_dir, "steps": result.steps,
                      "heldout_before": result.heldout_before, "heldout_after": result.heldout_after,
                      "seconds": round(result.seconds, 1)}, indent=1))


if __name__ == "__main__":
    app.run(main)
