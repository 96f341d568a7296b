"""The generic decoder: one forward pass for every supported family, as pure functions over a param tree.

``forward`` runs the layers either with ``lax.scan`` (parameters stacked over layers: fast to compile,
best for training and long prefill, optionally rematerialised) or unrolled in Python (parameters from
:func:`mfjax.models.params.unstack_layers`: the fast layout for decode). Both give the same numbers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mfjax import sharding
from mfjax.config import ModelConfig
from mfjax.engine.kvcache import KVCache
from mfjax.models import layers as L

REMAT_POLICIES = {
    None: None,
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def embed(params: dict[str, Any], cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Token embeddings [B, T, D] (Gemma multiplies by sqrt(D) in the activation dtype, as HF does)."""
    x = jnp.take(params["embed"], tokens, axis=0)
    if cfg.scale_embeddings:
        x = x * jnp.asarray(cfg.hidden_size**0.5, dtype=x.dtype)
    return sharding.constrain(x, ("batch", "seq", "embed"))


def logits(params: dict[str, Any], cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """float32 logits [..., V] from final hidden states [..., D] (tied or untied head, soft-capped)."""
    if cfg.tie_word_embeddings:
        out = jnp.einsum("...d,vd->...v", hidden, params["embed"], preferred_element_type=jnp.float32)
    else:
        out = jnp.einsum("...d,dv->...v", hidden, params["lm_head"], preferred_element_type=jnp.float32)
    return L.softcap(out, cfg.final_logit_softcap)


def _layer(
    lp: dict[str, jax.Array],
    x: jax.Array,
    cfg: ModelConfig,
    *,
    rope_pos: jax.Array,
    q_pos: jax.Array,
    key_pos: jax.Array,
    window,
    cache_kv: tuple[jax.Array, jax.Array] | None,
    cache_pos: jax.Array | None,
    cache_index,
    prefix_kv: tuple[jax.Array, jax.Array, jax.Array] | None,
    attn_impl: str,
):
    """One decoder layer. Returns (x, updated (k, v) cache arrays or None)."""
    inv_freq = L.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    h = L.rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps, cfg.norm_plus_one)
    q = jnp.einsum("btd,dnh->btnh", h, lp["q"])
    k = jnp.einsum("btd,dkh->btkh", h, lp["k"])
    v = jnp.einsum("btd,dkh->btkh", h, lp["v"])
    if cfg.attention_bias:
        q, k, v = q + lp["q_bias"], k + lp["k_bias"], v + lp["v_bias"]
    q = sharding.constrain(L.apply_rope(q, rope_pos, inv_freq), ("batch", "seq", "q_heads", "head_dim"))
    k = sharding.constrain(L.apply_rope(k, rope_pos, inv_freq), ("batch", "seq", "kv_heads", "head_dim"))

    new_cache = None
    if cache_kv is not None:
        ck = jax.lax.dynamic_update_slice(cache_kv[0], k.astype(cache_kv[0].dtype), (0, cache_index, 0, 0))
        cv = jax.lax.dynamic_update_slice(cache_kv[1], v.astype(cache_kv[1].dtype), (0, cache_index, 0, 0))
        new_cache = (ck, cv)
        segments = [L.KVSegment(ck, cv, cache_pos)]
    else:
        segments = [L.KVSegment(k, v, key_pos)]
    if prefix_kv is not None:
        segments.insert(0, L.KVSegment(prefix_kv[0], prefix_kv[1], prefix_kv[2], grouped=True))

    attn = L.attention(q, segments, q_pos, scale=cfg.attention_scale, window=window,
                       softcap=cfg.attn_logit_softcap, impl=attn_impl)
    out = jnp.einsum("btnh,nhd->btd", attn, lp["o"])
    if cfg.sandwich_norms:
        out = L.rms_norm(out, lp["post_attn_norm"], cfg.rms_norm_eps, cfg.norm_plus_one)
    x = x + out
    h = L.rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps, cfg.norm_plus_one)
    out = L.gated_mlp(h, lp["gate"], lp["up"], lp["down"], cfg.hidden_act)
    if cfg.sandwich_norms:
        out = L.rms_norm(out, lp["post_mlp_norm"], cfg.rms_norm_eps, cfg.norm_plus_one)
    x = sharding.constrain(x + out, ("batch", "seq", "embed"))
    return x, new_cache


