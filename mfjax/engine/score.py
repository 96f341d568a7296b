"""Teacher-forced scoring: log-probabilities of given continuations under given prompts, batched.

Used for the NLL of real actions under the policy (the paper's individual-level metric) and by IB-Tune.
A row's prompt may be split into a group prefix (shared, read once per group) and its own part, exactly
as in generation, so scoring sees the same prompt as sampling did.

Target log-probabilities are ``logit[target] − logsumexp(logits)`` computed in chunks of the target length
(blockwise cross-entropy): the float32 ``[rows, Tt, V]`` log-softmax is never materialised. Under ``jax.grad``
a chunk's backward needs only ∂log p/∂h, which the forward computes while it holds the chunk's logits
(``(onehot − softmax)·W``, one matmul the backward would do anyway) and keeps as a [rows, chunk, D] residual:
the logits are neither stored nor recomputed. (The head weight's own gradient, wanted only when the head is
trained, recomputes them.)
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from mfjax.config import ModelConfig
from mfjax.models import decoder
from mfjax.models.kvcache import Prefix, left_padded_positions, right_padded_positions
from mfjax.models.lora import LoraWeights
from mfjax.models.weights import Weights

# Logits held at once by the blockwise cross-entropy (float32 elements): 2**25 = 128 MiB.
MAX_LOGITS = 2**25


def score_tokens(weights: Weights, cfg: ModelConfig, prompt: jax.Array, prompt_lens: jax.Array, target: jax.Array,
                 target_lens: jax.Array, prefix: Optional[Prefix] = None, attn_impl: str = "xla",
                 lora: Optional[LoraWeights] = None, remat: Optional[str] = None, plan=None) -> jax.Array:
    """Per-token log p(target | prompt) [B, Tt] (float32; 0 past each target's length).

    Args:
      prompt: [B, Tp] left-padded prompt tokens (after the group prefix, when one is given); Tp >= 1.
      prompt_lens: [B]; each must be >= 1 unless the row has a prefix to condition on.
      target: [B, Tt] right-padded continuation tokens; target_lens [B].
      prefix: optional grouped prefix shared by B / E consecutive rows.
      lora, remat: the LoRA side path and rematerialisation (training).
    """
    B, Tp = prompt.shape
    Tt = target.shape[1]
    if Tp == 0:
        raise ValueError("scoring needs at least one prompt slot per row (the one that predicts target 0)")
    offset = jnp.zeros((B,), jnp.int32) if prefix is None else jnp.repeat(prefix.lengths, B // prefix.groups)
    prompt_pos = left_padded_positions(prompt_lens.astype(jnp.int32), Tp, offset)
    target_valid = jnp.arange(Tt, dtype=jnp.int32)[None, :] < target_lens[:, None]
    tokens = jnp.concatenate([prompt, target.astype(prompt.dtype)], axis=1)
    positions = jnp.concatenate([prompt_pos, right_padded_positions(target_lens, Tt, offset + prompt_lens)], axis=1)
    hidden, _ = decoder.forward(weights, cfg, tokens, positions, prefix=prefix, attn_impl=attn_impl, lora=lora,
                                remat=remat, plan=plan)
    # Hidden state at slot j predicts the token at slot j + 1: the last prompt slot predicts target 0.
    return target_logprobs(weights, cfg, hidden[:, Tp - 1:Tp - 1 + Tt], target, target_valid)


def target_logprobs(weights, cfg: ModelConfig, hidden: jax.Array, targets: jax.Array, valid: jax.Array, *,
                    max_logits: int = MAX_LOGITS) -> jax.Array:
    """log p(targets) [B, Tt] from the hidden states [B, Tt, D] that predict them; 0 where not ``valid``.

    Chunks of the target length are scored one after another, each holding at most ``max_logits`` logits.
    """
    B, T, D = hidden.shape
    if T == 0:
        return jnp.zeros((B, 0), jnp.float32)
    # As few chunks as the budget allows, of equal size: a budget of 170 rows for T = 255 makes 2 chunks of
    # 128 (1 padded row), not 170 + 170 (85 padded rows of logits computed for nothing).
    n = -(-T // max(1, min(T, max_logits // max(1, B * cfg.vocab_size))))
    chunk = -(-T // n)
    pad = n * chunk - T
    hs = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk, D).swapaxes(0, 1)
    ts = jnp.pad(targets.astype(jnp.int32), ((0, 0), (0, pad))).reshape(B, n, chunk).swapaxes(0, 1)

    head = weights.embed if cfg.tie_word_embeddings else weights.lm_head
    one = lambda args: _chunk_logprobs(cfg, head, *args)
    out = jax.lax.map(one, (hs, ts)).swapaxes(0, 1).reshape(B, n * chunk)[:, :T]
    return jnp.where(valid, out, 0.0)


def _head_logits(cfg: ModelConfig, head: jax.Array, hidden: jax.Array) -> jax.Array:
    """:func:`decoder.logits` given the head matrix alone (the tied embedding [V, D] or lm_head [D, V])."""
    if cfg.tie_word_embeddings:
        return decoder.logits(Weights(embed=head, layers=None, final_norm=None), cfg, hidden)
    return decoder.logits(Weights(embed=None, layers=None, final_norm=None, lm_head=head), cfg, hidden)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunk_logprobs(cfg: ModelConfig, head: jax.Array, hidden: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets) [B, c] from hidden states [B, c, D] (one chunk of :func:`target_logprobs`)."""
    lg = _head_logits(cfg, head, hidden)
    return jnp.take_along_axis(lg, targets[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(lg, axis=-1)


def _logprobs_and_grad(lg: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log p(target) and its gradient onehot(target) − softmax(logits), from one pass of exp over the logits."""
    row_max = jax.lax.stop_gradient(jnp.max(lg, axis=-1, keepdims=True))
    e = jnp.exp(lg - row_max)
    total = jnp.sum(e, axis=-1, keepdims=True)
    picked = jnp.take_along_axis(lg, targets[..., None], axis=-1)
    out = (picked - row_max - jnp.log(total))[..., 0]
    grad = jax.nn.one_hot(targets, lg.shape[-1], dtype=lg.dtype) - e / total
    return out, grad


def _chunk_logprobs_fwd(cfg, head, hidden, targets):
    lg, pull = jax.vjp(lambda h: _head_logits(cfg, head, h), hidden)
    out, dlogits = _logprobs_and_grad(lg, targets)
    (dhidden_unit,) = pull(dlogits)
    return out, (head, hidden, targets, dhidden_unit)


def _chunk_logprobs_bwd(cfg, residuals, ct):
    head, hidden, targets, dhidden_unit = residuals
    dhidden = (ct[..., None] * dhidden_unit).astype(hidden.dtype)
    # Only a trained head uses this; XLA drops it as dead code otherwise (LoRA training).
    lg, pull = jax.vjp(lambda w: _head_logits(cfg, w, hidden), head)
    (dhead,) = pull(ct[..., None].astype(lg.dtype) * _logprobs_and_grad(lg, targets)[1])
    return dhead, dhidden, None


_chunk_logprobs.defvjp(_chunk_logprobs_fwd, _chunk_logprobs_bwd)

score_tokens_jit = jax.jit(score_tokens, static_argnames=("cfg", "attn_impl", "remat", "plan"))
