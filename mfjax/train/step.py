"""The jitted IB-Tune train steps (IBTUNE.md §7): value_and_grad over the LoRA only, one optax update.

* :func:`make_optimizer` — clip 1.0 → AdamW β = (0.9, 0.95), wd 0, warm-up + cosine to 1 % of the peak, inside
  ``optax.MultiSteps`` (gradient accumulation over G micro-steps; G = 1 keeps the same state layout).
* :class:`TrainState` — micro-step count, LoRA, optimizer state (donated to each step).
* :class:`PolicyStep` — stage 2 (SFT on state + m → real action) and the state-SFT baseline.
* :class:`MeanFieldStep` — stage 1: sample k mean fields from the merged μ_θ, score them under π₀ and the
  prior, and take the score-function (RLOO / best-of-k) or the reference loss; a continuation at the
  simulator's settings becomes the slot's next mean field.

The frozen base weights are an argument of every step and never donated: one copy serves μ_θ (with the LoRA),
π₀ and the prior r (without). On a mesh, slots split over the data axes (logical 'batch'), weights and LoRA
over the model axis by their logical axes; activations are pinned through the decoder's ``plan``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mfjax import sharding
from mfjax.config import ModelConfig
from mfjax.engine.generate import GenerateConfig, generate_tokens, prefill_prefix
from mfjax.engine.sampling import SamplingConfig
from mfjax.models import lora as lora_lib
from mfjax.models.lora import LoraWeights
from mfjax.models.weights import Weights, weight_shardings
from mfjax.sim import lines as lines_lib
from mfjax.sim.rollout import Rollout
from mfjax.sim.types import RolloutInputs
from mfjax.train import batches as B
from mfjax.train import losses

# Salt of the PRNG stream of stage-1 samples: keys are fold_in(fold_in(fold_in(world_key, SALT), chunk), j), so
# they depend on (seed, event, chunk, sample) only, never on the slot or the micro-step; a resumed run redraws
# the same samples. (The rollout uses streams 0 and 1 of the same world key.)
SAMPLE_SALT = 7


# ------------------------------------------------------------------------------------------ optimizer
def make_optimizer(learning_rate: float, total_steps: int, *, warmup_fraction: float = 0.2, clip: float = 1.0,
                   accumulate: int = 1, final_fraction: float = 0.01, b1: float = 0.9,
                   b2: float = 0.95) -> optax.GradientTransformation:
    """The reference's optimizer (SPEC §3) over ``total_steps`` optimizer steps of ``accumulate`` micro-steps.

    The schedule's decay span includes the warm-up (optax's ``decay_steps``); the learning rate sits in the
    state (``inject_hyperparams``), so it is logged and checkpointed with it."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup = int(round(warmup_fraction * total_steps))
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(total_steps, warmup + 1),
                                                  final_fraction * learning_rate)
    adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=schedule, b1=b1, b2=b2, weight_decay=0.0)
    return optax.MultiSteps(optax.chain(optax.clip_by_global_norm(clip), adamw), every_k_schedule=accumulate)


def current_learning_rate(opt_state) -> jax.Array:
    """The learning rate the next optimizer step applies (from the injected hyper-parameters)."""
    return opt_state.inner_opt_state[1].hyperparams["learning_rate"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """What a step updates: micro-steps done, the LoRA, the optimizer state."""

    step: jax.Array  # int32 scalar
    lora: LoraWeights
    opt_state: Any


def init_state(lora: LoraWeights, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), lora=lora, opt_state=tx.init(lora))


def _apply(tx, state: TrainState, grads) -> tuple[TrainState, dict]:
    updates, opt_state = tx.update(grads, state.opt_state, state.lora)
    lora = optax.apply_updates(state.lora, updates)
    # inject_hyperparams stores the rate it applied in the *new* state (inside MultiSteps, updated on the G-th
    # micro-step only): that is the rate of this update.
    metrics = dict(grad_norm=optax.tree.norm(grads), lr=current_learning_rate(opt_state))
    return TrainState(step=state.step + 1, lora=lora, opt_state=opt_state), metrics