def forward(
    params: dict[str, Any],
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    *,
    cache: KVCache | None = None,
    cache_index: jax.Array | int = 0,
    prefix: KVCache | None = None,
    attn_impl: str = "xla",
    remat: str | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """Runs the decoder over tokens [B, T] at ``positions`` [B, T] (negative = padding).

    With ``cache``, this chunk's keys/values are written at slot ``cache_index`` and attention reads the
    whole cache (prefill or decode); without it, attention reads only this chunk (a full forward).
    ``prefix`` is a grouped cache [E, P, ...] shared by B / E consecutive rows each (cascade attention).
    Returns (final-normed hidden states [B, T, D], updated cache or None). Apply :func:`logits` to the
    positions you need: computing [B, T, V] for a long prefill is rarely wanted.
    """
    if attn_impl not in L.ATTENTION_IMPLS:
        raise ValueError(f"attn_impl must be one of {L.ATTENTION_IMPLS}, got {attn_impl!r}")
    x = embed(params, cfg, tokens)
    positions = positions.astype(jnp.int32)
    rope_pos = jnp.maximum(positions, 0)
    key_pos = jnp.where(positions >= 0, positions, L.INVALID_POS)
    cache_pos = None
    if cache is not None:
        cache_pos = jax.lax.dynamic_update_slice(cache.pos, key_pos, (0, cache_index))
    common = dict(rope_pos=rope_pos, q_pos=positions, key_pos=key_pos, cache_pos=cache_pos,
                  cache_index=cache_index, attn_impl=attn_impl)
    layer_params = params["layers"]

    if isinstance(layer_params, (list, tuple)):
        new_k, new_v = [], []
        for i, lp in enumerate(layer_params):
            x, kv = _layer(
                lp, x, cfg, window=L.layer_window(cfg, cfg.sliding_layers[i]),
                cache_kv=None if cache is None else (cache.k[i], cache.v[i]),
                prefix_kv=None if prefix is None else (prefix.k[i], prefix.v[i], prefix.pos),
                **common,
            )
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        new_cache = None if cache is None else KVCache(k=new_k, v=new_v, pos=cache_pos)
    else:
        x, new_cache = _scan_layers(layer_params, x, cfg, cache, prefix, remat, common)
    x = L.rms_norm(x, params["final_norm"], cfg.rms_norm_eps, cfg.norm_plus_one)
    return x, new_cache


def _scan_layers(layer_params, x, cfg, cache, prefix, remat, common):
    """The layers as one ``lax.scan`` over stacked parameters (and stacked caches)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {list(REMAT_POLICIES)}, got {remat!r}")
    sliding = jnp.asarray(np.array(cfg.sliding_layers, dtype=bool))
    stack = lambda a: a if not isinstance(a, (list, tuple)) else jnp.stack(a)
    xs = {"lp": layer_params, "sliding": sliding}
    if cache is not None:
        xs["ck"], xs["cv"] = stack(cache.k), stack(cache.v)
    if prefix is not None:
        xs["pk"], xs["pv"] = stack(prefix.k), stack(prefix.v)

    def body(x, xs):
        x, kv = _layer(
            xs["lp"], x, cfg, window=L.layer_window(cfg, xs["sliding"]),
            cache_kv=(xs["ck"], xs["cv"]) if cache is not None else None,
            prefix_kv=(xs["pk"], xs["pv"], prefix.pos) if prefix is not None else None,
            **common,
        )
        return x, kv

    if REMAT_POLICIES[remat] is not None:
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    x, kv = jax.lax.scan(body, x, xs)
    if cache is None:
        return x, None
    k, v = kv
    if isinstance(cache.k, (list, tuple)):
        k, v = list(k), list(v)
    return x, KVCache(k=k, v=v, pos=common["cache_pos"])


def padded_positions(mask: jax.Array) -> jax.Array:
    """Positions [B, T] for a left- or right-padded batch: 0.. over real tokens, -1 at padding."""
    mask = mask.astype(jnp.int32)
    return jnp.where(mask > 0, jnp.cumsum(mask, axis=-1) - 1, -1)


def forward_logits(params, cfg: ModelConfig, tokens, mask=None, *, attn_impl: str = "xla", remat=None) -> jax.Array:
    """Full-sequence logits [B, T, V] (float32) for a padded batch; ``mask`` [B, T] marks real tokens."""
    if mask is None:
        mask = jnp.ones(tokens.shape, jnp.int32)
    hidden, _ = forward(params, cfg, tokens, padded_positions(mask), attn_impl=attn_impl, remat=remat)
    return logits(params, cfg, hidden)
