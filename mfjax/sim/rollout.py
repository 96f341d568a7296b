"""The MF-LLM rollout: one ``jax.lax.scan`` over steps for many worlds (events × seeds) at once.

Per step k (agents [kB, (k+1)B) of every world), inside jit:

1. assemble each world's policy prefix in token space: topic + group context (the mean field, or the
   recent / popular comments) + "网友资料：";
2. prefill it once per world; prefill each agent's own part (state + instruction) against it;
3. generate the agents' actions (skipped in warm-up steps, which use the real actions);
4. pick each agent's action: real (warm-up, key node), intervention text, or generated (first line);
5. score the real actions under the policy (NLL, the individual-level metric);
6. build the mean-field prompt from this step's actions (post-intervention) and generate the next
   mean field (algorithm ``mf`` only); update the recent / popular buffers.

The carry holds the mean-field tokens and the comment buffers; PRNG keys derive from each world's key,
the agent index and the step, so a world's rollout does not depend on which worlds share its batch.
Policy and mean-field models may be different checkpoints but must share one tokenizer (actions and
the mean field pass between them as tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mfjax import sharding
from mfjax.config import ModelConfig
from mfjax.engine.generate import GenerateConfig, generate_tokens, prefill_prefix
from mfjax.engine.score import score_tokens
from mfjax.sim import lines as LN
from mfjax.sim import prompts as PR
from mfjax.sim import templates as T

# Where an agent's action came from (the ``source`` output).
SOURCE_GENERATED, SOURCE_WARMUP, SOURCE_INTERVENTION, SOURCE_KEY_NODE, SOURCE_NONE = 0, 1, 2, 3, -1
SOURCE_NAMES = {SOURCE_GENERATED: "generated", SOURCE_WARMUP: "warmup", SOURCE_INTERVENTION: "intervention",
                SOURCE_KEY_NODE: "key_node", SOURCE_NONE: "none"}
# Per-agent overrides (the ``override`` input).
OVERRIDE_NONE, OVERRIDE_INTERVENTION, OVERRIDE_KEY_NODE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Static settings of a rollout (hashable)."""

    num_steps: int
    algorithm: str = "mf"
    step_size: int = 16  # B: agents per step
    warmup_steps: int = 3  # steps whose actions are the real ones (3 × 16 = the reference's 48 agents)
    action_width: int = 64  # La: buffer of one action (sized from the data: real actions are never cut here)
    policy: GenerateConfig = GenerateConfig(max_new_tokens=50)
    mean_field: GenerateConfig = GenerateConfig(max_new_tokens=200, min_new_tokens=10)
    mf_with_states: bool = False  # mean-field prompt lines carry the agents' states too
    score_real: bool = True
    attn_impl: str = "xla"
    dump_prompts: bool = False  # also return every step's policy prefix and mean-field prompt tokens
    # Static buffer widths (tokens), fixed for a run so every batch of worlds shares one compile.
    policy_head_width: int = 128
    agent_part_width: int = 128
    mf_head_width: int = 128
    mf_state_line_width: int = 1
    mf_lines_width: int = 0  # the longest step's agent lines in a mean-field prompt (0: the worst case)

    def __post_init__(self):
        if self.algorithm not in T.ALGORITHMS:
            raise ValueError(f"algorithm must be one of {T.ALGORITHMS}, got {self.algorithm!r}")
        if not 0 <= self.warmup_steps <= self.num_steps:
            raise ValueError(f"warmup_steps must be in [0, num_steps={self.num_steps}]")

    @property
    def num_agents(self) -> int:
        return self.num_steps * self.step_size


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RolloutInputs:
    """Per-world arrays (W worlds, N = num_steps × step_size agent slots)."""

    policy_head: jax.Array  # [W, Lh] right-padded: chat head + topic
    policy_head_len: jax.Array  # [W]
    mf_head: jax.Array  # [W, Lmh]: chat head + "当前话题：{topic}\n过往网友评论总结："
    mf_head_len: jax.Array
    agent_part: jax.Array  # [W, N, Ls] right-padded: state + "\n" + instruction + chat tail
    agent_part_len: jax.Array  # [W, N]
    mf_state_line: jax.Array  # [W, N, Lsl]: "第{i}个网友的个人资料：{state}\n该网友的评论：" (mf_with_states)
    mf_state_line_len: jax.Array
    real_action: jax.Array  # [W, N, La] right-padded, whole (never cut to fit)
    real_action_len: jax.Array  # [W, N]
    followers: jax.Array  # [W, N] int32, -1 unknown
    agent_valid: jax.Array  # [W, N] bool
    override: jax.Array  # [W, N] int32: OVERRIDE_*
    override_action: jax.Array  # [W, N, La]
    override_action_len: jax.Array  # [W, N]
    world_key: jax.Array  # [W] typed PRNG keys


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepOutputs:
    """What each step records ([W, B, ...] per step; stacked over steps by the scan)."""

    generated: jax.Array  # [W, B, La] the policy's own action (first line), zeros in warm-up
    generated_len: jax.Array
    action: jax.Array  # [W, B, La] the action used (real / intervention / generated)
    action_len: jax.Array
    source: jax.Array  # [W, B] SOURCE_*
    nll: jax.Array  # [W, B] summed NLL of the real action under the policy
    nll_tokens: jax.Array  # [W, B]
    mean_field: jax.Array  # [W, Lm] the mean field the policy read at this step
    mean_field_len: jax.Array  # [W]
    mean_field_out: jax.Array  # [W, Lm] the mean field written from this step's actions (= the input
    mean_field_out_len: jax.Array  # of the next step; unchanged where the step has no agents)
    # With ``dump_prompts`` (else None): the prompts as the models read them.
    policy_prefix: jax.Array | None = None  # [W, P] each world's shared policy prefix at this step
    policy_prefix_len: jax.Array | None = None
    mf_prompt: jax.Array | None = None  # [W, Lmf] the mean-field prompt of this step
    mf_prompt_len: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Carry:
    m: jax.Array  # [W, Lm]
    m_len: jax.Array  # [W]
    recent: jax.Array  # [W, K, La] last K actions, oldest first
    recent_len: jax.Array
    recent_valid: jax.Array
    popular: jax.Array  # [W, Wp, La] last Wp actions
    popular_len: jax.Array
    popular_followers: jax.Array
    popular_valid: jax.Array


