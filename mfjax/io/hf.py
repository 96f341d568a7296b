"""HF safetensors folders <-> mfjax :class:`~mfjax.models.weights.Weights`, both ways and without torch.

The key table (:func:`mfjax.models.hf_keys.key_table`) names, for every parameter, its HF key pattern and
the layout change between the two. Loading reads tensors lazily with ``safetensors.safe_open`` and builds
one stacked ``[L, ...]`` array per parameter, placed onto its sharding as soon as it is built, so the host
never holds more than one stacked parameter beyond what is already placed. Saving applies the exact
inverse transforms and writes HF-loadable shards. :func:`load_model` / :func:`save_model` do the same for
the NNX front end (:class:`~mfjax.models.module.CausalLM`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from mfjax.config import ModelConfig
from mfjax.models.hf_keys import KeyRule, key_table, per_layer_shape
from mfjax.models.module import CausalLM
from mfjax.models.weights import Weights, get_path, replace_path, weight_specs

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Keys that checkpoints may carry and that hold nothing mfjax needs: recomputed RoPE tables.
_HARMLESS_KEYS = re.compile(r"(.*\.)?rotary_emb\.(original_)?inv_freq$")

# Files a tokenizer folder may hold; copied next to exported weights so the folder is complete.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    GENERATION_CONFIG_FILE,
)
_TOKENIZER_SUFFIXES = (".model", ".tiktoken")


class CheckpointFormatError(ValueError):
    """An HF folder does not match what its config describes (missing, unexpected or misshapen keys)."""


def _np_dtype(dtype) -> np.dtype | None:
    # jnp.bfloat16 is ml_dtypes.bfloat16, which numpy understands as a dtype.
    return None if dtype is None else np.dtype(jnp.dtype(dtype))


# ------------------------------------------------------------------------------------------ loading
def _weight_files(model_dir: str) -> dict[str, str]:
    """HF key -> safetensors file (absolute path), from the index when there is one."""
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointFormatError(f"{index_path}: no 'weight_map'")
        files = {}
        for key, name in weight_map.items():
            path = os.path.join(model_dir, name)
            if name not in files and not os.path.exists(path):
                raise FileNotFoundError(f"{index_path} lists {name} (for key {key!r}) but {path} does not exist")
            files[name] = path
        return {key: files[name] for key, name in weight_map.items()}
    single = os.path.join(model_dir, SINGLE_FILE)
    paths = [single] if os.path.exists(single) else sorted(
        os.path.join(model_dir, n) for n in os.listdir(model_dir) if n.endswith(".safetensors")
    )
    if not paths:
        others = [n for n in os.listdir(model_dir) if n.endswith((".bin", ".pt", ".pth", ".gguf"))]
        hint = f" (found {', '.join(others)}: convert to safetensors first)" if others else ""
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}{hint}")
    keys = {}
    for path in paths:
        with safe_open(path, framework="numpy") as f:
            for key in f.keys():
                keys[key] = path
    return keys


class _LazyTensors:
    """Opens each safetensors file once and reads single tensors on demand.

    ``framework="numpy"`` returns bf16 tensors as ``ml_dtypes.bfloat16`` arrays (safetensors >= 0.5,
    ml_dtypes comes with jax), so no torch and no device round trip are needed.
    """

    def __init__(self, key_to_file: Mapping[str, str]):
        self.key_to_file = key_to_file
        self._open: dict[str, Any] = {}

    def _handle(self, path: str):
        if path not in self._open:
            self._open[path] = safe_open(path, framework="numpy").__enter__()
        return self._open[path]

    def shape(self, key: str) -> tuple[int, ...]:
        path = self.key_to_file[key]
        try:
            return tuple(self._handle(path).get_slice(key).get_shape())
        except Exception as e:  # safetensors raises its own error type for absent keys
            raise CheckpointFormatError(f"{path}: cannot read key {key!r} ({e})") from None

    def get(self, key: str) -> np.ndarray:
        return self._handle(self.key_to_file[key]).get_tensor(key)

    def close(self) -> None:
        for handle in self._open.values():
            handle.__exit__(None, None, None)
        self._open.clear()


def _match_keys(rules: list[KeyRule], keys, num_layers: int, model_dir: str, key_to_file) -> dict:
    """(path, layer) -> HF key, refusing keys that no rule claims."""
    found: dict[tuple[tuple[str, ...], int | None], str] = {}
    unexpected = []
    for key in keys:
        for rule in rules:
            m = rule.pattern.match(key)
            if m and (not rule.per_layer or int(m.group(1)) < num_layers):
                found[(rule.path, int(m.group(1)) if rule.per_layer else None)] = key
                break
        else:
            if not _HARMLESS_KEYS.match(key) and not _is_tied_duplicate(key, rules):
                unexpected.append(key)
    if unexpected:
        shown = ", ".join(f"{k!r} in {os.path.basename(key_to_file[k])}" for k in unexpected[:5])
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointFormatError(f"{model_dir}: unexpected keys {shown}{more} (not in the {len(rules)}-rule key table)")
    return found


def _is_tied_duplicate(key: str, rules: list[KeyRule]) -> bool:
    # Some tied checkpoints still store lm_head.weight (a copy of the embeddings); mfjax uses the embeddings.
    return key == "lm_head.weight" and all(r.path != ("lm_head",) for r in rules)


def load_hf(model_dir: str | os.PathLike, dtype=jnp.float32, shardings: Weights | None = None) -> tuple[ModelConfig, Weights]:
    """Loads an HF safetensors folder as ``(config, weights)``.

    Args:
      model_dir: folder with ``config.json`` and ``model.safetensors`` (or shards plus
        ``model.safetensors.index.json``).
      dtype: dtype of the returned arrays; ``None`` keeps the stored dtype.
      shardings: optional :class:`Weights` of ``jax.sharding.Sharding`` (e.g.
        :func:`mfjax.models.weights.weight_shardings`); each stacked parameter is placed onto its sharding
        as soon as it is built.

    Raises:
      FileNotFoundError: no ``config.json``, no weights, or a shard listed in the index is absent.
      CheckpointFormatError: a key is missing or unexpected, or a tensor has the wrong shape (the
        message names the file, the key, and the expected and found shapes).
    """
    model_dir = os.fspath(model_dir)
    config_path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in {model_dir}")
    cfg = ModelConfig.from_hf(config_path)
    rules = key_table(cfg)
    weights = specs = weight_specs(cfg)
    key_to_file = _weight_files(model_dir)
    found = _match_keys(rules, key_to_file, cfg.num_layers, model_dir, key_to_file)
    target = _np_dtype(dtype)
    tensors = _LazyTensors(key_to_file)
    try:
        for rule in rules:
            spec = get_path(specs, rule.path)
            array = _read_param(rule, spec, found, tensors, cfg.num_layers, target, model_dir)
            sharding = get_path(shardings, rule.path) if shardings is not None else None
            weights = replace_path(weights, rule.path, _place(array, sharding))
            del array  # the host copy goes as soon as it is on the device
    finally:
        tensors.close()
    return cfg, weights


def load_model(model_dir: str | os.PathLike, dtype=jnp.float32, shardings: Weights | None = None,
               **kwargs) -> CausalLM:
    """An HF checkpoint directory as the NNX front end (``kwargs`` go to :class:`CausalLM`)."""
    cfg, weights = load_hf(model_dir, dtype=dtype, shardings=shardings)
    return CausalLM(cfg, weights, **kwargs)


def save_model(model: CausalLM, out_dir: str | os.PathLike, **kwargs) -> str:
    """Exports a :class:`CausalLM` to an HF directory that ``transformers.AutoModelForCausalLM`` loads
    (``kwargs`` as :func:`save_hf`)."""
    return save_hf(out_dir, model.cfg, model.weights(), **kwargs)


def _place(array: np.ndarray, sharding) -> jax.Array:
    """The host array on its sharding; each process places only the shards its devices hold, so the same
    call works on one host and on several."""
    if sharding is None:
        return jnp.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _read_param(rule, spec, found, tensors, num_layers, target, model_dir) -> np.ndarray:
    """One parameter, built layer by layer into a preallocated ``[L, ...]`` array."""
    layers = range(num_layers) if rule.per_layer else [None]
    shape = per_layer_shape(rule, spec)
    expected = tuple(rule.transform.hf_shape(shape))
    out = None
    for layer in layers:
        key = found.get((rule.path, layer))
        if key is None:
            files = sorted({os.path.basename(p) for p in tensors.key_to_file.values()})
            raise CheckpointFormatError(
                f"{model_dir}: missing key {rule.hf_key(layer)!r} (looked in {', '.join(files)})"
            )
        got = tensors.shape(key)
        if got != expected:
            raise CheckpointFormatError(
                f"{tensors.key_to_file[key]}: key {key!r} has shape {list(got)}, expected {list(expected)} "
                f"for {'/'.join(rule.path)} {list(spec.shape)}"
            )
        value = rule.transform.to_mfjax(tensors.get(key), shape)
        if out is None:
            out = np.empty(spec.shape, dtype=target if target is not None else value.dtype)
        if rule.per_layer:
            out[layer] = value  # casts to the target dtype while copying
        else:
            out[...] = value
    return out


# ------------------------------------------------------------------------------------------ saving
class _HostSource:
    """Per-layer host (numpy) slices of the weights, without device-side copies.

    A stacked parameter is fetched to the host once and kept while its layers are written (tensors are
    visited parameter by parameter), so host memory holds one stacked parameter at a time.
    """

    def __init__(self, weights: Weights):
        self.weights = weights
        self._cached: tuple[tuple[str, ...], np.ndarray] | None = None

    def host(self, path: tuple[str, ...], layer: int | None) -> np.ndarray:
        if self._cached is None or self._cached[0] != path:
            self._cached = None  # drop the previous parameter before fetching the next
            self._cached = (path, np.asarray(jax.device_get(get_path(self.weights, path))))
        value = self._cached[1]
        return value if layer is None else value[layer]


def _hf_tensors(cfg: ModelConfig, weights: Weights, dtype) -> list[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]]:
    """(HF key, HF shape, dtype, thunk) for every tensor, checked against the specs; nothing read yet."""
    if not isinstance(weights, Weights):
        raise TypeError(f"expected mfjax.models.weights.Weights, got {type(weights).__name__}")
    specs = weight_specs(cfg)
    source = _HostSource(weights)
    target = _np_dtype(dtype)
    out = []
    for rule in key_table(cfg):
        spec = get_path(specs, rule.path)
        value = get_path(weights, rule.path)
        if value is None or tuple(value.shape) != tuple(spec.shape):
            got = "nothing" if value is None else f"shape {list(value.shape)}"
            raise ValueError(f"param {'/'.join(rule.path)} has {got}, expected {list(spec.shape)}")
        out_dtype = target if target is not None else np.dtype(value.dtype)
        shape = per_layer_shape(rule, spec)
        for layer in (range(cfg.num_layers) if rule.per_layer else [None]):

            def thunk(path=rule.path, layer=layer, transform=rule.transform, out_dtype=out_dtype):
                return np.ascontiguousarray(transform.to_hf(source.host(path, layer)).astype(out_dtype, copy=False))

            out.append((rule.hf_key(layer), tuple(rule.transform.hf_shape(shape)), out_dtype, thunk))
    return out


def _plan_shards(tensors, max_shard_bytes: float) -> list[list]:
    """Greedy packing in key order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list] = [[]]
    size = 0
    for item in tensors:
        nbytes = int(np.prod(item[1], dtype=np.int64)) * item[2].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    return shards


