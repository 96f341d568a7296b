"""Token sampling: parity with transformers' logits processors, distribution, determinism, penalty."""

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats
from transformers.generation import logits_process as hf_lp

from mfjax.engine import sampling
from mfjax.sim import presets
from mfjax.engine.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    process_logits,
    row_keys,
    sample_tokens,
)

# Jitted once per config: op-by-op dispatch would dominate the test time.
_process = jax.jit(process_logits, static_argnames="cfg")
_sample = jax.jit(sample_tokens, static_argnames="cfg")
_penalty = jax.jit(apply_repetition_penalty)

# The paper's two settings plus configs that exercise each path on its own and in combination.
PARITY_CONFIGS = {
    "policy": presets.resolve(presets.PAPER["policy"]),
    "mean_field": presets.resolve(presets.PAPER["mean_field"]),
    "top_p_only": SamplingConfig(temperature=0.7, top_p=0.6),
    "top_k_only": SamplingConfig(temperature=1.3, top_k=7),
    "temperature_only": SamplingConfig(temperature=0.5),
    "penalty_only": SamplingConfig(temperature=1.0, repetition_penalty=1.5),
    "min_p_only": SamplingConfig(temperature=0.9, min_p=0.05),
    "everything": SamplingConfig(temperature=0.6, top_k=40, top_p=0.9, repetition_penalty=1.1, min_p=0.02),
    "greedy_penalty": SamplingConfig(temperature=None, repetition_penalty=1.3),
}


def _random_case(seed, batch=6, vocab=512, hist=40, scale=3.0):
    """Random logits and a history with repeated ids, padded slots and out-of-range ids."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((batch, vocab)) * scale).astype(np.float32)
    # Draw from a small id range so ids repeat within a row.
    history = rng.integers(0, vocab // 4, size=(batch, hist)).astype(np.int32)
    valid = rng.random((batch, hist)) < 0.8
    valid[0] = True  # one row with a full history
    valid[1] = False  # one row with none
    history[2, :3] = [vocab, vocab + 7, -1]  # out of range: ignored (HF clamps them into a dropped slot)
    valid[2, :3] = True
    return logits, history, valid


def _hf_processors(cfg):
    """The processors HF ``generate`` builds for ``cfg``, in its order."""
    procs = []
    if cfg.repetition_penalty != 1.0:
        procs.append(hf_lp.RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
    if not cfg.is_greedy:
        if cfg.temperature != 1.0:
            procs.append(hf_lp.TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k:
            procs.append(hf_lp.TopKLogitsWarper(cfg.top_k))
        if cfg.top_p < 1.0:
            procs.append(hf_lp.TopPLogitsWarper(cfg.top_p))
        if cfg.min_p is not None:
            procs.append(hf_lp.MinPLogitsWarper(cfg.min_p))
    return procs


def _hf_process(logits, history, valid, cfg):
    """Row by row (rows have different valid histories), exactly as transformers does it."""
    vocab = logits.shape[-1]
    out = []
    for row in range(logits.shape[0]):
        # HF clamps ids >= V into a dropped slot; negative ids are invalid input there, so drop them here.
        ids = history[row][valid[row] & (history[row] >= 0)]
        input_ids = torch.tensor(np.minimum(ids, vocab), dtype=torch.long)[None]
        scores = torch.tensor(logits[row : row + 1])
        for proc in _hf_processors(cfg):
            scores = proc(input_ids, scores)
        out.append(scores.numpy())
    return np.concatenate(out)


def _assert_same_survivors(ours, theirs):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    kept = ~np.isneginf(theirs)
    np.testing.assert_allclose(ours[kept], theirs[kept], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
@pytest.mark.parametrize("seed", [0, 1])
def test_process_logits_matches_transformers(name, seed):
    cfg = PARITY_CONFIGS[name]
    logits, history, valid = _random_case(seed)
    ours = _process(logits, history, valid, cfg=cfg)
    _assert_same_survivors(ours, _hf_process(logits, history, valid, cfg))


def test_top_k_ties_are_kept_like_transformers():
    # Integer logits tie often; HF keeps every token equal to the k-th value, and so must top-p's mass.
    rng = np.random.default_rng(3)
    logits = rng.integers(-3, 4, size=(8, 64)).astype(np.float32)
    for cfg in (SamplingConfig(top_k=5), SamplingConfig(top_k=5, min_p=0.3)):
        ours = _process(logits, None, None, cfg=cfg)
        _assert_same_survivors(ours, _hf_process(logits, np.zeros((8, 0), np.int32), np.zeros((8, 0), bool), cfg))
    # Top-k keeps all three 2.0s although only one is a top-3 candidate. Their mass must enter top-p's
    # cumulative sum: with it the 3.0 survives top_p=0.8 (cumulative 0.22 > 0.2), without it it would not.
    row = np.full((1, 16), -10.0, np.float32)
    row[0, [4, 9, 1, 12, 6]] = [5.0, 3.0, 2.0, 2.0, 2.0]
    cfg = SamplingConfig(top_k=3, top_p=0.8)
    ours = np.asarray(_process(row, None, None, cfg=cfg))
    _assert_same_survivors(ours, _hf_process(row, np.zeros((1, 0), np.int32), np.zeros((1, 0), bool), cfg))
    assert set(np.flatnonzero(~np.isneginf(ours[0]))) == {4, 9}


@functools.partial(jax.jit, static_argnames=("top_k", "top_p"))
def _top_p_two_ways(logits, top_k, top_p):
    fast = process_logits(logits, None, None, SamplingConfig(top_k=top_k, top_p=top_p))
    only_k = process_logits(logits, None, None, SamplingConfig(top_k=top_k))
    return fast, process_logits(only_k, None, None, SamplingConfig(top_p=top_p))  # full-sort path


def test_top_p_within_top_k_equals_full_vocab_top_p():
    """Top-p on the k candidates == top-p (full sort) applied to the top-k-filtered vocabulary."""
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((16, 1024)) * 2.5).astype(np.float32)
    for top_k, top_p in [(50, 0.85), (1, 0.3), (200, 0.99)]:
        _assert_same_survivors(*_top_p_two_ways(logits, top_k, top_p))


def _pooled_chisquare(counts, expected):
    """Chi-square p-value with cells of expected count < 5 pooled, as the test's approximation needs."""
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return stats.chisquare(obs, exp).pvalue


