"""The scanned MF-LLM rollout: equal to a step-by-step reference loop, prompts equal to the SPEC text,
warm-up / interventions / key nodes, seeds, one compile per run, sharding."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from mfjax.assets import read_fixture_events
from mfjax.config import ModelConfig
from mfjax.engine.sampling import SamplingConfig
from mfjax.io.tokenizer import Tokenizer
from mfjax.models.weights import init_weights
from mfjax.sim import batch as batching
from mfjax.sim import lines as lines_lib
from mfjax.sim import policies, presets
from mfjax.sim import rollout as rollout_lib
from mfjax.sim import templates
from mfjax.sim.prompts import TokenTemplates
from mfjax.sim.types import Source
import sim_reference

PAPER_POLICY = presets.resolve(presets.PAPER["policy"])  # T 0.8, top-p 0.85, top-k 50, penalty 1.2

B = 4  # agents per step
NUM_AGENTS = 12  # 3 steps
POLICY_NEW = 6
OVERRIDES = (
    batching.Override(step=1, position=1, kind="intervention", text="真的假的？"),
    batching.Override(step=2, position=0, kind="key_node"),
)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return Tokenizer.from_dir(smollm2_dir)


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny random Llama over SmolLM2's real byte-level vocabulary (so Chinese text round-trips)."""
    cfg = ModelConfig(model_type="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True)
    return cfg, init_weights(cfg, jax.random.key(0), std=0.05)


@pytest.fixture(scope="module")
def events():
    return read_fixture_events("ced_sample.jsonl")[:2]


@pytest.fixture(scope="module")
def lines(tokenizer, model):
    return lines_lib.build_line_tables(tokenizer, model[0].vocab_size)


def make_rollout(tokenizer, cfg, lines, events, algorithm, *, sampling=None, mesh=None, mf_tokens=8, language="zh",
                 mf_with_states=False, overrides=OVERRIDES, num_agents=NUM_AGENTS, dump_prompts=False,
                 max_action_tokens=None):
    tt = TokenTemplates.build(tokenizer, language, chat=True, step_size=B)
    encoded = [batching.encode_event(e, tokenizer, tt, num_agents=num_agents, step_size=B, algorithm=algorithm,
                               mf_with_states=mf_with_states, max_action_tokens=max_action_tokens, strict=False)
               for e in events]
    greedy = SamplingConfig(temperature=None, repetition_penalty=1.2)
    widths = batching.widths_for(encoded, tt, tokenizer, step_size=B, warmup_steps=1,
                           generated_width=lines_lib.clean_width(lines[0], POLICY_NEW), mf_with_states=mf_with_states,
                           overrides=overrides)
    rcfg = rollout_lib.RolloutConfig(
        num_steps=-(-max(e.num_agents for e in encoded) // B), algorithm=algorithm, step_size=B, warmup_steps=1,
        policy_sampling=sampling or greedy, policy_new_tokens=POLICY_NEW, mf_sampling=sampling or greedy,
        mf_new_tokens=mf_tokens, mf_min_new_tokens=0, stop_ids=tokenizer.eos_token_ids,
        pad_id=tokenizer.pad_token_id, mf_with_states=mf_with_states, dump_prompts=dump_prompts, widths=widths)
    return tt, encoded, rcfg, rollout_lib.Rollout(rcfg, tt, cfg, cfg, lines, mesh=mesh)


def run(rollout, params, worlds, rcfg, tokenizer, overrides=OVERRIDES, place=jnp.asarray):
    inputs = jax.tree.map(place, batching.stack_worlds(worlds, rcfg, tokenizer, overrides))
    ys, _ = rollout.run(params, params, inputs)
    return jax.tree.map(np.asarray, ys)


def world_tokens(ys, w, field, length_field, agent, B=B):
    k, j = divmod(agent, B)
    return getattr(ys, field)[k, w, j, :getattr(ys, length_field)[k, w, j]].tolist()


@pytest.mark.parametrize("algorithm", ["mf", "popular"])
def test_scan_equals_step_by_step_reference(tokenizer, model, lines, events, algorithm):
    cfg, params = model
    tt, encoded, rcfg, rollout = make_rollout(tokenizer, cfg, lines, events, algorithm)
    worlds = [(encoded[0], 0), (encoded[1], 3)]
    ys = run(rollout, params, worlds, rcfg, tokenizer)
    overrides = sim_reference.with_tokens(OVERRIDES, tokenizer)
    for w, (enc, seed) in enumerate(worlds):
        ref = sim_reference.reference_world(enc, seed, rcfg, tt, params, cfg, params, cfg, lines,
                                            batching.world_key(seed, enc.event.event_id), tokenizer, overrides)
        for a in range(NUM_AGENTS):
            k, j = divmod(a, B)
            assert Source(int(ys.source[k, w, j])).label == ref.sources[a]
            assert world_tokens(ys, w, "action", "action_len", a) == ref.actions[a], (w, a)
            assert world_tokens(ys, w, "generated", "generated_len", a) == ref.generated[a], (w, a)
            np.testing.assert_allclose(ys.nll[k, w, j], ref.nll[a], rtol=1e-4)
        for k in range(rcfg.num_steps):
            assert ys.mean_field[k, w, :ys.mean_field_len[k, w]].tolist() == ref.mean_fields[k]
            assert ys.mean_field_out[k, w, :ys.mean_field_out_len[k, w]].tolist() == ref.mean_fields_out[k]
        # Not a vacuous comparison: the policy wrote something.
        assert sum(len(g) for g in ref.generated) > 0
        if algorithm == "mf":
            # The mean field moved, and the intervention text reached the next mean-field prompt.
            assert any(ref.mean_fields[1:])
            assert "真的假的？" in tokenizer.decode(ref.mf_prompts[1])
        # Warm-up carries the real actions; the override slots carry the override.
        for a in range(B):
            assert ref.sources[a] == "warmup" and ref.actions[a] == enc.real_action[a]
        assert ref.sources[1 * B + 1] == "intervention"
        assert tokenizer.decode(world_tokens(ys, w, "action", "action_len", 1 * B + 1)) == "真的假的？"
        assert ref.sources[2 * B + 0] == "key_node" and ref.actions[2 * B] == enc.real_action[2 * B]


@pytest.mark.parametrize("fixture, language", [("ced_sample.jsonl", "zh"), ("twitter_sample.jsonl", "en")])
def test_prompts_in_token_space_equal_spec_text(tokenizer, model, lines, fixture, language):
    """Policy and mean-field prompts assembled inside jit decode to the SPEC templates byte for byte."""
    cfg, params = model
    head, tail = tokenizer.chat_template_parts()
    event = read_fixture_events(fixture)[0]
    assert event.language == language
    agents = event.agents[:B]
    states = [templates.state_text(a, language=language) for a in agents]
    for algorithm in ("mf", "recent", "popular", "state"):
        tt, encoded, rcfg, rollout = make_rollout(tokenizer, cfg, lines, [event], algorithm, language=language)
        LA = rcfg.widths.action
        inputs = jax.tree.map(jnp.asarray, batching.stack_worlds([(encoded[0], 0)], rcfg, tokenizer))
        m_text = "多数网友质疑该消息的真实性"
        past = ["求真相", "不信", "转发微博", "顶", "真的假的", "等官方消息"]
        followers = [5, -1, 300, 300, 7, 12]
        width = rollout.mean_field_width
        m = jnp.asarray([tokenizer.encode(m_text) + [0] * width])[:, :width]
        m_len = jnp.asarray([min(len(tokenizer.encode(m_text)), width)])
        m_text = tokenizer.decode(m[0, :m_len[0]].tolist())
        past_tok, past_len = batching._rows([tokenizer.encode(p) for p in past], len(past), LA, 0, "past", "t")

        def window(K):
            pad = K - len(past)
            return policies.CommentWindow(
                tokens=jnp.pad(jnp.asarray(past_tok), ((pad, 0), (0, 0)))[None],
                lengths=jnp.pad(jnp.asarray(past_len), (pad, 0))[None],
                valid=(jnp.arange(K) >= pad)[None], followers=jnp.pad(jnp.asarray(followers), (pad, 0))[None])

        if algorithm == "mf":
            state = policies.MeanFieldCarry(m=m, m_len=m_len)
        elif algorithm == "recent":  # the window holds the last K only
            state = jax.tree.map(lambda x: x[:, -templates.RECENT_K:], window(len(past)))
        elif algorithm == "popular":
            state = window(templates.POPULAR_WINDOW)
        else:
            state = ()
        carry = rollout_lib.Carry(algorithm=state)
        prefix, prefix_len = rollout.policy_prefix(inputs, carry)
        prefix_text = tokenizer.decode(np.asarray(prefix)[0, :int(prefix_len[0])].tolist(), skip_special_tokens=False)
        context = templates.group_context(algorithm, m=m_text, past_actions=past, past_followers=[
            None if f < 0 else f for f in followers], language=language)
        for i, state in enumerate(states):
            agent_part = tokenizer.decode(encoded[0].agent_part[i], skip_special_tokens=False)
            expected = head + templates.full_text(templates.policy_segments(event.topic, state, context, language=language)) + tail
            assert prefix_text + agent_part == expected
        if algorithm == "mf":
            actions = [tokenizer.encode(p) for p in past[:B]]
            a_tok, a_len = batching._rows(actions, B, LA, 0, "a", "t")
            prompt, prompt_len = rollout.mean_field_prompt(inputs, m, m_len, jnp.asarray(a_tok)[None],
                                                           jnp.asarray(a_len)[None], jnp.ones((1, B), bool), 0)
            text = tokenizer.decode(np.asarray(prompt)[0, :int(prompt_len[0])].tolist(), skip_special_tokens=False)
            expected = head + templates.full_text(templates.mean_field_segments(event.topic, m_text, past[:B], language=language)) + tail
            assert text == expected


def test_mean_field_prompt_with_states_equals_spec_text(tokenizer, model, lines, events):
    """The mean-field prompt variant whose lines carry each agent's state (the paper's μ(states, actions))."""
    cfg, _ = model
    head, tail = tokenizer.chat_template_parts()
    event = events[0]
    tt, encoded, rcfg, rollout = make_rollout(tokenizer, cfg, lines, [event], "mf", mf_with_states=True)
    inputs = jax.tree.map(jnp.asarray, batching.stack_worlds([(encoded[0], 0)], rcfg, tokenizer))
    actions = ["求真相", "不信", "转发微博", "顶"]
    a_tok, a_len = batching._rows([tokenizer.encode(a) for a in actions], B, rcfg.widths.action, 0, "a", "t")
    k = 1  # the second step: agents B .. 2B-1, numbered 1 .. B in the prompt
    empty = rollout.initial_carry(1).algorithm
    prompt, prompt_len = rollout.mean_field_prompt(inputs, empty.m, empty.m_len, jnp.asarray(a_tok)[None],
                                                   jnp.asarray(a_len)[None], jnp.ones((1, B), bool), k)
    text = tokenizer.decode(np.asarray(prompt)[0, :int(prompt_len[0])].tolist(), skip_special_tokens=False)
    states = [templates.state_text(a) for a in event.agents[k * B:(k + 1) * B]]
    assert text == head + templates.full_text(templates.mean_field_segments(event.topic, "", actions, states)) + tail


def test_seeds_reproducible_and_distinct(tokenizer, model, lines, events):
    cfg, params = model
    tt, encoded, rcfg, rollout = make_rollout(tokenizer, cfg, lines, events[:1], "mf",
                                              sampling=PAPER_POLICY)
    a = run(rollout, params, [(encoded[0], 0), (encoded[0], 1)], rcfg, tokenizer)
    b = run(rollout, params, [(encoded[0], 0), (encoded[0], 1)], rcfg, tokenizer)
    np.testing.assert_array_equal(a.action, b.action)
    np.testing.assert_array_equal(a.mean_field, b.mean_field)
    generated = a.source[:, 0] == Source.GENERATED
    assert generated.any()
    assert not np.array_equal(a.generated[:, 0][generated], a.generated[:, 1][generated])
    # A world's rollout does not depend on its batch: seed 1 alone in slot 0 equals slot 1 above.
    c = run(rollout, params, [(encoded[0], 1), (encoded[0], 1)], rcfg, tokenizer)
    np.testing.assert_array_equal(c.action[:, 0], a.action[:, 1])
    assert rollout.compile_count() == 1  # three batches of the same shape, one program


@pytest.mark.parametrize("shape", [{"data": 2, "model": 4}, {"data": 8}])
def test_sharded_equals_unsharded(tokenizer, model, lines, events, shape):
    from mfjax import sharding

    cfg, params = model
    mesh = sharding.make_mesh(shape)
    worlds = [(None, s) for s in range(mesh.shape["data"])]
    tt, encoded, rcfg, plain = make_rollout(tokenizer, cfg, lines, events[:1], "mf",
                                            sampling=PAPER_POLICY)
    worlds = [(encoded[0], s) for s, _ in enumerate(worlds)]
    *_, sharded = make_rollout(tokenizer, cfg, lines, events[:1], "mf", sampling=PAPER_POLICY, mesh=mesh)
    expected = run(plain, params, worlds, rcfg, tokenizer)
    from mfjax.models.weights import weight_shardings

    placed = jax.device_put(params, weight_shardings(cfg, mesh))
    shardings = sharded.input_shardings()
    got = run(sharded, placed, worlds, rcfg, tokenizer)
    assert shardings.agent_part.spec[0] == "data"  # worlds split over the data axis, by the logical rules
    np.testing.assert_array_equal(got.action, expected.action)
    np.testing.assert_array_equal(got.mean_field, expected.mean_field)
    np.testing.assert_allclose(got.nll, expected.nll, rtol=1e-4)


def test_short_event_stops_at_its_last_agent(tokenizer, model, lines, events):
    """An event shorter than the run: no rows past its last agent, no mean-field update of its empty steps,
    one trajectory entry per real step (the last update included)."""
    import dataclasses

    from mfjax.sim import outputs

    cfg, params = model
    short = dataclasses.replace(events[1], agents=events[1].agents[:6])  # 6 agents: steps 0 and 1 (partial)
    tt, encoded, rcfg, rollout = make_rollout(tokenizer, cfg, lines, [events[0], short], "mf", overrides=())
    assert rcfg.num_steps == 3 and encoded[1].num_agents == 6 and encoded[1].num_steps == 2
    ys = run(rollout, params, [(encoded[0], 0), (encoded[1], 0)], rcfg, tokenizer, overrides=())
    assert (ys.source[2, 1] == Source.NONE).all() and (ys.source[1, 1, 2:] == Source.NONE).all()
    # Step 2 of the short world has no agents: its mean field stays what step 1 wrote.
    np.testing.assert_array_equal(ys.mean_field_out[2, 1], ys.mean_field_out[1, 1])
    assert ys.mean_field_out_len[1, 1] > 0
    rows, trajectory = outputs.world_records(ys, 1, encoded[1], 0, tokenizer, rcfg)
    assert [r["agent"] for r in rows] == list(range(6))
    assert [t["step"] for t in trajectory] == [0, 1]
    final = tokenizer.decode(ys.mean_field_out[1, 1, :ys.mean_field_out_len[1, 1]].tolist())
    assert trajectory[-1]["mean_field"] == final and final  # the last update is written
    rows, trajectory = outputs.world_records(ys, 0, encoded[0], 0, tokenizer, rcfg)
    assert len(rows) == NUM_AGENTS and len(trajectory) == 3
    # Each step's update is what the next step's policy read.
    assert [r["mean_field"] for r in rows if r["step"] == 2][0] == trajectory[1]["mean_field"]


def test_real_actions_read_whole(tokenizer, model, lines, events):
    """Real actions are never cut to a buffer: the buffers are sized from the data; a user's cap cuts at a
    character boundary and is counted."""
    import dataclasses

    cfg, params = model
    long_text = "这条消息是真的吗？" * 12 + "@杜子腾"  # far longer than the policy's output width
    agents = list(events[0].agents[:NUM_AGENTS])
    agents[2] = dataclasses.replace(agents[2], action=long_text)
    event = dataclasses.replace(events[0], agents=tuple(agents))
    n_long = len(tokenizer.encode(long_text))
    tt, encoded, rcfg, rollout = make_rollout(tokenizer, cfg, lines, [event], "mf", overrides=())
    assert encoded[0].real_action[2] == tokenizer.encode(long_text) and encoded[0].truncated_actions == 0
    assert rcfg.widths.action >= n_long > rollout.generated_width
    ys = run(rollout, params, [(encoded[0], 0)], rcfg, tokenizer, overrides=())
    assert int(ys.nll_tokens[0, 0, 2]) == n_long  # scored whole
    used = ys.action[0, 0, 2, :ys.action_len[0, 0, 2]].tolist()
    assert tokenizer.decode(used) == long_text  # the warm-up reads it whole (and so does the mean field)
    # A cap cuts at a character boundary, never inside a character, and says how many it cut.
    tt, encoded, *_ = make_rollout(tokenizer, cfg, lines, [event], "mf", overrides=(), max_action_tokens=20)
    cut = tokenizer.decode(encoded[0].real_action[2])
    assert len(encoded[0].real_action[2]) <= 20 and long_text.startswith(cut) and "\ufffd" not in cut
    assert encoded[0].truncated_actions >= 1
