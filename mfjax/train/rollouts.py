"""Teacher-forced rollouts over a set of events: the held-out NLL of real actions, and stage 2's mean fields.

A teacher-forced rollout is :class:`~mfjax.sim.rollout.Rollout` with every step a warm-up step: the agents'
actions are the real ones, the policy only scores them (the NLL, SPEC §4's individual-level metric), and the
mean-field model writes m from the real actions at the simulator's settings. So

* the held-out NLL before vs after training is the simulator's own number on events not trained on, with
  the base or the tuned weights (:func:`teacher_forced`), and
* stage 2 reads the mean fields that the frozen stage-1 μ writes in simulation (``mean_field[t]`` is the m
  the policy reads at step t), from one rollout per event, cached (:class:`MeanFieldCache`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mfjax.models.weights import Weights
from mfjax.sim.rollout import Rollout
from mfjax.sim.types import RolloutInputs
from mfjax.train.batches import EventTable


@dataclasses.dataclass
class TeacherForced:
    """Per event (in table order): the mean field read at each step [steps, Lm] and its lengths, and the real
    actions' summed NLL and token counts per agent slot [steps, B] (0 where no agent)."""

    mean_field: np.ndarray  # [events, steps, Lm]
    mean_field_len: np.ndarray  # [events, steps]
    nll: np.ndarray  # [events, steps, B]
    nll_tokens: np.ndarray  # [events, steps, B]

    def summary(self) -> dict:
        """NLL per token over every real action, and the per-agent mean of per-token NLL."""
        tokens = self.nll_tokens.sum()
        agents = self.nll_tokens > 0
        per_agent = self.nll[agents] / self.nll_tokens[agents]
        return {"nll_per_token": float(self.nll.sum() / max(tokens, 1)),
                "nll_per_agent_token": float(per_agent.mean()) if per_agent.size else float("nan"),
                "agents": int(agents.sum()), "tokens": int(tokens)}


def _slice_worlds(host: RolloutInputs, idx: np.ndarray) -> RolloutInputs:
    return jax.tree.map(lambda a: a[idx], host)


def teacher_forced(rollout: Rollout, table: EventTable, w_policy: Weights, w_mf: Weights, *,
                   worlds_per_batch: int = 8, place=jnp.asarray, log=None) -> TeacherForced:
    """Runs ``rollout`` (every step a warm-up step) over every event of ``table``, ``worlds_per_batch`` at a
    time (the last batch padded with copies of its last event, whose outputs are dropped: one compile)."""
    if rollout.rcfg.warmup_steps != rollout.rcfg.num_steps:
        raise ValueError("a teacher-forced rollout needs warmup_steps == num_steps")
    n = len(table.encoded)
    outs = []
    for start in range(0, n, worlds_per_batch):
        idx = np.arange(start, min(start + worlds_per_batch, n))
        real = len(idx)
        idx = np.concatenate([idx, np.full(worlds_per_batch - real, idx[-1])]) if n > worlds_per_batch else idx
        ys, _ = rollout.run(w_policy, w_mf, jax.tree.map(place, _slice_worlds(table.host, idx)))
        ys = jax.tree.map(np.asarray, ys)
        outs.append((ys, real))
        if log is not None:
            log(f"teacher-forced rollout: {min(start + worlds_per_batch, n)}/{n} events")
    cat = lambda name: np.concatenate([np.swapaxes(getattr(ys, name), 0, 1)[:real] for ys, real in outs])
    return TeacherForced(mean_field=cat("mean_field"), mean_field_len=cat("mean_field_len"), nll=cat("nll"),
                         nll_tokens=cat("nll_tokens"))


class MeanFieldCache:
    """The mean field each (event, chunk) reads, from a teacher-forced rollout (stage 2 reads it), with the
    real actions' NLL under π₀ given m and, when given, under the state-only π₀ (for the logged IB gain)."""

    def __init__(self, forced: TeacherForced, state_only: Optional[TeacherForced] = None):
        self.m, self.m_len = forced.mean_field, forced.mean_field_len
        self.ce_m = _per_agent_ce(forced)
        self.ce_state = None if state_only is None else _per_agent_ce(state_only)

    def lookup(self, event: np.ndarray, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """m [E, Lm], m_len [E] of each slot (empty for idle slots, event -1)."""
        idle = event < 0
        rows, steps = np.where(idle, 0, event), np.where(idle, 0, chunk)
        m = self.m[rows, steps].copy()
        m_len = np.where(idle, 0, self.m_len[rows, steps]).astype(np.int32)
        m[idle] = 0
        return m.astype(np.int32), m_len

    def baselines(self, event: np.ndarray, chunk: np.ndarray, valid: np.ndarray) -> dict:
        """Σ over the slots' valid agents of the token-mean CE under π₀ given m and given the state only (and how
        many agents): stage 2's IB gain is CE_π₀(a|s) − CE_πφ(a|s,m) over the same agents."""
        if self.ce_state is None:
            return {}
        rows, steps = np.where(event < 0, 0, event), np.where(event < 0, 0, chunk)
        valid = np.asarray(valid) & (event >= 0)[:, None]
        pick = lambda ce: float(np.where(valid, ce[rows, steps], 0.0).sum())
        return {"ib_rows": int(valid.sum()), "ce_pi0_m_sum": pick(self.ce_m), "ce_pi0_state_sum": pick(self.ce_state)}

    def save(self, path: str) -> None:
        extra = {} if self.ce_state is None else {"ce_state": self.ce_state}
        np.savez(path, m=self.m, m_len=self.m_len, ce_m=self.ce_m, **extra)

    @classmethod
    def load(cls, path: str) -> "MeanFieldCache":
        data = np.load(path)
        cache = cls.__new__(cls)
        cache.m, cache.m_len, cache.ce_m = data["m"], data["m_len"], data["ce_m"]
        cache.ce_state = data["ce_state"] if "ce_state" in data else None
        return cache


def _per_agent_ce(forced: TeacherForced) -> np.ndarray:
    """Token-mean CE of each agent's real action [events, steps, B] (0 where no agent)."""
    return np.where(forced.nll_tokens > 0, forced.nll / np.maximum(forced.nll_tokens, 1), 0.0)


def nll_of(rollout: Optional[Rollout], table: EventTable, w_policy: Weights, w_mf: Weights, **kwargs) -> dict:
    """The held-out figure: :meth:`TeacherForced.summary` of a teacher-forced rollout."""
    return teacher_forced(rollout, table, w_policy, w_mf, **kwargs).summary()
