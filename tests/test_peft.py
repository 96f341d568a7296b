"""PEFT LoRA adapters merged at load time: torch parity of the merged model, key formats, dtypes, refusals.

Adapters are written by hand in the exact format of PEFT's ``save_pretrained`` (``adapter_config.json`` and
``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` [r, in] and
``...lora_B.weight`` [out, r]), so the tests need no ``peft``. The reference applies ``W += scale · B @ A``
to the torch model's own Linear weights and runs its forward.
"""

import copy
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from hf_fixtures import make_tiny_hf_model
from mfjax.io.hf import load_hf
from mfjax.models import decoder
from mfjax.io.peft import (
    AdapterFormatError,
    LoraAdapterConfig,
    UnsupportedAdapterError,
    lora_deltas,
    merge_peft_adapter,
    read_peft_adapter,
)
from mfjax.models.lora import add_deltas

TOL = dict(atol=1e-4, rtol=1e-4)  # JAX fp32 vs torch fp32, as in the parity tests
TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
IDS = np.array([[1, 5, 9, 33, 70, 2, 17, 101, 64, 3, 44, 12], [1, 90, 8, 8, 120, 6, 51, 77, 29, 2, 0, 15]])
_forward = jax.jit(decoder.forward_logits, static_argnames=("cfg", "attn_impl", "remat"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_base")
    return {name: make_tiny_hf_model(name, root, seed=i) for i, name in enumerate(("qwen2", "gemma2"))}


def peft_config(**fields) -> dict:
    """An ``adapter_config.json`` as PEFT 0.21 writes it for a causal LM (the fields the merge may read)."""
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": sorted({t.split(".")[-1] for t in TARGETS}),
        "use_rslora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": None,
        "use_dora": False,
        "lora_bias": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layer_replication": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    config.update(fields)
    return config


def random_lora(model, *, seed: int, ranks=None, targets=TARGETS) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """module name -> (A [r, in], B [out, r]) for every target on every layer (B random, not PEFT's zeros)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(model.config.num_hidden_layers):
        for target in targets:
            module = f"model.layers.{i}.{target}"
            linear = model.get_submodule(module)
            r = (ranks or {}).get(target.split(".")[-1], 4)
            a = (0.1 * rng.standard_normal((r, linear.in_features))).astype(np.float32)
            b = (0.1 * rng.standard_normal((linear.out_features, r))).astype(np.float32)
            out[module] = (a, b)
    return out


def write_adapter(path, lora, config: dict, *, key_format: str = "peft", extra: dict | None = None) -> str:
    """A PEFT adapter folder. ``key_format``: 'peft' (what save_pretrained writes), 'default_infix' (the
    in-memory ``lora_A.default.weight`` names), 'no_prefix' (transformers' ``save_peft_format=False``)."""
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for module, (a, b) in lora.items():
        for ab, value in (("A", a), ("B", b)):
            key = {
                "peft": f"base_model.model.{module}.lora_{ab}.weight",
                "default_infix": f"base_model.model.{module}.lora_{ab}.default.weight",
                "no_prefix": f"{module}.lora_{ab}.weight",
            }[key_format]
            tensors[key] = value
    tensors.update(extra or {})
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return os.fspath(path)


def reference_logits(model, lora, scales) -> np.ndarray:
    """The torch model's logits after ``W += scale · B @ A`` on its own Linear weights (``scales``: name -> scale)."""
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for module, (a, b) in lora.items():
            scale = scales[module.rsplit(".", 1)[-1]]
            weight = merged.get_submodule(module).weight
            weight += scale * (torch.from_numpy(b) @ torch.from_numpy(a))
        return merged(torch.as_tensor(IDS)).logits.float().numpy()


def mfjax_logits(cfg, params) -> np.ndarray:
    return np.asarray(_forward(params, cfg, jnp.asarray(IDS)))


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(IDS)).logits.float().numpy()


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize(
    "family, rslora", [("qwen2", False), ("gemma2", False), ("qwen2", True), ("gemma2", True)]
)
def test_merged_logits_match_torch(tiny, tmp_path, family, rslora):
    model_dir, model = tiny[family]
    lora = random_lora(model, seed=7)
    adapter = write_adapter(tmp_path / "adapter", lora, peft_config(use_rslora=rslora))
    scale = 8 / math.sqrt(4) if rslora else 8 / 4
    want = reference_logits(model, lora, {t.split(".")[-1]: scale for t in TARGETS})

    cfg, base = load_hf(model_dir)
    merged = merge_peft_adapter(cfg, base, adapter)
    got = mfjax_logits(cfg, merged)
    np.testing.assert_allclose(got, want, **TOL)
    # The adapter must move the logits far beyond the tolerance, or the comparison above proves nothing.
    assert np.abs(want - torch_logits(model)).max() > 100 * TOL["atol"]

    adapted = {"q", "v", "o", "gate", "down"}
    for name, value in merged.to_tree()["layers"].items():
        base_value = getattr(base.layers, name)
        same = np.array_equal(np.asarray(value), np.asarray(base_value))
        assert same == (name not in adapted), name
        assert value.dtype == base_value.dtype and value.shape == base_value.shape
    for name in ("embed", "final_norm", "lm_head"):
        assert getattr(merged, name) is getattr(base, name), name


def test_rank_and_alpha_patterns(tiny, tmp_path):
    model_dir, model = tiny["qwen2"]
    lora = random_lora(model, seed=3, ranks={"down_proj": 2})
    config = peft_config(rank_pattern={"down_proj": 2}, alpha_pattern={"self_attn.q_proj": 3})
    adapter = write_adapter(tmp_path / "adapter", lora, config)
    scales = {"q_proj": 3 / 4, "v_proj": 2.0, "o_proj": 2.0, "gate_proj": 2.0, "down_proj": 8 / 2}
    cfg, base = load_hf(model_dir)
    got = mfjax_logits(cfg, merge_peft_adapter(cfg, base, adapter))
    np.testing.assert_allclose(got, reference_logits(model, lora, scales), **TOL)

    adapter_cfg, _ = read_peft_adapter(adapter)
    assert adapter_cfg.rank("model.layers.1.mlp.down_proj") == 2 and adapter_cfg.rank("model.layers.1.mlp.up_proj") == 4
    assert adapter_cfg.alpha("model.layers.0.self_attn.q_proj") == 3
    assert adapter_cfg.alpha("model.layers.0.mlp.q_proj") == 8  # the pattern must match the end of the module path


def _lm_head_lora(seed=5):
    rng = np.random.default_rng(seed)
    return {"lm_head": ((0.1 * rng.standard_normal((4, 64))).astype(np.float32),
                        (0.1 * rng.standard_normal((128, 4))).astype(np.float32))}


def test_lm_head_lora_on_untied_model(tiny, tmp_path):
    """lm_head is a Linear in the key table of an untied model, so LoRA on it merges like any other. PEFT
    then also saves the base lm_head (``lm_head.base_layer.weight``, as vocabularies may be resized), and
    with ``save_embedding_layers=True`` plain copies such as ``model.embed_tokens.weight``: unchanged
    copies are accepted."""
    model_dir, model = tiny["qwen2"]
    lora = _lm_head_lora()
    sd = model.state_dict()
    copies = {"base_model.model.lm_head.base_layer.weight": sd["lm_head.weight"].numpy(),
              "base_model.model.model.embed_tokens.weight": sd["model.embed_tokens.weight"].numpy()}
    adapter = write_adapter(tmp_path / "adapter", lora, peft_config(target_modules=["lm_head"]), extra=copies)
    cfg, base = load_hf(model_dir)
    got = mfjax_logits(cfg, merge_peft_adapter(cfg, base, adapter))
    np.testing.assert_allclose(got, reference_logits(model, lora, {"lm_head": 2.0}), **TOL)


@pytest.mark.parametrize("change, words", [("values", ["differs from the base model's"]),
                                           ("vocab", ["shape [130, 64]", "[128, 64]", "resized"])])
def test_changed_base_copies_are_refused(tiny, tmp_path, change, words):
    model_dir, model = tiny["qwen2"]
    head = model.state_dict()["lm_head.weight"].numpy().copy()
    if change == "values":
        head[3, 5] += 1e-3
    else:
        head = np.concatenate([head, head[:2]])
    key = "base_model.model.lm_head.base_layer.weight"
    adapter = write_adapter(tmp_path / "adapter", _lm_head_lora(), peft_config(target_modules=["lm_head"]),
                            extra={key: head})
    cfg, base = load_hf(model_dir)
    with pytest.raises(UnsupportedAdapterError) as e:
        merge_peft_adapter(cfg, base, adapter)
    for word in [os.path.join(adapter, "adapter_model.safetensors"), repr(key), "unsupported", *words]:
        assert word in str(e.value)


# ------------------------------------------------------------------------------------------ formats
@pytest.mark.parametrize("key_format", ["default_infix", "no_prefix"])
def test_other_key_formats_merge_the_same(tiny, tmp_path, key_format):
    model_dir, model = tiny["gemma2"]
    lora = random_lora(model, seed=11)
    cfg, base = load_hf(model_dir)
    want = merge_peft_adapter(cfg, base, write_adapter(tmp_path / "peft", lora, peft_config()))
    other = write_adapter(tmp_path / key_format, lora, peft_config(), key_format=key_format)
    got = merge_peft_adapter(cfg, base, other)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)


def test_bf16_params_merge_in_float32_and_keep_their_dtype(tiny, tmp_path):
    model_dir, model = tiny["qwen2"]
    lora = random_lora(model, seed=2)
    adapter = write_adapter(tmp_path / "adapter", lora, peft_config())
    cfg, base = load_hf(model_dir, dtype=jnp.bfloat16)
    merged = merge_peft_adapter(cfg, base, adapter)
    deltas = lora_deltas(cfg, *read_peft_adapter(adapter))
    for name in ("q", "v", "o", "gate", "down"):
        assert getattr(merged.layers, name).dtype == jnp.bfloat16
        stack = np.stack([deltas[("layers", name)][i] for i in range(cfg.num_layers)])
        want = (np.asarray(getattr(base.layers, name)).astype(np.float32) + stack).astype(jnp.bfloat16)
        np.testing.assert_array_equal(np.asarray(getattr(merged.layers, name)), want, err_msg=name)


def test_adapter_config_fields(tmp_path, tiny):
    _, model = tiny["qwen2"]
    adapter = write_adapter(tmp_path / "adapter", random_lora(model, seed=1), peft_config(use_rslora=True, r=4))
    adapter_cfg, tensors = read_peft_adapter(adapter)
    assert adapter_cfg == LoraAdapterConfig(
        r=4, lora_alpha=8, target_modules=("down_proj", "gate_proj", "o_proj", "q_proj", "v_proj"),
        use_rslora=True, peft_type="LORA",
    )
    assert adapter_cfg.scale("model.layers.0.self_attn.q_proj") == pytest.approx(8 / 2)
    assert len(tensors) == 2 * len(TARGETS) * model.config.num_hidden_layers
    assert tensors["base_model.model.model.layers.2.mlp.down_proj.lora_A.weight"].shape == (4, 96)


# ------------------------------------------------------------------------------------------ refusals
def _layer0(model, targets=("self_attn.q_proj",)):
    return {k: v for k, v in random_lora(model, seed=0, targets=targets).items() if ".layers.0." in k}


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(peft_type="IA3"), ["peft_type", "IA3", "LoRA"]),
        (dict(fan_in_fan_out=True), ["fan_in_fan_out"]),
        (dict(bias="all"), ["bias", "'all'"]),
        (dict(bias="lora_only"), ["bias", "'lora_only'"]),
        (dict(modules_to_save=["lm_head"]), ["modules_to_save", "lm_head", "unsupported"]),
        (dict(use_dora=True), ["use_dora", "DoRA"]),
        (dict(lora_bias=True), ["lora_bias"]),
        (dict(layer_replication=[[0, 2], [1, 3]]), ["layer_replication"]),
    ],
)
def test_unsupported_config_fields_are_refused(tiny, tmp_path, fields, words):
    model_dir, model = tiny["qwen2"]
    adapter = write_adapter(tmp_path / "adapter", _layer0(model), peft_config(**fields))
    cfg, base = load_hf(model_dir)
    with pytest.raises(UnsupportedAdapterError) as e:
        merge_peft_adapter(cfg, base, adapter)
    for word in [os.path.join(adapter, "adapter_config.json"), *words]:
        assert word in str(e.value)