# ------------------------------------------------------------------------------------------ shardings
def lora_shardings(cfg: ModelConfig, spec: lora_lib.LoraSpec, mesh, rules=None) -> LoraWeights:
    """A NamedSharding per LoRA factor: the weight's own axes, the rank replicated."""
    pairs = {}
    for t in spec.targets:
        (a_shape, b_shape), (a_axes, b_axes) = lora_lib.lora_shapes(cfg, spec.rank, t), lora_lib.lora_axes(t)
        pairs[t] = lora_lib.LoraPair(a=sharding.named_sharding(a_axes, mesh, a_shape, rules),
                                     b=sharding.named_sharding(b_axes, mesh, b_shape, rules))
    return LoraWeights(**pairs, scale=spec.scale)


def state_shardings(cfg: ModelConfig, spec: lora_lib.LoraSpec, tx, mesh, rules=None) -> TrainState:
    """Shardings of a :class:`TrainState`: optimizer moments like their LoRA factor, counters replicated."""
    lora_sh = lora_shardings(cfg, spec, mesh, rules)
    replicated = sharding.named_sharding((), mesh)
    abstract = jax.eval_shape(lambda: tx.init(lora_lib.init_lora(cfg, spec, jax.random.key(0))))
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract, lora_sh, transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, lora=lora_sh, opt_state=opt_sh)


def slot_sharding(tree, mesh, rules=None):
    """Slot-major arrays (leading axis E) split over the data axes."""
    return jax.tree.map(lambda a: sharding.named_sharding(("batch",) + (None,) * (np.ndim(a) - 1), mesh,
                                                          np.shape(a), rules), tree)


# ------------------------------------------------------------------------------------------ stage 2
class PolicyStep:
    """One micro-step of SFT on the policy prompts of E chunks (stage 2: state + m; ``state_sft``: state only).

    Call with (state, weights, inputs, m, m_len) → (state, metrics); ``state`` is donated. ``inputs`` is a
    :class:`RolloutInputs` of E worlds × B agents (the chunk); m [E, Lm], m_len [E] the mean field each chunk's
    policy reads (ignored by state-only algorithms)."""

    def __init__(self, cfg: ModelConfig, rollout: Rollout, tx, *, remat: Optional[str] = "full",
                 attn_impl: str = "xla", mesh=None):
        self.cfg, self.rollout, self.tx, self.remat, self.attn_impl = cfg, rollout, tx, remat, attn_impl
        self.plan = None if mesh is None else sharding.MeshRules(mesh)
        self._jitted = jax.jit(self._step, donate_argnums=(0,))

    def batch(self, inputs: RolloutInputs, m, m_len) -> losses.ScoreBatch:
        return B.policy_batch(self.rollout, inputs, m, m_len)

    def _step(self, state: TrainState, weights: Weights, inputs: RolloutInputs, m, m_len):
        batch = self.batch(inputs, m, m_len)
        (loss, aux), grads = jax.value_and_grad(losses.sft_loss, has_aux=True)(
            state.lora, weights, self.cfg, batch, remat=self.remat, attn_impl=self.attn_impl, plan=self.plan)
        state, opt = _apply(self.tx, state, grads)
        return state, dict(loss=loss, **aux, **opt)

    def __call__(self, state, weights, inputs, m, m_len):
        return self._jitted(state, weights, inputs, m, m_len)


