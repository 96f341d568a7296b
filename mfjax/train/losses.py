"""IB-Tune losses (SPEC §3, IBTUNE.md §5): SFT of the policy, and the mean-field model's IB objective.

Every log-probability comes from :func:`mfjax.engine.score.score_tokens` (blockwise cross-entropy, logits
recomputed under grad). A grouped prefix (the part of a prompt that many rows share) is prefilled *with*
the LoRA inside the differentiated forward, and the rows attend to it (cascade attention), so the shared
tokens cost one forward, not one per row.

Shape letters: E slots (event chunks), k samples per slot, R rows per slot, Tp / Tt prompt / target length.

* :func:`sft_loss` — stage 2 and the state-SFT baseline: per-row token-mean CE of the real action.
* :func:`mf_rloo_loss` — stage 1: the score-function estimator with a leave-one-out baseline.
  :func:`ib_rewards`, :func:`rloo_advantages` and :func:`rloo_objective` are its maths, shared with the
  unbiasedness test.
* :func:`mf_best_of_k_loss` — stage 1, biased and cheap: SFT on the sample of lowest cost.
* :func:`mf_reference_loss` — the reference code's compression-only loss, for reproduction.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from mfjax.config import ModelConfig
from mfjax.engine.score import score_tokens
from mfjax.models import decoder
from mfjax.models.kvcache import Prefix, right_padded_positions
from mfjax.models.lora import LoraWeights
from mfjax.models.weights import Weights


# ------------------------------------------------------------------------------------------ batches
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ScoreBatch:
    """Rows that continue a grouped prefix: prefix [E, P] right-padded; R = rows / E rows per prefix, each
    with its own left-padded prompt part [E·R, Ts] and a right-padded target [E·R, Tt] to score."""

    prefix: jax.Array
    prefix_len: jax.Array  # [E]
    prompt: jax.Array
    prompt_len: jax.Array  # [E·R]
    target: jax.Array
    target_len: jax.Array  # [E·R]
    valid: jax.Array  # [E·R] bool: the row counts


def prefill_prefix(weights: Weights, cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array, *,
                   lora: Optional[LoraWeights] = None, remat: Optional[str] = None, attn_impl: str = "xla",
                   plan=None) -> Prefix:
    """A grouped prefix [E, P] (right-padded) prefilled with the LoRA side path, differentiable.

    :func:`mfjax.engine.generate.prefill_prefix` is the sampling twin (no LoRA: sampling reads merged
    weights); under ``jax.grad`` the prefix keys and values carry the LoRA's gradient from every row."""
    _, kv = decoder.forward(weights, cfg, tokens, right_padded_positions(lengths, tokens.shape[1]), lora=lora,
                            remat=remat, attn_impl=attn_impl, keep_kv=True, plan=plan)
    return Prefix(kv=kv, tokens=tokens.astype(jnp.int32), lengths=lengths.astype(jnp.int32))


def score_rows(weights: Weights, cfg: ModelConfig, batch: ScoreBatch, *, lora: Optional[LoraWeights] = None,
               remat: Optional[str] = None, attn_impl: str = "xla", plan=None) -> jax.Array:
    """log p(target | prefix + prompt) per token [E·R, Tt] (0 past each target's length)."""
    prefix = prefill_prefix(weights, cfg, batch.prefix, batch.prefix_len, lora=lora, remat=remat,
                            attn_impl=attn_impl, plan=plan)
    return score_tokens(weights, cfg, batch.prompt, batch.prompt_len, batch.target, batch.target_len, prefix=prefix,
                        attn_impl=attn_impl, lora=lora, remat=remat, plan=plan)


