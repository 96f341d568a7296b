"""Logit parity with transformers (the PyTorch reference) for every tiny family case.

Each case of ``TINY_CASES`` is a random tiny HF checkpoint (every tensor random, norms and biases
included). The batch is left-padded with a different pad length per row and is longer than the sliding
window, so padding, positions, windows, RoPE scaling and soft-capping all reach the logits.

Tolerances (fp32): 1e-4 against torch (different kernels and summation order on two frameworks; the
measured error is ~2e-6 on logits of magnitude ~3), 1e-5 between two JAX paths of the same maths and for
the export round trip (bit-identical weights, same torch kernels). Never loosened to make a test pass.
"""

import copy
import functools
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from hf_fixtures import TINY_CASES, hf_logits as _hf_logits, make_tiny_hf_model, tiny_hf_config
from mfjax.config import UnsupportedConfigError
from mfjax.io.hf import load_hf, load_model, save_hf
from mfjax.models import decoder
from mfjax.models.kvcache import DecodeCache, KV, padded_positions

CASES = sorted(TINY_CASES)

HF_TOL = dict(atol=1e-4, rtol=1e-4)  # JAX fp32 vs torch fp32
JAX_TOL = dict(atol=1e-5, rtol=1e-5)  # two JAX fp32 paths of the same maths

# 3 rows x 12 tokens, left padding of 0, 3 and 6 tokens: every row is longer than the sliding window (4).
PADS = (0, 3, 6)
SEQ = 12
PAD_ID = 0

# One jitted forward for every test: repeated calls with the same shapes and config reuse the compile.
_forward = jax.jit(decoder.forward_logits, static_argnames=("cfg", "attn_impl", "remat"))


def _batch(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(len(PADS), SEQ)).astype(np.int32)
    mask = np.ones((len(PADS), SEQ), np.int32)
    for row, pad in enumerate(PADS):
        mask[row, :pad] = 0
        tokens[row, :pad] = PAD_ID
    return tokens, mask


def _assert_close_on_real(got, want, mask, **tol):
    """Compares [B, T, V] logits at the real (non-padding) positions only."""
    real = np.asarray(mask).astype(bool)
    got = np.asarray(got)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.isfinite(got[real]).all()
    np.testing.assert_allclose(got[real], want[real], **tol)


@pytest.fixture(scope="module", params=CASES)
def case(request, tmp_path_factory):
    """One tiny case built once per module: torch model, its folder, the loaded params, the HF logits."""
    name = request.param
    root = tmp_path_factory.mktemp(f"parity_{name}")
    model_dir, model = make_tiny_hf_model(name, root, seed=CASES.index(name))
    tokens, mask = _batch(model.config.vocab_size)
    cfg, params = load_hf(model_dir)
    return types.SimpleNamespace(
        name=name, model_dir=model_dir, model=model, cfg=cfg, params=params,
        tokens=tokens, mask=mask, hf=_hf_logits(model, tokens, mask),
        jax=np.asarray(_forward(params, cfg, tokens, mask)),
    )


def test_fp32_matches_transformers(case):
    assert case.jax.dtype == np.float32
    assert case.jax.shape == (len(PADS), SEQ, case.cfg.vocab_size)
    _assert_close_on_real(case.jax, case.hf, case.mask, **HF_TOL)


def _torch_variant(model, **changes):
    """The same torch weights under a config with ``changes`` (a family feature switched off)."""
    config = copy.deepcopy(model.config)
    for key, value in changes.items():
        setattr(config, key, value)
    variant = type(model)(config)
    variant.load_state_dict(model.state_dict())
    return variant.eval()


