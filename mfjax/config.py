"""Model configuration: one frozen dataclass for every supported decoder family.

Family differences (Qwen2 biases, Llama 3 RoPE scaling, Mistral sliding windows, Gemma 2 norms and
soft-capping) are flags on :class:`ModelConfig`, built from an HF ``config.json`` by
:meth:`ModelConfig.from_hf` and written back by :meth:`ModelConfig.to_hf`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

SUPPORTED_FAMILIES = ("qwen2", "llama", "mistral", "gemma2")

# HF config fields that change the maths but that mfjax does not implement. Each maps to the value
# (or predicate) under which the field is harmless; anything else is refused with a clear error.
_UNSUPPORTED_IF = {
    "mlp_bias": lambda v: not v,
    "pretraining_tp": lambda v: v in (None, 1),
    "use_bidirectional_attention": lambda v: not v,
    "attention_dropout": lambda v: not v,  # training-time only, but refuse silent changes of maths
}

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_tanh"}


class UnsupportedConfigError(ValueError):
    """An HF config asks for something mfjax does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``kind`` is 'llama3' or 'linear'."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder maths needs, with one flag per family difference.

    Letters used in shape comments: V vocab, D model, F ffn, L layers, N q-heads, K kv-heads, H head dim.
    """

    model_type: str
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projection biases (Qwen2)
    hidden_act: str = "silu"  # 'silu' (SwiGLU) or 'gelu_tanh' (GeGLU)
    sliding_window: int | None = None
    # One entry per layer: True where the layer uses sliding-window attention.
    sliding_layers: tuple[bool, ...] = ()
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + w)
    scale_embeddings: bool = False  # Gemma: embeddings multiplied by sqrt(D)
    sandwich_norms: bool = False  # Gemma 2: extra norms after attention and after the MLP
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    query_pre_attn_scalar: float | None = None  # Gemma 2: attention scale = this ** -0.5
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # The HF config it came from, kept so export writes back what it read. Not part of equality.
    hf_config: Mapping[str, Any] | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_FAMILIES:
            raise UnsupportedConfigError(
                f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_FAMILIES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if not self.sliding_layers:
            object.__setattr__(self, "sliding_layers", (False,) * self.num_layers)
        if len(self.sliding_layers) != self.num_layers:
            raise UnsupportedConfigError(
                f"layer_types has {len(self.sliding_layers)} entries for {self.num_layers} layers"
            )
        if any(self.sliding_layers) and not self.sliding_window:
            raise UnsupportedConfigError("layer_types asks for sliding attention but sliding_window is unset")

    @property
    def attention_scale(self) -> float:
        """Multiplier applied to q·k before the softmax."""
        if self.query_pre_attn_scalar is not None:
            return float(self.query_pre_attn_scalar) ** -0.5
        return 1.0 / math.sqrt(self.head_dim)

    @property
    def param_count(self) -> int:
        """Number of parameters (embeddings counted once when tied)."""
        d, f, n, k, h = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        per_layer = d * n * h * 2 + d * k * h * 2 + 3 * d * f + 2 * d
        if self.attention_bias:
            per_layer += (n + 2 * k) * h
        if self.sandwich_norms:
            per_layer += 2 * d
        total = self.num_layers * per_layer + self.vocab_size * d + d
        if not self.tie_word_embeddings:
            total += self.vocab_size * d
        return total

    # ------------------------------------------------------------------------------------------ HF
    @classmethod
    def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike) -> "ModelConfig":
        """Builds a config from an HF ``config.json`` (a dict, the file, or its directory)."""
        if not isinstance(config, Mapping):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            try:
                with open(path, encoding="utf-8") as f:
                    config = json.load(f)
            except FileNotFoundError:
                raise FileNotFoundError(f"no HF config at {path}") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        hf = dict(config)
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_FAMILIES:
            raise UnsupportedConfigError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_FAMILIES)}"
            )
        for key, harmless in _UNSUPPORTED_IF.items():
            if key in hf and not harmless(hf[key]):
                raise UnsupportedConfigError(f"{model_type} config field {key}={hf[key]!r} is not supported")
        if hf.get("quantization_config"):
            raise UnsupportedConfigError("quantization_config is not supported: export unquantized weights")

        default_act = "gelu_pytorch_tanh" if model_type == "gemma2" else "silu"
        act = hf.get("hidden_activation") or hf.get("hidden_act") or default_act
        if act not in _ACTIVATIONS:
            raise UnsupportedConfigError(f"activation {act!r} is not supported")

        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        head_dim = hf.get("head_dim") or hidden // num_heads
        num_layers = hf["num_hidden_layers"]

        rope_theta, rope_scaling = _read_rope(hf, model_type)
        sliding_window, sliding_layers = _read_sliding(hf, model_type, num_layers)

        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        gemma = model_type == "gemma2"
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            attention_bias=(model_type == "qwen2") or bool(hf.get("attention_bias", False)),
            hidden_act=_ACTIVATIONS[act],
            sliding_window=sliding_window,
            sliding_layers=sliding_layers,
            norm_plus_one=gemma,
            scale_embeddings=gemma,
            sandwich_norms=gemma,
            attn_logit_softcap=hf.get("attn_logit_softcapping") if gemma else None,
            final_logit_softcap=hf.get("final_logit_softcapping") if gemma else None,
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar") if gemma else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
            hf_config=hf,
        )

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` dict for this config (the original's extra fields are kept)."""
        hf = dict(self.hf_config or {})
        architectures = {
            "qwen2": "Qwen2ForCausalLM",
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "gemma2": "Gemma2ForCausalLM",
        }
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rope.update(rope_type=self.rope_scaling.kind, factor=self.rope_scaling.factor)
            if self.rope_scaling.kind == "llama3":
                rope.update(
                    low_freq_factor=self.rope_scaling.low_freq_factor,
                    high_freq_factor=self.rope_scaling.high_freq_factor,
                    original_max_position_embeddings=self.rope_scaling.original_max_position_embeddings,
                )
        hf.pop("rope_scaling", None)
        hf.update(
            model_type=self.model_type,
            architectures=hf.get("architectures") or [architectures[self.model_type]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,  # older transformers read the top-level key
            rope_parameters=rope,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        hf_act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[self.hidden_act]
        hf["hidden_activation" if self.model_type == "gemma2" else "hidden_act"] = hf_act
        if self.model_type in ("llama",):
            hf["attention_bias"] = self.attention_bias
        if self.sliding_window:
            hf["sliding_window"] = self.sliding_window
            if self.model_type == "mistral":
                # transformers reads a mistral config with layer_types as Ministral; Mistral slides everywhere.
                hf.pop("layer_types", None)
            else:
                hf["layer_types"] = ["sliding_attention" if s else "full_attention" for s in self.sliding_layers]
            if self.model_type == "qwen2":
                hf["use_sliding_window"] = any(self.sliding_layers)
        if self.bos_token_id is not None:
            hf["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            hf["eos_token_id"] = self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)
        if self.pad_token_id is not None:
            hf["pad_token_id"] = self.pad_token_id
        return hf

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (keeps ``hf_config``)."""
        return dataclasses.replace(self, **changes)


def _read_rope(hf: Mapping[str, Any], model_type: str) -> tuple[float, RopeScaling | None]:
    """RoPE θ and scaling from either the transformers-5 ``rope_parameters`` or the hub's top-level keys."""
    params = hf.get("rope_parameters") or {}
    legacy = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    spec = {**legacy, **{k: v for k, v in params.items() if k != "rope_theta"}}
    kind = spec.get("rope_type") or spec.get("type") or "default"
    if kind == "default":
        return float(theta), None
    if kind == "llama3":
        return float(theta), RopeScaling(
            kind="llama3",
            factor=float(spec["factor"]),
            low_freq_factor=float(spec.get("low_freq_factor", 1.0)),
            high_freq_factor=float(spec.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(spec.get("original_max_position_embeddings", 8192)),
        )
    if kind == "linear":
        return float(theta), RopeScaling(kind="linear", factor=float(spec["factor"]))
    raise UnsupportedConfigError(f"{model_type}: rope_type {kind!r} is not supported (default, llama3, linear are)")


def _read_sliding(hf: Mapping[str, Any], model_type: str, num_layers: int) -> tuple[int | None, tuple[bool, ...]]:
    """Which layers use sliding-window attention, and the window."""
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
        return None, (False,) * num_layers
    if not window:
        return None, (False,) * num_layers
    if layer_types:
        unknown = set(layer_types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise UnsupportedConfigError(f"{model_type}: layer_types {sorted(unknown)} are not supported")
        return int(window), tuple(t == "sliding_attention" for t in layer_types)
    if model_type == "gemma2":
        return int(window), tuple(i % 2 == 0 for i in range(num_layers))
    if model_type == "qwen2":
        first = hf.get("max_window_layers", num_layers)
        return int(window), tuple(i >= first for i in range(num_layers))
    return int(window), (True,) * num_layers


def default_attn_impl() -> str:
    """The attention implementation used when none is asked for: XLA everywhere, for now.

    cuDNN (``attn_impl="cudnn"``) was measured 6-10x faster than XLA for long-sequence attention on
    H100/H200 (DESIGN.md), but mfjax's masked cuDNN path has not yet been run on a GPU, so it stays
    opt-in until ``benchmarks/generate.py`` has checked it there.
    """
    return "xla"
