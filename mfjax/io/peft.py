"""PEFT LoRA adapters read from disk and merged into mfjax weights at load time.

The simulator never runs an unmerged LoRA: an adapter folder written by PEFT's ``save_pretrained``
(``adapter_config.json`` + ``adapter_model.safetensors``) is folded into the base weights once, right
after :func:`mfjax.io.hf.load_hf`, so decoding costs exactly what the base model costs (zero overhead)::

    cfg, weights = load_hf(model_dir)
    weights = merge_peft_adapter(cfg, weights, adapter_dir)

For every adapted ``torch.nn.Linear`` the merge is PEFT's own: ``W' = W + scale · (B @ A)`` with ``A``
``[r, in]``, ``B`` ``[out, r]`` and ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
``use_rslora``; ``rank_pattern`` and ``alpha_pattern`` give per-module values). The product is formed in
the HF ``[out, in]`` layout, in float32, moved into the mfjax layout by the key table's transform of
that weight (:func:`mfjax.models.hf_keys.key_table`), added to the float32 weight and cast back to the
parameter dtype (:func:`mfjax.models.lora.add_deltas`). Anything that would make the merged model differ from PEFT's forward is refused with an error
naming the adapter file and the offending config field or tensor key: other PEFT methods, DoRA,
``fan_in_fan_out``, trained biases, ``modules_to_save`` (e.g. a fully trained ``lm_head``), LoRA on
embeddings, and keys whose module has no weight in the key table.

Adapters initialised with PiSSA, OLoRA, CorDA, LoRA-GA or LoftQ and saved without PEFT's conversion are
relative to the residual base model saved alongside them; merge them into that base, not the original.

Training-time LoRA (a separate trainable pytree beside frozen weights) lives in :mod:`mfjax.models.lora`;
:func:`save_peft_adapter` writes one as a PEFT adapter folder (what IB-Tune exports) and
:func:`load_peft_lora` reads such a folder back into a :class:`~mfjax.models.lora.LoraWeights`, bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from mfjax.config import ModelConfig
from mfjax.models.hf_keys import IDENTITY, KeyRule, key_table, per_layer_shape
from mfjax.models.lora import (HF_MODULES, TARGETS, Deltas, LoraPair, LoraSpec, LoraWeights, add_deltas,
                               lora_shapes)
from mfjax.models.weights import Weights, get_path, weight_specs

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_PICKLE_FILE = "adapter_model.bin"

# PEFT's saved keys: ``base_model.model.<module>.lora_A.weight`` (the adapter name, e.g. ``default``, is
# stripped on save; older or hand-made files keep it as ``lora_A.default.weight``). Adapters saved by
# transformers' own PEFT integration with ``save_peft_format=False`` lack the ``base_model.model.`` prefix.
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+?)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")

# Config fields of LoraConfig that change the maths of the adapted layers (or add trained tensors that a
# merge of A and B would silently drop). Each is harmless only when falsy (absent, None, False, [], {}).
_REFUSED_WHEN_SET = {
    "use_dora": "DoRA (weight-decomposed LoRA) rescales each merged column by a learned magnitude",
    "lora_bias": "lora_bias trains a bias on lora_B",
    "use_qalora": "QA-LoRA pools the input in groups before lora_A",
    "layer_replication": "layer_replication duplicates base layers",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters)",
    "trainable_token_indices": "trainable_token_indices trains embedding rows",
    "alora_invocation_tokens": "activated LoRA applies the adapter only after invocation tokens",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing between several LoRA experts",
    "kasa_config": "KaSA",
    "use_bdlora": "block-diagonal LoRA",
}


class UnsupportedAdapterError(ValueError):
    """A PEFT adapter uses something that a plain ``W + scale · B @ A`` merge cannot reproduce."""


class AdapterFormatError(ValueError):
    """A PEFT adapter folder is malformed: missing or misshapen tensors, or keys that match no weight."""


@dataclasses.dataclass(frozen=True)
class LoraAdapterConfig:
    """The fields of a PEFT ``adapter_config.json`` that the merge reads (defaults are PEFT's)."""

    r: int = 8
    lora_alpha: float = 8
    target_modules: tuple[str, ...] | str | None = None
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: tuple[str, ...] | None = None
    peft_type: str | None = None
    use_dora: bool = False
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    base_model_name_or_path: str | None = None
    # Where it was read from (for error messages) and the whole JSON. Not part of equality.
    config_file: str = dataclasses.field(default=ADAPTER_CONFIG_FILE, compare=False)
    weights_file: str = dataclasses.field(default=ADAPTER_WEIGHTS_FILE, compare=False)
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, config_file: str = ADAPTER_CONFIG_FILE,
                  weights_file: str = ADAPTER_WEIGHTS_FILE) -> "LoraAdapterConfig":
        """Reads the known fields of an ``adapter_config.json`` dict; unknown fields stay in ``raw``."""
        targets = raw.get("target_modules")
        to_save = raw.get("modules_to_save")
        return cls(
            r=int(raw.get("r", 8)),
            lora_alpha=raw.get("lora_alpha", 8),
            target_modules=tuple(targets) if isinstance(targets, (list, tuple)) else targets,
            use_rslora=bool(raw.get("use_rslora", False)),
            fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
            bias=raw.get("bias", "none") or "none",
            modules_to_save=tuple(to_save) if to_save else None,
            peft_type=raw.get("peft_type"),
            use_dora=bool(raw.get("use_dora", False)),
            rank_pattern=dict(raw.get("rank_pattern") or {}),
            alpha_pattern=dict(raw.get("alpha_pattern") or {}),
            base_model_name_or_path=raw.get("base_model_name_or_path"),
            config_file=config_file,
            weights_file=weights_file,
            raw=dict(raw),
        )

    def rank(self, module: str) -> int:
        """The rank PEFT gives ``module`` (e.g. ``model.layers.0.self_attn.q_proj``): rank_pattern or r."""
        key = _pattern_key(self.rank_pattern, module)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha(self, module: str) -> float:
        """The lora_alpha PEFT gives ``module``: alpha_pattern or lora_alpha."""
        key = _pattern_key(self.alpha_pattern, module)
        return float(self.alpha_pattern[key]) if key is not None else float(self.lora_alpha)

    def scale(self, module: str) -> float:
        """PEFT's ``scaling`` of ``module``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r = self.rank(module)
        return self.alpha(module) / (math.sqrt(r) if self.use_rslora else r)

    def check_supported(self) -> None:
        """Raises :class:`UnsupportedAdapterError` (naming the config file and field) unless plain LoRA."""
        where = self.config_file

        def refuse(field: str, value: Any, why: str) -> None:
            raise UnsupportedAdapterError(f"{where}: {field}={value!r} is not supported: {why}")

        if self.peft_type != "LORA":
            refuse("peft_type", self.peft_type, "only LoRA adapters (peft_type 'LORA') can be merged")
        if self.fan_in_fan_out:
            refuse("fan_in_fan_out", True, "adapters stored for Conv1D ([in, out]) layers; mfjax reads torch "
                   "Linear layouts ([out, in])")
        if self.bias != "none":
            refuse("bias", self.bias, "the adapter trains biases; only bias='none' is merged")
        if self.modules_to_save:
            refuse("modules_to_save", list(self.modules_to_save), "fully trained modules (such as an lm_head or "
                   "embeddings) are unsupported; merge the adapter with PEFT and export the whole model instead")
        if self.use_dora:
            refuse("use_dora", True, _REFUSED_WHEN_SET["use_dora"])
        for field, why in _REFUSED_WHEN_SET.items():
            value = self.raw.get(field)
            if value and field != "use_dora":
                refuse(field, value, why)


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of ``module`` at a dot boundary."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module):
            return pattern
    return None


# ------------------------------------------------------------------------------------------ reading
def read_peft_adapter(adapter_dir: str | os.PathLike) -> tuple[LoraAdapterConfig, dict[str, np.ndarray]]:
    """Reads a PEFT adapter folder: its config and every tensor of ``adapter_model.safetensors``.

    Nothing is validated beyond the files being readable; :func:`lora_deltas` checks the contents.

    Raises:
      FileNotFoundError: the folder, ``adapter_config.json`` or the weights are absent; a folder holding only
        ``adapter_model.bin`` is refused because only safetensors is supported (pickles are not read).
      AdapterFormatError: the config is not a JSON object.
    """
    adapter_dir = os.fspath(adapter_dir)
    if not os.path.isdir(adapter_dir):
        raise FileNotFoundError(f"LoRA adapter folder {adapter_dir} does not exist")
    config_file = os.path.join(adapter_dir, ADAPTER_CONFIG_FILE)
    weights_file = os.path.join(adapter_dir, ADAPTER_WEIGHTS_FILE)
    if not os.path.exists(config_file):
        raise FileNotFoundError(f"no {ADAPTER_CONFIG_FILE} in {adapter_dir} (not a PEFT adapter folder?)")
    try:
        with open(config_file, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise AdapterFormatError(f"{config_file}: expected a JSON object, found {type(raw).__name__}")
    if not os.path.exists(weights_file):
        pickle_file = os.path.join(adapter_dir, ADAPTER_PICKLE_FILE)
        if os.path.exists(pickle_file):
            raise FileNotFoundError(
                f"{pickle_file}: only {ADAPTER_WEIGHTS_FILE} is supported (pickled adapters are not read); "
                f"re-save the adapter with safe_serialization=True"
            )
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS_FILE} in {adapter_dir}")
    tensors = load_file(weights_file)  # bf16 comes back as ml_dtypes.bfloat16, no torch needed
    return LoraAdapterConfig.from_dict(raw, config_file=config_file, weights_file=weights_file), tensors


# ------------------------------------------------------------------------------------------ deltas
def _unsupported_key(where: str, key: str) -> UnsupportedAdapterError:
    """The error for an adapter tensor that is not a lora_A/lora_B weight, with what it most likely is."""
    hints = (
        ("lora_magnitude_vector", "a DoRA magnitude vector; DoRA is not supported"),
        ("lora_embedding_", "a LoRA on an embedding layer, which is not supported"),
        (".lora_B.bias", "a lora_B bias (lora_bias=True), which is not supported"),
        ("modules_to_save", "a fully trained module (modules_to_save), which is unsupported"),
    )
    for needle, why in hints:
        if needle in key:
            return UnsupportedAdapterError(f"{where}: key {key!r} is {why}")
    if key.endswith(".bias"):
        return UnsupportedAdapterError(f"{where}: key {key!r} is a trained bias; only bias='none' is supported")
    return UnsupportedAdapterError(
        f"{where}: key {key!r} is not a LoRA lora_A/lora_B weight (a fully trained module from modules_to_save, "
        f"such as an lm_head, or another PEFT method?); it is unsupported"
    )


def _find_rule(rules: list[KeyRule], hf_key: str, num_layers: int) -> tuple[KeyRule, int | None] | None:
    for rule in rules:
        m = rule.pattern.match(hf_key)
        if m and rule.transform is not IDENTITY:  # IDENTITY rows are norms and embeddings, not Linear layers
            layer = int(m.group(1)) if rule.per_layer else None
            if layer is not None and layer >= num_layers:
                return None
            return rule, layer
    return None


def _base_copy_rule(rules: list[KeyRule], key: str, num_layers: int) -> tuple[KeyRule, int | None] | None:
    """The key-table weight that ``key`` copies (``<module>.base_layer.weight`` or ``<module>.weight``), if any."""
    name = re.sub(r"\.base_layer\.weight$", ".weight", key.removeprefix(_PEFT_PREFIX))
    for rule in rules:
        m = rule.pattern.match(name)
        if m and name.endswith(".weight"):
            layer = int(m.group(1)) if rule.per_layer else None
            return None if layer is not None and layer >= num_layers else (rule, layer)
    return None


def _check_base_copy(where: str, key: str, copy: np.ndarray, rule: KeyRule, layer: int | None,
                     shape: tuple[int, ...], base_params: Weights | None) -> None:
    """PEFT saves base weights next to the adapter when it targets lm_head or embeddings (they may have been
    resized); merging is right only if they are the base model's own weights."""
    name = "/".join(rule.path)
    if base_params is None:
        raise AdapterFormatError(f"{where}: key {key!r} is a copy of the base weight {name}; pass the base "
                                 f"params to check that it is unchanged")
    if tuple(copy.shape) != tuple(rule.transform.hf_shape(shape)):
        raise UnsupportedAdapterError(f"{where}: key {key!r} has shape {list(copy.shape)}, but the base model's "
                                      f"{name} has HF shape {list(rule.transform.hf_shape(shape))} (resized "
                                      f"vocabulary?); it is unsupported")
    base = get_path(base_params, rule.path)
    base = np.asarray(jax.device_get(base if layer is None else base[layer]))
    value = np.asarray(rule.transform.to_mfjax(copy, shape))
    coarse = min((base.dtype, value.dtype), key=lambda d: d.itemsize)  # compare at the stored precision
    if not np.array_equal(base.astype(coarse), value.astype(coarse)):
        raise UnsupportedAdapterError(
            f"{where}: key {key!r} holds its own {name} weight, which differs from the base model's (a fully "
            f"trained module such as modules_to_save, or a resized vocabulary?); it is unsupported: merge the "
            f"adapter with PEFT and export the whole model instead"
        )


