"""Pure functions for the decoder maths: norms, rotary embeddings, attention, MLP.

Shape letters: B batch, T query length, S key length, D model, N q-heads, K kv-heads, G q-heads per
kv-head (N = K·G), H head dim, F ffn, V vocab. For grouped (shared-prefix) attention: E groups that each
share one prefix, R rows per group (B = E·R), P prefix length.

Numerics follow DESIGN.md: activations in the parameter dtype, float32 for norm statistics, RoPE angles,
attention logits and softmax — at least float32: float64 activations (gradient checks under x64) keep float64
there too (:func:`compute_dtype`), which leaves bf16 and float32 runs bit for bit as they were.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mfjax.config import ModelConfig, RopeScaling

# Key position of an empty or padded cache slot: larger than any query position, so causal masking
# (key_pos <= query_pos) hides it without a separate validity mask.
INVALID_POS = 2**30

ATTENTION_IMPLS = ("xla", "cudnn", "jax")


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype of statistics, rotations, attention scores and logits for activations of ``dtype``: float32,
    or float64 for float64 activations."""
    return jnp.promote_types(dtype, jnp.float32)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, plus_one: bool) -> jax.Array:
    """RMSNorm with float32 statistics; Gemma scales by (1 + w) in float32, the others by w in x's dtype."""
    x32 = x.astype(compute_dtype(x.dtype))
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if plus_one:
        return (normed * (1.0 + weight.astype(x32.dtype))).astype(x.dtype)
    return weight * normed.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies [H/2] in float32, with Llama-3 or linear scaling applied."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    # Llama 3: long wavelengths divided by `factor`, short ones kept, a smooth blend in between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rope:
    """cos and sin [B, T, H/2] (float32) of the rotary angles at some positions: computed once per forward
    and shared by every layer."""

    cos: jax.Array
    sin: jax.Array


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> Rope:
    """The rotary tables at ``positions`` [B, T] (negative positions, i.e. padding, rotate by angle 0)."""
    angles = jnp.maximum(positions, 0).astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
    return Rope(cos=jnp.cos(angles), sin=jnp.sin(angles))


def apply_rope(x: jax.Array, rope: Rope) -> jax.Array:
    """Rotates x [B, T, heads, H] by the angles of ``rope`` (half-split layout, as HF)."""
    cos = rope.cos[:, :, None, :]
    sin = rope.sin[:, :, None, :]
    x32 = x.astype(compute_dtype(x.dtype))
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class KVSegment:
    """Keys/values a query attends to, with the absolute position of each key.

    ``grouped`` segments (a shared prefix) have leading dim E = B / R and are read once for the R rows
    of each group (cascade attention) instead of being copied per row. ``heads_major`` segments hold
    [B or E, K, S, H] (a decode cache): the batch dims of the attention dots lead, so no transpose of the
    whole cache is made at every decode step.
    """

    k: jax.Array  # [B or E, S, K, H], or [B or E, K, S, H] when heads_major
    v: jax.Array
    pos: jax.Array  # [B or E, S] int32, INVALID_POS where empty
    grouped: bool = False
    heads_major: bool = False

    @property
    def length(self) -> int:
        return self.k.shape[2] if self.heads_major else self.k.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1] if self.heads_major else self.k.shape[2]


def _attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: jax.Array | int | None) -> jax.Array:
    """[b, T, S] bool: causal by position, inside the sliding window when one is given."""
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    mask = k <= q
    if window is not None:
        mask &= (q - k) < window
    return mask