def test_case_exercises_its_features(case):
    """Each family feature of the case is read from the config and really reaches the reference logits
    on this batch: switching it off in transformers moves them far past the parity tolerance, so an
    mfjax that ignored the feature would fail :func:`test_fp32_matches_transformers`."""
    cfg, n = case.cfg, case.cfg.num_layers
    variants = {}
    if case.name == "llama3":
        assert cfg.rope_scaling is not None and cfg.rope_scaling.kind == "llama3"
        assert cfg.rope_scaling.original_max_position_embeddings == 64
        theta = case.model.config.rope_parameters["rope_theta"]
        variants["llama3 rope scaling"] = dict(rope_parameters={"rope_type": "default", "rope_theta": theta})
    if case.name == "mistral":
        assert cfg.sliding_window == 4 and all(cfg.sliding_layers)
        variants["sliding window"] = dict(sliding_window=None)
    if case.name == "gemma2":
        assert cfg.sliding_window == 4 and cfg.sliding_layers == (True, False, True)
        assert (cfg.attn_logit_softcap, cfg.final_logit_softcap, cfg.query_pre_attn_scalar) == (50.0, 30.0, 16)
        variants["sliding window"] = dict(layer_types=["full_attention"] * n)
        variants["attention soft-cap"] = dict(attn_logit_softcapping=None)
        variants["final soft-cap"] = dict(final_logit_softcapping=None)
        variants["query_pre_attn_scalar"] = dict(query_pre_attn_scalar=64)
    if case.name.startswith("qwen2"):
        assert cfg.attention_bias and not any(cfg.sliding_layers)
        assert cfg.tie_word_embeddings == (case.name == "qwen2_tied")
    real = case.mask.astype(bool)
    for feature, changes in variants.items():
        moved = np.abs(_hf_logits(_torch_variant(case.model, **changes), case.tokens, case.mask) - case.hf)
        assert moved[real].max() > 5 * HF_TOL["atol"], f"{case.name}: {feature} does not reach the logits"
    # The padding mask reaches the maths too: ignoring it changes the real positions of padded rows.
    unmasked = np.asarray(_forward(case.params, case.cfg, case.tokens, np.ones_like(case.mask)))
    assert np.abs(unmasked - case.jax)[real].max() > 5 * HF_TOL["atol"]


@functools.partial(jax.jit, static_argnames="cfg")
def _decode_path_logits(weights, cfg, tokens, mask):
    """The whole batch as one chunk through the decode path: unrolled layers over the per-layer view,
    written into an empty decode cache."""
    B, T = tokens.shape
    L, K, H = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    positions = padded_positions(mask)
    empty = KV(k=jnp.zeros((L, B, 0, K, H)), v=jnp.zeros((L, B, 0, K, H)), pos=jnp.zeros((B, 0), jnp.int32))
    cache = DecodeCache.from_prefill(empty, keep=0, room=T)
    hidden, _ = decoder.decode_step(decoder.decode_view(weights), cfg, tokens, positions, cache, 0)
    return decoder.logits(weights, cfg, hidden)


def test_decode_path_matches(case):
    """The unrolled decode layers (per-layer view, decode cache) equal the scanned forward and transformers."""
    got = _decode_path_logits(case.params, case.cfg, jnp.asarray(case.tokens), jnp.asarray(case.mask))
    _assert_close_on_real(got, case.hf, case.mask, **HF_TOL)
    _assert_close_on_real(got, case.jax, case.mask, **JAX_TOL)


def test_remat_full_through_scan_matches(case):
    got = _forward(case.params, case.cfg, case.tokens, case.mask, remat="full")
    _assert_close_on_real(got, case.hf, case.mask, **HF_TOL)
    _assert_close_on_real(got, case.jax, case.mask, **JAX_TOL)


# The NNX front end only wraps the pure forward; its eager call is checked on two cases (the family maths
# is covered by the pure-function tests above), its loaded parameters on every case.
CAUSAL_LM_CALL_CASES = ("llama3", "qwen2_tied")