def lora_deltas(
    cfg: ModelConfig,
    adapter: LoraAdapterConfig,
    tensors: Mapping[str, np.ndarray],
    base_params: Weights | None = None,
) -> Deltas:
    """The scaled LoRA updates in the mfjax layout: ``{param path: {layer (None if not per layer): delta}}``.

    Each delta is float32 with the per-layer mfjax shape of its parameter, i.e. what is added to
    ``params[path][layer]`` (``params[path]`` when the layer is None).

    PEFT also saves full copies of base weights (``lm_head.base_layer.weight`` when it targets lm_head,
    ``lm_head.weight`` with ``save_embedding_layers=True``); those are accepted only when ``base_params``
    is given and they equal its weights.

    Raises:
      UnsupportedAdapterError: the config or a key asks for something beyond plain LoRA on the key
        table's Linear weights, or a saved base weight differs from the base model's (the message names
        the file and the config field or key).
      AdapterFormatError: a lora_A without its lora_B (or the reverse), shapes that disagree with the
        model or with each other, keys mixing adapter names, or one module given twice.
    """
    adapter.check_supported()
    where = adapter.weights_file
    rules = key_table(cfg)
    specs = weight_specs(cfg)

    pairs: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    adapter_names = set()
    for key in sorted(tensors):
        m = _LORA_KEY.match(key)
        if not m:
            copied = _base_copy_rule(rules, key, cfg.num_layers)
            if copied is None:
                raise _unsupported_key(where, key)
            rule, layer = copied
            shape = per_layer_shape(rule, get_path(specs, rule.path))
            _check_base_copy(where, key, tensors[key], rule, layer, shape, base_params)
            continue
        module = m["module"].removeprefix(_PEFT_PREFIX)
        adapter_names.add(m["adapter"])
        slot = pairs.setdefault(module, {})
        if m["ab"] in slot:
            raise AdapterFormatError(f"{where}: key {key!r} gives lora_{m['ab']} of {module} a second time "
                                     f"(also {slot[m['ab']][0]!r})")
        slot[m["ab"]] = (key, tensors[key])
    if len(adapter_names) > 1:
        shown = sorted("(none)" if n is None else n for n in adapter_names)
        raise AdapterFormatError(f"{where}: keys of several adapters ({', '.join(shown)}); save one adapter per folder")
    if not pairs:
        raise AdapterFormatError(f"{where}: no lora_A/lora_B weights")

    deltas: dict[tuple[str, ...], dict[int | None, np.ndarray]] = {}
    for module, slot in pairs.items():
        some_key = next(iter(slot.values()))[0]
        for ab in "AB":
            if ab not in slot:
                raise AdapterFormatError(f"{where}: key {some_key!r} has no matching lora_{ab} weight")
        (key_a, a), (key_b, b) = slot["A"], slot["B"]
        found = _find_rule(rules, module + ".weight", cfg.num_layers)
        if found is None:
            raise UnsupportedAdapterError(
                f"{where}: key {key_a!r} adapts module {module!r}, which has no Linear weight in the "
                f"{cfg.model_type} key table ({cfg.num_layers} layers"
                f"{', tied embeddings: no lm_head' if cfg.tie_word_embeddings else ''})"
            )
        rule, layer = found
        shape = per_layer_shape(rule, get_path(specs, rule.path))
        out_dim, in_dim = rule.transform.hf_shape(shape)
        r = adapter.rank(module)
        if a.ndim != 2 or tuple(a.shape) != (r, in_dim):
            raise AdapterFormatError(f"{where}: key {key_a!r} has shape {list(a.shape)}, expected [{r}, {in_dim}] "
                                     f"(r, in_features of {module}; r from {os.path.basename(adapter.config_file)})")
        if b.ndim != 2 or tuple(b.shape) != (out_dim, r):
            raise AdapterFormatError(f"{where}: key {key_b!r} has shape {list(b.shape)}, expected [{out_dim}, {r}] "
                                     f"(out_features of {module}, r; r from {os.path.basename(adapter.config_file)})")
        delta_hf = np.float32(adapter.scale(module)) * (b.astype(np.float32) @ a.astype(np.float32))
        deltas.setdefault(rule.path, {})[layer] = np.asarray(rule.transform.to_mfjax(delta_hf, shape), np.float32)
    return deltas