def at_temperature(weights: Weights, cfg: ModelConfig, temperature: float) -> Weights:
    """Weights whose logits are the model's logits / ``temperature``.

    Logits are linear in the final-normed hidden state, and the final norm's weight scales that state per
    feature, so dividing that weight by T divides every logit by T (no change elsewhere: the final norm is
    read only before the head). Soft-capped logits are not linear in the hidden state: refused."""
    if temperature == 1.0:
        return weights
    if cfg.final_logit_softcap is not None:
        raise ValueError(f"{cfg.model_type}: scoring at temperature {temperature} needs uncapped logits "
                         f"(final_logit_softcap={cfg.final_logit_softcap})")
    w = weights.final_norm.astype(jnp.float32)
    scaled = (1.0 + w) / temperature - 1.0 if cfg.norm_plus_one else w / temperature
    return dataclasses.replace(weights, final_norm=scaled.astype(weights.final_norm.dtype))


def row_token_mean_ce(logprobs: jax.Array, lengths: jax.Array) -> jax.Array:
    """Per-row mean negative log-likelihood over its target tokens [rows] (0 for an empty target)."""
    return -jnp.sum(logprobs, axis=1) / jnp.maximum(lengths, 1).astype(jnp.float32)


# ------------------------------------------------------------------------------------------ stage 2
def sft_loss(lora: Optional[LoraWeights], weights: Weights, cfg: ModelConfig, batch: ScoreBatch, *,
             remat: Optional[str] = "full", attn_impl: str = "xla", plan=None) -> tuple[jax.Array, dict]:
    """SFT of the real action: Σ over valid rows of its token-mean CE ÷ the nominal row count.

    Dividing by the nominal count (rows in the batch, valid or not) makes padding weigh nothing and every
    sample weigh the same across micro-steps of an accumulated optimizer step (a short last chunk does not
    up-weight its agents). Stage 2's IB loss CE_πφ(a|s,m) − CE_π₀(a|s) has this gradient: the second term
    does not depend on φ.

    Returns (loss, aux) with aux: ``ce_sum`` (Σ token-mean CE over valid rows), ``nll_sum`` and ``target_tokens``
    (summed NLL and scored tokens over valid rows), ``rows`` (valid rows), ``tokens`` (every real token the
    differentiated forward reads: the prefixes, then the valid rows' prompts and targets).
    """
    logprobs = score_rows(weights, cfg, batch, lora=lora, remat=remat, attn_impl=attn_impl, plan=plan)
    valid = batch.valid & (batch.target_len > 0)
    ce = jnp.where(valid, row_token_mean_ce(logprobs, batch.target_len), 0.0)
    loss = jnp.sum(ce) / valid.shape[0]
    aux = dict(ce_sum=jnp.sum(ce), nll_sum=-jnp.sum(jnp.where(valid[:, None], logprobs, 0.0)),
               target_tokens=jnp.sum(jnp.where(valid, batch.target_len, 0)), rows=jnp.sum(valid),
               tokens=jnp.sum(batch.prefix_len) + jnp.sum(jnp.where(valid, batch.prompt_len + batch.target_len, 0)))
    return loss, aux


# ------------------------------------------------------------------------------------------ stage 1
def ib_rewards(rel_ce: jax.Array, logq: jax.Array, logr: jax.Array, *, lam: float = 2.0, beta: float = 1.0,
               M: int) -> jax.Array:
    """The per-sample IB cost f [E, k] (lower is better):

        f = λ·CE_π₀(a_{t+1} | s_{t+1}, m) + β·(log q_θ(m|X) − log r(m)) / M

    the relevance (how well m predicts the next chunk's real actions) plus a one-sample estimate of the
    compression KL(q_θ(·|X) ‖ r) per token budget. M is a constant (the token budget), not each sample's
    length: a per-sample length would make the estimator's second term depend on the sample."""
    return lam * rel_ce + beta * (logq - logr) / M


def rloo_advantages(f: jax.Array) -> jax.Array:
    """Leave-one-out advantages A [E, k]: A_j = f_j − mean_{i≠j} f_i (= k/(k−1)·(f_j − mean f)); zeros when
    k < 2 (no baseline can be formed without the sample itself)."""
    k = f.shape[-1]
    if k < 2:
        return jnp.zeros_like(f)
    return (f - jnp.mean(f, axis=-1, keepdims=True)) * (k / (k - 1))


