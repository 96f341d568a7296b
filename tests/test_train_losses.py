"""IB-Tune losses: SFT against a full-sequence hand computation and finite differences (float64), the
score-function estimator's unbiasedness on a toy problem (against the enumerated exact gradient, KL term
included), the leave-one-out advantages, the reference variant by hand, and temperature scoring."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mfjax.config import ModelConfig
from mfjax.models import decoder
from mfjax.models import lora as lora_lib
from mfjax.models.weights import init_weights
from mfjax.train import losses

CFG = ModelConfig(model_type="qwen2", vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)


def random_lora(cfg, rank=2, seed=1, dtype=jnp.float32, targets=lora_lib.TARGETS):
    """A LoRA with B != 0 (PEFT's init has B = 0, a silent side path)."""
    lora = lora_lib.init_lora(cfg, lora_lib.LoraSpec(rank=rank, alpha=2 * rank, targets=targets), jax.random.key(seed),
                              dtype)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 32))
    return jax.tree.map(lambda x: x + (0.1 * jax.random.normal(next(keys), x.shape)).astype(dtype), lora)


def make_batch(rng, *, E=2, R=2, P=7, Ts=4, Tt=5, vocab=96, empty_row=True) -> losses.ScoreBatch:
    """Random prefixes (right-padded), own prompts (left-padded) and targets (right-padded), uneven lengths."""
    prefix_len = rng.integers(3, P + 1, size=E)
    prompt_len = rng.integers(1, Ts + 1, size=E * R)
    target_len = rng.integers(1, Tt + 1, size=E * R)
    if empty_row:
        target_len[-1] = 0  # a row with nothing to score weighs nothing
    prefix = np.zeros((E, P), np.int32)
    prompt = np.zeros((E * R, Ts), np.int32)
    target = np.zeros((E * R, Tt), np.int32)
    for e in range(E):
        prefix[e, :prefix_len[e]] = rng.integers(3, vocab, prefix_len[e])
    for i in range(E * R):
        prompt[i, Ts - prompt_len[i]:] = rng.integers(3, vocab, prompt_len[i])
        target[i, :target_len[i]] = rng.integers(3, vocab, target_len[i])
    valid = np.ones(E * R, bool)
    valid[0] = False  # an invalid row weighs nothing either
    return losses.ScoreBatch(prefix=jnp.asarray(prefix), prefix_len=jnp.asarray(prefix_len, jnp.int32),
                             prompt=jnp.asarray(prompt), prompt_len=jnp.asarray(prompt_len, jnp.int32),
                             target=jnp.asarray(target), target_len=jnp.asarray(target_len, jnp.int32),
                             valid=jnp.asarray(valid))


_logits = jax.jit(decoder.forward_logits, static_argnames=("cfg",))
_sft = jax.jit(losses.sft_loss, static_argnames=("cfg", "remat"))


def full_sequences(batch: losses.ScoreBatch):
    """A score batch written out as whole rows (prefix + prompt + target, right-padded to one width): the rows,
    each row's (target start, target length), and the int64 token and mask arrays [rows, width]."""
    E, R = batch.prefix.shape[0], batch.prompt.shape[0] // batch.prefix.shape[0]
    seqs, spans = [], []
    for i in range(E * R):
        e = i // R
        pl, sl, tl = int(batch.prefix_len[e]), int(batch.prompt_len[i]), int(batch.target_len[i])
        seqs.append(np.concatenate([np.asarray(batch.prefix[e, :pl]),
                                    np.asarray(batch.prompt[i, batch.prompt.shape[1] - sl:]),
                                    np.asarray(batch.target[i, :tl])]))
        spans.append((pl + sl, tl))
    width = max(len(q) for q in seqs)
    tokens = np.zeros((len(seqs), width), np.int64)
    mask = np.zeros((len(seqs), width), np.int64)
    for i, q in enumerate(seqs):
        tokens[i, :len(q)], mask[i, :len(q)] = q, 1
    return seqs, spans, tokens, mask


def hand_logprobs(weights, cfg, batch, lora=None, temperature=1.0) -> list[np.ndarray]:
    """Per row, log p of its target tokens from one plain forward over the concatenated sequence
    prefix + prompt + target (no grouped prefix, no blockwise scoring), rows right-padded to one width."""
    seqs, spans, tokens, mask = full_sequences(batch)
    logits = np.asarray(_logits(weights, cfg, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32), lora=lora), np.float64)
    logp = np.asarray(jax.nn.log_softmax(logits / temperature, axis=-1))
    return [np.array([logp[i, start - 1 + j, seqs[i][start + j]] for j in range(tl)])
            for i, (start, tl) in enumerate(spans)]


