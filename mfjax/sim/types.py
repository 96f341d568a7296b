"""The simulator's shared types: enums for sources and overrides, buffer widths, and the rollout's pytrees.

Shape letters: W worlds (events × seeds) in a batch, N agent slots per world (steps × B), B agents per step,
La an action buffer, L* other token buffers.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Optional

import jax


class Source(enum.IntEnum):
    """Where an agent's action came from (the ``source`` output)."""

    NONE = -1  # no agent in this slot (an event shorter than the run)
    GENERATED = 0
    WARMUP = 1
    INTERVENTION = 2
    KEY_NODE = 3

    @property
    def label(self) -> str:
        return self.name.lower()


class OverrideKind(enum.IntEnum):
    """A per-agent override of the ``override`` input."""

    NONE = 0
    INTERVENTION = 1  # the action is replaced by a given text
    KEY_NODE = 2  # the real action is revealed


@dataclasses.dataclass(frozen=True)
class Widths:
    """Static token-buffer widths of a run, sized from its data so that every batch of worlds shares one
    compile (see :func:`mfjax.sim.batch.widths_for`)."""

    action: int = 64  # La: one action (the longest real one, the policy's cleaned output, interventions)
    policy_head: int = 128  # chat head + topic
    agent_part: int = 128  # an agent's own part of the policy prompt
    mf_head: int = 128  # chat head + mean-field prompt start with the topic
    mf_state_line: int = 1  # a mean-field line's per-agent prefix with the agent's state (mf_with_states)
    mf_lines: int = 0  # all agent lines of one step in a mean-field prompt, at most (0: B × the widest line)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RolloutInputs:
    """Per-world arrays of one batch (built on the host by :func:`mfjax.sim.batch.stack_worlds`)."""

    policy_head: jax.Array  # [W, Lh] right-padded: chat head + topic
    policy_head_len: jax.Array  # [W]
    mf_head: jax.Array  # [W, Lmh]: chat head + "当前话题：{topic}\n过往网友评论总结："
    mf_head_len: jax.Array
    agent_part: jax.Array  # [W, N, Ls] right-padded: state + "\n" + instruction + chat tail
    agent_part_len: jax.Array  # [W, N]
    mf_state_line: jax.Array  # [W, N, Lsl]: "第{i}个网友的个人资料：{state}\n该网友的评论：" (mf_with_states)
    mf_state_line_len: jax.Array
    real_action: jax.Array  # [W, N, La] right-padded, whole
    real_action_len: jax.Array  # [W, N]
    followers: jax.Array  # [W, N] int32, -1 unknown
    agent_valid: jax.Array  # [W, N] bool
    override: jax.Array  # [W, N] int32: OverrideKind
    override_action: jax.Array  # [W, N, La]
    override_action_len: jax.Array  # [W, N]
    world_key: jax.Array  # [W, 2] uint32 raw PRNG key data of each world (see batch.world_key)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepOutputs:
    """What each step records ([W, B, ...] per step; stacked over steps by the scan)."""

    generated: jax.Array  # [W, B, La] the policy's own action (first line), padding in warm-up
    generated_len: jax.Array
    action: jax.Array  # [W, B, La] the action used (real / intervention / generated)
    action_len: jax.Array
    source: jax.Array  # [W, B] Source
    nll: jax.Array  # [W, B] summed NLL of the real action under the policy
    nll_tokens: jax.Array  # [W, B]
    mean_field: jax.Array  # [W, Lm] the mean field the policy read at this step ([W, 0] without one)
    mean_field_len: jax.Array  # [W]
    mean_field_out: jax.Array  # [W, Lm] the mean field written from this step's actions (the next step's
    mean_field_out_len: jax.Array  # input; unchanged where the step has no agents)
    # With ``dump_prompts`` (else None): the prompts as the models read them.
    policy_prefix: Optional[jax.Array] = None  # [W, P] each world's shared policy prefix at this step
    policy_prefix_len: Optional[jax.Array] = None
    mf_prompt: Optional[jax.Array] = None  # [W, Lmf] the mean-field prompt of this step
    mf_prompt_len: Optional[jax.Array] = None
