"""LoRA maths: the trainable side path beside frozen weights, and merging adapters into weights.

**Side path.** :class:`LoraWeights` is a float32 pytree of (A, B) pairs per targeted projection, stacked over
layers like :class:`~mfjax.models.weights.LayerWeights`. Shapes follow each projection's einsum (A: the
input dims + r; B: r + the output dims)::

    q: a [L, D, r], b [L, r, N, H]     k, v: a [L, D, r], b [L, r, K, H]     o: a [L, N, H, r], b [L, r, D]
    gate, up: a [L, D, r], b [L, r, F]                                     down: a [L, F, r], b [L, r, D]

and the decoder computes ``y = x·W + s·((x·A)·B)`` with ``s = α / r`` (``α / √r`` with rsLoRA), A and B cast
to the activation dtype. Initialised as PEFT does (A kaiming-uniform, B = 0), so step 0 is the base model;
``lora=None`` leaves the forward untouched. One copy of the base weights serves the tuned model and the
untuned one (and a prior) side by side; gradients reach only the LoRA leaves.

**Merging.** :func:`merge` folds a side path into the weights (for sampling, in float32, cast back);
:func:`add_deltas` adds per-layer updates already in the mfjax layout (what :mod:`mfjax.io.peft` reads
from a PEFT adapter folder).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mfjax.config import ModelConfig
from mfjax.models.weights import Weights, get_path, replace_path

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# Per target: the einsum of x·A and of (x·A)·B, and how many trailing weight dims are its input.
_INPUT_DIMS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}

# Paths in Weights -> HF module names (PEFT's target_modules).
HF_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
              "down": "down_proj"}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Rank, alpha and targets of a LoRA (hashable: a static argument)."""

    rank: int = 64
    alpha: float = 64.0
    targets: tuple[str, ...] = TARGETS
    use_rslora: bool = False

    def __post_init__(self):
        unknown = set(self.targets) - set(TARGETS)
        if unknown:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {TARGETS}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in self.targets))

    @property
    def scale(self) -> float:
        """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return float(self.alpha) / (math.sqrt(self.rank) if self.use_rslora else self.rank)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraPair:
    a: jax.Array
    b: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraWeights:
    """(A, B) per targeted projection (None where not targeted), stacked over layers; ``scale`` is static."""

    q: Optional[LoraPair] = None
    k: Optional[LoraPair] = None
    v: Optional[LoraPair] = None
    o: Optional[LoraPair] = None
    gate: Optional[LoraPair] = None
    up: Optional[LoraPair] = None
    down: Optional[LoraPair] = None
    scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))

    def pairs(self) -> dict[str, LoraPair]:
        return {t: getattr(self, t) for t in TARGETS if getattr(self, t) is not None}


def lora_shapes(cfg: ModelConfig, rank: int, target: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(A shape, B shape) of ``target``, stacked over layers."""
    L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    return {
        "q": ((L, D, rank), (L, rank, N, H)),
        "k": ((L, D, rank), (L, rank, K, H)),
        "v": ((L, D, rank), (L, rank, K, H)),
        "o": ((L, N, H, rank), (L, rank, D)),
        "gate": ((L, D, rank), (L, rank, F)),
        "up": ((L, D, rank), (L, rank, F)),
        "down": ((L, F, rank), (L, rank, D)),
    }[target]


def lora_axes(target: str) -> tuple[tuple, tuple]:
    """Logical axes of (A, B): the weight's own axes, the rank replicated."""
    return {
        "q": (("layers", "embed", "lora_rank"), ("layers", "lora_rank", "q_heads", "head_dim")),
        "k": (("layers", "embed", "lora_rank"), ("layers", "lora_rank", "kv_heads", "head_dim")),
        "v": (("layers", "embed", "lora_rank"), ("layers", "lora_rank", "kv_heads", "head_dim")),
        "o": (("layers", "q_heads", "head_dim", "lora_rank"), ("layers", "lora_rank", "embed")),
        "gate": (("layers", "embed", "lora_rank"), ("layers", "lora_rank", "mlp")),
        "up": (("layers", "embed", "lora_rank"), ("layers", "lora_rank", "mlp")),
        "down": (("layers", "mlp", "lora_rank"), ("layers", "lora_rank", "embed")),
    }[target]


def init_lora(cfg: ModelConfig, spec: LoraSpec, key: jax.Array, dtype=jnp.float32) -> LoraWeights:
    """PEFT's initialisation: A kaiming-uniform (bound 1 / sqrt(fan_in)), B = 0."""
    keys = jax.random.split(key, len(spec.targets))
    pairs = {}
    for t, k in zip(spec.targets, keys):
        a_shape, b_shape = lora_shapes(cfg, spec.rank, t)
        fan_in = int(np.prod(a_shape[1:-1]))
        bound = 1.0 / math.sqrt(fan_in)
        pairs[t] = LoraPair(a=jax.random.uniform(k, a_shape, dtype, -bound, bound), b=jnp.zeros(b_shape, dtype))
    return LoraWeights(**pairs, scale=spec.scale)


def layer_delta(pair: LoraPair, target: str, scale: float) -> jax.Array:
    """s·A·B for one layer's pair, in float32, shaped like that layer's weight."""
    a, b = pair.a.astype(jnp.float32), pair.b.astype(jnp.float32)
    n = _INPUT_DIMS[target]
    a2 = a.reshape(-1, a.shape[-1])  # [in..., r] -> [in, r]
    b2 = b.reshape(b.shape[0], -1)  # [r, out...] -> [r, out]
    return (scale * (a2 @ b2)).reshape(a.shape[:n] + b.shape[1:])


def merge(weights: Weights, lora: LoraWeights) -> Weights:
    """``weights`` with the side path folded in: W + s·A·B per layer (float32, cast back to W's dtype)."""
    out = weights
    for target, pair in lora.pairs().items():
        w = get_path(weights, ("layers", target))
        delta = jax.vmap(lambda p, t=target: layer_delta(p, t, lora.scale))(pair)
        out = replace_path(out, ("layers", target), (w.astype(jnp.float32) + delta).astype(w.dtype))
    return out


# (path, layer or None) -> update in the mfjax layout of that parameter (per layer when layer is given).
Deltas = Mapping[tuple[str, ...], Mapping[Optional[int], np.ndarray]]


def add_deltas(weights: Weights, deltas: Deltas) -> Weights:
    """A new :class:`Weights` with ``deltas`` added (float32 sums, cast back; jax arrays keep their sharding;
    untouched parameters are shared)."""
    out = weights
    for path, per_layer in deltas.items():
        array = get_path(weights, path)
        value = np.array(jax.device_get(array), dtype=np.float32)  # a copy: the input is never modified
        for layer, delta in per_layer.items():
            target = value if layer is None else value[layer]
            if target.shape != delta.shape:
                raise ValueError(f"param {'/'.join(path)} has shape {list(value.shape)}, which does not fit the "
                                 f"update {list(delta.shape)}")
            target += delta
        merged: Any = value.astype(array.dtype)
        if isinstance(array, jax.Array):
            merged = jax.device_put(merged, array.sharding)
        out = replace_path(out, path, merged)
    return out
