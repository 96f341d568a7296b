"""Token-level batched generation: shared-prefix prefill, per-row prefill, and a decode loop inside jit.

Layout of one generation call (B rows in E groups of R = B / E rows; each group shares a prefix):

* the **prefix** of each group, right-padded to P, is prefilled once (:func:`prefill_prefix`): its keys and
  values [L, E, P, K, H] are read by the R rows of the group, never copied per row (cascade attention);
* each row's own **suffix**, left-padded to Ts, is prefilled against its group's prefix, its positions
  continuing from the prefix's length, so the row sees exactly the concatenated prompt. Optional
  **targets** (continuations to score) ride the same prefill after the suffix and are scored blockwise;
* the **decode cache** is built from the suffix's keys and values only (scored targets never become
  decode slots) plus room for M new tokens; the **decode loop** (``lax.while_loop``, early stop when every
  row has stopped) runs the layers unrolled over a per-layer view of the weights taken once, writes token
  t at slot Ts + t, and samples with per-row keys ``fold_in(row_key, t)``: M - 1 decode forwards for M
  tokens (the prefill's last position predicts the first).

All functions are pure and traceable, so the simulator calls them inside its own ``lax.scan``. Every
entry point takes the one stored layout, :class:`~mfjax.models.weights.Weights` (layers stacked).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from mfjax.config import ModelConfig
from mfjax.engine.sampling import SamplingConfig, sample_tokens
from mfjax.engine.score import target_logprobs
from mfjax.models import decoder
from mfjax.models.kvcache import DecodeCache, Prefix, left_padded_positions, right_padded_positions
from mfjax.models.weights import Weights


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """Static settings of one generation call (hashable: a jit static argument)."""

    max_new_tokens: int = 50
    min_new_tokens: int = 0
    sampling: SamplingConfig = SamplingConfig(temperature=None)
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    attn_impl: str = "xla"
    early_stop: bool = True  # leave the loop once every row has emitted a stop token

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LineStop:
    """Stop a row when its first line ends: at a line break that follows visible text (breaks and other
    whitespace before the first visible character do not stop it). Tables are [V] bool."""

    whitespace: jax.Array  # the token's text is all whitespace
    has_break: jax.Array  # it holds a line break
    visible_break: jax.Array  # it holds a break after a visible character of its own

    def ends(self, token: jax.Array, started: jax.Array) -> jax.Array:
        """Whether ``token`` [B] ends the line, given whether visible text came before it [B]."""
        return jnp.where(started, self.has_break[token], self.visible_break[token])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Generated:
    """Generated tokens [B, M] (pad after the stop token, which is kept) and counts [B]."""

    tokens: jax.Array
    lengths: jax.Array
    finished: jax.Array  # [B] bool: a stop token was emitted
    target_logprobs: Optional[jax.Array] = None  # [B, Tt] when targets were scored in the same prefill


def prefill_prefix(weights: Weights, cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array, *,
                   attn_impl: str = "xla", plan=None) -> Prefix:
    """Prefills right-padded prefixes tokens [E, P] (``lengths`` [E]) once, for their groups' rows."""
    P = tokens.shape[1]
    _, kv = decoder.forward(weights, cfg, tokens, right_padded_positions(lengths, P), attn_impl=attn_impl,
                            keep_kv=True, plan=plan)
    return Prefix(kv=kv, tokens=tokens.astype(jnp.int32), lengths=lengths.astype(jnp.int32))


def _history(prefix: Optional[Prefix], rows_per_group: int, suffix: jax.Array, suffix_lens: jax.Array,
             max_new: int):
    """Token history [B, P + Ts + M] and its validity, for the repetition penalty (HF penalises every
    prompt and generated token; padding is not part of the prompt here)."""
    B, Ts = suffix.shape
    pad_start = Ts - suffix_lens[:, None]
    parts = [suffix]
    valid = [jnp.arange(Ts)[None, :] >= pad_start]
    if prefix is not None:
        P = prefix.tokens.shape[1]
        parts.insert(0, jnp.repeat(prefix.tokens, rows_per_group, axis=0))
        valid.insert(0, jnp.repeat(jnp.arange(P)[None, :] < prefix.lengths[:, None], rows_per_group, axis=0))
    parts.append(jnp.zeros((B, max_new), jnp.int32))
    valid.append(jnp.zeros((B, max_new), bool))
    return jnp.concatenate(parts, axis=1).astype(jnp.int32), jnp.concatenate(valid, axis=1)