@pytest.mark.parametrize(
    "key, shape, words",
    [
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", (64,), ["DoRA"]),
        ("base_model.model.lm_head.weight", (128, 64), ["modules_to_save", "lm_head", "unsupported"]),
        ("base_model.model.model.embed_tokens.lora_embedding_A", (4, 128), ["embedding"]),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", (64,), ["lora_bias"]),
        ("base_model.model.model.layers.0.self_attn.k_proj.bias", (32,), ["bias"]),
        ("base_model.model.model.layers.0.mlp.fc1.lora_A.weight", (4, 64), ["fc1", "key table"]),
        ("base_model.model.model.layers.3.mlp.up_proj.lora_A.weight", (4, 64), ["layers.3", "3 layers"]),
        ("base_model.model.model.layers.0.input_layernorm.lora_A.weight", (4, 64), ["input_layernorm"]),
    ],
)
def test_unsupported_keys_are_refused(tiny, tmp_path, key, shape, words):
    model_dir, model = tiny["qwen2"]
    extra = {key: np.zeros(shape, np.float32)}
    if key.endswith("lora_A.weight"):
        extra[key.replace("lora_A", "lora_B")] = np.zeros((64, 4), np.float32)
    adapter = write_adapter(tmp_path / "adapter", _layer0(model), peft_config(), extra=extra)
    cfg, base = load_hf(model_dir)
    with pytest.raises(UnsupportedAdapterError) as e:
        merge_peft_adapter(cfg, base, adapter)
    for word in [os.path.join(adapter, "adapter_model.safetensors"), repr(key), *words]:
        assert word in str(e.value)