def _text_length(out, eos: np.ndarray) -> jax.Array:
    """Generated tokens that carry text: all of them, less a final end-of-sequence token."""
    last = jnp.take_along_axis(out.tokens, jnp.maximum(out.lengths - 1, 0)[:, None], axis=1)[:, 0]
    ends_with_eos = out.finished & (out.lengths > 0) & jnp.asarray(eos)[last]
    return out.lengths - ends_with_eos.astype(jnp.int32)


def _ceil(n: int, multiple: int = 16) -> int:
    return -(-n // multiple) * multiple


def _flat(x):
    """[W, B, ...] -> [W·B, ...]."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


class Rollout:
    """A compiled rollout for fixed models, templates and settings; call :meth:`run` per batch of worlds."""

    def __init__(self, rcfg: RolloutConfig, templates: PR.TokenTemplates, policy_cfg: ModelConfig,
                 mf_cfg: ModelConfig, lines: tuple[LN.LineTables, LN.LineTables], *, mesh=None,
                 on_step: Callable | None = None):
        if policy_cfg.vocab_size != mf_cfg.vocab_size:
            raise ValueError("policy and mean-field models must share one tokenizer and vocabulary "
                             f"(vocab sizes {policy_cfg.vocab_size} vs {mf_cfg.vocab_size})")
        policy_lines, mf_lines = lines
        if (policy_lines.mode, mf_lines.mode) != (LN.FIRST_LINE, LN.JOIN):
            raise ValueError("lines must be (first-line tables for the policy, join tables for the mean field)")
        self.rcfg, self.tt, self.policy_cfg, self.mf_cfg = rcfg, templates, policy_cfg, mf_cfg
        self.lines = lines
        self.mesh = mesh
        self.on_step = on_step
        # Generated text after SPEC's line handling: the policy's first line, the mean field without breaks.
        self.generated_width = LN.clean_width(policy_lines, rcfg.policy.max_new_tokens)
        self.mean_field_width = LN.clean_width(mf_lines, rcfg.mean_field.max_new_tokens)
        if rcfg.action_width < self.generated_width:
            raise ValueError(f"action_width {rcfg.action_width} is below the policy's cleaned output width "
                             f"{self.generated_width}")
        self.policy_eos = self._stop_mask(policy_cfg, rcfg.policy.stop_token_ids)
        self.mf_eos = self._stop_mask(mf_cfg, rcfg.mean_field.stop_token_ids)
        if mesh is None:
            self._jitted = jax.jit(self._rollout)
        else:
            # Worlds over the data axes, weights over the model axis (the decode layout: unstacked layers).
            worlds = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
            per_step = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            in_shardings = (sharding.param_shardings(policy_cfg, mesh, layers_unstacked=True),
                            sharding.param_shardings(mf_cfg, mesh, layers_unstacked=True),
                            RolloutInputs(**{f.name: worlds for f in dataclasses.fields(RolloutInputs)}),
                            jax.tree.map(lambda _: replicated, lines))
            outputs = {f.name: per_step for f in dataclasses.fields(StepOutputs)}
            if not rcfg.dump_prompts:
                outputs.update(policy_prefix=None, policy_prefix_len=None, mf_prompt=None, mf_prompt_len=None)
            out_shardings = (StepOutputs(**outputs), Carry(**{f.name: worlds for f in dataclasses.fields(Carry)}))
            self._jitted = jax.jit(self._rollout, in_shardings=in_shardings, out_shardings=out_shardings)

    @staticmethod
    def _stop_mask(cfg: ModelConfig, ids) -> np.ndarray:
        mask = np.zeros((cfg.vocab_size,), bool)
        mask[list(ids)] = True
        return mask

    # ------------------------------------------------------------------------------ widths (static)
    @property
    def context_width(self) -> int:
        r, tt = self.rcfg, self.tt
        if r.algorithm == "mf":
            return len(tt.mf_ctx_open.tokens) + self.mean_field_width + len(tt.mf_ctx_close.tokens)
        if r.algorithm in ("recent", "popular"):
            header = max(len(tt.recent_header.tokens), len(tt.popular_header.tokens))
            k = T.RECENT_K if r.algorithm == "recent" else T.POPULAR_K
            return header + k * (tt.comment_pre.tokens.shape[1] + r.action_width + len(tt.comment_post.tokens))
        return 0

    @property
    def prefix_width(self) -> int:
        return _ceil(self.rcfg.policy_head_width + self.context_width + len(self.tt.profile.tokens))

    @property
    def mf_line_width(self) -> tuple[int, int]:
        """(prefix, suffix) tokens around one action in a mean-field prompt line, at most."""
        r, tt = self.rcfg, self.tt
        line_pre = r.mf_state_line_width if r.mf_with_states else tt.mf_line_pre.tokens.shape[1]
        line_post = len((tt.mf_state_line_post if r.mf_with_states else tt.mf_line_post).tokens)
        return line_pre, line_post

    @property
    def mf_prompt_width(self) -> int:
        r, tt = self.rcfg, self.tt
        pre, post = self.mf_line_width
        lines = r.mf_lines_width or r.step_size * (pre + r.action_width + post)
        return _ceil(r.mf_head_width + self.mean_field_width + len(tt.mf_head_post.tokens) + lines
                     + len(tt.mf_tail.tokens))

    # ------------------------------------------------------------------------------------ contexts
    def _comment_list(self, header: PR.Piece, items, lens, valid) -> list:
        """Header + "第{i}位网友评论：{c}。\\n" lines for the valid items (numbered from 1, in order)."""
        tt = self.tt
        any_valid = jnp.any(valid, axis=1)
        number = jnp.clip(jnp.cumsum(valid, axis=1) - 1, 0, tt.comment_pre.tokens.shape[0] - 1)
        segments = [PR.gated(PR.constant(header), any_valid)]
        for j in range(items.shape[1]):
            on = valid[:, j]
            segments += [PR.gated(PR.pick(tt.comment_pre, number[:, j]), on),
                         (items[:, j], jnp.where(on, lens[:, j], 0)),
                         PR.gated(PR.constant(tt.comment_post), on)]
        return segments

    def _context_segments(self, carry: Carry) -> list:
        r, tt = self.rcfg, self.tt
        if r.algorithm == "mf":
            has_m = carry.m_len > 0  # no context while the mean field is still empty
            return [PR.gated(PR.constant(tt.mf_ctx_open), has_m), (carry.m, carry.m_len),
                    PR.gated(PR.constant(tt.mf_ctx_close), has_m)]
        if r.algorithm == "recent":
            return self._comment_list(tt.recent_header, carry.recent, carry.recent_len, carry.recent_valid)
        if r.algorithm == "popular":
            # Most followers first; ties and unknown (-1) keep time order; empty slots last.
            key = jnp.where(carry.popular_valid, carry.popular_followers, -2)
            order = jnp.argsort(-key, axis=1, stable=True)[:, :T.POPULAR_K]
            take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)
            return self._comment_list(tt.popular_header, take(carry.popular), take(carry.popular_len),
                                      take(carry.popular_valid))
        return []

    def policy_prefix(self, inputs: RolloutInputs, carry: Carry) -> tuple[jax.Array, jax.Array]:
        """Each world's policy prefix [W, P] (right-padded) and length: topic + context + "网友资料："."""
        segments = [(inputs.policy_head, inputs.policy_head_len), *self._context_segments(carry),
                    PR.constant(self.tt.profile)]
        return PR.pack_segments(segments, self.prefix_width, self.rcfg.policy.pad_token_id)

    def mean_field_prompt(self, inputs: RolloutInputs, carry: Carry, action, action_len, valid, k):
        """Each world's mean-field prompt [W, Lmf] (right-padded) and length for step ``k``'s actions."""
        r, tt = self.rcfg, self.tt
        W, B = action.shape[:2]
        segments = [(inputs.mf_head, inputs.mf_head_len), (carry.m, carry.m_len), PR.constant(tt.mf_head_post)]
        if r.mf_with_states:
            line = jax.lax.dynamic_slice_in_dim(inputs.mf_state_line, k * B, B, axis=1)
            line_len = jax.lax.dynamic_slice_in_dim(inputs.mf_state_line_len, k * B, B, axis=1)
            post = tt.mf_state_line_post
        else:
            post = tt.mf_line_post
        for j in range(B):
            on = valid[:, j]
            pre = (line[:, j], line_len[:, j]) if r.mf_with_states else PR.pick(tt.mf_line_pre, jnp.full((W,), j))
            segments += [PR.gated(pre, on), (action[:, j], action_len[:, j]), PR.gated(PR.constant(post), on)]
        segments.append(PR.constant(tt.mf_tail))
        return PR.pack_segments(segments, self.mf_prompt_width, r.mean_field.pad_token_id)

    # ------------------------------------------------------------------------------------ one step
    def _step(self, policy_params, mf_params, inputs: RolloutInputs, lines, carry: Carry, k):
        r = self.rcfg
        W, B, La = inputs.agent_valid.shape[0], r.step_size, r.action_width
        policy_lines, mf_lines = lines
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, k * B, B, axis=1)
        agent_part, agent_len = sl(inputs.agent_part), sl(inputs.agent_part_len)
        real, real_len = sl(inputs.real_action), sl(inputs.real_action_len)
        valid, override = sl(inputs.agent_valid), sl(inputs.override)
        agent_index = k * B + jnp.arange(B)

        # 1-2. Policy prompt: the world's prefix once, each agent's own part against it.
        prefix_tokens, prefix_len = self.policy_prefix(inputs, carry)
        prefix = prefill_prefix(policy_params, self.policy_cfg, prefix_tokens, prefix_len, attn_impl=r.attn_impl)
        suffix_len = _flat(agent_len)
        suffix = PR.left_pad(_flat(agent_part), suffix_len)

        row_keys = jax.vmap(lambda wk: jax.vmap(lambda a: jax.random.fold_in(jax.random.fold_in(wk, 0), a))(
            agent_index))(inputs.world_key)

        # 3 + 5. Generated actions (first line; not in warm-up, which uses the real ones), and the NLL of
        # the real actions under the policy with the prompt it samples from, in the same prefill.
        real_flat, real_len_flat = _flat(real), _flat(real_len)
        score = dict(targets=real_flat, target_lens=real_len_flat) if r.score_real else {}

        def generate(_):
            out = generate_tokens(policy_params, self.policy_cfg, r.policy, suffix, suffix_len, _flat(row_keys),
                                  prefix, stop_mask=jnp.asarray(self.policy_eos), line_stop=policy_lines.stop_rule(),
                                  **score)
            # The first line of the stripped text (SPEC), in token space; an end-of-sequence token is dropped,
            # the token that ends the line keeps its text before the break.
            tokens, length = LN.clean(policy_lines, out.tokens, _text_length(out, self.policy_eos),
                                      r.policy.pad_token_id)
            tokens = jnp.pad(tokens, ((0, 0), (0, La - tokens.shape[1])), constant_values=r.policy.pad_token_id)
            return tokens.reshape(W, B, La), length.reshape(W, B), _nll(out.target_logprobs)

        def warmup(_):
            logprobs = None
            if r.score_real:
                logprobs = score_tokens(policy_params, self.policy_cfg, suffix, suffix_len, real_flat, real_len_flat,
                                        prefix=prefix, attn_impl=r.attn_impl)
            return (jnp.full((W, B, La), r.policy.pad_token_id, jnp.int32), jnp.zeros((W, B), jnp.int32),
                    _nll(logprobs))

        def _nll(logprobs):
            if logprobs is None:
                return jnp.zeros((W, B), jnp.float32)
            return -jnp.sum(logprobs, axis=1).reshape(W, B)

        warm = k < r.warmup_steps
        generated, generated_len, nll = jax.lax.cond(warm, warmup, generate, None)
        nll = jnp.where(valid, nll, 0.0)

        # 4. The action each agent takes.
        use_real = warm | (override == OVERRIDE_KEY_NODE)
        use_override = ~warm & (override == OVERRIDE_INTERVENTION)
        action = jnp.where(use_real[..., None], real,
                           jnp.where(use_override[..., None], sl(inputs.override_action), generated))
        action_len = jnp.where(use_real, real_len, jnp.where(use_override, sl(inputs.override_action_len),
                                                             generated_len))
        action_len = jnp.where(valid, action_len, 0)
        source = jnp.where(warm, SOURCE_WARMUP,
                           jnp.where(override == OVERRIDE_KEY_NODE, SOURCE_KEY_NODE,
                                     jnp.where(override == OVERRIDE_INTERVENTION, SOURCE_INTERVENTION,
                                               SOURCE_GENERATED)))
        source = jnp.where(valid, source, SOURCE_NONE)

        # 6. Mean-field update from this step's actions; a step without agents (an event that ended
        # earlier than others in its batch) leaves the mean field as it was.
        new_m, new_m_len = carry.m, carry.m_len
        mf_prompt = mf_prompt_len = None
        if r.algorithm == "mf":
            mf_prompt, mf_prompt_len = self.mean_field_prompt(inputs, carry, action, action_len, valid, k)
            m, m_len = self._mean_field(mf_params, inputs, mf_lines, mf_prompt, mf_prompt_len, k)
            has_agents = jnp.any(valid, axis=1)
            new_m = jnp.where(has_agents[:, None], m, carry.m)
            new_m_len = jnp.where(has_agents, m_len, carry.m_len)

        dump = {}
        if r.dump_prompts:
            if mf_prompt is None:
                mf_prompt, mf_prompt_len = jnp.zeros((W, 1), jnp.int32), jnp.zeros((W,), jnp.int32)
            dump = dict(policy_prefix=prefix_tokens, policy_prefix_len=prefix_len, mf_prompt=mf_prompt,
                        mf_prompt_len=mf_prompt_len)
        ys = StepOutputs(generated=generated, generated_len=generated_len, action=action, action_len=action_len,
                         source=source, nll=nll, nll_tokens=jnp.where(valid, real_len, 0),
                         mean_field=carry.m, mean_field_len=carry.m_len, mean_field_out=new_m,
                         mean_field_out_len=new_m_len, **dump)
        carry = self._update_buffers(carry, action, action_len, valid, sl(inputs.followers))
        carry = dataclasses.replace(carry, m=new_m, m_len=new_m_len)
        if self.on_step is not None:
            jax.debug.callback(self.on_step, k, nll, valid, source)
        return carry, ys

    def _mean_field(self, mf_params, inputs, mf_lines, prompt, prompt_len, k):
        r = self.rcfg
        keys = jax.vmap(lambda wk: jax.random.fold_in(jax.random.fold_in(wk, 1), k))(inputs.world_key)
        out = generate_tokens(mf_params, self.mf_cfg, r.mean_field, PR.left_pad(prompt, prompt_len), prompt_len,
                              keys, stop_mask=jnp.asarray(self.mf_eos))
        # SPEC: the decoded text stripped, line breaks removed — in token space.
        return LN.clean(mf_lines, out.tokens, _text_length(out, self.mf_eos), r.mean_field.pad_token_id)

    def _update_buffers(self, carry: Carry, action, action_len, valid, followers) -> Carry:
        K = carry.recent.shape[1]
        Wp = carry.popular.shape[1]
        cat = lambda old, new, n: jnp.concatenate([old, new], axis=1)[:, -n:]
        return dataclasses.replace(
            carry,
            recent=cat(carry.recent, action, K), recent_len=cat(carry.recent_len, action_len, K),
            recent_valid=cat(carry.recent_valid, valid, K),
            popular=cat(carry.popular, action, Wp), popular_len=cat(carry.popular_len, action_len, Wp),
            popular_followers=cat(carry.popular_followers, followers, Wp),
            popular_valid=cat(carry.popular_valid, valid, Wp),
        )

    # ------------------------------------------------------------------------------------ the scan
    def initial_carry(self, W: int) -> Carry:
        r = self.rcfg
        La, K, Wp = r.action_width, T.RECENT_K, T.POPULAR_WINDOW
        z = lambda *s: jnp.zeros(s, jnp.int32)
        return Carry(m=z(W, self.mean_field_width), m_len=z(W), recent=z(W, K, La), recent_len=z(W, K),
                     recent_valid=jnp.zeros((W, K), bool), popular=z(W, Wp, La), popular_len=z(W, Wp),
                     popular_followers=z(W, Wp), popular_valid=jnp.zeros((W, Wp), bool))

    def _rollout(self, policy_params, mf_params, inputs: RolloutInputs, lines) -> tuple[StepOutputs, Carry]:
        W = inputs.agent_valid.shape[0]
        body = lambda carry, k: self._step(policy_params, mf_params, inputs, lines, carry, k)
        final, ys = jax.lax.scan(body, self.initial_carry(W), jnp.arange(self.rcfg.num_steps))
        return ys, final

    def run(self, policy_params, mf_params, inputs: RolloutInputs) -> tuple[StepOutputs, Carry]:
        """Runs every step for every world in ``inputs``: one compiled program, one call."""
        if self.mesh is None:
            return self._jitted(policy_params, mf_params, inputs, self.lines)
        with sharding.use_mesh(self.mesh):
            return self._jitted(policy_params, mf_params, inputs, self.lines)

    def compile_count(self) -> int:
        """How many programs the rollout has compiled so far (one per distinct input shape)."""
        return self._jitted._cache_size()
