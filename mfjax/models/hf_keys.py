"""The HF key table: for every decoder parameter, its key in an HF checkpoint and the layout change.

One row (:class:`KeyRule`) per parameter of :func:`mfjax.models.weights.weight_specs`: the HF key template
(``{i}`` = layer index), the path in :class:`~mfjax.models.weights.Weights`, and the :class:`Transform`
between the HF tensor and one layer's slice of the mfjax parameter (pure reshapes and transposes with
exact inverses). Readers and writers of HF safetensors and PEFT adapters (:mod:`mfjax.io`) and the LoRA
maths share this table; it lives beside the model because it is model knowledge.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from mfjax.config import ModelConfig
from mfjax.models.weights import iter_paths, weight_specs


@dataclasses.dataclass(frozen=True)
class Transform:
    """A layout change between an HF tensor and one layer's slice of an mfjax parameter.

    ``hf_shape`` maps the mfjax (per-layer) shape to the HF shape; ``to_mfjax`` takes the HF array and
    the mfjax shape; ``to_hf`` is its exact inverse (pure reshapes and transposes, so bit-exact).
    """

    name: str
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]
    to_mfjax: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda s: s, lambda x, s: x, lambda x: x)
# [A, B] <-> [B, A]: torch Linear stores [out, in]; mfjax multiplies x @ w with w [in, out].
TRANSPOSE = Transform("transpose", lambda s: s[::-1], lambda x, s: x.T, lambda x: x.T)
# q/k/v projections: HF [X*H, D] <-> mfjax [D, X, H].
SPLIT_HEADS_OUT = Transform(
    "split_heads_out",
    lambda s: (s[1] * s[2], s[0]),
    lambda x, s: x.reshape(s[1], s[2], s[0]).transpose(2, 0, 1),
    lambda x: x.transpose(1, 2, 0).reshape(x.shape[1] * x.shape[2], x.shape[0]),
)
# output projection: HF [D, N*H] <-> mfjax [N, H, D].
SPLIT_HEADS_IN = Transform(
    "split_heads_in",
    lambda s: (s[2], s[0] * s[1]),
    lambda x, s: x.reshape(s[2], s[0], s[1]).transpose(1, 2, 0),
    lambda x: x.transpose(2, 0, 1).reshape(x.shape[2], x.shape[0] * x.shape[1]),
)
# q/k/v biases: HF [X*H] <-> mfjax [X, H].
SPLIT_BIAS = Transform(
    "split_bias",
    lambda s: (s[0] * s[1],),
    lambda x, s: x.reshape(s),
    lambda x: x.reshape(-1),
)


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """One row of the key table: an HF key template (``{i}`` = layer index) and where it lands."""

    hf_template: str
    path: tuple[str, ...]  # e.g. ("layers", "q")
    transform: Transform

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_template

    @property
    def pattern(self) -> re.Pattern:
        return re.compile(re.escape(self.hf_template).replace(r"\{i\}", r"(\d+)") + "$")

    def hf_key(self, layer: int | None = None) -> str:
        return self.hf_template.format(i=layer)


def key_table(cfg: ModelConfig) -> list[KeyRule]:
    """The HF key of every parameter of ``cfg`` and the layout change to reach it."""
    attn = "model.layers.{i}.self_attn."
    mlp = "model.layers.{i}.mlp."
    layer = "model.layers.{i}."
    rules = [
        KeyRule("model.embed_tokens.weight", ("embed",), IDENTITY),
        KeyRule("model.norm.weight", ("final_norm",), IDENTITY),
        KeyRule(attn + "q_proj.weight", ("layers", "q"), SPLIT_HEADS_OUT),
        KeyRule(attn + "k_proj.weight", ("layers", "k"), SPLIT_HEADS_OUT),
        KeyRule(attn + "v_proj.weight", ("layers", "v"), SPLIT_HEADS_OUT),
        KeyRule(attn + "o_proj.weight", ("layers", "o"), SPLIT_HEADS_IN),
        KeyRule(mlp + "gate_proj.weight", ("layers", "gate"), TRANSPOSE),
        KeyRule(mlp + "up_proj.weight", ("layers", "up"), TRANSPOSE),
        KeyRule(mlp + "down_proj.weight", ("layers", "down"), TRANSPOSE),
        KeyRule(layer + "input_layernorm.weight", ("layers", "attn_norm"), IDENTITY),
    ]
    if cfg.sandwich_norms:
        # Gemma 2: HF's "post_attention_layernorm" is the norm *after* attention, not before the MLP.
        rules += [
            KeyRule(layer + "post_attention_layernorm.weight", ("layers", "post_attn_norm"), IDENTITY),
            KeyRule(layer + "pre_feedforward_layernorm.weight", ("layers", "mlp_norm"), IDENTITY),
            KeyRule(layer + "post_feedforward_layernorm.weight", ("layers", "post_mlp_norm"), IDENTITY),
        ]
    else:
        rules.append(KeyRule(layer + "post_attention_layernorm.weight", ("layers", "mlp_norm"), IDENTITY))
    if cfg.attention_bias:
        rules += [
            KeyRule(attn + "q_proj.bias", ("layers", "q_bias"), SPLIT_BIAS),
            KeyRule(attn + "k_proj.bias", ("layers", "k_bias"), SPLIT_BIAS),
            KeyRule(attn + "v_proj.bias", ("layers", "v_bias"), SPLIT_BIAS),
        ]
    if not cfg.tie_word_embeddings:
        rules.append(KeyRule("lm_head.weight", ("lm_head",), TRANSPOSE))
    _check_table_covers_specs(cfg, rules)
    return rules


def _check_table_covers_specs(cfg: ModelConfig, rules: list[KeyRule]) -> None:
    """The key table and :func:`weight_specs` must name the same parameters (guards future edits)."""
    spec_paths = {path for path, _ in iter_paths(weight_specs(cfg))}
    rule_paths = {r.path for r in rules}
    if spec_paths != rule_paths:
        raise AssertionError(
            f"key table and weight_specs disagree: only in specs {sorted(spec_paths - rule_paths)}, "
            f"only in table {sorted(rule_paths - spec_paths)}"
        )


def per_layer_shape(rule: KeyRule, spec) -> tuple[int, ...]:
    """The shape of one HF tensor's mfjax counterpart: a layer's slice for per-layer rules."""
    return tuple(spec.shape[1:] if rule.per_layer else spec.shape)
