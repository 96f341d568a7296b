"""Training batches built by the simulator's own prompt code, so that training and simulation read the same
tokens (IBTUNE.md §5–6).

Host side: :class:`EventTable` encodes the events once (:func:`mfjax.sim.batch.encode_event`, one
:func:`~mfjax.sim.batch.widths_for` over the whole set: one compile) and stacks them into one numpy
:class:`~mfjax.sim.types.RolloutInputs` [events, agents, ...]; :meth:`EventTable.chunks` cuts each slot's chunk
out of it as a RolloutInputs of E worlds × the chunk's agents.

In jit: the policy prompt of a chunk is :meth:`Rollout.policy_prefix` (topic + the algorithm's context with
m + "网友资料：") plus each agent's own part, and the mean-field prompt X is :meth:`Rollout.mean_field_prompt`,
exactly as :class:`~mfjax.sim.rollout.Rollout` builds them when it simulates.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mfjax.sim import batch as batching
from mfjax.sim import lines as lines_lib
from mfjax.sim import policies
from mfjax.sim import prompts
from mfjax.sim import templates
from mfjax.sim.rollout import Carry, Rollout, RolloutConfig
from mfjax.sim.types import RolloutInputs
from mfjax.train.losses import ScoreBatch

# RolloutInputs fields with one entry per agent (sliced per chunk); the rest are per world (event).
PER_AGENT = ("agent_part", "agent_part_len", "mf_state_line", "mf_state_line_len", "real_action", "real_action_len",
             "followers", "agent_valid", "override", "override_action", "override_action_len")


def flat(x: jax.Array) -> jax.Array:
    """[W, B, ...] -> [W·B, ...]."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


class EventTable:
    """Events encoded once and stacked (host numpy), with the static settings their prompts need.

    Args:
      events: the events (each at most ``num_agents`` agents, in time order).
      tokenizer: the models' tokenizer; ``tt`` its token templates.
      rcfg: a rollout config whose widths are filled in by :meth:`build`.
    """

    def __init__(self, encoded: Sequence[batching.EncodedEvent], rcfg: RolloutConfig, tokenizer, seed: int):
        self.encoded, self.rcfg = list(encoded), rcfg
        self.host = batching.stack_worlds([(e, seed) for e in self.encoded], rcfg, tokenizer)
        self.num_chunks = [e.num_steps for e in self.encoded]

    @classmethod
    def build(cls, events, tokenizer, tt: prompts.TokenTemplates, rcfg: RolloutConfig, *, num_agents: int, seed: int,
              lines: tuple, max_action_tokens: Optional[int] = None, width_events: Sequence = ()) -> "EventTable":
        """Encodes the first ``num_agents`` agents of each event and sizes the buffers to them. ``rcfg`` gives
        the step size, algorithm, token budgets and line settings; its step count (the longest event's),
        warm-up (every step: real actions) and widths are filled in here. ``width_events`` (e.g. the held-out
        events) count for the sizes too, so that two tables share one rollout config: one compiled program."""
        encode = lambda e: batching.encode_event(e, tokenizer, tt, num_agents=num_agents, step_size=rcfg.step_size,
                                                 algorithm=rcfg.algorithm, mf_with_states=rcfg.mf_with_states,
                                                 max_action_tokens=max_action_tokens, strict=False)
        encoded = [encode(e) for e in events]
        sized = encoded + [encode(e) for e in width_events]
        num_steps = max(e.num_steps for e in sized)
        widths = batching.widths_for(sized, tt, tokenizer, step_size=rcfg.step_size, warmup_steps=num_steps,
                                     generated_width=lines_lib.clean_width(lines[0], rcfg.policy_new_tokens),
                                     mf_with_states=rcfg.mf_with_states)
        rcfg = dataclasses.replace(rcfg, num_steps=num_steps, warmup_steps=num_steps, widths=widths)
        return cls(encoded, rcfg, tokenizer, seed)

    @property
    def event_ids(self) -> list[str]:
        return [e.event.event_id for e in self.encoded]

    def chunks(self, event: np.ndarray, chunk: np.ndarray, width: Optional[int] = None) -> RolloutInputs:
        """The chunk ``chunk[s]`` of event ``event[s]`` for every slot s, as RolloutInputs of E worlds × ``width``
        agents (default: the step size; fewer takes the chunk's first agents). A slot with event -1, or a
        chunk past its event's end, has no valid agent."""
        B = self.rcfg.step_size
        width = B if width is None else width
        idle = event < 0
        rows = np.where(idle, 0, event)
        start = np.where(idle, 0, chunk) * B
        N = self.host.agent_valid.shape[1]
        take = np.minimum(start[:, None] + np.arange(width)[None, :], N - 1)  # [E, width]
        out = {}
        for f in dataclasses.fields(RolloutInputs):
            a = getattr(self.host, f.name)[rows]
            if f.name in PER_AGENT:
                a = np.take_along_axis(a, take.reshape(take.shape + (1,) * (a.ndim - 2)), axis=1)
            out[f.name] = a
        beyond = (start[:, None] + np.arange(width)[None, :]) >= N
        out["agent_valid"] = out["agent_valid"] & ~idle[:, None] & ~beyond
        return RolloutInputs(**out)


