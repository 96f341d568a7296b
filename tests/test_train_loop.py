"""The IB-Tune loop on tiny models: a run killed and resumed equals an uninterrupted one bit for bit (LoRA,
optimizer state, carry, logged losses); stage 1 → stage 2 → PEFT export → a simulation with the adapters; a
reset slot's X carries no mean field; a step sharded over 8 CPU devices equals the unsharded one."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_fixtures import make_tiny_tokenizer
from mfjax import sharding
from mfjax.assets import read_fixture_events
from mfjax.config import ModelConfig
from mfjax.io.peft import merge_peft_adapter
from mfjax.io.tokenizer import Tokenizer
from mfjax.models.lora import LoraSpec
from mfjax.models.module import CausalLM
from mfjax.models.weights import init_weights
from mfjax.sim.simulate import Simulation, SimulationConfig
from mfjax.train.checkpoint import TrainCheckpointer
from mfjax.train.loop import TrainConfig, fit
from mfjax.train.metrics import read_metrics
from mfjax.train.step import MeanFieldSettings

CFG = ModelConfig(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, tie_word_embeddings=True)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Runs of one module compile the same programs again (every fit builds its own jitted step, as a fresh
    process does): JAX's persistent compilation cache makes the repeats cheap. Restored afterwards."""
    from jax._src import compilation_cache as cc  # reset: the cache's on/off state is fixed at first use

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    cc.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for n, v in old.items():
        jax.config.update(n, v)
    cc.reset_cache()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tok_dir = make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return tok_dir, Tokenizer.from_dir(tok_dir), init_weights(CFG, jax.random.key(0), std=0.3)


@pytest.fixture(scope="module")
def events():
    ced = read_fixture_events("ced_sample.jsonl")
    return ced[:1], ced[1:]


def config(stage, out_dir, **kw):
    base = dict(num_agents=11, step_size=4, slots=2, accumulate=1, lora=LoraSpec(rank=4, alpha=8),
                learning_rate=2e-2, warmup_fraction=0.0, mean_field=MeanFieldSettings(k=2, rel_agents=2, temperature=0.9),
                mf_new_tokens=6, save_every=1, log_ib_gain=True, eval_worlds=2)
    base.update(kw)
    return TrainConfig(stage=stage, out_dir=str(out_dir), **base)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_bit_equal(a, b, what):
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb), what
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and np.array_equal(x, y), what


@pytest.fixture(scope="module")
def stage1(model, events, tmp_path_factory):
    tok_dir, tok, weights = model
    out = tmp_path_factory.mktemp("stage1")
    return fit(config("mf", out, epochs=2), CFG, weights, tok, events[0], log=lambda s: None, model_dir=tok_dir)


def test_killed_and_resumed_stage1_is_bit_identical(model, events, stage1, tmp_path):
    tok_dir, tok, weights = model
    assert stage1.steps == 3  # one event of 3 chunks, 2 epochs: the two slots walk both epochs side by side
    first = fit(config("mf", tmp_path, epochs=2), CFG, weights, tok, events[0], log=lambda s: None, stop_after=1,
                model_dir=tok_dir)
    assert first.steps == 1 and first.adapter_dir is None
    resumed = fit(config("mf", tmp_path, epochs=2, eval_every=2), CFG, weights, tok, events[0], log=lambda s: None,
                  model_dir=tok_dir)
    assert resumed.steps == 3
    assert_bit_equal(resumed.lora, stage1.lora, "LoRA")
    assert_bit_equal(resumed.state.opt_state, stage1.state.opt_state, "optimizer state")
    assert_bit_equal(resumed.carry, stage1.carry, "carry")
    straight, again = read_metrics(stage1.out_dir), read_metrics(str(tmp_path))
    assert [r["step"] for r in again] == [r["step"] for r in straight] == list(range(1, 4))
    for key in ("loss", "grad_norm", "lr", "f_mean", "rel_ce", "kl_tok", "m_len"):
        assert [r[key] for r in again] == [r[key] for r in straight], key
    # Not a run that stood still: the LoRA moved and the learning rate followed the schedule.
    assert max(np.abs(x).max() for x in leaves(jax.tree.map(lambda p: p, resumed.lora.pairs()["q"].b))) > 0
    assert straight[0]["lr"] > straight[-1]["lr"] > 0
    # The checkpoint carries everything a resume needs.
    meta = TrainCheckpointer(os.path.join(tmp_path, "checkpoints")).read_meta()
    assert meta["opt_step"] == 3 and meta["walk"]["micro_step"] == 3 and meta["stage"] == "mf"
    with pytest.raises(ValueError, match="learning_rate"):
        fit(config("mf", tmp_path, epochs=2, learning_rate=1e-3), CFG, weights, tok, events[0], log=lambda s: None)


