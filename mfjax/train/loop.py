"""The IB-Tune training loop (IBTUNE.md §6–10): walk → step → log → evaluate → checkpoint → export; resume.

:func:`fit` trains one stage on a set of events and returns what it measured::

    result = fit(TrainConfig(stage="mf", out_dir="runs/mf", ...), cfg, weights, tokenizer, train, heldout)

* ``stage="mf"`` (stage 1): the mean-field model's LoRA, the policy π₀ untouched;
* ``stage="policy"`` (stage 2): the policy's LoRA on (state + m) prompts, m written by the frozen stage-1 μ
  (``mean_field_weights``: the base merged with the stage-1 adapter), precomputed by one teacher-forced rollout;
* ``stage="state_sft"``: the baseline, SFT on state-only prompts.

A run saves its checkpoint every ``save_every`` optimizer steps and at the end, writes a metrics row per
optimizer step, evaluates the held-out NLL of real actions at the start, every ``eval_every`` steps and at the
end, and exports the LoRA as a PEFT adapter (``<out_dir>/adapter``) and, if asked, a merged HF folder. Run again
with the same ``out_dir`` and it resumes from the newest checkpoint; the result is bit-identical to a run that
was never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mfjax.config import ModelConfig
from mfjax.io.hf import save_hf
from mfjax.io.peft import save_peft_adapter
from mfjax.models import lora as lora_lib
from mfjax.models.weights import Weights, weight_shardings
from mfjax.sim import lines as lines_lib
from mfjax.sim import presets
from mfjax.sim.prompts import TokenTemplates
from mfjax.sim.rollout import Rollout, RolloutConfig
from mfjax.train import batches as B
from mfjax.train import rollouts
from mfjax.train.checkpoint import TrainCheckpointer
from mfjax.train.data import ChunkWalker, WalkStep
from mfjax.train.metrics import MetricsWriter
from mfjax.train.step import (MeanFieldSettings, MeanFieldStep, PolicyStep, TrainState, init_state, make_optimizer,
                              slot_sharding, state_shardings)

STAGES = ("mf", "policy", "state_sft")
MEAN_FIELD_CACHE = "mean_fields.npz"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (recorded in every checkpoint)."""

    stage: str
    out_dir: str
    # data walk
    num_agents: int = 300  # the first responders of each event, in time order
    step_size: int = 16  # agents per chunk (the simulator's step)
    slots: int = 16  # E: events walked side by side
    accumulate: int = 1  # G: micro-steps per optimizer step
    epochs: int = 1
    max_steps: Optional[int] = None  # optimizer steps (None: the whole walk)
    seed: int = 0
    max_action_tokens: Optional[int] = None
    mf_with_states: bool = False
    # model
    lora: lora_lib.LoraSpec = lora_lib.LoraSpec()
    remat: Optional[str] = "full"
    attn_impl: str = "xla"
    # optimizer (reference: 5e-7, 1e-6 for state-SFT; barely moves a LoRA, see the README)
    learning_rate: float = 5e-7
    warmup_fraction: float = 0.2
    clip: float = 1.0
    # stage 1
    mean_field: MeanFieldSettings = MeanFieldSettings()
    mf_new_tokens: int = 200  # M: the mean field's token budget (the simulator's, and the KL's constant)
    # simulation settings of the continuation and of the teacher-forced rollouts
    preset: str = "paper"
    # stage 2: what the frozen mean-field model is (e.g. the stage-1 adapter's folder); recorded, and a resume
    # refuses another one (the cached mean fields are its own)
    mean_field_source: Optional[str] = None
    # bookkeeping
    eval_every: int = 0  # optimizer steps between held-out evaluations (0: start and end only)
    eval_worlds: int = 8  # events per teacher-forced rollout batch
    save_every: int = 10
    keep: int = 3
    log_ib_gain: bool = True  # stage 2: also run the state-only π₀ once for CE_π₀(a|s)
    export_merged: bool = False
    tensorboard: bool = True

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        for name in ("num_agents", "step_size", "slots", "accumulate", "epochs", "mf_new_tokens", "save_every", "keep",
                     "eval_worlds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["lora"]["targets"] = list(self.lora.targets)
        return out


@dataclasses.dataclass
class FitResult:
    out_dir: str
    steps: int
    heldout_before: Optional[dict]
    heldout_after: Optional[dict]
    seconds: float
    adapter_dir: Optional[str]
    lora: Optional[lora_lib.LoraWeights] = None
    state: Optional[TrainState] = None
    carry: object = None


def _rollout_config(config: TrainConfig, tokenizer, algorithm: str) -> RolloutConfig:
    preset = presets.PRESETS[config.preset]
    gen = tokenizer.generation_config
    mf_min = min(preset["mean_field"].min_new_tokens, config.mf_new_tokens)
    return RolloutConfig(num_steps=1, algorithm=algorithm, step_size=config.step_size, warmup_steps=1,
                         policy_sampling=presets.resolve(preset["policy"], gen),
                         policy_new_tokens=preset["policy"].max_new_tokens,
                         mf_sampling=presets.resolve(preset["mean_field"], gen), mf_new_tokens=config.mf_new_tokens,
                         mf_min_new_tokens=mf_min, stop_ids=tokenizer.eos_token_ids, pad_id=tokenizer.pad_token_id,
                         attn_impl=config.attn_impl, mf_with_states=config.mf_with_states)


class _Progress:
    """One line per optimizer step on stderr: loss, tokens/s, elapsed and ETA."""

    def __init__(self, total: int, start: int, log):
        self.total, self.start, self.t0, self.log = total, start, time.time(), log

    def __call__(self, step: int, loss: float, tokens_per_s: float):
        done = step - self.start
        elapsed = time.time() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        bar = "#" * int(20 * step / max(self.total, 1))
        self.log(f"[{bar:<20}] step {step}/{self.total} loss {loss:.4f} {tokens_per_s:.0f} tok/s "
                 f"elapsed {elapsed:.0f}s ETA {eta:.0f}s")


def _place(tree, mesh, slotwise: bool):
    if mesh is None:
        return jax.tree.map(jnp.asarray, tree)
    return jax.device_put(tree, slot_sharding(tree, mesh) if slotwise else None)


def _idle(slots: int) -> WalkStep:
    z = np.zeros((slots,), np.int64)
    return WalkStep(event=z - 1, chunk=z, reset=np.zeros((slots,), bool), has_next=np.zeros((slots,), bool), epoch=z - 1)


def fit(config: TrainConfig, cfg: ModelConfig, weights: Weights, tokenizer, train_events, heldout_events=(), *,
        mean_field_weights: Optional[Weights] = None, model_dir: Optional[str] = None, mesh=None,
        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
        stop_after: Optional[int] = None) -> FitResult:
    """Trains ``config.stage`` (see the module docstring); resumes from ``config.out_dir`` when it holds a
    checkpoint of the same settings.

    Args:
      cfg, weights: the frozen base model (policy and mean-field backbone; one copy).
      tokenizer: its :class:`mfjax.io.tokenizer.Tokenizer`.
      train_events, heldout_events: :class:`mfjax.data.events.Event` lists (held-out ones are only evaluated).
      mean_field_weights: stage 2: the frozen stage-1 μ (base merged with its adapter); default the base.
      model_dir: the base model's folder (recorded, named in the adapter, tokenizer of a merged export).
      mesh: optional device mesh (slots over its data axes, weights over its model axis).
      stop_after: stop after this many optimizer steps of this call, checkpoint saved, nothing exported (what a
        killed run leaves behind; tests of resuming).
    """
    started = time.time()
    c = config
    os.makedirs(c.out_dir, exist_ok=True)
    language = {e.language for e in list(train_events) + list(heldout_events)}
    if len(language) != 1:
        raise ValueError(f"the events mix languages {sorted(language)}; a run trains on one language")
    language = language.pop()
    tt = TokenTemplates.build(tokenizer, language, chat=tokenizer.has_chat_template, step_size=c.step_size)
    lines = lines_lib.build_line_tables(tokenizer, cfg.vocab_size)
    algorithm = "state_sft" if c.stage == "state_sft" else "mf"
    base_rcfg = _rollout_config(c, tokenizer, algorithm)
    # Both tables are sized over all events, so the teacher-forced rollouts of training and held-out events are one
    # program (compiled once per process, and found in JAX's compilation cache when one is set).
    build = lambda evs, others: B.EventTable.build(evs, tokenizer, tt, base_rcfg, num_agents=c.num_agents, seed=c.seed,
                                                   lines=lines, max_action_tokens=c.max_action_tokens,
                                                   width_events=others)
    table = build(train_events, heldout_events)
    rollout = Rollout(table.rcfg, tt, cfg, cfg, lines, mesh=mesh)
    held = None
    if heldout_events:
        held_table = build(heldout_events, train_events)
        held = (held_table, Rollout(held_table.rcfg, tt, cfg, cfg, lines, mesh=mesh))
    truncated = sum(e.truncated_actions for e in table.encoded)

    walker = ChunkWalker(table.num_chunks, c.slots, seed=c.seed, epochs=c.epochs)
    micro_total = walker.total_micro_steps()
    total = -(-micro_total // c.accumulate)
    if c.max_steps is not None:
        total = min(total, c.max_steps)
    tx = make_optimizer(c.learning_rate, total, warmup_fraction=c.warmup_fraction, clip=c.clip,
                        accumulate=c.accumulate)
    if mesh is not None:
        weights = jax.device_put(weights, weight_shardings(cfg, mesh))
        if mean_field_weights is not None:
            mean_field_weights = jax.device_put(mean_field_weights, weight_shardings(cfg, mesh))
    lora = lora_lib.init_lora(cfg, c.lora, jax.random.key(c.seed))
    state = init_state(lora, tx)
    if mesh is not None:
        state = jax.device_put(state, state_shardings(cfg, c.lora, tx, mesh))

    mu_frozen = weights if mean_field_weights is None else mean_field_weights
    cache = None
    if c.stage == "mf":
        step_fn = MeanFieldStep(cfg, rollout, tx, c.mean_field, B.prior_prompt(tokenizer, tt), mf_lines=lines[1],
                                remat=c.remat, attn_impl=c.attn_impl, mesh=mesh)
        carry = step_fn.initial_carry(c.slots)
    else:
        step_fn = PolicyStep(cfg, rollout, tx, remat=c.remat, attn_impl=c.attn_impl, mesh=mesh)
        carry = {}
        if c.stage == "policy":
            cache = _mean_field_cache(c, rollout, table, weights, mu_frozen, tokenizer, tt, lines, mesh, log)
    if mesh is not None and carry:
        carry = jax.device_put(carry, slot_sharding(carry, mesh))

    ckpt = TrainCheckpointer(os.path.join(c.out_dir, "checkpoints"), keep=c.keep,
                             async_save=jax.default_backend() != "cpu")
    opt_step, heldout_before = 0, None
    if ckpt.latest_step() is not None:
        meta = ckpt.read_meta()
        check_resume(meta, c, table.event_ids, model_dir)
        state, carry, meta = ckpt.restore(state, carry)
        if mesh is None:
            # Restored arrays come back committed to a device, fresh ones do not; jit keys its programs on that, so
            # a resumed run would compile its step again (twice). Host round trip: same bits, uncommitted.
            state, carry = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), (state, carry))
        walker.restore(meta["walk"])
        opt_step, heldout_before = int(meta["opt_step"]), meta.get("heldout_before")
        log(f"mfjax train: resumed from {ckpt.directory} at optimizer step {opt_step}")
    writer = MetricsWriter(c.out_dir, resume_step=opt_step if opt_step else None, tensorboard=c.tensorboard)

    def weights_for_eval(lora):
        merged = lora_lib.merge(weights, lora)
        if c.stage == "mf":
            return weights, merged  # π₀ reads the tuned μ's mean fields
        return merged, mu_frozen

    def evaluate(lora) -> Optional[dict]:
        if held is None:
            return None
        w_policy, w_mf = weights_for_eval(lora) if lora is not None else (weights, mu_frozen)
        return rollouts.nll_of(held[1], held[0], w_policy, w_mf, worlds_per_batch=c.eval_worlds,
                               place=lambda a: _place(a, mesh, True))

    log(f"mfjax train: stage {c.stage}, {len(table.encoded)} training events ({micro_total} micro-steps of "
        f"{c.slots} slots × {c.step_size} agents), {total} optimizer steps of {c.accumulate} micro-steps"
        + (f", {len(held[0].encoded)} held-out events" if held else "")
        + (f"; {truncated} real actions cut by max_action_tokens" if truncated else ""))
    if opt_step == 0 and held is not None:
        heldout_before = evaluate(None)
        writer.write(0, {f"heldout_{k}": v for k, v in heldout_before.items()})
        log(f"held-out NLL/token before: {heldout_before['nll_per_token']:.4f} "
            f"({heldout_before['agents']} agents, {heldout_before['tokens']} tokens)")

    progress = _Progress(total, opt_step, log)
    weights_slots = weights
    done = opt_step >= total
    first = opt_step
    while not done:
        t0 = time.time()
        rows = []
        for _ in range(c.accumulate):
            ws = walker.next() or _idle(c.slots)  # a short last step: idle micro-steps weigh nothing
            chunk = table.chunks(ws.event, ws.chunk)
            if c.stage == "mf":
                nxt = table.chunks(np.where(ws.has_next, ws.event, -1), ws.chunk + 1, width=c.mean_field.rel_agents)
                args = _place((chunk, nxt, ws.reset, ws.has_next, ws.chunk.astype(np.int32)), mesh, True)
                state, carry, metrics = step_fn(state, carry, weights_slots, *args)
            else:
                m, m_len = cache.lookup(ws.event, ws.chunk) if cache is not None else (
                    np.zeros((c.slots, 1), np.int32), np.zeros((c.slots,), np.int32))
                args = _place((chunk, m, m_len), mesh, True)
                state, metrics = step_fn(state, weights_slots, *args)
                if cache is not None and c.log_ib_gain:
                    metrics = dict(metrics, **cache.baselines(ws.event, ws.chunk, chunk.agent_valid))
            rows.append(metrics)
        opt_step += 1
        row = _reduce(jax.device_get(rows), c.stage)
        row["seconds"] = time.time() - t0
        row["tokens_per_s"] = row.get("tokens", 0) / max(row["seconds"], 1e-9)
        row["micro_step"] = walker.micro_step
        if c.eval_every and opt_step % c.eval_every == 0 and opt_step < total and held is not None:
            row.update({f"heldout_{k}": v for k, v in evaluate(state.lora).items()})
        done = opt_step >= total
        text = None
        if c.stage == "mf" and (opt_step % max(c.save_every, 1) == 0 or done):
            m = jax.device_get(carry.m[0][:int(carry.m_len[0])])
            text = {"mean_field_sample": tokenizer.decode(m)}
        writer.write(opt_step, row, text=text)
        progress(opt_step, row["loss"], row["tokens_per_s"])
        stopping = stop_after is not None and opt_step - first >= stop_after
        if opt_step % c.save_every == 0 or done or stopping:
            ckpt.save(opt_step, state, carry, _meta(c, opt_step, walker, table, model_dir, heldout_before))
        if stopping and not done:
            writer.close()
            ckpt.close()
            return FitResult(out_dir=c.out_dir, steps=opt_step, heldout_before=heldout_before, heldout_after=None,
                             seconds=time.time() - started, adapter_dir=None, lora=state.lora, state=state, carry=carry)
    ckpt.wait()

    heldout_after = evaluate(state.lora) if held is not None else None
    if heldout_after is not None:
        writer.write(total, {f"heldout_after_{k}": v for k, v in heldout_after.items()})
        log(f"held-out NLL/token after {total} steps: {heldout_after['nll_per_token']:.4f} "
            f"(before {heldout_before['nll_per_token']:.4f})")
    writer.close()
    ckpt.close()
    adapter_dir = save_peft_adapter(cfg, jax.device_get(state.lora), c.lora, os.path.join(c.out_dir, "adapter"),
                                    base_model_name_or_path=model_dir)
    if c.export_merged:
        save_hf(os.path.join(c.out_dir, "merged"), cfg, jax.device_get(lora_lib.merge(weights, state.lora)),
                tokenizer_dir=model_dir)
    summary = {"stage": c.stage, "steps": total, "heldout_before": heldout_before, "heldout_after": heldout_after,
               "seconds": time.time() - started, "adapter": adapter_dir}
    with open(os.path.join(c.out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return FitResult(out_dir=c.out_dir, steps=total, heldout_before=heldout_before, heldout_after=heldout_after,
                     seconds=summary["seconds"], adapter_dir=adapter_dir, lora=state.lora, state=state, carry=carry)


def _reduce(rows: list[dict], stage: str) -> dict:
    """One metrics row from the micro-steps of an optimizer step: means of per-micro-step values (the optimizer
    averages their gradients), sums of counts; grad_norm and lr of the step that applied the update."""
    sums = ("tokens", "target_tokens", "rows", "ce_sum", "nll_sum", "slots", "loss_slots", "x_tokens", "ib_rows", "ce_pi0_m_sum",
            "ce_pi0_state_sum")
    out = {}
    for key in rows[0]:
        values = np.array([float(r[key]) for r in rows])
        out[key] = float(values.sum() if key in sums else values[-1] if key in ("grad_norm", "lr") else values.mean())
    if stage != "mf" and out.get("rows"):
        out["ce_policy"] = out["ce_sum"] / out["rows"]
    if out.get("ib_rows"):
        out["ce_pi0_m"] = out["ce_pi0_m_sum"] / out["ib_rows"]
        out["ce_pi0_state"] = out["ce_pi0_state_sum"] / out["ib_rows"]
        out["ib_gain"] = out["ce_pi0_state"] - out["ce_policy"]
    return out


def _meta(c: TrainConfig, opt_step: int, walker: ChunkWalker, table, model_dir, heldout_before) -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("jax", "optax", "orbax-checkpoint", "flax"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return {"opt_step": opt_step, "micro_step": walker.micro_step, "stage": c.stage, "config": c.to_json(),
            "walk": walker.state(), "events": table.event_ids, "base_model": model_dir, "seed": c.seed,
            "heldout_before": heldout_before, "versions": versions}


# Settings that may change on resume (bookkeeping); any other difference refuses the checkpoint.
_RESUMABLE = ("eval_every", "eval_worlds", "save_every", "keep", "export_merged", "tensorboard", "out_dir")


def check_resume(meta: dict, c: TrainConfig, event_ids: list, model_dir) -> None:
    saved, mine = dict(meta["config"]), c.to_json()
    diff = sorted(k for k in set(saved) | set(mine) if k not in _RESUMABLE and saved.get(k) != mine.get(k))
    if diff:
        raise ValueError(f"{c.out_dir} holds a checkpoint of other settings ({', '.join(diff)} differ); use another "
                         f"--out_dir or the same settings")
    if meta["events"] != event_ids:
        raise ValueError(f"{c.out_dir} holds a checkpoint trained on other events; use another --out_dir")


def _mean_field_cache(c: TrainConfig, rollout: Rollout, table, weights, mu_frozen, tokenizer, tt, lines, mesh,
                      log) -> "rollouts.MeanFieldCache":
    """Stage 2's mean fields: read from ``<out_dir>/mean_fields.npz`` when a run already computed them (a resume
    reads the very same m), else one teacher-forced rollout per event under the frozen μ."""
    path = os.path.join(c.out_dir, MEAN_FIELD_CACHE)
    if os.path.exists(path):
        return rollouts.MeanFieldCache.load(path)
    log(f"mfjax train: writing the frozen mean-field model's m for {len(table.encoded)} events (one teacher-forced "
        f"rollout each)")
    place = lambda a: _place(a, mesh, True)
    forced = rollouts.teacher_forced(rollout, table, weights, mu_frozen, worlds_per_batch=c.eval_worlds, place=place)
    state_forced = None
    if c.log_ib_gain:
        state_rcfg = dataclasses.replace(table.rcfg, algorithm="state")
        state_rollout = Rollout(state_rcfg, tt, rollout.policy_cfg, rollout.mf_cfg, lines, mesh=mesh)
        state_forced = rollouts.teacher_forced(state_rollout, table, weights, weights, worlds_per_batch=c.eval_worlds,
                                               place=place)
    cache = rollouts.MeanFieldCache(forced, state_forced)
    cache.save(path)
    return cache