# ------------------------------------------------------------------------------------------ stage 1
@dataclasses.dataclass(frozen=True)
class MeanFieldSettings:
    """Stage 1's estimator settings (IBTUNE.md §5)."""

    estimator: str = "rloo"  # 'rloo', 'best_of_k' or 'reference'
    k: int = 4  # sampled mean fields per slot
    temperature: float = 1.0  # T_train: pure-temperature sampling, so log q is the sampling law
    lam: float = 2.0  # λ on the relevance CE
    beta: float = 1.0  # β on the compression KL
    rel_agents: int = 4  # B_rel: agents of the next chunk scored for relevance

    def __post_init__(self):
        if self.estimator not in ("rloo", "best_of_k", "reference"):
            raise ValueError(f"estimator must be rloo, best_of_k or reference, got {self.estimator!r}")
        if self.estimator == "rloo" and self.k < 2:
            raise ValueError("the RLOO estimator needs k >= 2 samples per slot (a leave-one-out baseline)")
        if self.k < 1 or self.rel_agents < 1 or self.temperature <= 0:
            raise ValueError("k and rel_agents must be >= 1 and temperature > 0")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MeanFieldCarryState:
    """Per slot: the mean field the next chunk's X reads (cleaned, as the simulator threads it), and for the
    reference's one-chunk lag the previous chunk's X prefix and the raw m written from it."""

    m: jax.Array  # [E, Lm]
    m_len: jax.Array  # [E]
    prev_x: jax.Array  # [E, Lx]
    prev_x_len: jax.Array  # [E] (prefix length: X less its tail)
    prev_m: jax.Array  # [E, M] raw tokens
    prev_m_len: jax.Array  # [E]
    prev_valid: jax.Array  # [E] bool