def test_stage2_on_the_stage1_adapter_then_simulate(model, events, stage1, tmp_path):
    tok_dir, tok, weights = model
    assert os.path.exists(os.path.join(stage1.adapter_dir, "adapter_model.safetensors"))
    mu = merge_peft_adapter(CFG, weights, stage1.adapter_dir)
    first = fit(config("policy", tmp_path, export_merged=True), CFG, weights, tok, events[0], events[1],
                mean_field_weights=mu, log=lambda s: None, stop_after=1, model_dir=tok_dir)
    result = fit(config("policy", tmp_path, export_merged=True), CFG, weights, tok, events[0], events[1],
                 mean_field_weights=mu, log=lambda s: None, model_dir=tok_dir)
    assert first.heldout_before is not None and result.heldout_before == first.heldout_before
    before, after = result.heldout_before["nll_per_token"], result.heldout_after["nll_per_token"]
    assert np.isfinite(before) and np.isfinite(after) and before != after
    rows = read_metrics(str(tmp_path))
    assert rows[0]["step"] == 0 and "heldout_nll_per_token" in rows[0]
    trained = [r for r in rows if "loss" in r]
    assert [r["step"] for r in trained] == [1, 2, 3]
    # At step 1 the LoRA is B = 0: π_φ is π₀, so its CE equals the cached CE_π₀(a|s,m) of the same agents.
    np.testing.assert_allclose(trained[0]["ce_policy"], trained[0]["ce_pi0_m"], rtol=1e-5)
    assert "ib_gain" in trained[-1]
    with open(os.path.join(tmp_path, "summary.json")) as f:
        assert json.load(f)["heldout_after"]["nll_per_token"] == after
    assert os.path.exists(os.path.join(tmp_path, "merged", "config.json"))

    # Close the loop: the simulator reads both adapters (merged at load, as launch/simulate.py does).
    policy = CausalLM(CFG, merge_peft_adapter(CFG, weights, result.adapter_dir))
    mean_field = CausalLM(CFG, mu)
    sim = Simulation(events[1], tok, SimulationConfig(num_agents=8, step_size=4, warmup_steps=1, policy_new_tokens=4,
                                                      mf_new_tokens=6))
    out = sim.run(policy, mean_field)
    assert len(out.worlds[0].rows) == 8 and out.worlds[0].trajectory


def test_state_sft_baseline_runs(model, events, tmp_path):
    tok_dir, tok, weights = model
    result = fit(config("state_sft", tmp_path, learning_rate=1e-2), CFG, weights, tok, events[0],
                 log=lambda s: None, model_dir=tok_dir)
    rows = [r for r in read_metrics(str(tmp_path)) if "loss" in r]
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows) and "ib_gain" not in rows[0]
    assert rows[-1]["loss"] != rows[0]["loss"] and float(jnp.abs(result.lora.pairs()["down"].b).max()) > 0