# ------------------------------------------------------------------------------------------ merging
def merge_peft_adapter(cfg: ModelConfig, weights: Weights, adapter_dir: str | os.PathLike) -> Weights:
    """``weights`` with the PEFT LoRA adapter in ``adapter_dir`` merged in (see the module docstring).

    Args:
      cfg: the base model's config (as returned by :func:`mfjax.io.hf.load_hf`).
      weights: the base model's weights, any float dtype; not modified.
      adapter_dir: a PEFT ``save_pretrained`` folder (``adapter_config.json``, ``adapter_model.safetensors``).

    Returns:
      The merged weights, each adapted one in its original dtype (and sharding, for jax arrays).

    Raises:
      FileNotFoundError, UnsupportedAdapterError, AdapterFormatError: see :func:`read_peft_adapter` and
        :func:`lora_deltas`.
    """
    adapter, tensors = read_peft_adapter(adapter_dir)
    return add_deltas(weights, lora_deltas(cfg, adapter, tensors, base_params=weights))


# ------------------------------------------------------------------------------------------ writing
# Every Linear transform of the key table is "flatten the mfjax weight to [in, out], then transpose"
# (TRANSPOSE, SPLIT_HEADS_OUT, SPLIT_HEADS_IN). So for W = s·A·B with A [in..., r] and B [r, out...], the HF
# weight is s·B₂ᵀ·A₂ᵀ: PEFT's ``lora_A = A₂ᵀ`` [r, in] and ``lora_B = B₂ᵀ`` [out, r] (A₂, B₂ the flattened
# factors). These are pure reshapes and transposes, hence exact both ways; :func:`_check_flat_transpose`
# verifies the premise against the key table's own transform, so a new layout cannot slip through.
def _lora_rules(cfg: ModelConfig) -> dict[str, KeyRule]:
    """Target name ('q', ..., 'down') -> its key-table row."""
    by_path = {rule.path: rule for rule in key_table(cfg)}
    return {t: by_path[("layers", t)] for t in TARGETS}


