"""The key/value cache: one array per layer, a position per slot, allocated with zeros.

Layout per layer: ``[B, S, K, H]`` (batch, slot, kv-head, head dim). Slots are written in order at a
cache index shared by all rows; each row's padding is expressed through ``pos`` (the absolute position of
the token in each slot, ``INVALID_POS`` where empty or padded), so left padding, per-row lengths and gaps
all reduce to one causal test ``key_pos <= query_pos`` inside attention. One array per layer (not one
stacked array) because decode with unrolled layers and separate caches avoids XLA copying a stacked cache
(DESIGN.md, measured facts); training and full prefill may use the stacked form.
"""

from __future__ import annotations

import dataclasses
from typing import Union

import jax
import jax.numpy as jnp

from mfjax.config import ModelConfig
from mfjax.models.layers import INVALID_POS

LayerArrays = Union[list, jax.Array]  # list of [B, S, K, H] per layer, or one [L, B, S, K, H]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer keys and values with the position held in each slot."""

    k: LayerArrays
    v: LayerArrays
    pos: jax.Array  # [B, S] int32

    @property
    def batch(self) -> int:
        return self.pos.shape[0]

    @property
    def capacity(self) -> int:
        return self.pos.shape[1]


def init_cache(cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.bfloat16, stacked: bool = False) -> KVCache:
    """An empty cache of ``capacity`` slots for ``batch`` rows (zeros; every slot invalid)."""
    shape = (batch, capacity, cfg.num_kv_heads, cfg.head_dim)
    if stacked:
        k = jnp.zeros((cfg.num_layers, *shape), dtype)
        v = jnp.zeros((cfg.num_layers, *shape), dtype)
    else:
        k = [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)]
        v = [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)]
    return KVCache(k=k, v=v, pos=jnp.full((batch, capacity), INVALID_POS, jnp.int32))


def cache_bytes(cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.bfloat16) -> int:
    """Memory taken by :func:`init_cache` with these arguments."""
    per = batch * capacity * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
    return 2 * cfg.num_layers * per + batch * capacity * 4


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Prefix:
    """A prefilled group prefix: cache [E, P, ...] plus its tokens (for the repetition penalty)."""

    cache: KVCache
    tokens: jax.Array  # [E, P] int32
    lengths: jax.Array  # [E] int32


def right_padded_positions(lengths: jax.Array, width: int, offset: jax.Array | int = 0) -> jax.Array:
    """Positions [B, width] of right-padded rows: offset + 0 … len-1, then -1."""
    idx = jnp.arange(width, dtype=jnp.int32)[None, :]
    lengths = lengths[:, None]
    return jnp.where(idx < lengths, idx + jnp.asarray(offset, jnp.int32).reshape(-1, 1), -1)


def left_padded_positions(lengths: jax.Array, width: int, offset: jax.Array | int = 0) -> jax.Array:
    """Positions [B, width] of left-padded rows: -1 over the padding, then offset + 0 … len-1."""
    idx = jnp.arange(width, dtype=jnp.int32)[None, :]
    start = width - lengths[:, None]
    return jnp.where(idx >= start, idx - start + jnp.asarray(offset, jnp.int32).reshape(-1, 1), -1)
