"""Training reads the simulator's tokens: the policy prompts and mean-field prompts that IB-Tune builds for a
chunk equal the prompts the rollout builds for the same step (its prompt dump), the SFT loss of π₀ equals the
rollout's NLL of the real actions, the split X (shared prefix + tail rows) writes the same mean field as the
rollout, and the chunk table masks what is not there."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_fixtures import make_tiny_tokenizer
from mfjax.assets import read_fixture_events
from mfjax.config import ModelConfig
from mfjax.engine.generate import generate_tokens, prefill_prefix
from mfjax.engine.sampling import SamplingConfig
from mfjax.io.tokenizer import Tokenizer
from mfjax.models.weights import init_weights
from mfjax.sim import lines as lines_lib
from mfjax.sim.prompts import TokenTemplates
from mfjax.sim.rollout import Rollout, RolloutConfig
from mfjax.train import batches as B
from mfjax.train import losses

STEP = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = Tokenizer.from_dir(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))
    cfg = ModelConfig(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True)
    weights = init_weights(cfg, jax.random.key(0), std=0.3)
    lines = lines_lib.build_line_tables(tok, cfg.vocab_size)
    tt = TokenTemplates.build(tok, "zh", chat=True, step_size=STEP)
    greedy = SamplingConfig(temperature=None, repetition_penalty=1.2)
    base = RolloutConfig(num_steps=1, algorithm="mf", step_size=STEP, warmup_steps=1, policy_sampling=greedy,
                         policy_new_tokens=4, mf_sampling=greedy, mf_new_tokens=6, mf_min_new_tokens=2,
                         stop_ids=tok.eos_token_ids, pad_id=tok.pad_token_id)
    events = read_fixture_events("ced_sample.jsonl")
    table = B.EventTable.build(events, tok, tt, base, num_agents=3 * STEP - 1, seed=0, lines=lines)
    rollout = Rollout(dataclasses.replace(table.rcfg, dump_prompts=True), tt, cfg, cfg, lines)
    ys, _ = rollout.run(weights, weights, jax.tree.map(jnp.asarray, table.host))
    return dict(tok=tok, cfg=cfg, weights=weights, lines=lines, table=table, rollout=rollout,
                ys=jax.tree.map(np.asarray, ys))


def test_table_is_teacher_forced_and_chunks_mask_what_is_missing(setup):
    table = setup["table"]
    assert table.rcfg.warmup_steps == table.rcfg.num_steps == 3 and table.num_chunks == [3, 3]
    chunk = table.chunks(np.array([1, -1, 0]), np.array([2, 0, 1]))
    assert chunk.agent_valid.shape == (3, STEP)
    assert chunk.agent_valid[0].tolist() == [True, True, True, False]  # 11 agents: the last chunk has 3
    assert not chunk.agent_valid[1].any()  # an idle slot
    assert chunk.agent_valid[2].all()
    np.testing.assert_array_equal(chunk.real_action[2], table.host.real_action[0, STEP:2 * STEP])
    np.testing.assert_array_equal(chunk.policy_head[0], table.host.policy_head[1])
    first2 = table.chunks(np.array([0]), np.array([1]), width=2)
    np.testing.assert_array_equal(first2.agent_part[0], table.host.agent_part[0, STEP:STEP + 2])


def test_training_prompts_equal_the_simulators(setup):
    table, rollout, ys, cfg, weights = setup["table"], setup["rollout"], setup["ys"], setup["cfg"], setup["weights"]
    sft = jax.jit(lambda inputs, m, m_len: losses.score_rows(weights, cfg, B.policy_batch(rollout, inputs, m, m_len)))
    x_of = jax.jit(lambda inputs, m, m_len: B.mean_field_prompt(rollout, inputs, m, m_len))
    checked_context = 0
    for w in range(2):
        for t in range(3):
            inputs = table.chunks(np.array([w]), np.array([t]))
            m, m_len = ys.mean_field[t, w][None], ys.mean_field_len[t, w][None]  # the m the policy read at step t
            batch = B.policy_batch(rollout, jax.tree.map(jnp.asarray, inputs), jnp.asarray(m), jnp.asarray(m_len))
            n = int(batch.prefix_len[0])
            assert n == ys.policy_prefix_len[t, w]
            np.testing.assert_array_equal(np.asarray(batch.prefix[0, :n]), ys.policy_prefix[t, w, :n])
            checked_context += int(m_len[0] > 0)
            # The agents' own parts and targets are the simulator's, and π₀'s CE is the rollout's NLL.
            logprobs = np.asarray(sft(inputs, m, m_len))
            valid = inputs.agent_valid[0]
            nll = -logprobs.sum(axis=1)
            np.testing.assert_allclose(nll[valid], ys.nll[t, w][valid], rtol=1e-5)
            np.testing.assert_array_equal(np.asarray(batch.target_len)[valid], ys.nll_tokens[t, w][valid])
            # Stage 1's X for this chunk is the simulator's mean-field prompt of this step.
            x, x_len = x_of(inputs, m, m_len)
            n = int(x_len[0])
            assert n == ys.mf_prompt_len[t, w]
            np.testing.assert_array_equal(np.asarray(x[0, :n]), ys.mf_prompt[t, w, :n])
    assert checked_context >= 4  # the mean field really is in most of the compared prompts


def test_split_x_writes_the_simulators_mean_field(setup):
    """X cut into a shared prefix and the tail as each row's own part (what stage 1 samples from) generates,
    greedily, the same mean field as the rollout from the whole X."""
    table, rollout, ys, cfg, weights = setup["table"], setup["rollout"], setup["ys"], setup["cfg"], setup["weights"]
    r = rollout.rcfg
    eos = jnp.asarray(np.isin(np.arange(cfg.vocab_size), list(r.stop_ids)))

    @jax.jit
    def write(x, x_len):
        prefix_tokens, prefix_len, tail, tail_len = B.split_tail(rollout, x, x_len, 1)
        prefix = prefill_prefix(weights, cfg, prefix_tokens, prefix_len)
        out = generate_tokens(weights, cfg, r.mean_field_generate, tail, tail_len,
                              jax.random.split(jax.random.key(0), x.shape[0]), prefix, stop_mask=eos)
        length = B.text_length(out.tokens, out.lengths, out.finished, eos)
        return lines_lib.clean(setup["lines"][1], out.tokens, length, r.pad_id)

    for t in range(3):
        x, x_len = jnp.asarray(ys.mf_prompt[t]), jnp.asarray(ys.mf_prompt_len[t])
        m, m_len = map(np.asarray, write(x, x_len))
        for w in range(2):
            n = int(ys.mean_field_out_len[t, w])
            assert int(m_len[w]) == n and m[w, :n].tolist() == ys.mean_field_out[t, w, :n].tolist()
    assert ys.mean_field_out_len.min() > 0
