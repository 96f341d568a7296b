"""Flax NNX front end: :class:`CausalLM` holds a config and its :class:`~mfjax.models.weights.Weights` as
``nnx.Param`` leaves.

The maths lives in :mod:`mfjax.models.decoder` as pure functions. The module is the edge users touch in
notebooks (``model = mfjax.io.hf.load_model(dir)``; ``model(tokens)``); hot loops take ``model.weights()``
once and run the pure functions through ``jax.jit`` / ``lax.scan`` (the NNX split-once pattern). The text
engine (:class:`mfjax.engine.api.Engine`) reads the same arrays: one copy of the weights.
"""

from __future__ import annotations

from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from mfjax.config import ModelConfig
from mfjax.models import decoder
from mfjax.models.weights import Weights, init_weights


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


class CausalLM(nnx.Module):
    """A decoder-only causal LM of any supported family."""

    def __init__(self, cfg: ModelConfig, weights: Weights, *, attn_impl: str = "xla"):
        if not isinstance(weights, Weights):
            raise TypeError(f"CausalLM takes mfjax.models.weights.Weights, got {type(weights).__name__}")
        self.cfg = cfg
        self.attn_impl = attn_impl
        self.params = nnx.data(jax.tree.map(nnx.Param, weights))

    @classmethod
    def random(cls, cfg: ModelConfig, seed: int = 0, dtype=jnp.float32, **kwargs) -> "CausalLM":
        """Random weights (tests, benchmarks)."""
        return cls(cfg, init_weights(cfg, jax.random.key(seed), dtype), **kwargs)

    def weights(self) -> Weights:
        """The weights as plain arrays (the same buffers, no copy), for the pure functions."""
        return jax.tree.map(lambda v: v[...], self.params, is_leaf=_is_variable)

    def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """float32 logits [B, T, V] for tokens [B, T]; ``mask`` marks real (non-padding) tokens. Jitted."""
        return decoder.forward_logits_jit(self.weights(), self.cfg, tokens, mask, attn_impl=self.attn_impl)
