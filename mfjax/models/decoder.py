"""The generic decoder: every supported family, as pure functions over :class:`~mfjax.models.weights.Weights`.

Two entry points, one per job:

* :func:`forward` — a prefill or a full forward over a chunk of tokens: the layers are one ``lax.scan``
  over the stacked weights (fast to compile, rematerialisable for training, an optional LoRA side path
  rides the scan). Attention reads a grouped prefix (if any) and the chunk's own keys and values — never
  an empty cache. It can return the chunk's keys and values (stacked) for a decode cache.
* :func:`decode_step` — one token per row against a :class:`~mfjax.models.kvcache.DecodeCache`, the layers
  unrolled over a per-layer view of the weights (:func:`decode_view`, taken once per generation).

Rotary tables are computed once per call and shared by the layers. Activations are pinned to the mesh by
logical axes through an explicit :class:`~mfjax.sharding.MeshRules` (or JAX's context mesh).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mfjax import sharding
from mfjax.config import ModelConfig
from mfjax.models import layers
from mfjax.models.kvcache import CACHE_AXES, KV, DecodeCache, Prefix, key_positions, padded_positions
from mfjax.models.lora import LoraWeights
from mfjax.models.weights import LayerWeights, Weights

REMAT_POLICIES = {
    None: None,
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def embed(weights, cfg: ModelConfig, tokens: jax.Array, plan=None) -> jax.Array:
    """Token embeddings [B, T, D] (Gemma multiplies by sqrt(D) in the activation dtype, as HF does)."""
    x = jnp.take(weights.embed, tokens, axis=0)
    if cfg.scale_embeddings:
        x = x * jnp.asarray(cfg.hidden_size**0.5, dtype=x.dtype)
    return sharding.constrain(x, ("batch", "seq", "embed"), plan)


def logits(weights, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """float32 logits [..., V] from final hidden states [..., D] (tied or untied head, soft-capped); float64 for
    float64 hidden states."""
    acc = layers.compute_dtype(hidden.dtype)
    if cfg.tie_word_embeddings:
        out = jnp.einsum("...d,vd->...v", hidden, weights.embed, preferred_element_type=acc)
    else:
        out = jnp.einsum("...d,dv->...v", hidden, weights.lm_head, preferred_element_type=acc)
    return layers.softcap(out, cfg.final_logit_softcap)


def _rope(cfg: ModelConfig, positions: jax.Array) -> layers.Rope:
    return layers.rope_tables(positions, layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))


def _proj(x: jax.Array, w: jax.Array, eq: str, lora, scale: float) -> jax.Array:
    """x·W, plus the LoRA side path s·((x·A)·B) when ``lora`` (one layer's pair, A's input dim matching x's
    last) is given."""
    y = jnp.einsum(eq, x, w)
    if lora is not None:
        side = layers.lora_side_path(x, lora.a.astype(x.dtype), lora.b.astype(x.dtype), 1)
        y = y + (scale * side).astype(y.dtype)
    return y


def _layer(lw: LayerWeights, x: jax.Array, cfg: ModelConfig, *, rope: layers.Rope, q_pos: jax.Array, window,
           own_pos: Optional[jax.Array], cache: Optional[tuple], prefix_kv: Optional[tuple], attn_impl: str,
           lora: Optional[LoraWeights], plan):
    """One decoder layer over x [B, T, D].

    Keys/values: with ``cache = (k [B, K, S, H], v, pos [B, S], index)`` (heads-major) this chunk is written at
    ``index`` and attention reads the cache (decode); otherwise it reads this chunk's own keys at ``own_pos``
    (prefill). ``prefix_kv = (k, v, pos [E, P])`` is a grouped prefix read by B / E rows each: [E, P, K, H]
    in a prefill, heads-major [E, K, P, H] in decode (``cache`` given).
    Returns (x, (k, v) of this chunk, or the updated cache arrays).
    """
    pair = (lambda t: getattr(lora, t)) if lora is not None else (lambda t: None)
    s = 0.0 if lora is None else lora.scale
    h = layers.rms_norm(x, lw.attn_norm, cfg.rms_norm_eps, cfg.norm_plus_one)
    q = _proj(h, lw.q, "btd,dnh->btnh", pair("q"), s)
    k = _proj(h, lw.k, "btd,dkh->btkh", pair("k"), s)
    v = _proj(h, lw.v, "btd,dkh->btkh", pair("v"), s)
    if cfg.attention_bias:
        q, k, v = q + lw.q_bias, k + lw.k_bias, v + lw.v_bias
    q = sharding.constrain(layers.apply_rope(q, rope), ("batch", "seq", "q_heads", "head_dim"), plan)
    k = sharding.constrain(layers.apply_rope(k, rope), ("batch", "seq", "kv_heads", "head_dim"), plan)
    v = sharding.constrain(v, ("batch", "seq", "kv_heads", "head_dim"), plan)

    if cache is not None:
        ck, cv, cpos, index = cache
        heads_major = lambda a: a.transpose(0, 2, 1, 3).astype(ck.dtype)  # [B, T, K, H] -> [B, K, T, H]
        ck = jax.lax.dynamic_update_slice(ck, heads_major(k), (0, 0, index, 0))
        cv = jax.lax.dynamic_update_slice(cv, heads_major(v), (0, 0, index, 0))
        segments = [layers.KVSegment(ck, cv, cpos, heads_major=True)]
        out_kv = (ck, cv)
    else:
        segments = [layers.KVSegment(k, v, own_pos)]
        out_kv = (k, v)
    if prefix_kv is not None:
        segments.insert(0, layers.KVSegment(*prefix_kv, grouped=True, heads_major=cache is not None))

    attn = layers.attention(q, segments, q_pos, scale=cfg.attention_scale, window=window,
                            softcap=cfg.attn_logit_softcap, impl=attn_impl)
    # The heads flattened in their logical order behind a barrier: otherwise XLA may match the attention
    # output's internal layout by transposing the [N, H, D] weight instead, at every layer and token.
    B, T = attn.shape[:2]
    attn = jax.lax.optimization_barrier(attn.reshape(B, T, -1))
    o_pair = pair("o")
    if o_pair is not None:
        o_pair = dataclasses.replace(o_pair, a=o_pair.a.reshape(-1, o_pair.a.shape[-1]))
    out = _proj(attn, lw.o.reshape(-1, lw.o.shape[-1]), "btf,fd->btd", o_pair, s)
    if cfg.sandwich_norms:
        out = layers.rms_norm(out, lw.post_attn_norm, cfg.rms_norm_eps, cfg.norm_plus_one)
    x = x + out
    h = layers.rms_norm(x, lw.mlp_norm, cfg.rms_norm_eps, cfg.norm_plus_one)
    g = _proj(h, lw.gate, "btd,df->btf", pair("gate"), s)
    u = _proj(h, lw.up, "btd,df->btf", pair("up"), s)
    g = sharding.constrain(layers.glu(g, u, cfg.hidden_act), ("batch", "seq", "mlp"), plan)
    out = _proj(g, lw.down, "btf,fd->btd", pair("down"), s)
    if cfg.sandwich_norms:
        out = layers.rms_norm(out, lw.post_mlp_norm, cfg.rms_norm_eps, cfg.norm_plus_one)
    x = sharding.constrain(x + out, ("batch", "seq", "embed"), plan)
    return x, out_kv


def forward(weights: Weights, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array, *,
            prefix: Optional[Prefix] = None, lora: Optional[LoraWeights] = None, attn_impl: str = "xla",
            remat: Optional[str] = None, keep_kv: bool = False, plan=None) -> tuple[jax.Array, Optional[KV]]:
    """Runs the decoder over tokens [B, T] at ``positions`` [B, T] (negative = padding), layers scanned.

    ``prefix`` is a grouped prefix [E, P] shared by B / E consecutive rows each (cascade attention).
    ``lora`` adds its side path to every targeted projection. With ``keep_kv`` the chunk's keys and values
    come back (stacked over layers) to seed a decode cache.
    Returns (final-normed hidden states [B, T, D], :class:`KV` or None). Apply :func:`logits` to the
    positions you need: [B, T, V] for a long prefill is rarely wanted.
    """
    if attn_impl not in layers.ATTENTION_IMPLS:
        raise ValueError(f"attn_impl must be one of {layers.ATTENTION_IMPLS}, got {attn_impl!r}")
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {list(REMAT_POLICIES)}, got {remat!r}")
    positions = positions.astype(jnp.int32)
    own_pos = key_positions(positions)
    rope = _rope(cfg, positions)
    x = embed(weights, cfg, tokens, plan)
    xs = {"lw": weights.layers, "sliding": jnp.asarray(np.array(cfg.sliding_layers, dtype=bool))}
    if prefix is not None:
        xs["pk"], xs["pv"] = prefix.kv.k, prefix.kv.v
    if lora is not None:
        xs["lora"] = lora

    def body(x, xs):
        x, kv = _layer(xs["lw"], x, cfg, rope=rope, q_pos=positions, window=layers.layer_window(cfg, xs["sliding"]),
                       own_pos=own_pos, cache=None,
                       prefix_kv=(xs["pk"], xs["pv"], prefix.kv.pos) if prefix is not None else None,
                       attn_impl=attn_impl, lora=xs.get("lora"), plan=plan)
        return x, (kv if keep_kv else None)

    if REMAT_POLICIES[remat] is not None:
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    x, kv = jax.lax.scan(body, x, xs)
    x = layers.rms_norm(x, weights.final_norm, cfg.rms_norm_eps, cfg.norm_plus_one)
    return x, (KV(k=kv[0], v=kv[1], pos=own_pos) if keep_kv else None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeView:
    """The weights as decode reads them: one :class:`LayerWeights` per layer (see :func:`decode_view`)."""

    embed: jax.Array
    layers: tuple
    final_norm: jax.Array
    lm_head: Optional[jax.Array] = None


def decode_view(weights: Weights) -> DecodeView:
    """Per-layer slices of the stacked weights, for :func:`decode_step`. Take it inside jit once per
    generation, before the decode loop, so that the loop reads separate per-layer arrays."""
    return DecodeView(embed=weights.embed, layers=weights.per_layer(), final_norm=weights.final_norm,
                      lm_head=weights.lm_head)


def decode_step(view: DecodeView, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array, cache: DecodeCache,
                index, *, prefix: Optional[tuple] = None, attn_impl: str = "xla",
                plan=None) -> tuple[jax.Array, DecodeCache]:
    """One chunk (usually one token) per row: tokens, positions [B, T] written at slot ``index`` of the cache,
    layers unrolled. ``prefix`` = (per-layer keys, per-layer values, positions [E, P]) of a grouped prefix,
    heads-major as :meth:`~mfjax.models.kvcache.Prefix.per_layer` gives them.
    Returns (final-normed hidden states [B, T, D], updated cache)."""
    positions = positions.astype(jnp.int32)
    rope = _rope(cfg, positions)
    cache_pos = jax.lax.dynamic_update_slice(cache.pos, key_positions(positions), (0, index))
    x = embed(view, cfg, tokens, plan)
    new_k, new_v = [], []
    for i, lw in enumerate(view.layers):
        x, (ck, cv) = _layer(lw, x, cfg, rope=rope, q_pos=positions,
                             window=layers.layer_window(cfg, cfg.sliding_layers[i]), own_pos=None,
                             cache=(cache.k[i], cache.v[i], cache_pos, index),
                             prefix_kv=None if prefix is None else (prefix[0][i], prefix[1][i], prefix[2]),
                             attn_impl=attn_impl, lora=None, plan=plan)
        new_k.append(sharding.constrain(ck, CACHE_AXES, plan))
        new_v.append(sharding.constrain(cv, CACHE_AXES, plan))
    x = layers.rms_norm(x, view.final_norm, cfg.rms_norm_eps, cfg.norm_plus_one)
    return x, DecodeCache(k=tuple(new_k), v=tuple(new_v), pos=cache_pos)


def forward_logits(weights: Weights, cfg: ModelConfig, tokens, mask=None, *, attn_impl: str = "xla", remat=None,
                   lora: Optional[LoraWeights] = None, plan=None) -> jax.Array:
    """Full-sequence logits [B, T, V] (float32) for a padded batch; ``mask`` [B, T] marks real tokens."""
    if mask is None:
        mask = jnp.ones(tokens.shape, jnp.int32)
    hidden, _ = forward(weights, cfg, tokens, padded_positions(mask), attn_impl=attn_impl, remat=remat, lora=lora,
                        plan=plan)
    return logits(weights, cfg, hidden)


forward_logits_jit = jax.jit(forward_logits, static_argnames=("cfg", "attn_impl", "remat", "plan"))