def rloo_objective(logq: jax.Array, rel_ce: jax.Array, logr: jax.Array, valid: jax.Array, *, lam: float,
                   beta: float, M: int) -> tuple[jax.Array, dict]:
    """The score-function surrogate L = 1/(E·k·M) · Σ sg(A_ej) · log q_θ(m_ej | X_e) over valid slots.

    Its gradient is an unbiased estimate of ∇J / M for J = E_q[f]: ∇J = E_q[f·∇log q] + (β/M)·E_q[∇log q],
    the second term is zero, and a baseline that does not depend on the sample (the others' mean) keeps
    the first unbiased. ``logq`` [E, k] is summed over each sample's tokens at the sampling temperature and
    differentiable; ``rel_ce``, ``logr`` [E, k] are constants; ``valid`` [E] masks slots without a loss
    (an event's last chunk, idle slots)."""
    E, k = logq.shape
    f = ib_rewards(rel_ce, jax.lax.stop_gradient(logq), logr, lam=lam, beta=beta, M=M)
    adv = jax.lax.stop_gradient(rloo_advantages(f))
    mask = valid[:, None].astype(jnp.float32)
    loss = jnp.sum(adv * logq * mask) / (E * k * M)
    n = jnp.maximum(jnp.sum(mask) * k, 1.0)
    aux = dict(f_mean=jnp.sum(f * mask) / n, adv_abs=jnp.sum(jnp.abs(adv) * mask) / n,
               rel_ce=jnp.sum(rel_ce * mask) / n, kl_tok=jnp.sum((jax.lax.stop_gradient(logq) - logr) * mask) / (n * M),
               slots=jnp.sum(mask))
    return loss, aux


def best_of_k_objective(logq: jax.Array, rel_ce: jax.Array, logr: jax.Array, valid: jax.Array, *, lam: float,
                        beta: float, M: int) -> tuple[jax.Array, dict]:
    """SFT on each slot's sample of lowest cost f: −1/(E·M)·Σ log q_θ(m_best | X). Biased (it climbs toward
    the best of k, not the expected cost) but needs no baseline."""
    E, k = logq.shape
    f = ib_rewards(rel_ce, jax.lax.stop_gradient(logq), logr, lam=lam, beta=beta, M=M)
    best = jax.nn.one_hot(jnp.argmin(f, axis=-1), k, dtype=jnp.float32)
    mask = valid[:, None].astype(jnp.float32)
    loss = -jnp.sum(best * logq * mask) / (E * M)
    n = jnp.maximum(jnp.sum(mask) * k, 1.0)
    aux = dict(f_mean=jnp.sum(f * mask) / n, f_best=jnp.sum(jnp.min(f, axis=-1) * valid) / jnp.maximum(jnp.sum(valid), 1),
               rel_ce=jnp.sum(rel_ce * mask) / n, kl_tok=jnp.sum((jax.lax.stop_gradient(logq) - logr) * mask) / (n * M),
               slots=jnp.sum(mask))
    return loss, aux


OBJECTIVES = {"rloo": rloo_objective, "best_of_k": best_of_k_objective}


def mf_logq(lora: Optional[LoraWeights], weights: Weights, cfg: ModelConfig, samples: ScoreBatch, *,
            temperature: float, remat: Optional[str] = "full", attn_impl: str = "xla", plan=None) -> jax.Array:
    """log q_θ(m | X) [E·k] summed over each sample's tokens at the sampling temperature.

    ``samples.prefix`` is X without its tail (prefilled once per slot, with LoRA, inside the differentiated
    forward); each of the k rows of a slot has the tail as its prompt and one sampled m as its target, so
    the forward costs E·|X| + E·k·(|tail| + M) tokens rather than E·k·(|X| + M)."""
    prefix = prefill_prefix(weights, cfg, samples.prefix, samples.prefix_len, lora=lora, remat=remat,
                            attn_impl=attn_impl, plan=plan)
    logprobs = score_tokens(at_temperature(weights, cfg, temperature), cfg, samples.prompt, samples.prompt_len,
                            samples.target, samples.target_len, prefix=prefix, attn_impl=attn_impl, lora=lora,
                            remat=remat, plan=plan)
    return jnp.sum(logprobs, axis=1)


