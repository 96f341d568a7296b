"""Decoder weights: one typed container, every parameter described once (shape, logical axes, initialiser).

:class:`Weights` holds the layers **stacked** (each leaf of :class:`LayerWeights` has a leading L): the one
layout weights are stored, loaded, sharded, checkpointed and trained in, and the one every jitted entry point
takes. Prefill, scoring and training run the layers as a ``lax.scan`` over the stack (fast to compile,
rematerialisable); decode takes a per-layer view *inside* jit (:meth:`Weights.per_layer`, once per
generation call, before the decode loop) and unrolls the layers over it, which keeps the decode loop free of
stacked weight slabs and caches (DESIGN.md, measured facts)::

    Weights(embed [V, D],
            layers=LayerWeights(attn_norm [L, D], q [L, D, N, H], k/v [L, D, K, H], o [L, N, H, D],
                                mlp_norm [L, D], gate/up [L, D, F], down [L, F, D],
                                q_bias [L, N, H], k_bias/v_bias [L, K, H]        (attention_bias only),
                                post_attn_norm/post_mlp_norm [L, D]              (sandwich_norms only)),
            final_norm [D], lm_head [D, V] (untied only))

Optional parameters are None (no leaves). Norm weights are stored as HF stores them (Gemma's ``(1 + w)`` is
applied in the maths). Initialisation and shardings derive from :func:`weight_specs`; the HF key table
(:mod:`mfjax.models.hf_keys`) names the same paths.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp

from mfjax import sharding
from mfjax.config import ModelConfig

Path = tuple[str, ...]  # e.g. ("layers", "q"): field names from Weights down


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Shape, logical axis names (one per dimension) and initialiser kind of one parameter."""

    shape: tuple[int, ...]
    axes: tuple[Optional[str], ...]
    init: str  # 'normal', 'zeros' or 'ones'


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerWeights:
    """The weights of the decoder layers (stacked: leading L), or of one layer (no L)."""

    attn_norm: Any
    q: Any
    k: Any
    v: Any
    o: Any
    mlp_norm: Any
    gate: Any
    up: Any
    down: Any
    q_bias: Any = None
    k_bias: Any = None
    v_bias: Any = None
    post_attn_norm: Any = None
    post_mlp_norm: Any = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Weights:
    """All weights of a decoder, layers stacked (see the module docstring)."""

    embed: Any
    layers: LayerWeights
    final_norm: Any
    lm_head: Any = None

    @property
    def num_layers(self) -> int:
        return self.layers.q.shape[0]

    def per_layer(self) -> tuple[LayerWeights, ...]:
        """One :class:`LayerWeights` per layer (static slices of the stack: take it inside jit, once,
        outside loops, e.g. before a decode loop)."""
        return tuple(jax.tree.map(lambda a, i=i: a[i], self.layers) for i in range(self.num_layers))

    def to_tree(self) -> dict:
        """Plain nested dict of the present parameters (for orbax and other dict-based tools)."""
        return {name: value for name, value in _fields(self)}

    @classmethod
    def from_tree(cls, tree: dict) -> "Weights":
        """Inverse of :meth:`to_tree`."""
        return cls(embed=tree["embed"], layers=LayerWeights(**tree["layers"]), final_norm=tree["final_norm"],
                   lm_head=tree.get("lm_head"))


def _fields(obj) -> Iterator[tuple[str, Any]]:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        yield f.name, dict(_fields(value)) if isinstance(value, LayerWeights) else value


def get_path(weights: Weights, path: Path) -> Any:
    """The parameter at ``path`` (e.g. ``("layers", "q")``)."""
    value: Any = weights
    for name in path:
        value = getattr(value, name)
    return value


def replace_path(weights: Weights, path: Path, value: Any) -> Weights:
    """A copy of ``weights`` with the parameter at ``path`` replaced (other leaves shared)."""
    if len(path) == 1:
        return dataclasses.replace(weights, **{path[0]: value})
    return dataclasses.replace(weights, **{path[0]: replace_path(getattr(weights, path[0]), path[1:], value)})


def iter_paths(specs: Weights) -> Iterator[tuple[Path, ParamSpec]]:
    """(path, spec) of every parameter of a spec tree from :func:`weight_specs`."""
    for name, value in _fields(specs):
        if isinstance(value, dict):
            for sub, spec in value.items():
                yield (name, sub), spec
        else:
            yield (name,), value


def weight_specs(cfg: ModelConfig) -> Weights:
    """The :class:`Weights` of ``cfg`` with a :class:`ParamSpec` at every leaf."""
    L, V, D, F = cfg.num_layers, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    norm_init = "zeros" if cfg.norm_plus_one else "ones"
    norm = ParamSpec((L, D), ("layers", "embed"), norm_init)
    layers = LayerWeights(
        attn_norm=norm,
        q=ParamSpec((L, D, N, H), ("layers", "embed", "q_heads", "head_dim"), "normal"),
        k=ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        v=ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        o=ParamSpec((L, N, H, D), ("layers", "q_heads", "head_dim", "embed"), "normal"),
        mlp_norm=norm,
        gate=ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal"),
        up=ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal"),
        down=ParamSpec((L, F, D), ("layers", "mlp", "embed"), "normal"),
    )
    if cfg.attention_bias:
        layers.q_bias = ParamSpec((L, N, H), ("layers", "q_heads", "head_dim"), "zeros")
        layers.k_bias = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
        layers.v_bias = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
    if cfg.sandwich_norms:
        layers.post_attn_norm = norm
        layers.post_mlp_norm = norm
    return Weights(
        embed=ParamSpec((V, D), ("vocab", "embed"), "normal"),
        layers=layers,
        final_norm=ParamSpec((D,), ("embed",), norm_init),
        lm_head=None if cfg.tie_word_embeddings else ParamSpec((D, V), ("embed", "vocab"), "normal"),
    )


def is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def map_specs(fn: Callable[[ParamSpec], Any], specs: Weights) -> Weights:
    """``jax.tree.map`` over a spec tree, treating each :class:`ParamSpec` as a leaf."""
    return jax.tree.map(fn, specs, is_leaf=is_spec)


def init_weights(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Weights:
    """Random weights (normal(0, std) matrices, norms at their identity) — for tests and benchmarks."""
    specs = weight_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(key, len(leaves))

    def make(spec: ParamSpec, k: jax.Array) -> jax.Array:
        if spec.init == "zeros":
            return jnp.zeros(spec.shape, dtype)
        if spec.init == "ones":
            return jnp.ones(spec.shape, dtype)
        return (std * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys)])


def abstract_weights(cfg: ModelConfig, dtype=jnp.float32, shardings: Weights | None = None) -> Weights:
    """``jax.ShapeDtypeStruct`` tree of the weights (restores and compiles without weights)."""
    specs = weight_specs(cfg)
    if shardings is None:
        return map_specs(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), specs)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sh), specs, shardings,
                        is_leaf=is_spec)


def weight_shardings(cfg: ModelConfig, mesh, rules: sharding.Rules | None = None) -> Weights:
    """A :class:`jax.sharding.NamedSharding` for every parameter, from its logical axes and the rules."""
    return map_specs(lambda s: sharding.named_sharding(s.axes, mesh, s.shape, rules), weight_specs(cfg))
