"""Simulate populations with MF-LLM from Python: the one entry point the launcher, benchmarks and notebooks use.

    from mfjax.io.hf import load_model
    from mfjax.io.tokenizer import Tokenizer
    from mfjax.sim.simulate import SimulationConfig, simulate

    model, tok = load_model(path), Tokenizer.from_dir(path)
    result = simulate(events, model, tok, SimulationConfig(algorithm="mf", num_agents=48), out_dir="runs/x")
    result.worlds[0].rows[0]["action"]

:class:`Simulation` splits the work where a user needs it split: constructing one checks everything that
can be checked without a model (events, settings, interventions, the output folder) and resolves the
settings; :meth:`Simulation.run` then encodes the events, batches worlds (events × seeds), runs the
compiled rollout, and keeps the records in memory and, with ``out_dir``, on disk as each batch finishes
(finished worlds of an earlier run with the same settings are skipped). Bad input raises
:class:`SimulationError` (a ``ValueError``) with a one-line message naming what is wrong.

On several processes (``jax.distributed``), every process builds the same host arrays and places only its
own shards (global arrays over the mesh); process 0 gathers the outputs and writes every world.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mfjax import sharding
from mfjax.config import default_attn_impl
from mfjax.data.events import Event
from mfjax.models.module import CausalLM
from mfjax.models.weights import weight_shardings
from mfjax.sim import batch as batching
from mfjax.sim import lines as lines_lib
from mfjax.sim import outputs, policies, presets
from mfjax.sim.prompts import TokenTemplates
from mfjax.sim.rollout import Rollout, RolloutConfig
from mfjax.sim.types import Source

logger = logging.getLogger(__name__)


class SimulationError(ValueError):
    """Bad input to a simulation (events, settings, interventions, output folder): one line naming it."""


@dataclasses.dataclass(frozen=True)
class SimulationConfig:
    """What to simulate and how. Sampling settings left None come from the preset (the paper's) and,
    where the preset leaves them open too, from the policy checkpoint's generation config."""

    algorithm: str = "mf"
    num_agents: int = 300  # the first responders of each event in time order; shorter events stop early
    step_size: int = 16
    warmup_steps: int = 3
    seeds: tuple[int, ...] = (0,)
    worlds_per_batch: int = 8
    preset: str = "paper"
    temperature: Optional[float] = None  # policy (0 = greedy)
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    policy_new_tokens: Optional[int] = None
    mf_temperature: Optional[float] = None
    mf_top_k: Optional[int] = None
    mf_top_p: Optional[float] = None
    mf_repetition_penalty: Optional[float] = None
    mf_new_tokens: Optional[int] = None
    mf_min_new_tokens: Optional[int] = None
    mf_with_states: bool = False
    max_action_tokens: Optional[int] = None  # an optional cap on real actions (whole characters, counted)
    chat: Optional[bool] = None  # None: the checkpoint's chat template when it has one
    score_real: bool = True
    dump_prompts: int = 0  # record the prompts of the first N agents and every mean-field update
    strict: bool = False  # refuse events without reactions or shorter than num_agents (else warn)
    attn_impl: Optional[str] = None
    # Benchmarks on random weights, whose output is noise, measure full-length generation: no stop tokens
    # (an empty tuple) and no line handling. Real runs keep the defaults (the tokenizer's stop ids; SPEC's
    # first line / line breaks removed).
    stop_ids: Optional[tuple[int, ...]] = None
    line_handling: bool = True


@dataclasses.dataclass
class WorldResult:
    """One simulated world: its rows (one per agent), mean-field trajectory and (optional) prompts."""

    event_id: str
    seed: int
    rows: list
    trajectory: list
    prompts: Optional[list] = None
    path: Optional[str] = None


@dataclasses.dataclass
class SimulationResult:
    worlds: list
    skipped: int  # worlds already finished in out_dir
    seconds: float
    compiles: int
    batches: Optional[list] = None  # with keep_arrays: (host RolloutInputs, StepOutputs) per batch


def _positive(name: str, value: Optional[int], minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise SimulationError(f"{name} must be >= {minimum}, got {value}")


class Simulation:
    """A checked simulation: events, settings and interventions resolved before any model is loaded."""

    def __init__(self, events: Sequence[Event], tokenizer, config: SimulationConfig = SimulationConfig(), *,
                 overrides: Sequence[batching.Override] = (), out_dir: Optional[str] = None,
                 models: Optional[Mapping[str, Any]] = None, dtype: str = "float32",
                 source: Optional[str] = None):
        """
        Args:
          events: the events to simulate (each once per seed).
          tokenizer: the :class:`mfjax.io.tokenizer.Tokenizer` both models share.
          config: what and how.
          overrides: interventions and key nodes (:func:`mfjax.sim.batch.read_overrides`).
          out_dir: where worlds, prompts and the manifest go (None: in memory only).
          models: how the models are named in the settings (e.g. their folders), for the resume check.
          dtype: the models' dtype name, recorded in the settings.
          source: where the events came from, for the manifest.
        """
        c = config
        self.config, self.tokenizer, self.out_dir, self.source = c, tokenizer, out_dir, source
        try:
            self.algorithm = policies.get(c.algorithm)
        except ValueError as e:
            raise SimulationError(str(e)) from None
        for name in ("num_agents", "step_size", "worlds_per_batch", "policy_new_tokens", "mf_new_tokens",
                     "max_action_tokens"):
            _positive(name, getattr(c, name))
        for name in ("warmup_steps", "dump_prompts", "mf_min_new_tokens"):
            _positive(name, getattr(c, name), minimum=0)
        if not c.seeds:
            raise SimulationError("seeds is empty: give at least one seed")
        if c.preset not in presets.PRESETS:
            raise SimulationError(f"unknown preset {c.preset!r}; choose from {sorted(presets.PRESETS)}")

        events = list(events)
        empty = [e for e in events if e.num_agents == 0]
        if empty:
            message = f"{len(empty)} event(s) have no reactions, e.g. {empty[0].source_path or empty[0].event_id}"
            if c.strict:
                raise SimulationError(message + " (strict)")
            logger.warning("%s: skipped (nothing to simulate)", message)
            events = [e for e in events if e.num_agents > 0]
        if not events:
            raise SimulationError("no events with reactions to simulate")
        ids = [e.event_id for e in events]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise SimulationError(f"event id {dup!r} appears twice; event ids name the output files")
        short = [e for e in events if e.num_agents < c.num_agents]
        if short and c.strict:
            raise SimulationError(f"event {short[0].event_id} ({short[0].source_path}) has {short[0].num_agents} "
                                  f"agents, fewer than num_agents={c.num_agents} (strict)")
        if short:
            logger.warning("%d of %d events have fewer than %d agents; each stops at its last agent", len(short),
                           len(events), c.num_agents)
        languages = sorted({e.language for e in events})
        if len(languages) > 1:
            raise SimulationError(f"events mix languages {languages}; one run simulates one language")
        self.events, self.language = events, languages[0]
        self.num_agents = {e.event_id: min(e.num_agents, c.num_agents) for e in events}
        self.num_steps = -(-max(self.num_agents.values()) // c.step_size)
        if c.warmup_steps >= self.num_steps:
            raise SimulationError(f"warmup_steps={c.warmup_steps} leaves nothing to simulate: the longest event "
                                  f"has {self.num_steps} step(s) of {c.step_size} agents")
        if c.algorithm == "popular" and all(a.followers_count is None for e in events for a in e.agents):
            logger.warning("algorithm popular: these events carry no follower counts, so 'the 5 most followed of "
                           "the last 30 comments' falls back to time order: the 5 oldest of the last 30")
        try:
            self.overrides = batching.check_overrides(list(overrides), self.num_agents, step_size=c.step_size,
                                                      warmup_steps=c.warmup_steps)
        except ValueError as e:
            raise SimulationError(str(e)) from None

        self.chat = tokenizer.has_chat_template if c.chat is None else c.chat
        if self.chat and not tokenizer.has_chat_template:
            raise SimulationError(f"chat=True but the tokenizer ({tokenizer.path}) has no chat template")
        self.rcfg = self._rollout_config()
        self.settings = {
            "algorithm": c.algorithm, **{k: v for k, v in dict(models or {}).items()},
            "num_agents": c.num_agents, "step_size": c.step_size, "warmup_steps": c.warmup_steps,
            "policy_generation": dataclasses.asdict(self.rcfg.policy_generate),
            "mean_field_generation": dataclasses.asdict(self.rcfg.mean_field_generate),
            "mf_with_states": c.mf_with_states, "max_action_tokens": c.max_action_tokens, "chat": self.chat,
            "score_real": c.score_real, "dtype": dtype, "line_handling": c.line_handling,
            "overrides": [{k: v for k, v in dataclasses.asdict(o).items() if k != "origin"} for o in self.overrides],
        }
        self.config_hash = outputs.settings_hash(self.settings)
        if out_dir is not None:
            try:
                outputs.check_resume(out_dir, self.settings)
            except ValueError as e:
                raise SimulationError(str(e)) from None

    def _rollout_config(self) -> RolloutConfig:
        """Sampling resolved as the paper's code calls generate: explicit settings, then the checkpoint's
        generation config, then HF's fallbacks (widths come later, from the encoded events)."""
        c = self.config
        preset = presets.PRESETS[c.preset]
        gen_cfg = self.tokenizer.generation_config
        try:
            policy = presets.resolve(preset["policy"], gen_cfg, temperature=c.temperature, top_k=c.top_k,
                                     top_p=c.top_p, repetition_penalty=c.repetition_penalty)
            mean_field = presets.resolve(preset["mean_field"], gen_cfg, temperature=c.mf_temperature,
                                         top_k=c.mf_top_k, top_p=c.mf_top_p,
                                         repetition_penalty=c.mf_repetition_penalty)
        except ValueError as e:
            raise SimulationError(f"sampling settings: {e}") from None
        mf_new = c.mf_new_tokens or preset["mean_field"].max_new_tokens
        mf_min = preset["mean_field"].min_new_tokens if c.mf_min_new_tokens is None else c.mf_min_new_tokens
        if c.mf_min_new_tokens is None:
            mf_min = min(mf_min, mf_new)  # the reference's 10, or all of a shorter budget
        if mf_min > mf_new:
            raise SimulationError(f"mf_min_new_tokens={mf_min} is above mf_new_tokens={mf_new}")
        return RolloutConfig(
            num_steps=self.num_steps, algorithm=c.algorithm, step_size=c.step_size, warmup_steps=c.warmup_steps,
            policy_sampling=policy, policy_new_tokens=c.policy_new_tokens or preset["policy"].max_new_tokens,
            mf_sampling=mean_field, mf_new_tokens=mf_new, mf_min_new_tokens=mf_min,
            stop_ids=self.tokenizer.eos_token_ids if c.stop_ids is None else c.stop_ids,
            pad_id=self.tokenizer.pad_token_id,
            attn_impl=c.attn_impl or default_attn_impl(), mf_with_states=c.mf_with_states, score_real=c.score_real,
            dump_prompts=c.dump_prompts > 0)

    # ------------------------------------------------------------------------------------ running
    def _prepare(self, policy: CausalLM, mean_field: CausalLM, mesh, progress: bool):
        """Encoded events, the final rollout config and the compiled rollout: built on the first run and
        reused by later ones with the same models' configs and mesh (no recompilation)."""
        key = (policy.cfg, mean_field.cfg, mesh, bool(progress))
        if getattr(self, "_prepared", None) is not None and self._prepared[0] == key:
            return self._prepared[1]
        c, tok = self.config, self.tokenizer
        tt = TokenTemplates.build(tok, self.language, chat=self.chat, step_size=c.step_size)
        encoded = [batching.encode_event(e, tok, tt, num_agents=c.num_agents, step_size=c.step_size,
                                         algorithm=c.algorithm, mf_with_states=c.mf_with_states,
                                         max_action_tokens=c.max_action_tokens, strict=False) for e in self.events]
        vocab = policy.cfg.vocab_size
        if c.line_handling:
            lines = lines_lib.build_line_tables(tok, vocab)
        else:
            lines = (lines_lib.passthrough_tables(vocab, lines_lib.FIRST_LINE),
                     lines_lib.passthrough_tables(vocab, lines_lib.JOIN))
        widths = batching.widths_for(encoded, tt, tok, step_size=c.step_size, warmup_steps=c.warmup_steps,
                                     generated_width=lines_lib.clean_width(lines[0], self.rcfg.policy_new_tokens),
                                     mf_with_states=c.mf_with_states, overrides=self.overrides)
        rcfg = dataclasses.replace(self.rcfg, widths=widths)
        bar = _Progress(rcfg.num_steps, rcfg.warmup_steps) if progress else None
        rollout = Rollout(rcfg, tt, policy.cfg, mean_field.cfg, lines, mesh=mesh, on_step=bar)
        self._prepared = (key, (encoded, rcfg, rollout, bar))
        return self._prepared[1]

    def run(self, policy: CausalLM, mean_field: Optional[CausalLM] = None, *, mesh=None,
            progress: bool = False, log: Callable[[str], None] = functools.partial(print, flush=True),
            keep_arrays: bool = False) -> SimulationResult:
        """Runs every world not yet finished in ``out_dir``; returns their records.

        Args:
          policy, mean_field: the models (``mean_field`` defaults to the policy: one copy of the weights).
          mesh: optional device mesh (worlds over its data axes, weights over its model axis).
          progress: print per-batch lines and a per-step progress bar (a host callback per step).
          log: where progress lines go.
          keep_arrays: also return each batch's host inputs and step outputs (benchmarks, analysis).
        """
        c, tok = self.config, self.tokenizer
        mean_field = mean_field or policy
        if policy.cfg.vocab_size != mean_field.cfg.vocab_size:
            raise SimulationError("the policy and mean-field models must share one tokenizer and vocabulary")
        encoded, rcfg, rollout, bar = self._prepare(policy, mean_field, mesh, progress)
        truncated = sum(enc.truncated_actions for enc in encoded)
        w_policy, w_mf = policy.weights(), mean_field.weights()
        if mesh is not None:  # a no-op for weights already loaded onto these shardings
            w_policy = jax.device_put(w_policy, weight_shardings(policy.cfg, mesh))
            w_mf = w_policy if mean_field is policy else jax.device_put(w_mf, weight_shardings(mean_field.cfg, mesh))

        writer = jax.process_index() == 0 and self.out_dir is not None
        if writer:
            outputs.write_manifest(self.out_dir, self.settings, {
                "events": self.source, "event_ids": [e.event_id for e in self.events], "seeds": list(c.seeds),
                "mesh": None if mesh is None else dict(mesh.shape), "rollout": dataclasses.asdict(rcfg),
                "truncated_actions": truncated})
        todo = [(enc, seed) for enc in encoded for seed in c.seeds
                if self.out_dir is None or not outputs.is_done(self.out_dir, enc.event.event_id, seed)]
        skipped = len(encoded) * len(c.seeds) - len(todo)
        if progress:
            log(f"mfjax: {len(encoded)} events × {len(c.seeds)} seeds, {rcfg.num_steps} steps of {c.step_size} "
                f"agents, alg={c.algorithm}; {skipped} worlds already done, {len(todo)} to run"
                + (f"; {truncated} real actions cut by max_action_tokens" if truncated else ""))

        data = 1 if mesh is None else sharding.data_parallel_size(mesh)
        per_batch = -(-c.worlds_per_batch // data) * data
        started = time.time()
        results, batches = [], []
        for b in range(0, len(todo), per_batch):
            # Padding copies only fill the data-parallel devices; their outputs are discarded.
            padded, real = batching.pad_worlds(list(todo[b:b + per_batch]), data)
            label = f"batch {b // per_batch + 1}/{-(-len(todo) // per_batch)}"
            if bar is not None:
                log(f"mfjax: {label}: {real} worlds (+{len(padded) - real} padding)")
                bar.begin(label, real)
            host = batching.stack_worlds(padded, rcfg, tok, self.overrides)
            ys, _ = rollout.run(w_policy, w_mf, _place(host, rollout, mesh))
            ys = _gather(ys)
            if keep_arrays:
                batches.append((host, ys))
            for i, (enc, seed) in enumerate(padded[:real]):
                rows, trajectory = outputs.world_records(ys, i, enc, seed, tok, rcfg)
                prompts = (outputs.prompt_records(ys, i, enc, tok, rcfg, c.dump_prompts) if c.dump_prompts
                           else None)
                world = WorldResult(enc.event.event_id, seed, rows, trajectory, prompts)
                if writer:
                    world.path = outputs.write_world(self.out_dir, enc, seed, rows, trajectory,
                                                     config_hash=self.config_hash, prompts=prompts)
                    if progress:
                        nll = [r["nll"] / max(r["nll_tokens"], 1) for r in rows]
                        log(f"  wrote {world.path}: {len(rows)} agents, mean real-action NLL/token "
                            f"{sum(nll) / max(len(nll), 1):.3f}")
                results.append(world)
        seconds = time.time() - started
        if progress:
            agents = sum(len(w.rows) for w in results)
            log(f"mfjax: done in {seconds:.1f}s ({agents / max(seconds, 1e-9):.1f} agent-actions/s incl. compile); "
                f"{rollout.compile_count()} compile(s)" + (f"; outputs in {self.out_dir}" if self.out_dir else ""))
        return SimulationResult(worlds=results, skipped=skipped, seconds=seconds, compiles=rollout.compile_count(),
                                batches=batches if keep_arrays else None)

    def rollout(self):
        """The compiled rollout of the last run (widths, buffer sizes, compile count), or None."""
        prepared = getattr(self, "_prepared", None)
        return None if prepared is None else prepared[1][2]


def simulate(events: Sequence[Event], policy: CausalLM, tokenizer, config: SimulationConfig = SimulationConfig(), *,
             mean_field: Optional[CausalLM] = None, overrides: Sequence[batching.Override] = (),
             out_dir: Optional[str] = None, mesh=None, progress: bool = False,
             models: Optional[Mapping[str, Any]] = None, source: Optional[str] = None) -> SimulationResult:
    """Checks, then runs, a simulation (see :class:`Simulation`; ``source`` names where the events came
    from, for the manifest and the evaluator)."""
    sim = Simulation(events, tokenizer, config, overrides=overrides, out_dir=out_dir, models=models,
                     dtype=jnp.dtype(jax.tree.leaves(policy.weights())[0].dtype).name, source=source)
    return sim.run(policy, mean_field, mesh=mesh, progress=progress)


def _place(host, rollout: Rollout, mesh):
    """Host arrays as device arrays: on a mesh, global arrays of which each process places its own shards."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, host)
    return jax.tree.map(lambda a, s: jax.make_array_from_callback(a.shape, s, lambda idx: a[idx]), host,
                        rollout.input_shardings())


def _gather(ys):
    """The step outputs of every world as host numpy arrays (gathered across processes)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, ys)
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), ys)


class _Progress:
    """Per-step progress and summary of the real worlds of a batch (padding worlds are not counted), fed
    from inside the scan by ``jax.debug.callback``."""

    def __init__(self, num_steps: int, warmup_steps: int):
        self.num_steps, self.warmup_steps = num_steps, warmup_steps
        self.batch, self.start, self.real = "", time.time(), 0

    def begin(self, label: str, real: int) -> None:
        self.batch, self.start, self.real = label, time.time(), real

    def __call__(self, step, nll, valid, source):
        step = int(step)
        valid = np.asarray(valid)[:self.real]
        n = max(int(valid.sum()), 1)
        generated = int((np.asarray(source)[:self.real] == Source.GENERATED).sum())
        done = step + 1
        bar = "#" * int(20 * done / self.num_steps)
        phase = "warm-up" if step < self.warmup_steps else "rollout"
        print(f"\r[{bar:<20}] {self.batch} step {done}/{self.num_steps} ({phase}) "
              f"real-action NLL/agent {float(np.asarray(nll)[:self.real][valid].sum()) / n:8.2f}  "
              f"generated {generated:4d}  {time.time() - self.start:6.1f}s",
              end="\n" if done == self.num_steps else "", flush=True)


__all__ = ["Simulation", "SimulationConfig", "SimulationError", "SimulationResult", "WorldResult", "simulate"]