def attention(
    q: jax.Array,
    segments: Sequence[KVSegment],
    q_pos: jax.Array,
    *,
    scale: float,
    window: jax.Array | int | None = None,
    softcap: float | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Multi-head GQA attention of q [B, T, N, H] over one or more key/value segments.

    Scores of all segments share one softmax (concatenated along keys), so a grouped prefix segment is
    exactly equivalent to prepending the prefix to every row, while its keys are read once per group.
    Rows whose every key is masked (padding queries) return zeros.
    """
    # The fused kernel takes one key tensor per row: a grouped prefix would have to be copied to every
    # row (each decode step), which costs more than the einsum path's single read of it.
    if impl in ("cudnn", "jax") and softcap is None and not any(s.grouped for s in segments):
        return _attention_dot_product(q, segments, q_pos, scale=scale, window=window, impl=impl)
    B, T, N, H = q.shape
    acc = compute_dtype(q.dtype)
    K = segments[0].kv_heads
    G = N // K
    # The G query heads of a kv-head ride the query axis: [B, K, T·G, H]. Scores and outputs are then plain
    # batched matmuls over (b, k) whose operands XLA reads as they lie (no layout copy of the scores).
    TG = T * G
    qh = q.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, TG, H)
    heads_major = lambda a, seg: a if seg.heads_major else a.transpose(0, 2, 1, 3)  # -> [b, K, S, H]
    scores, masks = [], []
    for seg in segments:
        k = heads_major(seg.k, seg)
        if seg.grouped:
            E = k.shape[0]
            R = B // E
            s = jnp.einsum("erkqh,ekph->erkqp", qh.reshape(E, R, K, TG, H), k,
                           preferred_element_type=acc).reshape(B, K, TG, -1)
            m = _attention_mask(q_pos, jnp.repeat(seg.pos, R, axis=0), window)
        else:
            s = jnp.einsum("bkqh,bksh->bkqs", qh, k, preferred_element_type=acc)
            m = _attention_mask(q_pos, seg.pos, window)
        scores.append(s)
        masks.append(m)
    logits = jnp.concatenate(scores, axis=-1) * scale
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    mask = jnp.concatenate(masks, axis=-1)  # [B, T, S] -> every query head of a position: [B, 1, T·G, S]
    mask = jnp.broadcast_to(mask[:, None, :, None, :], (B, 1, T, G, mask.shape[-1])).reshape(B, 1, TG, -1)
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(logits - row_max)  # unnormalised: the division happens on the [.., H] output below,
    denom = jnp.sum(weights, axis=-1, keepdims=True)  # one pass over the scores fewer than normalising them
    out = jnp.zeros((B, K, TG, H), acc)
    start = 0
    for seg in segments:
        length = seg.length
        p = weights[..., start:start + length].astype(seg.v.dtype)
        start += length
        v = heads_major(seg.v, seg)
        if seg.grouped:
            E = v.shape[0]
            R = B // E
            o = jnp.einsum("erkqp,ekph->erkqh", p.reshape(E, R, K, TG, length), v,
                           preferred_element_type=acc).reshape(B, K, TG, H)
        else:
            o = jnp.einsum("bkqs,bksh->bkqh", p, v, preferred_element_type=acc)
        out = out + o
    out = out / jnp.where(denom > 0, denom, 1.0)  # rows with no visible key (padding) stay 0
    out = out.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4)
    return out.reshape(B, T, N, H).astype(q.dtype)


def _attention_dot_product(q, segments, q_pos, *, scale, window, impl):
    """``jax.nn.dot_product_attention`` path (cuDNN on GPU) for per-row segments."""
    rows_major = lambda a, seg: a.transpose(0, 2, 1, 3) if seg.heads_major else a  # the kernel takes [B, S, K, H]
    k = jnp.concatenate([rows_major(seg.k, seg) for seg in segments], axis=1)
    v = jnp.concatenate([rows_major(seg.v, seg) for seg in segments], axis=1)
    mask = _attention_mask(q_pos, jnp.concatenate([seg.pos for seg in segments], axis=1), window)
    # A query with no visible key (padding) would give NaN in the fused kernel: let it see key 0;
    # its output is discarded by the caller anyway.
    empty = ~jnp.any(mask, axis=-1, keepdims=True)
    mask = mask | (empty & (jnp.arange(mask.shape[-1]) == 0))
    out = jax.nn.dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), mask=mask[:, None], scale=scale,
        implementation="cudnn" if impl == "cudnn" else None,
    )
    return jnp.where(empty[..., None], 0, out).astype(q.dtype)


def glu(g: jax.Array, u: jax.Array, act: str) -> jax.Array:
    """The gated unit of a SwiGLU ('silu') or GeGLU ('gelu_tanh') MLP: act(g) * u."""
    if act == "silu":
        return jax.nn.silu(g) * u
    if act == "gelu_tanh":
        return jax.nn.gelu(g, approximate=True) * u
    raise ValueError(f"unknown activation {act!r}")


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """tanh soft-capping to (-cap, cap); identity when cap is None."""
    return x if cap is None else jnp.tanh(x / cap) * cap


def layer_window(cfg: ModelConfig, sliding: bool | jax.Array) -> jax.Array | int | None:
    """The attention window of a layer: the config's sliding window where ``sliding``, else unbounded."""
    if not cfg.sliding_window:
        return None
    if isinstance(sliding, (bool, np.bool_)):
        return cfg.sliding_window if sliding else None
    return jnp.where(sliding, cfg.sliding_window, INVALID_POS)


def lora_side_path(x: jax.Array, a: jax.Array, b: jax.Array, input_dims: int) -> jax.Array:
    """(x·A)·B of a LoRA pair: x [..., *in] with A [*in, r] and B [r, *out] -> [..., *out].

    ``input_dims`` trailing dims of x (and leading dims of A) are contracted. The product runs as two 2-D
    matmuls over the flattened tokens, with a hand-written backward (:func:`_lora_2d`).
    """
    in_shape, out_shape = a.shape[:input_dims], b.shape[1:]
    lead = x.shape[:x.ndim - input_dims]
    x2 = x.reshape(-1, math.prod(in_shape))
    y2 = _lora_2d(x2, a.reshape(x2.shape[1], -1), b.reshape(b.shape[0], -1))
    return y2.reshape(*lead, *out_shape)


@jax.custom_vjp
def _lora_2d(x, a, b):
    """x [M, I] · a [I, r] · b [r, O]."""
    return (x @ a) @ b


def _lora_2d_fwd(x, a, b):
    low = x @ a
    return low @ b, (x, a, b, low)


def _lora_2d_bwd(residuals, dy):
    # The weight gradients contract over the M tokens, the major dim of both operands. XLA:CPU's matmuls want
    # one operand transposed for that, and left to itself it transposes the wide one (dy [M, O], x [M, I]),
    # fused into dy's elementwise producer, with strided writes: ~30 ms per layer at SmolLM2's MLP width.
    # Contracting with the rank-r operand first makes the transposed operand the thin [M, r] one, and the
    # barrier keeps dy a plain array instead of a transposed fusion output. Same maths as autodiff.
    x, a, b, low = residuals
    dy = jax.lax.optimization_barrier(dy)
    db = jnp.einsum("mr,mo->ro", low, dy)
    dlow = dy @ b.T
    da = jnp.einsum("mr,mi->ri", dlow, x).T
    dx = dlow @ a.T
    return dx, da, db


_lora_2d.defvjp(_lora_2d_fwd, _lora_2d_bwd)