def mf_rloo_loss(lora: LoraWeights, weights: Weights, cfg: ModelConfig, samples: ScoreBatch, rel_ce: jax.Array,
                 logr: jax.Array, valid: jax.Array, *, temperature: float, lam: float = 2.0, beta: float = 1.0,
                 M: int, estimator: str = "rloo", remat: Optional[str] = "full", attn_impl: str = "xla",
                 plan=None) -> tuple[jax.Array, dict]:
    """Stage 1's loss for E slots × k sampled mean fields (see :func:`rloo_objective`).

    Args:
      samples: X's prefix per slot and k rows (tail → sampled m) per slot, sampled at ``temperature``.
      rel_ce: [E, k] CE_π₀ of the next chunk's real actions given each m (no gradient).
      logr: [E, k] log r(m) under the prior at ``temperature`` (no gradient).
      valid: [E] slots that have a next chunk.
      estimator: 'rloo' (unbiased) or 'best_of_k'.
    """
    E = valid.shape[0]
    logq = mf_logq(lora, weights, cfg, samples, temperature=temperature, remat=remat, attn_impl=attn_impl,
                   plan=plan).reshape(E, -1)
    loss, aux = OBJECTIVES[estimator](logq, rel_ce, logr, valid, lam=lam, beta=beta, M=M)
    aux["logq_tok"] = jnp.sum(jax.lax.stop_gradient(logq) * valid[:, None]) / (
        jnp.maximum(jnp.sum(valid), 1) * logq.shape[1] * M)
    return loss, aux


def mean_token_logprob(logprobs: jax.Array, lengths: jax.Array) -> jax.Array:
    """ℓ = Σ log p / n per row (the reference's per-token mean; 0 for an empty row)."""
    return jnp.sum(logprobs, axis=1) / jnp.maximum(lengths, 1).astype(jnp.float32)


def mf_reference_loss(lora: LoraWeights, weights: Weights, cfg: ModelConfig, previous: ScoreBatch,
                      prior: ScoreBatch, *, beta: float = 1.0, remat: Optional[str] = "full", attn_impl: str = "xla",
                      plan=None) -> tuple[jax.Array, dict]:
    """The reference code's stage-1 loss, one chunk late: ℓ_q(m_{t−1} | X_{t−1}) − β·ℓ_r(m_{t−1}), averaged over
    valid slots (ℓ: the per-token mean log-prob; the reference's off-by-one in m's log-probs is fixed).

    ``previous``: the previous chunk's X (prefix) and the m written from it (one row per slot, target = m);
    ``prior``: the prior prompt → the same m. Only ℓ_q reaches θ: the loss lowers the likelihood of μ's own
    past samples (what the reference trains; its relevance term is a constant there, logged by the caller).
    """
    valid = previous.valid & (previous.target_len > 0)
    lq = mean_token_logprob(score_rows(weights, cfg, previous, lora=lora, remat=remat, attn_impl=attn_impl,
                                       plan=plan), previous.target_len)
    lr = jax.lax.stop_gradient(mean_token_logprob(score_rows(weights, cfg, prior, attn_impl=attn_impl, plan=plan),
                                                  prior.target_len))
    n = jnp.maximum(jnp.sum(valid), 1)
    loss = jnp.sum(jnp.where(valid, lq - beta * lr, 0.0)) / n
    aux = dict(lq=jnp.sum(jnp.where(valid, lq, 0.0)) / n, lr=jnp.sum(jnp.where(valid, lr, 0.0)) / n,
               slots=jnp.sum(valid))
    return loss, aux