def test_lm_head_lora_on_tied_model_is_refused(tmp_path):
    model_dir, model = make_tiny_hf_model("qwen2_tied", tmp_path)
    adapter = write_adapter(tmp_path / "adapter", _lm_head_lora(), peft_config(target_modules=["lm_head"]))
    cfg, base = load_hf(model_dir)
    with pytest.raises(UnsupportedAdapterError, match="'base_model.model.lm_head.lora_A.weight'.*tied embeddings"):
        merge_peft_adapter(cfg, base, adapter)


@pytest.mark.parametrize(
    "change, words",
    [
        ("a_in", ["q_proj.lora_A.weight", "[4, 65]", "expected [4, 64]"]),
        ("b_out", ["q_proj.lora_B.weight", "[63, 4]", "expected [64, 4]"]),
        ("b_rank", ["q_proj.lora_B.weight", "[64, 3]", "expected [64, 4]"]),
        ("both_rank", ["q_proj.lora_A.weight", "[2, 64]", "expected [4, 64]", "adapter_config.json"]),
        ("no_b", ["q_proj.lora_A.weight", "no matching lora_B"]),
        ("twice", ["q_proj", "second time"]),
        ("two_adapters", ["several adapters", "default", "other"]),
    ],
)
def test_malformed_adapters_are_refused(tiny, tmp_path, change, words):
    model_dir, model = tiny["qwen2"]
    (module, (a, b)), = _layer0(model).items()
    lora, extra, key_format = {module: (a, b)}, {}, "peft"
    prefix = f"base_model.model.{module}"
    if change == "a_in":
        lora = {module: (np.zeros((4, 65), np.float32), b)}
    elif change == "b_out":
        lora = {module: (a, np.zeros((63, 4), np.float32))}
    elif change == "b_rank":
        lora = {module: (a, np.zeros((64, 3), np.float32))}
    elif change == "both_rank":
        lora = {module: (a[:2], b[:, :2])}
    elif change == "no_b":
        lora, extra = {}, {f"{prefix}.lora_A.weight": a}
    elif change == "twice":
        extra = {f"{module}.lora_A.weight": a}  # the same module without the base_model.model. prefix
    elif change == "two_adapters":
        key_format = "default_infix"
        extra = {f"{prefix.replace('q_proj', 'v_proj')}.lora_A.other.weight": np.zeros((4, 64), np.float32),
                 f"{prefix.replace('q_proj', 'v_proj')}.lora_B.other.weight": np.zeros((32, 4), np.float32)}
    adapter = write_adapter(tmp_path / "adapter", lora, peft_config(), key_format=key_format, extra=extra)
    cfg, base = load_hf(model_dir)
    with pytest.raises(AdapterFormatError) as e:
        merge_peft_adapter(cfg, base, adapter)
    for word in [os.path.join(adapter, "adapter_model.safetensors"), *words]:
        assert word in str(e.value)


def test_missing_or_pickled_adapter_files(tmp_path, tiny):
    model_dir, _ = tiny["qwen2"]
    cfg, base = load_hf(model_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        merge_peft_adapter(cfg, base, tmp_path / "absent")
    folder = tmp_path / "pickled"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        merge_peft_adapter(cfg, base, folder)
    (folder / "adapter_config.json").write_text(json.dumps(peft_config()))
    (folder / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.bin: only adapter_model\.safetensors is supported"):
        merge_peft_adapter(cfg, base, folder)


def test_add_deltas_leaves_the_input_alone(tiny, tmp_path):
    model_dir, model = tiny["qwen2"]
    cfg, base = load_hf(model_dir)
    before = jax.tree.map(lambda x: np.array(x), base)
    adapter_cfg, tensors = read_peft_adapter(write_adapter(tmp_path / "a", random_lora(model, seed=9), peft_config()))
    add_deltas(base, lora_deltas(cfg, adapter_cfg, tensors))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), base, before)