@pytest.fixture(scope="module")
def weights():
    return init_weights(CFG, jax.random.key(0), std=0.2)


# ------------------------------------------------------------------------------------------ SFT
def test_sft_loss_equals_a_full_sequence_hand_computation(weights):
    batch = make_batch(np.random.default_rng(0))
    lora = random_lora(CFG)
    loss, aux = _sft(lora, weights, CFG, batch, remat="full")
    rows = hand_logprobs(weights, CFG, batch, lora=lora)
    valid = np.asarray(batch.valid) & (np.asarray(batch.target_len) > 0)
    ce = [-r.mean() for r, v in zip(rows, valid) if v]
    np.testing.assert_allclose(float(loss), sum(ce) / len(rows), rtol=1e-5)
    assert int(aux["rows"]) == valid.sum() and int(aux["target_tokens"]) == sum(len(r) for r, v in zip(rows, valid) if v)
    np.testing.assert_allclose(float(aux["nll_sum"]), -sum(r.sum() for r, v in zip(rows, valid) if v), rtol=1e-5)
    # Without LoRA (π₀) it is the base model's CE.
    base, _ = _sft(None, weights, CFG, batch)
    base_rows = hand_logprobs(weights, CFG, batch)
    np.testing.assert_allclose(float(base), sum(-r.mean() for r, v in zip(base_rows, valid) if v) / len(rows), rtol=1e-5)
    assert abs(float(base) - float(loss)) > 1e-3  # the side path moved it


def test_sft_loss_gradients_match_finite_differences_in_float64():
    with jax.enable_x64(True):
        cfg = CFG
        w64 = init_weights(cfg, jax.random.key(0), dtype=jnp.float64, std=0.2)
        lora = random_lora(cfg, rank=2, dtype=jnp.float64, targets=("q", "k", "v", "o", "gate", "up", "down"))
        batch = make_batch(np.random.default_rng(1), E=2, R=2, P=5, Ts=3, Tt=4)
        f = jax.jit(lambda l: losses.sft_loss(l, w64, cfg, batch, remat="full")[0])
        assert f(lora).dtype == jnp.float64
        check_grads(f, (lora,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6, eps=1e-5)
        grads = jax.grad(f)(lora)
        assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(grads))  # every factor gets a gradient


# ------------------------------------------------------------------------------------------ stage 1 maths
def test_rloo_advantages_closed_form_and_zero_mean():
    f = jnp.asarray(np.random.default_rng(2).normal(size=(3, 5)), jnp.float32)
    adv = np.asarray(losses.rloo_advantages(f))
    fn = np.asarray(f)
    for e in range(3):
        for j in range(5):
            others = np.delete(fn[e], j)
            np.testing.assert_allclose(adv[e, j], fn[e, j] - others.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adv.sum(axis=1), 0.0, atol=1e-5)
    assert not np.any(np.asarray(losses.rloo_advantages(f[:, :1])))  # k = 1: no baseline, no signal


def test_ib_rewards():
    rel, logq, logr = jnp.array([[1.0, 2.0]]), jnp.array([[-3.0, -5.0]]), jnp.array([[-4.0, -4.0]])
    f = losses.ib_rewards(rel, logq, logr, lam=2.0, beta=0.5, M=4)
    np.testing.assert_allclose(np.asarray(f), [[2 + 0.5 * 1 / 4, 4 + 0.5 * -1 / 4]])