def test_reset_slot_reads_no_mean_field(model, events, stage1):
    """A slot that starts an event builds X from an empty mean field whatever its carry holds."""
    from mfjax.train import batches as B

    tok_dir, tok, weights = model
    # Run the loop's own pieces: the table and the X of chunk 0 with and without a stale carry.
    from mfjax.sim import lines as lines_lib
    from mfjax.sim.prompts import TokenTemplates
    from mfjax.sim.rollout import Rollout
    from mfjax.train.loop import _rollout_config
    from mfjax.train.step import MeanFieldStep, init_state, make_optimizer

    c = config("mf", "/unused")
    tt = TokenTemplates.build(tok, "zh", chat=True, step_size=4)
    lines = lines_lib.build_line_tables(tok, CFG.vocab_size)
    table = B.EventTable.build(events[0], tok, tt, _rollout_config(c, tok, "mf"), num_agents=11, seed=0, lines=lines)
    rollout = Rollout(table.rcfg, tt, CFG, CFG, lines)
    # The stage-1 run's own settings: the same program as its step (the compilation cache serves it).
    tx = lambda: make_optimizer(c.learning_rate, 3, warmup_fraction=c.warmup_fraction)
    step = MeanFieldStep(CFG, rollout, tx(), c.mean_field, B.prior_prompt(tok, tt), mf_lines=lines[1])
    stale = step.initial_carry(2)
    stale = dataclasses.replace(stale, m=stale.m.at[:, :5].set(7), m_len=jnp.full((2,), 5, jnp.int32))
    chunk = table.chunks(np.array([0, -1]), np.array([0, 0]))
    nxt = table.chunks(np.array([0, -1]), np.array([1, 0]), width=2)
    args = (jax.tree.map(jnp.asarray, chunk), jax.tree.map(jnp.asarray, nxt), jnp.array([True, False]),
            jnp.array([True, False]), jnp.array([0, 0], jnp.int32))
    fresh = lambda: init_state(jax.tree.map(jnp.copy, stage1.lora), tx())  # a step donates its state
    _, carry_reset, m_reset = step(fresh(), stale, weights, *args)
    _, carry_clean, m_clean = step(fresh(), step.initial_carry(2), weights, *args)
    assert int(m_reset["x_tokens"]) == int(m_clean["x_tokens"])
    assert_bit_equal(carry_reset.m[0], carry_clean.m[0], "the mean field written after a reset")
    assert int(carry_reset.m_len[1]) == 5  # the idle slot keeps its carry untouched


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (host) devices")
def test_sharded_policy_step_equals_unsharded(model, events):
    from mfjax.sim import lines as lines_lib
    from mfjax.sim.prompts import TokenTemplates
    from mfjax.sim.rollout import Rollout
    from mfjax.train import batches as B
    from mfjax.train.loop import _rollout_config
    from mfjax.train.step import PolicyStep, init_state, make_optimizer, slot_sharding, state_shardings
    from mfjax.models.weights import weight_shardings
    from test_train_peft import trained_lora

    tok_dir, tok, weights = model
    # The stage-2 run's own table and settings: its unsharded step is a compilation-cache hit.
    c = config("policy", "/unused")
    tt = TokenTemplates.build(tok, "zh", chat=True, step_size=4)
    lines = lines_lib.build_line_tables(tok, CFG.vocab_size)
    table = B.EventTable.build(events[0], tok, tt, _rollout_config(c, tok, "mf"), num_agents=11, seed=0, lines=lines,
                               width_events=events[1])
    spec = c.lora
    lora = trained_lora(CFG, spec)
    tx = make_optimizer(c.learning_rate, 3, warmup_fraction=c.warmup_fraction)
    chunk = table.chunks(np.array([0, 0]), np.array([0, 2]))
    rollout = Rollout(table.rcfg, tt, CFG, CFG, lines)
    m = np.zeros((2, rollout.mean_field_width), np.int32)
    m[:, :3] = [[5, 6, 7]] * 2
    m_len = np.array([3, 0], np.int32)

    copy = lambda: jax.tree.map(jnp.copy, lora)  # a step donates its state
    plain_state, plain = PolicyStep(CFG, rollout, tx)(init_state(copy(), tx), weights, jax.tree.map(jnp.asarray, chunk),
                                                      jnp.asarray(m), jnp.asarray(m_len))
    mesh = sharding.make_mesh({"data": 2, "model": 4})
    state = jax.device_put(init_state(copy(), tx), state_shardings(CFG, spec, tx, mesh))
    args = jax.device_put((chunk, m, m_len), slot_sharding((chunk, m, m_len), mesh))
    sharded_state, sharded = PolicyStep(CFG, rollout, tx, mesh=mesh)(
        state, jax.device_put(weights, weight_shardings(CFG, mesh)), *args)
    np.testing.assert_allclose(float(sharded["loss"]), float(plain["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(sharded["grad_norm"]), float(plain["grad_norm"]), rtol=1e-4)
    # Adam's first update is lr·g/(|g| + ε): per element it normalises the gradient away, so an entry whose
    # gradient is ~1e-8 moves by up to lr either way on a float reduction-order difference. Compare the gradients
    # themselves (sharded loss, same plan), and the updated LoRA within 1 % of one step's size.
    from mfjax.train import losses as L

    def grads(lora, w, inputs, mm, mm_len, plan):
        batch = B.policy_batch(rollout, inputs, mm, mm_len)
        return jax.grad(lambda l: L.sft_loss(l, w, CFG, batch, plan=plan)[0])(lora)

    g_plain = jax.jit(grads, static_argnums=5)(lora, weights, jax.tree.map(jnp.asarray, chunk), jnp.asarray(m),
                                               jnp.asarray(m_len), None)
    g_sharded = jax.jit(grads, static_argnums=5)(jax.device_put(copy(), state_shardings(CFG, spec, tx, mesh).lora),
                                                 jax.device_put(weights, weight_shardings(CFG, mesh)), *args,
                                                 sharding.MeshRules(mesh))
    top = max(float(np.abs(x).max()) for x in leaves(g_plain))
    for a, b in zip(leaves(g_sharded), leaves(g_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * top)
    for a, b in zip(leaves(sharded_state.lora), leaves(plain_state.lora)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-2 * c.learning_rate)
    q_b = sharded_state.lora.pairs()["q"].b
    assert q_b.sharding.spec[2] == "model" and args[1].sharding.spec[0] == "data"  # heads, slots
