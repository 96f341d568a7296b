"""The LoRA side path of the decoder (training) against merged weights, and its gradients."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mfjax.config import ModelConfig
from mfjax.models import decoder
from mfjax.models import lora as lora_lib
from mfjax.models.weights import init_weights

CFG = ModelConfig(model_type="qwen2", vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)
TOKENS = np.random.default_rng(0).integers(0, 96, size=(2, 7)).astype(np.int32)
MASK = np.array([[1] * 7, [0, 0] + [1] * 5], np.int32)


def _random_lora(spec, seed=1):
    """A LoRA with B != 0 (after PEFT's init B is 0 and the side path is silent)."""
    lora = lora_lib.init_lora(CFG, spec, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 16))
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), lora)


def test_peft_init_is_the_base_model():
    weights = init_weights(CFG, jax.random.key(0), std=0.2)
    spec = lora_lib.LoraSpec(rank=4, alpha=8)
    lora = lora_lib.init_lora(CFG, spec, jax.random.key(1))
    assert all(float(jnp.abs(p.b).max()) == 0.0 for p in lora.pairs().values())
    assert all(float(jnp.abs(p.a).max()) > 0.0 for p in lora.pairs().values())
    base = decoder.forward_logits(weights, CFG, TOKENS, MASK)
    side = decoder.forward_logits(weights, CFG, TOKENS, MASK, lora=lora)
    np.testing.assert_array_equal(np.asarray(side), np.asarray(base))


@pytest.mark.parametrize("targets, rslora", [(lora_lib.TARGETS, False), (("q", "o", "down"), True)])
def test_side_path_equals_merged_weights(targets, rslora):
    weights = init_weights(CFG, jax.random.key(0), std=0.2)
    spec = lora_lib.LoraSpec(rank=4, alpha=8, targets=targets, use_rslora=rslora)
    lora = _random_lora(spec)
    assert lora.scale == spec.scale == (8 / 2 if rslora else 8 / 4)
    side = np.asarray(decoder.forward_logits(weights, CFG, TOKENS, MASK, lora=lora))
    merged = np.asarray(decoder.forward_logits(lora_lib.merge(weights, lora), CFG, TOKENS, MASK))
    base = np.asarray(decoder.forward_logits(weights, CFG, TOKENS, MASK))
    np.testing.assert_allclose(side, merged, atol=1e-5, rtol=0)
    assert np.abs(side - base).max() > 1e-2  # the side path really moves the logits
    untouched = set(lora_lib.TARGETS) - set(targets)
    merged_w = lora_lib.merge(weights, lora)
    for name in untouched:
        assert getattr(merged_w.layers, name) is getattr(weights.layers, name)


def test_gradients_reach_only_the_lora():
    weights = init_weights(CFG, jax.random.key(0), std=0.2)
    lora = _random_lora(lora_lib.LoraSpec(rank=2, alpha=2, targets=("q", "v", "gate")))

    def loss(lora):
        logits = decoder.forward_logits(weights, CFG, TOKENS, MASK, lora=lora, remat="full")
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    grads = jax.grad(loss)(lora)
    assert jax.tree.structure(grads) == jax.tree.structure(lora)
    assert set(grads.pairs()) == {"q", "v", "gate"}
    for pair in grads.pairs().values():
        assert float(jnp.abs(pair.a).max()) > 0 and float(jnp.abs(pair.b).max()) > 0
    # Finite differences along one direction agree with the gradient (float32, central differences).
    direction = jax.tree.map(lambda x: jax.random.normal(jax.random.key(7), x.shape), lora)
    eps = 1e-2
    plus = loss(jax.tree.map(lambda x, d: x + eps * d, lora, direction))
    minus = loss(jax.tree.map(lambda x, d: x - eps * d, lora, direction))
    numeric = (plus - minus) / (2 * eps)
    analytic = sum(jnp.sum(g * d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    np.testing.assert_allclose(float(numeric), float(analytic), rtol=2e-2)


def test_spec_is_checked():
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        lora_lib.LoraSpec(targets=("q", "embed"))
    with pytest.raises(ValueError, match="rank"):
        lora_lib.LoraSpec(rank=0)
    assert lora_lib.LoraSpec(targets=("down", "q")).targets == ("q", "down")
    assert dataclasses.asdict(lora_lib.LoraSpec())["rank"] == 64