def test_rloo_estimator_is_unbiased_on_a_toy_categorical():
    """m ranges over 6 'sequences' with q_θ = softmax(θ); f(m) = λ·c(m) + β·(log q_θ(m) − log r(m))/M. The mean of
    many per-slot estimates (M × the surrogate's gradient, k = 4 samples each) must equal the enumerated exact
    ∇J, J = Σ_m q_θ(m)·f(m) — the KL term's dependence on θ included — within 4 standard errors; dropping the
    KL term from f must miss it by far (the test has the power to see a bias)."""
    S, k, N, lam, beta, M = 6, 4, 40000, 2.0, 1.0, 3
    theta = jnp.array([0.3, -1.0, 0.8, 0.0, -0.4, 1.2])
    cost = jnp.array([1.0, 3.0, 0.5, 2.0, 2.5, 0.2])
    logr = jax.nn.log_softmax(jnp.array([0.0, 0.5, -0.5, 1.0, 0.2, -1.0]))

    def J(th):
        logq = jax.nn.log_softmax(th)
        return jnp.sum(jnp.exp(logq) * (lam * cost + beta * (logq - logr) / M))

    exact = np.asarray(jax.grad(J)(theta))
    samples = jax.random.categorical(jax.random.key(0), theta, shape=(N, 1, k))

    def estimate(th, s, objective_beta):
        logq = jax.nn.log_softmax(th)[s]  # [1, k]
        loss, _ = losses.rloo_objective(logq, cost[s], logr[s], jnp.ones((1,), bool), lam=lam, beta=objective_beta, M=M)
        return M * loss

    per_slot = np.asarray(jax.vmap(jax.grad(estimate), in_axes=(None, 0, None))(theta, samples, beta))
    mean, se = per_slot.mean(axis=0), per_slot.std(axis=0, ddof=1) / np.sqrt(N)
    assert np.all(np.abs(mean - exact) < 4 * se + 1e-6), (mean, exact, se)
    assert np.abs(exact).max() > 50 * se.max()  # a real gradient, well resolved
    no_kl = np.asarray(jax.vmap(jax.grad(estimate), in_axes=(None, 0, None))(theta, samples, 0.0)).mean(axis=0)
    assert np.max(np.abs(no_kl - exact) / se) > 10  # leaving out the KL term is a detectable bias

    # The batched form (all slots at once) is the mean of the per-slot estimates.
    batched = jax.grad(lambda th: M * losses.rloo_objective(
        jax.nn.log_softmax(th)[samples[:, 0]], cost[samples[:, 0]], logr[samples[:, 0]], jnp.ones((N,), bool),
        lam=lam, beta=beta, M=M)[0])(theta)
    np.testing.assert_allclose(np.asarray(batched), mean, rtol=1e-4, atol=1e-5)


def test_invalid_slots_weigh_nothing():
    logq = jnp.array([[-1.0, -2.0], [-3.0, -4.0]])
    rel, logr = jnp.array([[1.0, 2.0], [3.0, 0.0]]), jnp.zeros((2, 2))
    g_all = jax.grad(lambda q: losses.rloo_objective(q, rel, logr, jnp.array([True, False]), lam=1, beta=1, M=2)[0])(logq)
    assert not np.any(np.asarray(g_all[1])) and np.any(np.asarray(g_all[0]))


# ------------------------------------------------------------------------------------------ log q, prior, reference
def test_logq_of_samples_and_temperature_scoring(weights):
    """mf_logq (X's prefix shared by k rows, each with the tail and one sample) equals Σ log softmax(logits / T)
    of a plain forward over X + m; at_temperature divides every logit by T."""
    batch = make_batch(np.random.default_rng(3), E=2, R=3, empty_row=False)
    lora = random_lora(CFG, seed=4)
    logq = jax.jit(losses.mf_logq, static_argnames=("cfg", "temperature"))
    for T in (1.0, 0.7):
        got = np.asarray(logq(lora, weights, CFG, batch, temperature=T))
        want = np.array([r.sum() for r in hand_logprobs(weights, CFG, batch, lora=lora, temperature=T)])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 96, (2, 6)))
    plain = _logits(weights, CFG, tokens)
    cooled = _logits(losses.at_temperature(weights, CFG, 0.5), CFG, tokens)
    np.testing.assert_allclose(np.asarray(cooled), np.asarray(plain) / 0.5, rtol=1e-5, atol=1e-5)
    capped = ModelConfig(model_type="gemma2", vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, final_logit_softcap=30.0, norm_plus_one=True)
    with pytest.raises(ValueError, match="final_logit_softcap"):
        losses.at_temperature(init_weights(capped, jax.random.key(0)), capped, 0.5)


def test_reference_loss_equals_a_hand_computation(weights):
    """ℓ_q(m|X) − β·ℓ_r(m), ℓ the per-token mean log-prob (no off-by-one), averaged over valid slots; only ℓ_q
    carries a gradient."""
    rng = np.random.default_rng(6)
    previous = make_batch(rng, E=3, R=1, empty_row=False)
    prior_tokens = rng.integers(3, 96, 5).astype(np.int32)
    from mfjax.train.batches import prior_batch

    prior = prior_batch(prior_tokens, previous.target, previous.target_len, 3)
    lora, beta = random_lora(CFG, seed=8), 0.7
    ref = jax.jit(jax.value_and_grad(losses.mf_reference_loss, has_aux=True), static_argnames=("cfg",))
    (loss, aux), g = ref(lora, weights, CFG, previous, prior, beta=beta)  # β traced: one compile
    lq = [r.mean() for r in hand_logprobs(weights, CFG, previous, lora=lora)]
    lr = [r.mean() for r in hand_logprobs(weights, CFG, prior)]
    valid = np.asarray(previous.valid)
    want = np.mean([q - beta * r for q, r, v in zip(lq, lr, valid) if v])
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)

    _, g_q = ref(lora, weights, CFG, previous, prior, beta=0.0)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_q)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