STAT_CONFIGS = {
    "policy": presets.resolve(presets.PAPER["policy"]),
    "top_p_full_sort": SamplingConfig(temperature=0.8, top_p=0.7),
    "temperature_only": SamplingConfig(temperature=1.5),
    "top_k_min_p": SamplingConfig(temperature=1.0, top_k=12, min_p=0.1, repetition_penalty=1.3),
    "min_p_only": SamplingConfig(temperature=1.2, min_p=0.15),
}


@pytest.mark.parametrize("name", sorted(STAT_CONFIGS))
def test_sampled_frequencies_match_kept_distribution(name):
    cfg = STAT_CONFIGS[name]
    n, vocab = 20_000, 40
    rng = np.random.default_rng(5)
    row_logits = (rng.standard_normal(vocab) * 1.5).astype(np.float32)
    row_history = np.array([3, 3, 7, 11, 0], np.int32)  # includes a repeat
    logits = np.broadcast_to(row_logits, (n, vocab))
    history = np.broadcast_to(row_history, (n, row_history.size))
    valid = np.ones_like(history, bool)

    processed = np.asarray(_process(logits[:1], history[:1], valid[:1], cfg=cfg))[0]
    weights = np.exp(processed.astype(np.float64) - processed.max())  # float64: sums to 1 for the test
    expected_p = weights / weights.sum()
    keys = row_keys(123, jnp.arange(n), 0)
    tokens = np.asarray(_sample(logits, keys, cfg=cfg, history=history, history_valid=valid))

    assert not np.isneginf(processed[tokens]).any(), "a filtered token was drawn"
    counts = np.bincount(tokens, minlength=vocab)
    # Per-token bound from the sample size: 5 binomial standard deviations (false alarm ~1e-5 per test).
    sigma = np.sqrt(expected_p * (1 - expected_p) / n)
    assert np.all(np.abs(counts / n - expected_p) <= 5 * sigma + 1e-12)
    assert _pooled_chisquare(counts.astype(float), expected_p * n) > 1e-4


