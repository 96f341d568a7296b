"""The hand-written backward passes equal autodiff of the plain maths (float64).

``engine.score.target_logprobs`` (blockwise cross-entropy: ∂/∂h computed in the forward, the head's own
gradient by recomputation) and ``models.layers.lora_side_path`` (weight gradients contracted in the order
XLA:CPU runs fast) each replace autodiff's backward; both are checked here against ``jax.grad`` of a direct
formula, for every input that has a gradient, tied and untied heads, with padding and several chunks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mfjax.config import ModelConfig
from mfjax.engine.score import target_logprobs
from mfjax.models import decoder, layers
from mfjax.models.weights import init_weights


@pytest.fixture(autouse=True)
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def _cfg(tied: bool, softcap=None) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=37, hidden_size=8, intermediate_size=16, num_layers=1,
                       num_heads=2, num_kv_heads=1, head_dim=4, tie_word_embeddings=tied,
                       final_logit_softcap=softcap)


@pytest.mark.parametrize("tied,softcap", [(True, None), (False, None), (False, 5.0)])
def test_blockwise_cross_entropy_gradients_equal_autodiff(tied, softcap):
    cfg = _cfg(tied, softcap)
    weights = jax.tree.map(lambda a: a.astype(jnp.float64), init_weights(cfg, jax.random.key(0), std=0.5))
    B, T = 3, 7
    hidden = jax.random.normal(jax.random.key(1), (B, T, cfg.hidden_size), jnp.float64)
    targets = jax.random.randint(jax.random.key(2), (B, T), 0, cfg.vocab_size)
    valid = jnp.arange(T)[None, :] < jnp.array([[7], [4], [1]])
    coef = jax.random.normal(jax.random.key(3), (B, T), jnp.float64)  # a cotangent that is not all ones

    def ours(w, h):  # max_logits forces chunks of 2 positions (4 chunks, the last one padded)
        return jnp.sum(coef * target_logprobs(w, cfg, h, targets, valid, max_logits=2 * B * cfg.vocab_size))

    def direct(w, h):
        lp = jax.nn.log_softmax(decoder.logits(w, cfg, h), axis=-1)
        picked = jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(coef * jnp.where(valid, picked, 0.0))

    np.testing.assert_allclose(ours(weights, hidden), direct(weights, hidden), rtol=1e-12)
    (gw, gh), (rw, rh) = jax.grad(ours, (0, 1))(weights, hidden), jax.grad(direct, (0, 1))(weights, hidden)
    np.testing.assert_allclose(gh, rh, rtol=1e-10, atol=1e-12)
    head = "embed" if tied else "lm_head"
    np.testing.assert_allclose(getattr(gw, head), getattr(rw, head), rtol=1e-10, atol=1e-12)
    assert np.abs(np.asarray(getattr(rw, head))).max() > 1e-3  # the head really has a gradient here


@pytest.mark.parametrize("input_dims", [1, 2])
def test_lora_side_path_gradients_equal_autodiff(input_dims):
    keys = jax.random.split(jax.random.key(0), 4)
    in_shape, r, out_shape = ((6,), 3, (2, 5)) if input_dims == 1 else ((2, 4), 3, (7,))
    x = jax.random.normal(keys[0], (2, 5, *in_shape), jnp.float64)
    a = jax.random.normal(keys[1], (*in_shape, r), jnp.float64)
    b = jax.random.normal(keys[2], (r, *out_shape), jnp.float64)
    ct = jax.random.normal(keys[3], (2, 5, *out_shape), jnp.float64)

    def direct(x, a, b):
        low = jnp.tensordot(x, a, axes=input_dims)
        return jnp.sum(ct * jnp.tensordot(low, b, axes=1))

    ours = lambda x, a, b: jnp.sum(ct * layers.lora_side_path(x, a, b, input_dims))
    np.testing.assert_allclose(ours(x, a, b), direct(x, a, b), rtol=1e-12)
    for got, want in zip(jax.grad(ours, (0, 1, 2))(x, a, b), jax.grad(direct, (0, 1, 2))(x, a, b)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
