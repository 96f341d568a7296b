"""Teacher-forced scoring: log-probabilities of given continuations under given prompts, batched.

Used for the NLL of real actions under the policy (the paper's individual-level metric) and by IB-Tune.
A row's prompt may be split into a group prefix (shared, read once per group) and its own part, exactly
as in generation, so scoring sees the same prompt as sampling did.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mfjax.config import ModelConfig
from mfjax.engine.kvcache import Prefix, left_padded_positions, right_padded_positions
from mfjax.models import decoder


def score_tokens(params, cfg: ModelConfig, prompt: jax.Array, prompt_lens: jax.Array, target: jax.Array,
                 target_lens: jax.Array, prefix: Prefix | None = None, attn_impl: str = "xla") -> jax.Array:
    """Per-token log p(target | prompt) [B, Tt] (float32; 0 past each target's length).

    Args:
      prompt: [B, Tp] left-padded prompt tokens (after the group prefix, when one is given).
      prompt_lens: [B]; each must be >= 1 unless the row has a prefix to condition on.
      target: [B, Tt] right-padded continuation tokens; target_lens [B].
      prefix: optional grouped prefix shared by B / E consecutive rows.
    """
    B, Tp = prompt.shape
    Tt = target.shape[1]
    if prefix is None:
        offset = jnp.zeros((B,), jnp.int32)
    else:
        offset = jnp.repeat(prefix.lengths, B // prefix.tokens.shape[0])
    prompt_pos = left_padded_positions(prompt_lens.astype(jnp.int32), Tp, offset)
    target_valid = jnp.arange(Tt, dtype=jnp.int32)[None, :] < target_lens[:, None]
    tokens = jnp.concatenate([prompt, target], axis=1)
    positions = jnp.concatenate([prompt_pos, right_padded_positions(target_lens, Tt, offset + prompt_lens)], axis=1)
    if prefix is not None and Tp == 0:
        raise ValueError("scoring with an empty per-row prompt needs the prefix's last hidden state")
    hidden, _ = decoder.forward(params, cfg, tokens, positions, prefix=None if prefix is None else prefix.cache,
                                attn_impl=attn_impl)
    # Hidden state at slot j predicts the token at slot j + 1: the last prompt slot predicts target 0.
    return target_logprobs(params, cfg, hidden[:, Tp - 1:Tp - 1 + Tt], target, target_valid)


def target_logprobs(params, cfg: ModelConfig, hidden: jax.Array, targets: jax.Array, valid: jax.Array) -> jax.Array:
    """log p(targets) [B, Tt] from the hidden states [B, Tt, D] that predict them; 0 where not ``valid``."""
    logprobs = jax.nn.log_softmax(decoder.logits(params, cfg, hidden), axis=-1)
    picked = jnp.take_along_axis(logprobs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.where(valid, picked, 0.0)


score_tokens_jit = jax.jit(score_tokens, static_argnames=("cfg", "attn_impl"))


def sequence_nll(logprobs: jax.Array, target_lens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed NLL [B], mean per-token NLL [B]) from :func:`score_tokens` output."""
    total = -jnp.sum(logprobs, axis=-1)
    return total, total / jnp.maximum(target_lens, 1)
