"""Token-level batched generation: shared-prefix prefill, per-row prefill, and a decode loop inside jit.

Layout of one generation call (B rows in E groups of R = B / E rows; each group shares a prefix):

* the **prefix** of each group, right-padded to a bucket P, is prefilled once into a grouped cache
  [E, P, K, H] — positions 0 … len-1, padding invalid;
* each row's own **suffix**, left-padded to a bucket Ts, is prefilled into the row's cache [B, Ts + M]
  (M = max_new_tokens) while attending to its group's prefix (cascade attention: the prefix keys are read
  once per group, never copied per row); its positions continue from its group's prefix length, so the
  row sees exactly the concatenated prompt;
* the **decode loop** (``lax.while_loop``, early stop when every row has stopped) writes token t at slot
  Ts + t of every row and samples with per-row keys ``fold_in(row_key, t)``.

All functions are pure and traceable, so the simulator can call them inside its own ``lax.scan``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mfjax.config import ModelConfig
from mfjax.engine.kvcache import (KVCache, Prefix, init_cache, left_padded_positions,  # noqa: F401
                                   right_padded_positions)
from mfjax.engine.score import target_logprobs
from mfjax.models.layers import INVALID_POS
from mfjax.engine.sampling import SamplingConfig, sample_tokens
from mfjax.models import decoder


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
    target_logprobs: jax.Array | None = None  # [B, Tt] when targets were scored in the same prefill


def prefill_prefix(params, cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array, *,
                   attn_impl: str = "xla", cache_dtype=None) -> Prefix:
    """Prefills right-padded prefixes tokens [E, P] (``lengths`` [E]) into a grouped cache."""
    E, P = tokens.shape
    cache = init_cache(cfg, E, P, dtype=cache_dtype or params["embed"].dtype,
                       stacked=not isinstance(params["layers"], (list, tuple)))
    _, cache = decoder.forward(params, cfg, tokens, right_padded_positions(lengths, P), cache=cache,
                               cache_index=0, attn_impl=attn_impl)
    return Prefix(cache=cache, tokens=tokens.astype(jnp.int32), lengths=lengths.astype(jnp.int32))


def _history(prefix: Prefix | None, rows_per_group: int, suffix: jax.Array, suffix_lens: jax.Array, max_new: int):
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


def generate_tokens(params, cfg: ModelConfig, gcfg: GenerateConfig, suffix: jax.Array, suffix_lens: jax.Array,
                    keys: jax.Array, prefix: Prefix | None = None, cache_dtype=None,
                    stop_mask: jax.Array | None = None, targets: jax.Array | None = None,
                    target_lens: jax.Array | None = None, line_stop: LineStop | None = None) -> Generated:
    """Generates up to ``gcfg.max_new_tokens`` tokens for each of B rows.

    Args:
      params: decoder parameters (unstacked layers are the fast layout for decode).
      suffix: [B, Ts] left-padded prompt tokens of each row (the whole prompt when ``prefix`` is None).
      suffix_lens: [B] real lengths.
      keys: [B] per-row PRNG keys (typed); token t of row b is drawn with ``fold_in(keys[b], t)``.
      prefix: optional group prefix (see :func:`prefill_prefix`); row b belongs to group b // (B / E).
      stop_mask: optional [V] bool table of stop tokens, used instead of ``gcfg.stop_token_ids`` when a
        stop set is large (e.g. every token that contains a newline).
      targets, target_lens: optional [B, Tt] right-padded continuations to score in the same prefill
        (teacher forced after the prompt); their log-probabilities come back in ``target_logprobs``
        and their cache slots are then hidden, so generation continues from the prompt alone.
      line_stop: optional: also stop a row where its first line ends (the token that ends it is kept).
    """
    B, Ts = suffix.shape
    M = gcfg.max_new_tokens
    suffix_lens = suffix_lens.astype(jnp.int32)
    if prefix is not None:
        E = prefix.tokens.shape[0]
        if B % E:
            raise ValueError(f"{B} rows do not split into {E} prefix groups")
        R = B // E
        offset = jnp.repeat(prefix.lengths, R)
        hist_offset = prefix.tokens.shape[1]
    else:
        R, offset, hist_offset = 1, jnp.zeros((B,), jnp.int32), 0
    prefix_cache = None if prefix is None else prefix.cache

    Tt = 0 if targets is None else targets.shape[1]
    cache = init_cache(cfg, B, Ts + Tt + M, dtype=cache_dtype or params["embed"].dtype,
                       stacked=not isinstance(params["layers"], (list, tuple)))
    tokens, positions = suffix, left_padded_positions(suffix_lens, Ts, offset)
    if targets is not None:
        target_valid = jnp.arange(Tt)[None, :] < target_lens[:, None]
        tokens = jnp.concatenate([suffix, targets.astype(suffix.dtype)], axis=1)
        positions = jnp.concatenate([positions, right_padded_positions(target_lens, Tt, offset + suffix_lens)], axis=1)
    hidden, cache = decoder.forward(params, cfg, tokens, positions, cache=cache, cache_index=0, prefix=prefix_cache,
                                    attn_impl=gcfg.attn_impl)
    first_logits = decoder.logits(params, cfg, hidden[:, Ts - 1])
    scored = None
    if targets is not None:
        scored = target_logprobs(params, cfg, hidden[:, Ts - 1:Ts - 1 + Tt], targets, target_valid)
        # The targets were read only to be scored: hide their slots from the continuation.
        cache = KVCache(k=cache.k, v=cache.v, pos=cache.pos.at[:, Ts:Ts + Tt].set(INVALID_POS))
    Ts_gen = Ts + Tt  # decode writes after the scored targets
    history, history_valid = _history(prefix, R, suffix, suffix_lens, M)
    next_pos = offset + suffix_lens
    if stop_mask is None:
        stop_mask = jnp.zeros((cfg.vocab_size,), bool)
        if gcfg.stop_token_ids:
            stop_mask = stop_mask.at[jnp.asarray(gcfg.stop_token_ids)].set(True)

    def cond(carry):
        step, _, _, done, *_ = carry
        keep_going = step < M
        if gcfg.early_stop:
            keep_going &= ~jnp.all(done)
        return keep_going

    def body(carry):
        step, logits, cache, done, out, history, history_valid, started = carry
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
        done = done | stop
        hidden, cache = decoder.forward(params, cfg, token[:, None], (next_pos + step)[:, None], cache=cache,
                                        cache_index=Ts_gen + step, prefix=prefix_cache, attn_impl=gcfg.attn_impl)
        logits = decoder.logits(params, cfg, hidden[:, 0])
        return step + 1, logits, cache, done, out, history, history_valid, started

    out = jnp.full((B, M), gcfg.pad_token_id, jnp.int32)
    done = jnp.zeros((B,), bool)
    carry = (jnp.int32(0), first_logits, cache, done, out, history, history_valid, jnp.zeros((B,), bool))
    _, _, _, done, out, _, history_valid, _ = jax.lax.while_loop(cond, body, carry)
    lengths = jnp.sum(history_valid[:, hist_offset + Ts:], axis=1).astype(jnp.int32)
    return Generated(tokens=out, lengths=lengths, finished=done, target_logprobs=scored)


def step_logits(params, cfg: ModelConfig, gcfg: GenerateConfig, suffix, suffix_lens, prefix: Prefix | None,
                tokens: jax.Array) -> jax.Array:
    """Logits [B, M, V] that the decode loop saw before drawing each of ``tokens`` [B, M] (teacher
    forced through the same cache path) — to check cached decode against a full forward."""
    B, Ts = suffix.shape
    M = tokens.shape[1]
    R = 1 if prefix is None else B // prefix.tokens.shape[0]
    offset = jnp.zeros((B,), jnp.int32) if prefix is None else jnp.repeat(prefix.lengths, R)
    cache = init_cache(cfg, B, Ts + M, dtype=params["embed"].dtype,
                       stacked=not isinstance(params["layers"], (list, tuple)))
    prefix_cache = None if prefix is None else prefix.cache
    hidden, cache = decoder.forward(params, cfg, suffix, left_padded_positions(suffix_lens, Ts, offset),
                                    cache=cache, cache_index=0, prefix=prefix_cache, attn_impl=gcfg.attn_impl)
    all_logits = [decoder.logits(params, cfg, hidden[:, -1])]
    for t in range(M - 1):
        hidden, cache = decoder.forward(params, cfg, tokens[:, t:t + 1], (offset + suffix_lens + t)[:, None],
                                        cache=cache, cache_index=Ts + t, prefix=prefix_cache,
                                        attn_impl=gcfg.attn_impl)
        all_logits.append(decoder.logits(params, cfg, hidden[:, 0]))
    return jnp.stack(all_logits, axis=1)


def bucket_length(n: int, buckets: Sequence[int] | None = None, minimum: int = 16) -> int:
    """The smallest bucket >= n: from ``buckets`` when given, else the next power of two (>= minimum)."""
    if buckets:
        for b in sorted(buckets):
            if b >= n:
                return int(b)
        raise ValueError(f"length {n} exceeds the largest bucket {max(buckets)}")
    size = minimum
    while size < n:
        size *= 2
    return size


def pad_rows_host(rows: Sequence[Sequence[int]], width: int, pad_id: int, *, left: bool,
                  num_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pads token lists to numpy [num_rows or len(rows), width] on the left or right; returns
    (tokens, lengths). Rows past ``len(rows)`` are all padding with length 0."""
    n = len(rows) if num_rows is None else num_rows
    out = np.full((n, width), pad_id, np.int32)
    lengths = np.zeros((n,), np.int32)
    for i, row in enumerate(rows):
        if len(row) > width:
            raise ValueError(f"row {i} has {len(row)} tokens, more than the width {width}")
        lengths[i] = len(row)
        if len(row):
            if left:
                out[i, width - len(row):] = row
            else:
                out[i, :len(row)] = row
    return out, lengths


def pad_rows(rows: Sequence[Sequence[int]], width: int, pad_id: int, left: bool) -> tuple[jax.Array, jax.Array]:
    """:func:`pad_rows_host` as device arrays."""
    tokens, lengths = pad_rows_host(rows, width, pad_id, left=left)
    return jnp.asarray(tokens), jnp.asarray(lengths)


prefill_prefix_jit = jax.jit(prefill_prefix, static_argnames=("cfg", "attn_impl", "cache_dtype"))
generate_tokens_jit = jax.jit(generate_tokens, static_argnames=("cfg", "gcfg", "cache_dtype"))