# ------------------------------------------------------------------------------------------ in jit
def mean_field_carry(rollout: Rollout, m: jax.Array, m_len: jax.Array) -> Any:
    """The algorithm's carry that makes :meth:`Rollout.policy_prefix` read the mean field m (for ``mf``), or
    the empty carry of a state-only algorithm."""
    if rollout.algorithm.uses_mean_field:
        return policies.MeanFieldCarry(m=m, m_len=m_len)
    return rollout.algorithm.init(m.shape[0], rollout.rcfg.widths, rollout.mean_field_width)


def policy_batch(rollout: Rollout, inputs: RolloutInputs, m: jax.Array, m_len: jax.Array) -> ScoreBatch:
    """The policy prompts of a chunk, as the simulator builds them: a shared prefix per world [E, P] (topic +
    context(m) + "网友资料："), each agent's own part (left-padded) and its real action as the target."""
    prefix, prefix_len = rollout.policy_prefix(inputs, Carry(algorithm=mean_field_carry(rollout, m, m_len)))
    prompt_len = flat(inputs.agent_part_len)
    return ScoreBatch(prefix=prefix, prefix_len=prefix_len, prompt=prompts.left_pad(flat(inputs.agent_part), prompt_len),
                      prompt_len=prompt_len, target=flat(inputs.real_action), target_len=flat(inputs.real_action_len),
                      valid=flat(inputs.agent_valid))


def mean_field_prompt(rollout: Rollout, inputs: RolloutInputs, m: jax.Array, m_len: jax.Array):
    """X of each slot [E, Lx] (right-padded) and its length: the simulator's mean-field prompt from the chunk's
    real actions and the slot's previous mean field."""
    valid = inputs.agent_valid
    return rollout.mean_field_prompt(inputs, m, m_len, inputs.real_action, jnp.where(valid, inputs.real_action_len, 0),
                                     valid, 0)


def split_tail(rollout: Rollout, x: jax.Array, x_len: jax.Array, rows_per_slot: int):
    """X as (prefix [E, Lx], prefix lengths, tail rows [E·R, Lt], tail lengths): the constant summary instruction
    (``mf_tail``) that ends every X becomes each row's own prompt part, the rest is the shared prefix.
    Together they are exactly X (cascade attention over the prefix), and every row has >= 1 own token, which
    generation and scoring need."""
    tail = np.asarray(rollout.tt.mf_tail.tokens, np.int32)
    E = x.shape[0]
    tail_rows = jnp.broadcast_to(jnp.asarray(tail)[None, :], (E * rows_per_slot, len(tail)))
    return x, x_len - len(tail), tail_rows, jnp.full((E * rows_per_slot,), len(tail), jnp.int32)


def prior_prompt(tokenizer, tt: prompts.TokenTemplates) -> np.ndarray:
    """The prior r's prompt (IBTUNE §2): chat head + the summary instruction + chat tail, each piece tokenized
    on its own as the simulator's templates are."""
    # Like the simulator's mf_tail piece, the instruction and the chat tail are one piece.
    instruction = templates.mean_field_instruction(language=tt.language)
    ids = list(tt.chat_head.tokens) + tokenizer.encode(instruction + tt.chat_tail.text)
    return np.asarray(ids, np.int32)


def prior_batch(prior: np.ndarray, target: jax.Array, target_len: jax.Array, groups: int) -> ScoreBatch:
    """``target`` [groups·R, M] scored after the prior prompt: the prompt less its last token is one shared
    prefix per group, the last token each row's own part."""
    rows = target.shape[0]
    prefix = jnp.broadcast_to(jnp.asarray(prior[:-1])[None, :], (groups, len(prior) - 1))
    return ScoreBatch(prefix=prefix, prefix_len=jnp.full((groups,), len(prior) - 1, jnp.int32),
                      prompt=jnp.full((rows, 1), int(prior[-1]), jnp.int32), prompt_len=jnp.ones((rows,), jnp.int32),
                      target=target, target_len=target_len, valid=target_len > 0)


def text_length(tokens: jax.Array, lengths: jax.Array, finished: jax.Array, eos: jax.Array) -> jax.Array:
    """Generated tokens that carry text: all of them, less a final end-of-sequence token (as the rollout)."""
    last = jnp.take_along_axis(tokens, jnp.maximum(lengths - 1, 0)[:, None], axis=1)[:, 0]
    return lengths - (finished & (lengths > 0) & eos[last]).astype(jnp.int32)
