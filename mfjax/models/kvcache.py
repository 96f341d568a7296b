"""Keys and values: what a prefill leaves behind, and the cache a decode loop writes into.

Every slot carries the absolute position of its token (``INVALID_POS`` where empty or padded), so left
padding, per-row lengths and gaps all reduce to one causal test ``key_pos <= query_pos`` inside attention.

* :class:`KV` — the keys and values of one forward over a chunk, stacked over layers ``[L, B, T, K, H]``
  (the scanned prefill's output). A prefill attends to its own chunk and a prefix only: no empty decode
  slots are read.
* :class:`Prefix` — a group prefix prefilled once and read by B / E rows each (cascade attention).
* :class:`DecodeCache` — one array per layer ``[B, K, S, H]`` (a tuple; heads before slots, so the
  attention dots of every decode step read the cache as it lies, without a transpose): the decode
  layout. Unrolled layers with separate caches keep XLA from copying a stacked cache every token
  (DESIGN.md, measured). It is built once per generation from the prefill's keys and values of the
  prompt (never from scored continuations, which would be dead slots read by every decode step) plus
  room for the new tokens.

Logical axes of the decode cache arrays: ('cache_batch', 'cache_heads', 'cache_seq', 'head_dim').
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mfjax.models.layers import INVALID_POS

CACHE_AXES = ("cache_batch", "cache_heads", "cache_seq", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KV:
    """Keys and values of every layer for a chunk: k, v [L, B, T, K, H]; the positions of its slots [B, T]."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Prefix:
    """A prefilled group prefix [E rows, P slots] plus its tokens and lengths (the repetition penalty
    counts prompt tokens)."""

    kv: KV
    tokens: jax.Array  # [E, P] int32
    lengths: jax.Array  # [E] int32

    @property
    def groups(self) -> int:
        return self.tokens.shape[0]

    def per_layer(self) -> tuple[tuple, tuple, jax.Array]:
        """(keys per layer, values per layer, positions [E, P]) for unrolled decode layers, heads-major
        [E, K, P, H] like the decode cache; take them once, outside the decode loop."""
        L = self.kv.k.shape[0]
        heads_major = lambda a: a.transpose(0, 2, 1, 3)
        return (tuple(heads_major(self.kv.k[i]) for i in range(L)), tuple(heads_major(self.kv.v[i]) for i in range(L)),
                self.kv.pos)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeCache:
    """One key and one value array per layer [B, K, S, H], and the position held in each slot [B, S]."""

    k: tuple
    v: tuple
    pos: jax.Array

    @property
    def capacity(self) -> int:
        return self.pos.shape[1]

    @classmethod
    def from_prefill(cls, kv: KV, keep: int, room: int) -> "DecodeCache":
        """The first ``keep`` slots of a prefill's keys and values, per layer and heads-major, plus ``room``
        empty slots."""
        L, B, _, K, H = kv.k.shape
        pad = lambda a: jnp.concatenate([a[:, :keep].transpose(0, 2, 1, 3), jnp.zeros((B, K, room, H), a.dtype)],
                                        axis=2)
        k = tuple(pad(kv.k[i]) for i in range(L))
        v = tuple(pad(kv.v[i]) for i in range(L))
        pos = jnp.concatenate([kv.pos[:, :keep], jnp.full((B, room), INVALID_POS, jnp.int32)], axis=1)
        return cls(k=k, v=v, pos=pos)


def key_positions(positions: jax.Array) -> jax.Array:
    """Slot positions for keys: the token's position, ``INVALID_POS`` for padding (negative positions)."""
    return jnp.where(positions >= 0, positions, INVALID_POS).astype(jnp.int32)


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


def padded_positions(mask: jax.Array) -> jax.Array:
    """Positions [B, T] for a left- or right-padded batch: 0.. over real tokens, -1 at padding."""
    mask = mask.astype(jnp.int32)
    return jnp.where(mask > 0, jnp.cumsum(mask, axis=-1) - 1, -1)