def generate_tokens(weights: Weights, cfg: ModelConfig, gcfg: GenerateConfig, suffix: jax.Array,
                    suffix_lens: jax.Array, keys: jax.Array, prefix: Optional[Prefix] = None,
                    stop_mask: Optional[jax.Array] = None, targets: Optional[jax.Array] = None,
                    target_lens: Optional[jax.Array] = None, line_stop: Optional[LineStop] = None,
                    plan=None) -> Generated:
    """Generates up to ``gcfg.max_new_tokens`` tokens for each of B rows.

    Args:
      weights: the model's weights (layers stacked; decode takes a per-layer view inside).
      suffix: [B, Ts] left-padded prompt tokens of each row (the whole prompt when ``prefix`` is None).
      suffix_lens: [B] real lengths.
      keys: [B] per-row PRNG keys (typed); token t of row b is drawn with ``fold_in(keys[b], t)``.
      prefix: optional group prefix (see :func:`prefill_prefix`); row b belongs to group b // (B / E).
      stop_mask: optional [V] bool table of stop tokens, used instead of ``gcfg.stop_token_ids``.
      targets, target_lens: optional [B, Tt] right-padded continuations to score in the same prefill
        (teacher forced after the prompt); their log-probabilities come back in ``target_logprobs``.
        They are not decode slots: generation continues from the prompt alone.
      line_stop: optional: also stop a row where its first line ends (the token that ends it is kept).
      plan: optional :class:`~mfjax.sharding.MeshRules` pinning activations and caches.
    """
    B, Ts = suffix.shape
    M = gcfg.max_new_tokens
    suffix_lens = suffix_lens.astype(jnp.int32)
    if prefix is not None:
        E = prefix.groups
        if B % E:
            raise ValueError(f"{B} rows do not split into {E} prefix groups")
        R = B // E
        offset = jnp.repeat(prefix.lengths, R)
        hist_offset = prefix.tokens.shape[1]
    else:
        R, offset, hist_offset = 1, jnp.zeros((B,), jnp.int32), 0

    tokens, positions = suffix, left_padded_positions(suffix_lens, Ts, offset)
    Tt = 0
    if targets is not None:
        Tt = targets.shape[1]
        target_valid = jnp.arange(Tt)[None, :] < target_lens[:, None]
        tokens = jnp.concatenate([suffix, targets.astype(suffix.dtype)], axis=1)
        positions = jnp.concatenate([positions, right_padded_positions(target_lens, Tt, offset + suffix_lens)], axis=1)
    hidden, kv = decoder.forward(weights, cfg, tokens, positions, prefix=prefix, attn_impl=gcfg.attn_impl,
                                 keep_kv=True, plan=plan)
    first_logits = decoder.logits(weights, cfg, hidden[:, Ts - 1])
    scored = None
    if targets is not None:
        scored = target_logprobs(weights, cfg, hidden[:, Ts - 1:Ts - 1 + Tt], targets, target_valid)
    cache = DecodeCache.from_prefill(kv, keep=Ts, room=M)  # the prompt's slots only, then M empty ones
    view = decoder.decode_view(weights)  # per-layer weights, sliced once outside the loop
    prefix_view = None if prefix is None else prefix.per_layer()
    history, history_valid = _history(prefix, R, suffix, suffix_lens, M)
    next_pos = offset + suffix_lens
    if stop_mask is None:
        stop_mask = jnp.zeros((cfg.vocab_size,), bool)
        if gcfg.stop_token_ids:
            stop_mask = stop_mask.at[jnp.asarray(gcfg.stop_token_ids)].set(True)

    def pick(step, logits, done, out, history, history_valid, started):
        """Token ``step`` of every row from the logits that predict it, and the bookkeeping around it."""
        if gcfg.min_new_tokens:
            logits = jnp.where((step < gcfg.min_new_tokens) & stop_mask[None, : logits.shape[-1]], -jnp.inf, logits)
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
        token = sample_tokens(logits, step_keys, gcfg.sampling, history, history_valid)
        token = jnp.where(done, gcfg.pad_token_id, token)
        out = out.at[:, step].set(token)
        history = history.at[:, hist_offset + Ts + step].set(token)
        history_valid = history_valid.at[:, hist_offset + Ts + step].set(~done)
        stop = stop_mask[token]
        if line_stop is not None:
            stop |= line_stop.ends(token, started)
            started |= ~line_stop.whitespace[token]
        return token, done | stop, out, history, history_valid, started

    def cond(carry):
        step, _, _, done, *_ = carry
        keep_going = step < M
        if gcfg.early_stop:
            keep_going &= ~jnp.all(done)
        return keep_going

    def body(carry):
        # Token step - 1 is fed in and token step drawn: M - 1 decode forwards for M tokens (the prefill
        # predicted the first one), none after the last.
        step, token, cache, done, out, history, history_valid, started = carry
        hidden, cache = decoder.decode_step(view, cfg, token[:, None], (next_pos + step - 1)[:, None], cache,
                                            Ts + step - 1, prefix=prefix_view, attn_impl=gcfg.attn_impl, plan=plan)
        logits = decoder.logits(view, cfg, hidden[:, 0])
        token, done, out, history, history_valid, started = pick(step, logits, done, out, history, history_valid,
                                                                 started)
        return step + 1, token, cache, done, out, history, history_valid, started

    out = jnp.full((B, M), gcfg.pad_token_id, jnp.int32)
    first = pick(0, first_logits, jnp.zeros((B,), bool), out, history, history_valid, jnp.zeros((B,), bool))
    token, done, out, history, history_valid, started = first
    carry = (jnp.int32(1), token, cache, done, out, history, history_valid, started)
    _, _, _, done, out, _, history_valid, _ = jax.lax.while_loop(cond, body, carry)
    lengths = jnp.sum(history_valid[:, hist_offset + Ts:], axis=1).astype(jnp.int32)
    return Generated(tokens=out, lengths=lengths, finished=done, target_logprobs=scored)


prefill_prefix_jit = jax.jit(prefill_prefix, static_argnames=("cfg", "attn_impl", "plan"))
generate_tokens_jit = jax.jit(generate_tokens, static_argnames=("cfg", "gcfg", "plan"))
