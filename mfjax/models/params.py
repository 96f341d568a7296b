"""Every decoder parameter described once: shape, logical axes and initialiser.

The parameter tree is a plain nested dict of arrays::

    {
      "embed": [V, D],
      "layers": {                      # stacked over layers (leading L); see ``unstack_layers``
        "attn_norm": [L, D],
        "q": [L, D, N, H], "k": [L, D, K, H], "v": [L, D, K, H],
        "q_bias": [L, N, H], "k_bias": [L, K, H], "v_bias": [L, K, H],      # attention_bias only
        "o": [L, N, H, D],
        "post_attn_norm": [L, D],                                           # sandwich_norms only
        "mlp_norm": [L, D],
        "post_mlp_norm": [L, D],                                            # sandwich_norms only
        "gate": [L, D, F], "up": [L, D, F], "down": [L, F, D],
      },
      "final_norm": [D],
      "lm_head": [D, V],                                                    # untied only
    }

Norm weights are stored as HF stores them (Gemma's ``(1 + w)`` is applied in the maths). Initialisation,
sharding and HF conversion all derive from :func:`param_specs`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from mfjax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Shape, logical axis names (one per dimension) and initialiser kind of one parameter."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str  # 'normal', 'zeros' or 'ones'


def param_specs(cfg: ModelConfig) -> dict[str, Any]:
    """The tree of :class:`ParamSpec` for ``cfg``, in the layout of the module docstring."""
    L, V, D, F = cfg.num_layers, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    norm_init = "zeros" if cfg.norm_plus_one else "ones"
    layers = {
        "attn_norm": ParamSpec((L, D), ("layers", "embed"), norm_init),
        "q": ParamSpec((L, D, N, H), ("layers", "embed", "q_heads", "head_dim"), "normal"),
        "k": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "v": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "o": ParamSpec((L, N, H, D), ("layers", "q_heads", "head_dim", "embed"), "normal"),
        "mlp_norm": ParamSpec((L, D), ("layers", "embed"), norm_init),
        "gate": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal"),
        "up": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal"),
        "down": ParamSpec((L, F, D), ("layers", "mlp", "embed"), "normal"),
    }
    if cfg.attention_bias:
        layers["q_bias"] = ParamSpec((L, N, H), ("layers", "q_heads", "head_dim"), "zeros")
        layers["k_bias"] = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
        layers["v_bias"] = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
    if cfg.sandwich_norms:
        layers["post_attn_norm"] = ParamSpec((L, D), ("layers", "embed"), norm_init)
        layers["post_mlp_norm"] = ParamSpec((L, D), ("layers", "embed"), norm_init)
    specs: dict[str, Any] = {
        "embed": ParamSpec((V, D), ("vocab", "embed"), "normal"),
        "layers": layers,
        "final_norm": ParamSpec((D,), ("embed",), norm_init),
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((D, V), ("embed", "vocab"), "normal")
    return specs


def is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def map_specs(fn: Callable[[ParamSpec], Any], specs: Any) -> Any:
    """``jax.tree.map`` over a spec tree, treating each :class:`ParamSpec` as a leaf."""
    return jax.tree.map(fn, specs, is_leaf=is_spec)


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> dict[str, Any]:
    """Random parameters (normal(0, std) matrices, norms at their identity) — for tests and benchmarks."""
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(key, len(leaves))

    def make(spec: ParamSpec, k: jax.Array) -> jax.Array:
        if spec.init == "zeros":
            return jnp.zeros(spec.shape, dtype)
        if spec.init == "ones":
            return jnp.ones(spec.shape, dtype)
        return (std * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys)])


def abstract_params(cfg: ModelConfig, dtype=jnp.float32) -> dict[str, Any]:
    """``jax.ShapeDtypeStruct`` tree of the parameters (for restores and compilation without weights)."""
    return map_specs(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_specs(cfg))


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """The same parameters with ``layers`` as a list of per-layer dicts (the fast layout for decode)."""
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return params
    num_layers = jax.tree.leaves(layers)[0].shape[0]
    per_layer = [jax.tree.map(lambda a, i=i: a[i], layers) for i in range(num_layers)]
    return {**params, "layers": per_layer}


def stack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`unstack_layers`."""
    layers = params["layers"]
    if not isinstance(layers, (list, tuple)):
        return params
    return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def cast_params(params: Any, dtype) -> Any:
    """All floating-point leaves cast to ``dtype``."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
