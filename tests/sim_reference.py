"""A plain Python, step-by-step reference of the MF-LLM loop (SPEC §2), for testing the scanned rollout.

It shares only the engine primitives (one jitted generate / score call on a whole prompt) with
:mod:`mfjax.sim.rollout`: prompts are built by concatenating Python token lists, there is no shared
prefix cache, no packing, no scan and no ``lax.cond``, and every world runs on its own.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mfjax.engine.generate import generate_tokens_jit
from mfjax.engine.host import pad_rows_host
from mfjax.engine.score import score_tokens_jit
from mfjax.sim import lines as lines_lib
from mfjax.sim import templates
from mfjax.sim.batch import Override


@dataclasses.dataclass
class ReferenceWorld:
    actions: list  # per agent: token list used
    generated: list  # per agent: generated token list ([] in warm-up)
    sources: list  # per agent: 'warmup' | 'generated' | 'intervention' | 'key_node'
    nll: list  # per agent
    mean_fields: list  # per step: the mean field the policy read
    mean_fields_out: list  # per step: the mean field written from the step's actions
    mf_prompts: list  # per step: the mean-field prompt tokens
    policy_prefixes: list  # per step: the policy prompt tokens before the agent's own part


def _ids(piece):
    return list(piece.tokens)


def _table_row(table, i):
    return table.tokens[i, :table.lengths[i]].tolist()


def _comment_list(tt, header, items):
    if not items:
        return []
    out = _ids(header)
    for i, a in enumerate(items):
        out += _table_row(tt.comment_pre, i) + a + _ids(tt.comment_post)
    return out


def pad_rows(rows, width, pad_id, left):
    tokens, lengths = pad_rows_host(rows, width, pad_id, left=left)
    return jnp.asarray(tokens), jnp.asarray(lengths)


def _cleaned(tables, tokens, text_len, pad, tokenizer, expected_fn, raw):
    """The line-handled tokens, checked against SPEC's string operation on the decoded text."""
    out, n = clean_jit(tables, jnp.asarray([tokens]), jnp.asarray([text_len]), pad)
    cleaned = np.asarray(out)[0, :int(n[0])].tolist()
    assert tokenizer.decode(cleaned) == expected_fn(tokenizer.decode(raw[:text_len])), (raw, cleaned)
    return cleaned


clean_jit = jax.jit(lines_lib.clean, static_argnames=("pad_id",))


def reference_world(enc, seed, rcfg, tt, policy_params, policy_cfg, mf_params, mf_cfg, lines, world_key,
                    tokenizer, overrides=()) -> ReferenceWorld:
    """Runs one world step by step."""
    B = rcfg.step_size
    policy_lines, mf_lines = lines
    vocab = policy_lines.whitespace.shape[0]
    eos = set(rcfg.stop_ids)
    policy_stop = jnp.asarray(np.isin(np.arange(vocab), list(eos)))
    mf_eos = eos
    mf_stop = jnp.asarray(np.isin(np.arange(vocab), list(mf_eos)))
    kinds = {}
    for o in overrides:
        if o.event_id in (None, enc.event.event_id):
            kinds[o.step * B + o.position] = o
    m: list[int] = []
    past: list[tuple[list[int], int]] = []  # (action, followers)
    out = ReferenceWorld([], [], [], [], [], [], [], [])
    for k in range(rcfg.num_steps):
        agents = [a for a in range(k * B, (k + 1) * B) if a < enc.num_agents]
        if not agents:
            break
        if rcfg.algorithm == "mf":
            ctx = (_ids(tt.mf_ctx_open) + m + _ids(tt.mf_ctx_close)) if m else []
        elif rcfg.algorithm == "recent":
            ctx = _comment_list(tt, tt.recent_header, [a for a, _ in past[-templates.RECENT_K:]])
        elif rcfg.algorithm == "popular":
            window = past[-templates.POPULAR_WINDOW:]
            ranked = sorted(window, key=lambda af: af[1], reverse=True)  # stable: ties keep time order
            ctx = _comment_list(tt, tt.popular_header, [a for a, _ in ranked[:templates.POPULAR_K]])
        else:
            ctx = []
        prefix = enc.policy_head + ctx + _ids(tt.profile)
        out.policy_prefixes.append(prefix)
        prompts = [prefix + enc.agent_part[a] for a in agents]
        width = max(len(p) for p in prompts)
        tokens, lens = pad_rows(prompts, width, rcfg.pad_id, left=True)
        real, real_lens = pad_rows([enc.real_action[a] for a in agents], rcfg.widths.action,
                                   rcfg.pad_id, left=False)
        logprobs = np.asarray(score_tokens_jit(policy_params, policy_cfg, tokens, lens, real, real_lens))
        warm = k < rcfg.warmup_steps
        if warm:
            generated = [[] for _ in agents]
        else:
            keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(world_key, 0), a) for a in agents])
            gen = generate_tokens_jit(policy_params, policy_cfg, rcfg.policy_generate, tokens, lens, keys,
                                      stop_mask=policy_stop, line_stop=policy_lines.stop_rule())
            g_tok, g_len = np.asarray(gen.tokens), np.asarray(gen.lengths)
            generated = []
            for i in range(len(agents)):
                raw = g_tok[i, :g_len[i]].tolist()
                n = len(raw) - int(bool(raw) and raw[-1] in eos)  # an end-of-sequence token carries no text
                generated.append(_cleaned(policy_lines, raw, n, rcfg.pad_id, tokenizer, lines_lib.first_line,
                                          raw))
        step_actions = []
        for i, a in enumerate(agents):
            o = kinds.get(a)
            if warm:
                action, source = enc.real_action[a], "warmup"
            elif o is not None and o.kind == "key_node":
                action, source = enc.real_action[a], "key_node"
            elif o is not None:
                action, source = o.text_tokens, "intervention"
            else:
                action, source = generated[i], "generated"
            out.actions.append(action)
            out.generated.append(generated[i])
            out.sources.append(source)
            out.nll.append(-float(logprobs[i].sum()))
            step_actions.append(action)
            past.append((action, enc.followers[a]))
        out.mean_fields.append(list(m))
        if rcfg.algorithm == "mf":
            prompt = enc.mf_head + m + _ids(tt.mf_head_post)
            for j, action in enumerate(step_actions):
                prompt += _table_row(tt.mf_line_pre, j) + action + _ids(tt.mf_line_post)
            prompt += _ids(tt.mf_tail)
            out.mf_prompts.append(prompt)
            p_tok, p_len = pad_rows([prompt], len(prompt), rcfg.pad_id, left=True)
            key = jax.random.fold_in(jax.random.fold_in(world_key, 1), k)[None]
            gen = generate_tokens_jit(mf_params, mf_cfg, rcfg.mean_field_generate, p_tok, p_len, key, stop_mask=mf_stop)
            raw = np.asarray(gen.tokens)[0, :int(gen.lengths[0])].tolist()
            n = len(raw) - int(bool(raw) and raw[-1] in mf_eos)
            m = _cleaned(mf_lines, raw, n, rcfg.pad_id, tokenizer, lines_lib.join_lines, raw)
        out.mean_fields_out.append(list(m))
    return out


def with_tokens(overrides, tokenizer):
    """Overrides with their intervention texts tokenized (as the batch builder does)."""
    out = []
    for o in overrides:
        o2 = Override(**dataclasses.asdict(o))
        object.__setattr__(o2, "text_tokens", tokenizer.encode(o.text) if o.text else [])
        out.append(o2)
    return out
