"""The MF-LLM rollout: one ``jax.lax.scan`` over steps for many worlds (events × seeds) at once.

Per step k (agents [kB, (k+1)B) of every world), inside jit:

1. assemble each world's policy prefix in token space: topic + the algorithm's group context + "网友资料：";
2. prefill it once per world and each agent's own part (state + instruction) against it — in warm-up steps
   only when the real actions are scored;
3. generate the agents' actions (skipped in warm-up steps, which use the real actions) as SPEC's first line;
4. pick each agent's action: real (warm-up, key node), intervention text, or generated;
5. score the real actions under the policy (NLL, the individual-level metric) in the same prefill;
6. build the mean-field prompt from this step's actions (post-intervention) and write the next mean field
   (algorithms that use one), then let the algorithm update its carry.

A step in which no world of the batch has agents left is skipped. PRNG keys derive from each world's key,
the agent index and the step, so a world's rollout does not depend on which worlds share its batch. Policy
and mean-field models may be different checkpoints but must share one tokenizer (actions and the mean
field pass between them as tokens). Both take their one stored layout, stacked :class:`Weights`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mfjax import sharding
from mfjax.config import ModelConfig
from mfjax.engine.generate import GenerateConfig, generate_tokens, prefill_prefix
from mfjax.engine.sampling import SamplingConfig
from mfjax.engine.score import score_tokens
from mfjax.models.weights import Weights, weight_shardings
from mfjax.sim import lines as lines_lib
from mfjax.sim import policies
from mfjax.sim import prompts
from mfjax.sim.types import OverrideKind, RolloutInputs, Source, StepOutputs, Widths

# Logical axes of the per-world arrays: worlds split over the data axes, the rest whole.
_WORLD = "batch"


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Static settings of a rollout (hashable). It owns every setting once; the two models'
    :class:`GenerateConfig` derive from it."""

    num_steps: int
    algorithm: str = "mf"
    step_size: int = 16  # B: agents per step
    warmup_steps: int = 3  # steps whose actions are the real ones (3 × 16 = the reference's 48 agents)
    policy_sampling: SamplingConfig = SamplingConfig(temperature=None)
    policy_new_tokens: int = 50
    mf_sampling: SamplingConfig = SamplingConfig(temperature=None)
    mf_new_tokens: int = 200
    mf_min_new_tokens: int = 10
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0
    attn_impl: str = "xla"
    mf_with_states: bool = False  # mean-field prompt lines carry the agents' states too
    score_real: bool = True
    dump_prompts: bool = False  # also return every step's policy prefix and mean-field prompt tokens
    widths: Widths = Widths()

    def __post_init__(self):
        policies.get(self.algorithm)  # a clear error for an unknown algorithm
        if not 0 <= self.warmup_steps <= self.num_steps:
            raise ValueError(f"warmup_steps must be in [0, num_steps={self.num_steps}]")
        object.__setattr__(self, "stop_ids", tuple(int(t) for t in self.stop_ids))

    @property
    def num_agents(self) -> int:
        return self.num_steps * self.step_size

    @property
    def policy_generate(self) -> GenerateConfig:
        return GenerateConfig(max_new_tokens=self.policy_new_tokens, sampling=self.policy_sampling,
                              stop_token_ids=self.stop_ids, pad_token_id=self.pad_id, attn_impl=self.attn_impl)

    @property
    def mean_field_generate(self) -> GenerateConfig:
        return GenerateConfig(max_new_tokens=self.mf_new_tokens, min_new_tokens=self.mf_min_new_tokens,
                              sampling=self.mf_sampling, stop_token_ids=self.stop_ids, pad_token_id=self.pad_id,
                              attn_impl=self.attn_impl)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Carry:
    algorithm: Any  # the algorithm's own slice (see mfjax.sim.policies)