class MeanFieldStep:
    """One micro-step of stage 1 for E slots (see the module docstring).

    Call with (state, carry, weights, chunk, next_chunk, reset, has_next, chunk_index) → (state, carry, metrics);
    ``state`` and ``carry`` are donated. ``chunk`` holds the E chunks (E worlds × B agents), ``next_chunk`` the first
    B_rel agents of each slot's next chunk; ``reset`` [E] starts a slot's event (empty m), ``has_next`` [E] marks
    slots whose event has a next chunk (the others advance m without a loss), ``chunk_index`` [E] the chunk t.
    """

    def __init__(self, cfg: ModelConfig, rollout: Rollout, tx, settings: MeanFieldSettings, prior: np.ndarray, *,
                 mf_lines: lines_lib.LineTables, remat: Optional[str] = "full", attn_impl: str = "xla", mesh=None):
        r = rollout.rcfg
        if not rollout.algorithm.uses_mean_field:
            raise ValueError("stage 1 trains the mean-field model: the rollout's algorithm must be 'mf'")
        self.cfg, self.rollout, self.tx, self.s, self.prior = cfg, rollout, tx, settings, np.asarray(prior, np.int32)
        self.mf_lines, self.remat, self.attn_impl = mf_lines, remat, attn_impl
        self.plan = None if mesh is None else sharding.MeshRules(mesh)
        self.M = r.mf_new_tokens
        self.eos = np.isin(np.arange(cfg.vocab_size), list(r.stop_ids))
        # k samples at pure temperature (no top-k / top-p / penalty, no minimum length): log q is their exact law.
        self.sample_gcfg = GenerateConfig(max_new_tokens=self.M, sampling=SamplingConfig(temperature=settings.temperature),
                                          stop_token_ids=r.stop_ids, pad_token_id=r.pad_id, attn_impl=attn_impl)
        # The continuation that becomes the slot's next m: the simulator's own mean-field settings.
        self.continue_gcfg = r.mean_field_generate
        self._jitted = jax.jit(self._step, donate_argnums=(0, 1))

    def initial_carry(self, E: int) -> MeanFieldCarryState:
        Lx = self.rollout.mf_prompt_width
        z = lambda *shape: jnp.zeros(shape, jnp.int32)
        return MeanFieldCarryState(m=z(E, self.rollout.mean_field_width), m_len=z(E), prev_x=z(E, Lx), prev_x_len=z(E),
                                   prev_m=z(E, self.M), prev_m_len=z(E), prev_valid=jnp.zeros((E,), bool))

    # ------------------------------------------------------------------------------ pieces
    def _keys(self, chunk: RolloutInputs, t: jax.Array, n: int, first: int = 0) -> jax.Array:
        """[E·n] keys: sample j = first … first+n−1 of slot e at chunk t."""
        world = jax.random.wrap_key_data(chunk.world_key)

        def slot(wk, tt):
            base = jax.random.fold_in(jax.random.fold_in(wk, SAMPLE_SALT), tt)
            return jax.vmap(lambda j: jax.random.fold_in(base, j))(jnp.arange(first, first + n))

        return jax.vmap(slot)(world, t).reshape(-1)

    def _clean(self, gen) -> tuple[jax.Array, jax.Array]:
        """SPEC's mean-field text (stripped, no line breaks) of generated rows, in token space."""
        length = B.text_length(gen.tokens, gen.lengths, gen.finished, jnp.asarray(self.eos))
        return lines_lib.clean(self.mf_lines, gen.tokens, length, self.rollout.rcfg.pad_id)

    def relevance(self, weights: Weights, nxt: RolloutInputs, m: jax.Array, m_len: jax.Array, k: int) -> jax.Array:
        """CE_π₀ [E, k] of the next chunk's real actions (per-agent token mean, averaged over its valid agents)
        given each of the k mean fields per slot (m [E·k, Lm] cleaned), with the simulator's policy prompt."""
        E = nxt.agent_valid.shape[0]
        rep = jax.tree.map(lambda a: jnp.repeat(a, k, axis=0), nxt)
        batch = B.policy_batch(self.rollout, rep, m, m_len)
        lp = losses.score_rows(weights, self.cfg, batch, attn_impl=self.attn_impl, plan=self.plan)
        valid = batch.valid & (batch.target_len > 0)
        ce = jnp.where(valid, losses.row_token_mean_ce(lp, batch.target_len), 0.0).reshape(E * k, -1)
        n = jnp.sum(valid.reshape(E * k, -1), axis=1)
        return (jnp.sum(ce, axis=1) / jnp.maximum(n, 1)).reshape(E, k)

    def log_prior(self, weights: Weights, tokens: jax.Array, lengths: jax.Array, groups: int,
                  temperature: float) -> jax.Array:
        """log r(m) [rows] summed over m's tokens at ``temperature`` (the untuned model after the prior prompt)."""
        batch = B.prior_batch(self.prior, tokens, lengths, groups)
        lp = losses.score_rows(losses.at_temperature(weights, self.cfg, temperature), self.cfg, batch,
                               attn_impl=self.attn_impl, plan=self.plan)
        return jnp.sum(lp, axis=1)

    # ------------------------------------------------------------------------------ the step
    def _step(self, state: TrainState, carry: MeanFieldCarryState, weights: Weights, chunk: RolloutInputs,
              nxt: RolloutInputs, reset, has_next, t):
        s, r, cfg = self.s, self.rollout.rcfg, self.cfg
        E = reset.shape[0]
        active = jnp.any(chunk.agent_valid, axis=1)
        m = jnp.where(reset[:, None], r.pad_id, carry.m)  # no mean field crosses an event boundary
        m_len = jnp.where(reset, 0, carry.m_len)
        x, x_len = B.mean_field_prompt(self.rollout, chunk, m, m_len)
        mu = jax.lax.stop_gradient(lora_lib.merge(weights, state.lora))  # sampling reads merged weights
        k = s.k if s.estimator != "reference" else 0
        prefix_tokens, prefix_len, tail1, tail1_len = B.split_tail(self.rollout, x, x_len, 1)
        prefix = prefill_prefix(mu, cfg, prefix_tokens, prefix_len, attn_impl=self.attn_impl, plan=self.plan)
        cont = generate_tokens(mu, cfg, self.continue_gcfg, tail1, tail1_len, self._keys(chunk, t, 1, first=s.k),
                               prefix, stop_mask=jnp.asarray(self.eos), plan=self.plan)
        new_m, new_m_len = self._clean(cont)
        loss_valid = has_next & active & jnp.any(nxt.agent_valid, axis=1)
        metrics = {}

        if s.estimator == "reference":
            previous = losses.ScoreBatch(prefix=carry.prev_x, prefix_len=carry.prev_x_len, prompt=tail1,
                                         prompt_len=tail1_len, target=carry.prev_m, target_len=carry.prev_m_len,
                                         valid=carry.prev_valid)
            prior = B.prior_batch(self.prior, carry.prev_m, carry.prev_m_len, E)
            (loss, aux), grads = jax.value_and_grad(losses.mf_reference_loss, has_aux=True)(
                state.lora, weights, cfg, previous, prior, beta=s.beta, remat=self.remat, attn_impl=self.attn_impl,
                plan=self.plan)
            rel = self.relevance(weights, nxt, new_m, new_m_len, 1)[:, 0]  # logged constant, as the reference
            metrics.update(rel_ce=jnp.sum(jnp.where(loss_valid, rel, 0.0)) / jnp.maximum(jnp.sum(loss_valid), 1))
            sample_len = cont.lengths
        else:
            def estimate(_):
                _, _, tails, tails_len = B.split_tail(self.rollout, x, x_len, k)
                samples = generate_tokens(mu, cfg, self.sample_gcfg, tails, tails_len, self._keys(chunk, t, k), prefix,
                                          stop_mask=jnp.asarray(self.eos), plan=self.plan)
                m_k, m_k_len = self._clean(samples)
                rel_ce = self.relevance(weights, nxt, m_k, m_k_len, k)
                logr = self.log_prior(weights, samples.tokens, samples.lengths, E, s.temperature).reshape(E, k)
                batch = losses.ScoreBatch(prefix=prefix_tokens, prefix_len=prefix_len, prompt=tails,
                                          prompt_len=tails_len, target=samples.tokens, target_len=samples.lengths,
                                          valid=jnp.repeat(loss_valid, k))
                (loss, aux), grads = jax.value_and_grad(losses.mf_rloo_loss, has_aux=True)(
                    state.lora, weights, cfg, batch, jax.lax.stop_gradient(rel_ce), jax.lax.stop_gradient(logr),
                    loss_valid, temperature=s.temperature, lam=s.lam, beta=s.beta, M=self.M, estimator=s.estimator,
                    remat=self.remat, attn_impl=self.attn_impl, plan=self.plan)
                return loss, aux, grads, samples.lengths

            def skip(_):
                # No slot has a next chunk (every event at its last chunk, or idle): its mean field is still written
                # (above), but there is nothing to score it on, so sampling and scoring are skipped.
                shapes = jax.eval_shape(estimate, None)
                return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

            loss, aux, grads, sample_len = jax.lax.cond(jnp.any(loss_valid), estimate, skip, None)
        state, opt = _apply(self.tx, state, grads)
        keep = active[:, None]
        carry = MeanFieldCarryState(
            m=jnp.where(keep, new_m, m), m_len=jnp.where(active, new_m_len, m_len),
            prev_x=x, prev_x_len=prefix_len, prev_m=cont.tokens, prev_m_len=jnp.where(active, cont.lengths, 0),
            prev_valid=active)
        n_active = jnp.maximum(jnp.sum(active), 1)
        metrics.update(loss=loss, **aux, **opt, loss_slots=jnp.sum(loss_valid),
                       sample_len=jnp.mean(sample_len.astype(jnp.float32)),
                       # what the differentiated forward reads: each X once, then the tail and sample of each row
                       tokens=jnp.sum(jnp.where(active, x_len, 0))
                       + jnp.sum(jnp.where(jnp.repeat(active, sample_len.shape[0] // E), sample_len, 0)),
                       m_len=jnp.sum(jnp.where(active, new_m_len, 0)) / n_active,
                       x_tokens=jnp.sum(jnp.where(active, x_len, 0)))
        return state, carry, metrics

    def __call__(self, state, carry, weights, chunk, nxt, reset, has_next, t):
        return self._jitted(state, carry, weights, chunk, nxt, reset, has_next, t)