def _check_flat_transpose(rule: KeyRule, shape: tuple[int, ...], n_in: int) -> None:
    probe = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    flat = probe.reshape(int(np.prod(shape[:n_in])), -1).T
    if not np.array_equal(rule.transform.to_hf(probe), flat):
        raise AssertionError(f"key-table transform {rule.transform.name} of {rule.hf_template} is not a "
                             f"flatten-and-transpose; the PEFT layout of its LoRA factors needs its own rule")


def _module(rule: KeyRule, layer: int) -> str:
    return rule.hf_key(layer).removesuffix(".weight")


def peft_tensors(cfg: ModelConfig, lora: LoraWeights) -> dict[str, np.ndarray]:
    """The ``adapter_model.safetensors`` tensors of ``lora`` (float32, PEFT's key names and layouts).

    Also maps anything shaped like a :class:`LoraWeights` (e.g. its gradients) into the PEFT layout."""
    rules = _lora_rules(cfg)
    specs = weight_specs(cfg)
    out = {}
    for target, pair in lora.pairs().items():
        rule = rules[target]
        a = np.asarray(jax.device_get(pair.a), np.float32)  # [L, in..., r]
        b = np.asarray(jax.device_get(pair.b), np.float32)  # [L, r, out...]
        n_in = a.ndim - 2
        _check_flat_transpose(rule, per_layer_shape(rule, get_path(specs, rule.path)), n_in)
        r = a.shape[-1]
        for layer in range(a.shape[0]):
            module = _module(rule, layer)
            out[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a[layer].reshape(-1, r).T)
            out[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b[layer].reshape(r, -1).T)
    return out