def _ceil(n: int, multiple: int = 16) -> int:
    return -(-n // multiple) * multiple


def _flat(x):
    """[W, B, ...] -> [W·B, ...]."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _text_length(tokens: jax.Array, lengths: jax.Array, finished: jax.Array, eos: jax.Array) -> jax.Array:
    """Generated tokens that carry text: all of them, less a final end-of-sequence token."""
    last = jnp.take_along_axis(tokens, jnp.maximum(lengths - 1, 0)[:, None], axis=1)[:, 0]
    return lengths - (finished & (lengths > 0) & eos[last]).astype(jnp.int32)


class Rollout:
    """A compiled rollout for fixed models, templates and settings; call :meth:`run` per batch of worlds."""

    def __init__(self, rcfg: RolloutConfig, templates: prompts.TokenTemplates, policy_cfg: ModelConfig,
                 mf_cfg: ModelConfig, lines: tuple[lines_lib.LineTables, lines_lib.LineTables], *,
                 mesh=None, rules=None, on_step: Optional[Callable] = None):
        if policy_cfg.vocab_size != mf_cfg.vocab_size:
            raise ValueError("policy and mean-field models must share one tokenizer and vocabulary "
                             f"(vocab sizes {policy_cfg.vocab_size} vs {mf_cfg.vocab_size})")
        policy_lines, mf_lines = lines
        if (policy_lines.mode, mf_lines.mode) != (lines_lib.FIRST_LINE, lines_lib.JOIN):
            raise ValueError("lines must be (first-line tables for the policy, join tables for the mean field)")
        self.rcfg, self.tt, self.policy_cfg, self.mf_cfg = rcfg, templates, policy_cfg, mf_cfg
        self.algorithm = policies.get(rcfg.algorithm)
        self.lines = lines
        self.on_step = on_step  # a host callback per step, only when asked (it syncs device and host)
        self.plan = None if mesh is None else sharding.MeshRules(mesh, rules or sharding.DEFAULT_RULES)
        # Generated text after SPEC's line handling: the policy's first line, the mean field without breaks.
        self.generated_width = lines_lib.clean_width(policy_lines, rcfg.policy_new_tokens)
        self.mean_field_width = (lines_lib.clean_width(mf_lines, rcfg.mf_new_tokens)
                                 if self.algorithm.uses_mean_field else 0)
        if rcfg.widths.action < self.generated_width:
            raise ValueError(f"the action width {rcfg.widths.action} is below the policy's cleaned output width "
                             f"{self.generated_width}")
        self.eos = np.isin(np.arange(policy_cfg.vocab_size), list(rcfg.stop_ids))
        if self.plan is None:
            self._jitted = jax.jit(self._rollout)
        else:
            self._jitted = jax.jit(self._rollout, in_shardings=self._in_shardings(),
                                   out_shardings=self._out_shardings())

    # ------------------------------------------------------------------------------ shardings
    def input_shardings(self) -> RolloutInputs:
        """Where each input array lives: worlds over the data axes (logical 'batch'), the rest whole."""
        spec = lambda ndim: self.plan.sharding((_WORLD,) + (None,) * (ndim - 1))
        ndims = {f.name: 2 for f in dataclasses.fields(RolloutInputs)}
        ndims.update(policy_head_len=1, mf_head_len=1, agent_part=3, mf_state_line=3, real_action=3,
                     override_action=3)
        return RolloutInputs(**{name: spec(n) for name, n in ndims.items()})

    def _in_shardings(self):
        replicated = self.plan.sharding(())
        return (weight_shardings(self.policy_cfg, self.plan.mesh, self.plan.rules),
                weight_shardings(self.mf_cfg, self.plan.mesh, self.plan.rules),
                self.input_shardings(), jax.tree.map(lambda _: replicated, self.lines))

    def _out_shardings(self):
        per_step = self.plan.sharding((None, _WORLD))
        outputs = {f.name: per_step for f in dataclasses.fields(StepOutputs)}
        if not self.rcfg.dump_prompts:
            outputs.update(policy_prefix=None, policy_prefix_len=None, mf_prompt=None, mf_prompt_len=None)
        carry = jax.tree.map(lambda _: self.plan.sharding((_WORLD,)), self.initial_carry(1))
        return StepOutputs(**outputs), carry

    # ------------------------------------------------------------------------------ widths (static)
    @property
    def prefix_width(self) -> int:
        r, tt = self.rcfg, self.tt
        context = self.algorithm.context_width(tt, r.widths, self.mean_field_width)
        return _ceil(r.widths.policy_head + context + len(tt.profile.tokens))

    @property
    def mf_line_width(self) -> tuple[int, int]:
        """(prefix, suffix) tokens around one action in a mean-field prompt line, at most."""
        r, tt = self.rcfg, self.tt
        line_pre = r.widths.mf_state_line if r.mf_with_states else tt.mf_line_pre.tokens.shape[1]
        line_post = len((tt.mf_state_line_post if r.mf_with_states else tt.mf_line_post).tokens)
        return line_pre, line_post

    @property
    def mf_prompt_width(self) -> int:
        r, tt = self.rcfg, self.tt
        pre, post = self.mf_line_width
        lines = r.widths.mf_lines or r.step_size * (pre + r.widths.action + post)
        return _ceil(r.widths.mf_head + self.mean_field_width + len(tt.mf_head_post.tokens) + lines
                     + len(tt.mf_tail.tokens))

    # ------------------------------------------------------------------------------------ prompts
    def policy_prefix(self, inputs: RolloutInputs, carry: Carry) -> tuple[jax.Array, jax.Array]:
        """Each world's policy prefix [W, P] (right-padded) and length: topic + context + "网友资料："."""
        segments = [(inputs.policy_head, inputs.policy_head_len), *self.algorithm.context(self.tt, carry.algorithm),
                    prompts.constant(self.tt.profile)]
        return prompts.pack_segments(segments, self.prefix_width, self.rcfg.pad_id)

    def mean_field_prompt(self, inputs: RolloutInputs, m, m_len, action, action_len, valid, k):
        """Each world's mean-field prompt [W, Lmf] (right-padded) and length for step ``k``'s actions:
        head + m + the step's agent lines (one block) + the summary instruction."""
        r, tt = self.rcfg, self.tt
        B = action.shape[1]
        if r.mf_with_states:
            pre = (jax.lax.dynamic_slice_in_dim(inputs.mf_state_line, k * B, B, axis=1),
                   jax.lax.dynamic_slice_in_dim(inputs.mf_state_line_len, k * B, B, axis=1))
            post = prompts.constant(tt.mf_state_line_post)
        else:
            pre = (jnp.asarray(tt.mf_line_pre.tokens[:B]), jnp.asarray(tt.mf_line_pre.lengths[:B]))
            post = prompts.constant(tt.mf_line_post)
        block = prompts.lines_block([pre, (action, action_len), (post[0][:, None, :], post[1])], valid)
        segments = [(inputs.mf_head, inputs.mf_head_len), (m, m_len), prompts.constant(tt.mf_head_post), block,
                    prompts.constant(tt.mf_tail)]
        return prompts.pack_segments(segments, self.mf_prompt_width, r.pad_id)

    # ------------------------------------------------------------------------------------ one step
    def _step(self, w_policy: Weights, w_mf: Weights, inputs: RolloutInputs, lines, carry: Carry, k):
        r, plan = self.rcfg, self.plan
        W, B, La = inputs.agent_valid.shape[0], r.step_size, r.widths.action
        policy_lines, mf_lines = lines
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, k * B, B, axis=1)
        valid = sl(inputs.agent_valid)

        def real_step(carry):
            agent_len = sl(inputs.agent_part_len)
            real, real_len = sl(inputs.real_action), sl(inputs.real_action_len)
            override = sl(inputs.override)
            prefix_tokens, prefix_len = self.policy_prefix(inputs, carry)
            suffix_len = _flat(agent_len)
            suffix = prompts.left_pad(_flat(sl(inputs.agent_part)), suffix_len)
            real_flat, real_len_flat = _flat(real), _flat(real_len)
            world_keys = jax.random.wrap_key_data(inputs.world_key)
            agent_index = k * B + jnp.arange(B)
            row_keys = jax.vmap(lambda wk: jax.vmap(
                lambda a: jax.random.fold_in(jax.random.fold_in(wk, 0), a))(agent_index))(world_keys)

            def nll_of(logprobs):
                return -jnp.sum(logprobs, axis=1).reshape(W, B)

            def generate(_):
                prefix = prefill_prefix(w_policy, self.policy_cfg, prefix_tokens, prefix_len, attn_impl=r.attn_impl,
                                        plan=plan)
                score = dict(targets=real_flat, target_lens=real_len_flat) if r.score_real else {}
                out = generate_tokens(w_policy, self.policy_cfg, r.policy_generate, suffix, suffix_len,
                                      _flat(row_keys), prefix, stop_mask=jnp.asarray(self.eos),
                                      line_stop=policy_lines.stop_rule(), plan=plan, **score)
                # SPEC's first line of the stripped text, in token space: an end-of-sequence token is dropped,
                # the token that ends the line keeps its text before the break.
                tokens, length = lines_lib.clean(policy_lines, out.tokens,
                                                 _text_length(out.tokens, out.lengths, out.finished,
                                                              jnp.asarray(self.eos)), r.pad_id)
                tokens = jnp.pad(tokens, ((0, 0), (0, La - tokens.shape[1])), constant_values=r.pad_id)
                nll = nll_of(out.target_logprobs) if r.score_real else jnp.zeros((W, B), jnp.float32)
                return tokens.reshape(W, B, La), length.reshape(W, B), nll

            def warmup(_):
                nll = jnp.zeros((W, B), jnp.float32)
                if r.score_real:  # the prefix is prefilled only where something reads it
                    prefix = prefill_prefix(w_policy, self.policy_cfg, prefix_tokens, prefix_len,
                                            attn_impl=r.attn_impl, plan=plan)
                    nll = nll_of(score_tokens(w_policy, self.policy_cfg, suffix, suffix_len, real_flat, real_len_flat,
                                              prefix=prefix, attn_impl=r.attn_impl, plan=plan))
                return jnp.full((W, B, La), r.pad_id, jnp.int32), jnp.zeros((W, B), jnp.int32), nll

            warm = k < r.warmup_steps
            generated, generated_len, nll = jax.lax.cond(warm, warmup, generate, None)
            nll = jnp.where(valid, nll, 0.0)

            # The action each agent takes.
            key_node = override == OverrideKind.KEY_NODE
            use_real = warm | key_node
            use_override = ~warm & (override == OverrideKind.INTERVENTION)
            action = jnp.where(use_real[..., None], real,
                               jnp.where(use_override[..., None], sl(inputs.override_action), generated))
            action_len = jnp.where(use_real, real_len, jnp.where(use_override, sl(inputs.override_action_len),
                                                                 generated_len))
            action_len = jnp.where(valid, action_len, 0)
            source = jnp.where(warm, Source.WARMUP,
                               jnp.where(key_node, Source.KEY_NODE,
                                         jnp.where(use_override, Source.INTERVENTION, Source.GENERATED)))
            source = jnp.where(valid, source, Source.NONE).astype(jnp.int32)

            # The mean-field update from this step's actions (post-intervention); a world without agents in
            # this step (an event that ended earlier than others in its batch) keeps its mean field.
            m, m_len = self.algorithm.mean_field(carry.algorithm, W)
            new_m, new_m_len = m, m_len
            mf_prompt = mf_prompt_len = None
            if self.algorithm.uses_mean_field:
                mf_prompt, mf_prompt_len = self.mean_field_prompt(inputs, m, m_len, action, action_len, valid, k)
                written, written_len = self._mean_field(w_mf, inputs, mf_lines, mf_prompt, mf_prompt_len, k)
                has_agents = jnp.any(valid, axis=1)
                new_m = jnp.where(has_agents[:, None], written, m)
                new_m_len = jnp.where(has_agents, written_len, m_len)
            step = policies.StepActions(action=action, action_len=action_len, valid=valid,
                                        followers=sl(inputs.followers), mean_field=(new_m, new_m_len))
            carry = Carry(algorithm=self.algorithm.update(carry.algorithm, step))
            dump = {}
            if r.dump_prompts:
                if mf_prompt is None:
                    mf_prompt, mf_prompt_len = jnp.zeros((W, 1), jnp.int32), jnp.zeros((W,), jnp.int32)
                dump = dict(policy_prefix=prefix_tokens, policy_prefix_len=prefix_len, mf_prompt=mf_prompt,
                            mf_prompt_len=mf_prompt_len)
            ys = StepOutputs(generated=generated, generated_len=generated_len, action=action, action_len=action_len,
                             source=source, nll=nll, nll_tokens=jnp.where(valid, real_len, 0), mean_field=m,
                             mean_field_len=m_len, mean_field_out=new_m, mean_field_out_len=new_m_len, **dump)
            return carry, ys

        def empty_step(carry):
            # Every world of the batch has ended: nothing to prefill, generate or write.
            _, ys = jax.eval_shape(real_step, carry)
            ys = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), ys)
            m, m_len = self.algorithm.mean_field(carry.algorithm, W)
            ys = dataclasses.replace(ys, source=jnp.full((W, B), Source.NONE, jnp.int32), mean_field=m,
                                     mean_field_len=m_len, mean_field_out=m, mean_field_out_len=m_len)
            return carry, ys

        carry, ys = jax.lax.cond(jnp.any(valid), real_step, empty_step, carry)
        if self.on_step is not None:
            jax.debug.callback(self.on_step, k, ys.nll, valid, ys.source)
        return carry, ys

    def _mean_field(self, w_mf: Weights, inputs, mf_lines, prompt, prompt_len, k):
        r = self.rcfg
        world_keys = jax.random.wrap_key_data(inputs.world_key)
        keys = jax.vmap(lambda wk: jax.random.fold_in(jax.random.fold_in(wk, 1), k))(world_keys)
        out = generate_tokens(w_mf, self.mf_cfg, r.mean_field_generate, prompts.left_pad(prompt, prompt_len),
                              prompt_len, keys, stop_mask=jnp.asarray(self.eos), plan=self.plan)
        # SPEC: the decoded text stripped, line breaks removed — in token space.
        length = _text_length(out.tokens, out.lengths, out.finished, jnp.asarray(self.eos))
        return lines_lib.clean(mf_lines, out.tokens, length, r.pad_id)

    # ------------------------------------------------------------------------------------ the scan
    def initial_carry(self, W: int) -> Carry:
        return Carry(algorithm=self.algorithm.init(W, self.rcfg.widths, self.mean_field_width))

    def _rollout(self, w_policy: Weights, w_mf: Weights, inputs: RolloutInputs, lines) -> tuple[StepOutputs, Carry]:
        W = inputs.agent_valid.shape[0]
        body = lambda carry, k: self._step(w_policy, w_mf, inputs, lines, carry, k)
        final, ys = jax.lax.scan(body, self.initial_carry(W), jnp.arange(self.rcfg.num_steps))
        return ys, final

    def run(self, w_policy: Weights, w_mf: Weights, inputs: RolloutInputs) -> tuple[StepOutputs, Carry]:
        """Runs every step for every world in ``inputs``: one compiled program, one call."""
        return self._jitted(w_policy, w_mf, inputs, self.lines)

    def compile_count(self) -> int:
        """How many programs the rollout has compiled so far (one per distinct input shape)."""
        return self._jitted._cache_size()
