"""Flax NNX front end: :class:`CausalLM` holds a config and its parameters as ``nnx.Param`` leaves.

The maths lives in :mod:`mfjax.models.decoder` as pure functions. The module is the edge users touch in
notebooks (``model = CausalLM.from_hf(dir)``; ``model(tokens)``); hot loops take ``model.pure_params()``
once and run the pure functions through ``jax.jit`` / ``lax.scan`` (the NNX split-once pattern).
"""

from __future__ import annotations

import os
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from mfjax.config import ModelConfig
from mfjax.models import decoder
from mfjax.models.params import init_params, stack_layers


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


class CausalLM(nnx.Module):
    """A decoder-only causal LM of any supported family."""

    def __init__(self, cfg: ModelConfig, params: dict[str, Any], *, attn_impl: str = "xla"):
        self.cfg = cfg
        self.attn_impl = attn_impl
        self.params = nnx.data(jax.tree.map(nnx.Param, stack_layers(params)))

    @classmethod
    def random(cls, cfg: ModelConfig, seed: int = 0, dtype=jnp.float32, **kwargs) -> "CausalLM":
        """Random weights (tests, benchmarks)."""
        return cls(cfg, init_params(cfg, jax.random.key(seed), dtype), **kwargs)

    @classmethod
    def from_hf(cls, model_dir: str | os.PathLike, dtype=jnp.float32, shardings=None, **kwargs) -> "CausalLM":
        """Loads an HF checkpoint directory (config.json + safetensors)."""
        from mfjax.io.hf import load_hf

        cfg, params = load_hf(model_dir, dtype=dtype, shardings=shardings)
        return cls(cfg, params, **kwargs)

    def pure_params(self) -> dict[str, Any]:
        """The parameters as a plain dict of arrays (layers stacked), for the pure functions."""
        return jax.tree.map(lambda v: v[...], self.params, is_leaf=_is_variable)

    def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """float32 logits [B, T, V] for tokens [B, T]; ``mask`` marks real (non-padding) tokens."""
        return decoder.forward_logits(self.pure_params(), self.cfg, tokens, mask, attn_impl=self.attn_impl)

    def save_hf(self, out_dir: str | os.PathLike, **kwargs) -> None:
        """Exports to an HF directory that ``transformers.AutoModelForCausalLM`` loads."""
        from mfjax.io.hf import save_hf

        save_hf(out_dir, self.cfg, self.pure_params(), **kwargs)