def test_causal_lm_from_hf(case):
    model = load_model(case.model_dir)
    assert model.cfg == case.cfg
    pure = model.weights()
    assert jax.tree.structure(pure) == jax.tree.structure(case.params)
    for a, b in zip(jax.tree.leaves(pure), jax.tree.leaves(case.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if case.name in CAUSAL_LM_CALL_CASES:
        got = model(jnp.asarray(case.tokens), jnp.asarray(case.mask))
        _assert_close_on_real(got, case.hf, case.mask, **HF_TOL)


def test_bf16_agrees_with_fp32(case):
    """bf16 weights and activations (fp32 norm statistics, softmax, logits) against the fp32 forward.

    bf16 keeps 8 significant bits: unit roundoff u = 2^-9 ~ 2e-3. Every weight and every activation
    (embedding, q/k/v, attention output, MLP, residual stream, 3 layers) is rounded once or more, so the
    logits carry a sum of a few dozen relative errors of size u: a few 1e-2 at logit scale ~3 (measured:
    <= 0.05 on every tiny case). The bound is 5e-2 of the largest |logit| for the log-softmax (~0.15
    here, ~25 u relative), 1e-2 of it for the mean error (systematic drift), and top-1 agreement wherever
    the fp32 margin between the best two tokens exceeds twice that bound (elsewhere bf16 may flip a
    near-tie legitimately).
    """
    cfg16, params16 = load_hf(case.model_dir, dtype=jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
    got = np.asarray(_forward(params16, cfg16, case.tokens, case.mask))
    assert got.dtype == np.float32  # logits are float32 even for bf16 weights (DESIGN.md, Numerics)
    real = case.mask.astype(bool)
    scale = np.abs(case.jax[real]).max()
    bound = 5e-2 * scale
    ref_lp = np.asarray(jax.nn.log_softmax(case.jax))[real]
    got_lp = np.asarray(jax.nn.log_softmax(got))[real]
    assert np.isfinite(got_lp).all()
    err = np.abs(got_lp - ref_lp)
    assert err.max() <= bound, (err.max(), bound)
    assert err.mean() <= 1e-2 * scale, (err.mean(), scale)
    top2 = np.sort(case.jax[real], axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * bound
    assert clear.sum() >= 1
    np.testing.assert_array_equal(got[real].argmax(-1)[clear], case.jax[real].argmax(-1)[clear])


def test_export_round_trip(case, tmp_path):
    out = save_hf(tmp_path / "export", case.cfg, case.params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    got = _hf_logits(reloaded.eval(), case.tokens, case.mask)
    _assert_close_on_real(got, case.hf, case.mask, atol=1e-5, rtol=0)


def test_export_keeps_the_architecture(case, tmp_path):
    out = save_hf(tmp_path / "export", case.cfg, case.params)
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.model_type == case.model.config.model_type
    assert transformers.AutoModelForCausalLM.from_config(config).__class__ is type(case.model)


def test_dot_product_attention_matches_xla(case):
    """``attn_impl='jax'`` (jax.nn.dot_product_attention; XLA on CPU) equals the einsum path wherever the
    fused call applies, i.e. without attention soft-capping (Gemma 2 always takes the einsum path)."""
    if case.cfg.attn_logit_softcap is not None:
        pytest.skip("attention soft-capping always uses the einsum path")
    got = np.asarray(_forward(case.params, case.cfg, case.tokens, case.mask, attn_impl="jax"))
    _assert_close_on_real(got, case.jax, case.mask, **JAX_TOL)
    _assert_close_on_real(got, case.hf, case.mask, **HF_TOL)
    # Padding queries attend to nothing on both paths: their logits are finite and agree as well.
    np.testing.assert_allclose(got, case.jax, **JAX_TOL)


GRAD_CASE = "qwen2_tied"  # tied embeddings (one tensor, two uses) and q/k/v biases in the backward pass


def test_remat_gradients_match_torch(tmp_path_factory):
    """Gradients of a masked next-token loss through the rematerialised scan equal torch autograd's.

    The JAX gradient tree has the parameter layout, so ``save_hf`` maps it to HF names and layouts and
    each tensor is compared with the ``.grad`` of the torch parameter of that name (tied embeddings:
    one tensor receiving both uses). Tolerance 1e-4 of each tensor's largest gradient (fp32, two
    frameworks), as for the logits.
    """
    root = tmp_path_factory.mktemp("grad")
    model_dir, model = make_tiny_hf_model(GRAD_CASE, root, seed=CASES.index(GRAD_CASE))
    cfg, params = load_hf(model_dir)
    tokens, mask = _batch(cfg.vocab_size)
    targets = tokens[:, 1:]
    weight = (mask[:, 1:] * mask[:, :-1]).astype(np.float32)  # predict real tokens from real tokens

    def loss(p):
        logp = jax.nn.log_softmax(decoder.forward_logits(p, cfg, tokens, mask, remat="full")[:, :-1])
        picked = jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
        return -(picked * weight).sum() / weight.sum()

    value, grads = jax.jit(jax.value_and_grad(loss))(params)

    positions = np.clip(np.cumsum(mask, axis=-1) - 1, 0, None)
    model.zero_grad()
    logits = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                   attention_mask=torch.as_tensor(mask, dtype=torch.long),
                   position_ids=torch.as_tensor(positions, dtype=torch.long)).logits
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = torch.gather(logp, -1, torch.as_tensor(targets, dtype=torch.long)[..., None])[..., 0]
    ref = -(picked * torch.as_tensor(weight)).sum() / float(weight.sum())
    ref.backward()
    np.testing.assert_allclose(float(value), ref.item(), rtol=1e-5)

    exported = load_file(os.path.join(save_hf(root / "grads", cfg, grads), "model.safetensors"))
    assert set(exported) == {name for name, _ in model.named_parameters()}
    for key, got in exported.items():
        want = model.get_parameter(key).grad.numpy()
        scale = np.abs(want).max()
        assert scale > 0, key
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale, err_msg=key)


# ------------------------------------------------------------------------------------- refusals
def _llama_config() -> dict:
    return tiny_hf_config("llama").to_dict()


def _edit(**changes):
    def apply(hf):
        hf.update(changes)
        return hf
    return apply


UNSUPPORTED = {
    "model_type": (_edit(model_type="phi3"), "phi3"),
    "mlp_bias": (_edit(mlp_bias=True), "mlp_bias"),
    "pretraining_tp": (_edit(pretraining_tp=2), "pretraining_tp"),
    "rope_yarn": (
        _edit(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                   original_max_position_embeddings=64)),
        "yarn",
    ),
    # Hub configs name the scaling in a top-level ``rope_scaling`` instead.
    "rope_yarn_legacy": (
        _edit(rope_parameters=None, rope_theta=10000.0, rope_scaling=dict(type="yarn", factor=4.0)),
        "yarn",
    ),
    "layer_types": (
        _edit(sliding_window=4, layer_types=["chunked_attention", "full_attention", "full_attention"]),
        "chunked_attention",
    ),
    "activation": (_edit(hidden_act="relu"), "relu"),
}


@pytest.mark.parametrize("what", sorted(UNSUPPORTED))
def test_unsupported_config_is_refused_by_name(what, tmp_path):
    edit, named = UNSUPPORTED[what]
    model_dir = tmp_path / what
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(edit(_llama_config())))
    with pytest.raises(UnsupportedConfigError, match=named):
        load_hf(model_dir)
    with pytest.raises(UnsupportedConfigError, match=named):
        load_model(model_dir)


def test_unsupported_real_checkpoint_is_refused(tmp_path):
    """A real transformers checkpoint with MLP biases is refused, not loaded with its biases dropped."""
    model_dir, model = make_tiny_hf_model("llama", tmp_path, mlp_bias=True)
    assert "model.layers.0.mlp.up_proj.bias" in model.state_dict()
    with pytest.raises(UnsupportedConfigError, match="mlp_bias"):
        load_hf(model_dir)
    assert os.path.exists(os.path.join(model_dir, "model.safetensors"))