@pytest.mark.parametrize("cfg", [presets.resolve(presets.PAPER["policy"]), SamplingConfig(temperature=0.9, top_p=0.9), SamplingConfig()])
def test_row_draws_ignore_batch_composition(cfg):
    rng = np.random.default_rng(6)
    n, vocab = 12, 300
    logits = (rng.standard_normal((n, vocab)) * 2).astype(np.float32)
    history = rng.integers(0, vocab, size=(n, 9)).astype(np.int32)
    valid = rng.random((n, 9)) < 0.7
    ids = np.arange(100, 100 + n)
    sample = _sample

    base = np.asarray(sample(logits, row_keys(7, ids, 4), cfg=cfg, history=history, history_valid=valid))
    again = np.asarray(sample(logits, row_keys(7, ids, 4), cfg=cfg, history=history, history_valid=valid))
    np.testing.assert_array_equal(base, again)

    # Reorder and add rows: each original row keeps its token (keys follow the row id, not the slot).
    perm = rng.permutation(n)
    extra = 5
    big_logits = np.concatenate([logits[perm], (rng.standard_normal((extra, vocab)) * 2).astype(np.float32)])
    big_history = np.concatenate([history[perm], rng.integers(0, vocab, size=(extra, 9)).astype(np.int32)])
    big_valid = np.concatenate([valid[perm], np.ones((extra, 9), bool)])
    big_ids = np.concatenate([ids[perm], np.arange(500, 500 + extra)])
    big = np.asarray(sample(big_logits, row_keys(7, big_ids, 4), cfg=cfg, history=big_history, history_valid=big_valid))
    np.testing.assert_array_equal(big[:n], base[perm])

    # A different step gives different draws somewhere (the keys really change).
    other = np.asarray(sample(logits, row_keys(7, ids, 5), cfg=cfg, history=history, history_valid=valid))
    assert (other != base).any()


def test_row_keys_forms():
    ids = jnp.arange(4)
    typed = row_keys(3, ids, 2)
    assert typed.shape == (4,) and jnp.issubdtype(typed.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(typed), jax.random.key_data(row_keys(jax.random.key(3), ids, 2)))
    # A traced integer seed works inside jit and agrees with the Python one.
    traced = jax.jit(lambda s: jax.random.key_data(row_keys(s, ids, 2)))(jnp.int32(3))
    np.testing.assert_array_equal(traced, jax.random.key_data(typed))
    raw = row_keys(jax.random.PRNGKey(3), ids, jnp.array([2, 2, 2, 2]))
    assert raw.shape == (4, 2) and raw.dtype == jnp.uint32
    np.testing.assert_array_equal(raw, jax.random.key_data(typed))
    # Raw and typed keys with the same bits draw the same tokens.
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((4, 50)), jnp.float32)
    cfg = presets.resolve(presets.PAPER["policy"])
    np.testing.assert_array_equal(_sample(logits, raw, cfg=SamplingConfig(top_k=20)), _sample(logits, typed, cfg=SamplingConfig(top_k=20)))
    assert cfg == presets.resolve(presets.PAPER["policy"]) and hash(cfg) == hash(presets.resolve(presets.PAPER["policy"]))


def _reference_penalty(logits, history, valid, penalty):
    out = logits.copy()
    for row in range(logits.shape[0]):
        for tok in set(history[row][valid[row]].tolist()):
            if 0 <= tok < logits.shape[1]:
                v = logits[row, tok]
                out[row, tok] = v * penalty if v < 0 else v / penalty
    return out


def test_repetition_penalty_duplicates_and_invalid_slots():
    logits = np.array([[1.0, -2.0, 3.0, -4.0, 0.0, 5.0], [2.0, 2.0, -1.0, 1.0, -3.0, 0.5]], np.float32)
    history = np.array([[1, 1, 1, 2, 5, 9], [0, 3, 0, 4, 2, -5]], np.int32)
    # Row 0: id 5 only in an invalid slot -> untouched; id 1 three times -> penalised once.
    # Row 1: id 4 and id 2 invalid; id 0 twice valid; -5 out of range.
    valid = np.array([[True, True, True, True, False, True], [True, True, True, False, False, True]])
    out = np.asarray(_penalty(logits, history, valid, 2.0))
    np.testing.assert_array_equal(out, _reference_penalty(logits, history, valid, 2.0))
    np.testing.assert_array_equal(out[0], [1.0, -4.0, 1.5, -4.0, 0.0, 5.0])
    np.testing.assert_array_equal(out[1], [1.0, 2.0, -1.0, 0.5, -3.0, 0.5])
    # A penalty of 1 changes nothing; an all-invalid history changes nothing.
    np.testing.assert_array_equal(_penalty(logits, history, valid, 1.0), logits)
    np.testing.assert_array_equal(_penalty(logits, history, np.zeros_like(valid), 3.0), logits)