def peft_config_dict(spec: LoraSpec, *, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """``adapter_config.json`` of a plain LoRA with ``spec`` on a causal LM (fields PEFT 0.21 reads)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "use_rslora": spec.use_rslora,
        "target_modules": sorted(HF_MODULES[t] for t in spec.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_peft_adapter(cfg: ModelConfig, lora: LoraWeights, spec: LoraSpec, out_dir: str | os.PathLike, *,
                      base_model_name_or_path: str | None = None) -> str:
    """Writes ``lora`` as a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) that
    ``peft.PeftModel.from_pretrained`` loads onto the transformers model and :func:`merge_peft_adapter` merges.

    Args:
      cfg: the base model's config.
      lora: the trained side path (any float dtype; written as float32).
      spec: its rank, alpha, targets and rsLoRA flag (the scale PEFT recomputes from them must be ``lora``'s).
      out_dir: created if needed; an existing adapter there is replaced.
      base_model_name_or_path: recorded in the config (PEFT's field).
    """
    if not math.isclose(spec.scale, lora.scale, rel_tol=1e-12):
        raise ValueError(f"LoRA scale {lora.scale} does not match the spec's {spec.scale} (rank {spec.rank}, "
                         f"alpha {spec.alpha}, rslora {spec.use_rslora})")
    if set(lora.pairs()) != set(spec.targets):
        raise ValueError(f"LoRA targets {sorted(lora.pairs())} differ from the spec's {sorted(spec.targets)}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    save_file(peft_tensors(cfg, lora), os.path.join(out_dir, ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(out_dir, ADAPTER_CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(peft_config_dict(spec, base_model_name_or_path=base_model_name_or_path), f, indent=2)
        f.write("\n")
    return out_dir


def load_peft_lora(cfg: ModelConfig, adapter_dir: str | os.PathLike) -> tuple[LoraSpec, LoraWeights]:
    """Reads a PEFT LoRA adapter folder as a trainable side path (the exact inverse of :func:`save_peft_adapter`).

    Only adapters that a :class:`LoraSpec` describes are accepted: one rank and alpha for every module
    (no rank or alpha patterns), every layer of each target module present, targets among q/k/v/o/gate/up/down.
    Tensors keep their values bit for bit (float32).

    Raises:
      UnsupportedAdapterError, AdapterFormatError: naming the adapter file and the field or key at fault.
    """
    adapter, tensors = read_peft_adapter(adapter_dir)
    adapter.check_supported()
    where = adapter.config_file
    if adapter.rank_pattern or adapter.alpha_pattern:
        raise UnsupportedAdapterError(f"{where}: rank_pattern / alpha_pattern give modules their own rank or "
                                      f"alpha; a trainable LoRA has one rank and alpha")
    lora_deltas(cfg, adapter, tensors)  # full validation of keys and shapes, with its error messages
    modules = {m.group("module").removeprefix(_PEFT_PREFIX) for m in map(_LORA_KEY.match, tensors) if m}
    rules = _lora_rules(cfg)
    targets, pairs = [], {}
    for target, rule in rules.items():
        present = [layer for layer in range(cfg.num_layers) if _module(rule, layer) in modules]
        if not present:
            continue
        if len(present) != cfg.num_layers:
            raise AdapterFormatError(f"{adapter.weights_file}: {HF_MODULES[target]} is adapted on layers {present} "
                                     f"only; a trainable LoRA covers every layer")
        a_shape, b_shape = lora_shapes(cfg, adapter.r, target)  # the einsum shapes of each factor
        a = np.stack([_tensor(tensors, _module(rule, i), "A").T for i in range(cfg.num_layers)]).reshape(a_shape)
        b = np.stack([_tensor(tensors, _module(rule, i), "B").T for i in range(cfg.num_layers)]).reshape(b_shape)
        pairs[target] = LoraPair(a=jax.numpy.asarray(a), b=jax.numpy.asarray(b))
        targets.append(target)
    spec = LoraSpec(rank=adapter.r, alpha=float(adapter.lora_alpha), targets=tuple(targets),
                    use_rslora=adapter.use_rslora)
    return spec, LoraWeights(**pairs, scale=spec.scale)


def _tensor(tensors: Mapping[str, np.ndarray], module: str, ab: str) -> np.ndarray:
    for key in (f"{_PEFT_PREFIX}{module}.lora_{ab}.weight", f"{_PEFT_PREFIX}{module}.lora_{ab}.default.weight",
                f"{module}.lora_{ab}.weight"):
        if key in tensors:
            return np.asarray(tensors[key], np.float32)
    raise AdapterFormatError(f"no lora_{ab} weight for {module}")