def save_hf(
    out_dir: str | os.PathLike,
    cfg: ModelConfig,
    weights: Weights,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    generation_config: Mapping[str, Any] | None = None,
    max_shard_bytes: float = 2e9,
    dtype=None,
) -> str:
    """Writes ``weights`` as an HF folder that ``AutoModelForCausalLM.from_pretrained`` loads.

    Args:
      out_dir: created if needed; existing weight files of a previous export are replaced.
      cfg: the model config (written as ``config.json`` via :meth:`ModelConfig.to_hf`).
      weights: the model's :class:`Weights`.
      tokenizer_dir: folder whose tokenizer files (and ``generation_config.json``) are copied along.
      generation_config: written as ``generation_config.json`` (wins over one in ``tokenizer_dir``).
      max_shard_bytes: above this total, weights are split into shards with an index.
      dtype: dtype of the written tensors; ``None`` keeps each array's dtype.

    Returns:
      ``out_dir`` as a string.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tensors = _hf_tensors(cfg, weights, dtype)

    for name in os.listdir(out_dir):  # stale shards of an earlier export would confuse loaders
        if name.endswith(".safetensors") or name == INDEX_FILE:
            os.remove(os.path.join(out_dir, name))
    total = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for _, s, d, _ in tensors)
    shards = _plan_shards(tensors, max_shard_bytes) if total > max_shard_bytes else [tensors]
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for name, shard in zip(names, shards):
        # Materialise one shard at a time so peak host memory is one shard, not the whole model.
        save_file({key: thunk() for key, _, _, thunk in shard}, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update({key: name for key, *_ in shard})
    if len(shards) > 1:
        with open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)

    hf = cfg.to_hf()
    dtypes = {d for _, _, d, _ in tensors}
    if len(dtypes) == 1:
        dtype_name = str(next(iter(dtypes)))  # 'float32', 'bfloat16', 'float16' are also torch's names
        hf["dtype"] = dtype_name
        if "torch_dtype" in hf:
            hf["torch_dtype"] = dtype_name
    _write_json(os.path.join(out_dir, CONFIG_FILE), hf)

    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out_dir)
    if generation_config is not None:
        _write_json(os.path.join(out_dir, GENERATION_CONFIG_FILE), dict(generation_config))
    return out_dir


def copy_tokenizer_files(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Copies tokenizer files (and ``generation_config.json``) from ``src_dir``; returns their names."""
    src_dir, out_dir = os.fspath(src_dir), os.fspath(out_dir)
    if not os.path.isdir(src_dir):
        raise FileNotFoundError(f"tokenizer folder {src_dir} does not exist")
    copied = []
    for name in sorted(os.listdir(src_dir)):
        if name in TOKENIZER_FILES or name.endswith(_TOKENIZER_SUFFIXES):
            if os.path.abspath(os.path.join(src_dir, name)) != os.path.abspath(os.path.join(out_dir, name)):
                shutil.copyfile(os.path.join(src_dir, name), os.path.join(out_dir, name))
            copied.append(name)
    return copied


def _write_json(path: str, value: Mapping[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
