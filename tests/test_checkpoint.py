"""Orbax checkpoints of parameter trees: bit-exact round trips, dtype casts, sharded restores."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_fixtures import TINY
from mfjax.config import ModelConfig
from mfjax.io import checkpoint
from mfjax.models.weights import map_specs, weight_specs

P = jax.sharding.PartitionSpec


def tiny_cfg(model_type="qwen2", **extra) -> ModelConfig:
    return ModelConfig.from_hf({"model_type": model_type, **TINY, "eos_token_id": 2, **extra})


def random_params(cfg, dtype, seed=0):
    """Random everywhere, norms and biases included; numpy draws (no per-shape XLA compiles)."""
    rng = np.random.default_rng(seed)
    return map_specs(lambda s: jnp.asarray((0.1 * rng.standard_normal(s.shape)).astype(jnp.dtype(dtype))), weight_specs(cfg))


def _bits(a):
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def assert_bit_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        assert a.dtype == b.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_type", ["qwen2", "gemma2"])
def test_round_trip_is_bit_exact(tmp_path, dtype, model_type):
    gemma = dict(sliding_window=4, hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=30.0)
    cfg = tiny_cfg(model_type, **(gemma if model_type == "gemma2" else {}))
    params = random_params(cfg, dtype)
    checkpoint.save_checkpoint(tmp_path / "ckpt", params, cfg, step=3)
    restored_cfg, restored = checkpoint.restore_checkpoint(tmp_path / "ckpt")
    assert restored_cfg == cfg
    assert_bit_equal(restored, params)


def test_steps_and_metadata(tmp_path):
    cfg = tiny_cfg("llama", tie_word_embeddings=True)
    first, second = random_params(cfg, jnp.float32), random_params(cfg, jnp.bfloat16, seed=1)
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, first, cfg, step=1, metadata={"generation_config": {"eos_token_id": [2, 7]}})
    checkpoint.save_checkpoint(path, second, cfg, step=5)
    assert checkpoint.latest_step(path) == 5
    assert_bit_equal(checkpoint.restore_checkpoint(path)[1], second)
    assert_bit_equal(checkpoint.restore_checkpoint(path, step=1)[1], first)
    meta = checkpoint.read_metadata(path, step=1)
    assert meta["generation_config"] == {"eos_token_id": [2, 7]}
    assert meta["hf_config"]["model_type"] == "llama"
    with pytest.raises(FileNotFoundError, match="no step 4"):
        checkpoint.restore_checkpoint(path, step=4)
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        checkpoint.restore_checkpoint(tmp_path / "absent")


def test_restore_casts_dtype(tmp_path):
    cfg = tiny_cfg()
    params = random_params(cfg, jnp.float32)
    checkpoint.save_checkpoint(tmp_path / "ckpt", params, cfg)
    _, bf16 = checkpoint.restore_checkpoint(tmp_path / "ckpt", dtype=jnp.bfloat16)
    assert_bit_equal(bf16, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params))


def test_restore_onto_8_device_mesh(tmp_path):
    assert jax.device_count() == 8, "tests/conftest.py sets eight host devices"
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    cfg = tiny_cfg()
    params = random_params(cfg, jnp.bfloat16)
    checkpoint.save_checkpoint(tmp_path / "ckpt", params, cfg)

    replicated = jax.sharding.NamedSharding(mesh, P())
    shardings = jax.tree.map(lambda _: replicated, params)
    shardings.embed = jax.sharding.NamedSharding(mesh, P(None, "model"))  # [V, D/4]
    shardings.layers.q = jax.sharding.NamedSharding(mesh, P(None, "data", "model", None))  # [L, D/2, N/4, H]
    _, restored = checkpoint.restore_checkpoint(tmp_path / "ckpt", shardings=shardings)

    assert restored.embed.sharding == shardings.embed
    assert restored.embed.addressable_shards[0].data.shape == (TINY["vocab_size"], TINY["hidden_size"] // 4)
    assert restored.layers.q.sharding == shardings.layers.q
    assert restored.layers.q.addressable_shards[0].data.shape == (3, 32, 1, 16)
    assert restored.final_norm.sharding == replicated
    assert_bit_equal(restored, params)


def test_restore_refuses_a_tree_that_does_not_match_its_config(tmp_path):
    cfg = tiny_cfg()
    params = dataclasses.replace(random_params(cfg, jnp.float32), lm_head=None)  # a tied model's, untied config
    checkpoint.save_checkpoint(tmp_path / "ckpt", params, cfg)
    with pytest.raises(ValueError, match=r"missing \['lm_head'\]"):
        checkpoint.restore_checkpoint(tmp_path / "ckpt")