def test_repetition_penalty_never_builds_a_batch_by_vocab_intermediate():
    """O(B*T) memory: the only [B, V] value in the computation is the updated logits themselves."""
    b, v, t = 4, 1000, 7
    jaxpr = jax.make_jaxpr(apply_repetition_penalty)(
        jnp.zeros((b, v), jnp.float32), jnp.zeros((b, t), jnp.int32), jnp.ones((b, t), bool), 1.2
    )
    big = [e.primitive.name for e in jaxpr.jaxpr.eqns for o in e.outvars if getattr(o.aval, "shape", ()) == (b, v)]
    assert big == ["scatter"], big


def test_greedy_is_argmax_with_lowest_index_ties():
    rng = np.random.default_rng(8)
    logits = rng.integers(0, 5, size=(32, 20)).astype(np.float32)  # many ties
    keys = row_keys(0, jnp.arange(32), 0)
    for temperature in (None, 0, 0.0):
        cfg = SamplingConfig(temperature=temperature, top_k=3, top_p=0.5)
        assert cfg.is_greedy
        np.testing.assert_array_equal(_sample(logits, keys, cfg=cfg), np.argmax(logits, axis=-1))
    history = rng.integers(0, 20, size=(32, 6)).astype(np.int32)
    valid = np.ones_like(history, bool)
    cfg = SamplingConfig(temperature=None, repetition_penalty=1.7)
    penalised = _reference_penalty(logits, history, valid, 1.7)
    np.testing.assert_array_equal(_sample(logits, keys, cfg=cfg, history=history, history_valid=valid), np.argmax(penalised, axis=-1))
    torch_argmax = torch.argmax(torch.tensor(penalised), dim=-1).numpy()
    np.testing.assert_array_equal(_sample(logits, keys, cfg=cfg, history=history, history_valid=valid), torch_argmax)


def test_paper_settings_and_hf_resolution():
    policy = presets.resolve(presets.PAPER["policy"])
    assert (policy.temperature, policy.top_k, policy.top_p, policy.repetition_penalty, policy.min_p) == (0.8, 50, 0.85, 1.2, None)
    mean_field = presets.resolve(presets.PAPER["mean_field"])
    assert (mean_field.temperature, mean_field.top_k, mean_field.top_p, mean_field.repetition_penalty) == (0.1, 50, 1.0, 1.2)
    # A checkpoint's own generation_config fills what the call leaves unset (as HF generate does).
    checkpoint = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05}
    tuned = presets.resolve(presets.PAPER["mean_field"], checkpoint)
    assert (tuned.temperature, tuned.top_k, tuned.top_p, tuned.repetition_penalty) == (0.1, 20, 0.8, 1.2)
    assert presets.resolve(presets.PAPER["policy"], checkpoint) == policy
    assert SamplingConfig.from_generation_config().is_greedy  # HF's default is do_sample=False
    assert SamplingConfig.from_generation_config(checkpoint) == SamplingConfig(0.7, 20, 0.8, 1.05)
    with pytest.raises(ValueError, match="typical_p"):
        SamplingConfig.from_generation_config({"typical_p": 0.5})
    # The fallbacks are transformers' own.
    from transformers import GenerationConfig

    if hasattr(GenerationConfig, "_get_default_generation_params"):
        hf = GenerationConfig._get_default_generation_params()
        for name, value in sampling.HF_FALLBACK_GENERATION.items():
            if name in hf:
                assert hf[name] == value, name
    assert SamplingConfig(temperature=0, top_k=0, min_p=0.0) == SamplingConfig(temperature=None)
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0.0)
