"""Line handling in token space equals SPEC's string operations on the decoded text, on real vocabularies."""

from __future__ import annotations

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mfjax.io.tokenizer import Tokenizer
from mfjax.sim import lines

MEAN_FIELD_TEXT = "1. 立场分布：\n大部分网友支持。\n2. 情绪：质疑？\n"

clean = jax.jit(lines.clean, static_argnames=("pad_id",))


@pytest.fixture(scope="module", params=["qwen2", "smollm2"])
def vocab(request):
    """(tokenizer, (first-line tables, join tables)) for the real Qwen2 and SmolLM2 vocabularies."""
    if request.param == "qwen2":
        from mfjax.io import qwen2_tokenizer

        try:
            path = qwen2_tokenizer.qwen2_tokenizer_dir()
        except qwen2_tokenizer.QwenTokenizerNotInstalled as e:
            pytest.skip(str(e))
    else:
        path = request.getfixturevalue("smollm2_dir")
    tok = Tokenizer.from_dir(path)
    return request.param, tok, lines.build_line_tables(tok, tok.vocab_size)


def _clean_text(tok, tables, ids):
    out, n = clean(tables, jnp.asarray([list(ids) + [0]]), jnp.asarray([len(ids)]), pad_id=0)
    return tok.decode(np.asarray(out)[0, :int(n[0])].tolist())


def test_text_operations():
    assert lines.first_line(" \n\n我不信 \n还有") == "我不信"
    assert lines.first_line("a\r\nb") == "a" and lines.first_line("  \n ") == ""
    assert lines.join_lines("\n1. 立场：\n支持。\n") == "1. 立场：支持。"
    assert lines.join_lines("a\r\n b ") == "a b"


def test_spec_strings(vocab):
    name, tok, (policy, mean_field) = vocab
    ids = tok.encode(MEAN_FIELD_TEXT)
    if name == "qwen2":
        # The vocabulary merges the punctuation with the break: dropping such tokens would drop the punctuation.
        pieces = [tok.decode([i]) for i in ids]
        assert "：\n" in pieces and "。\n" in pieces and "？\n" in pieces
        assert int(np.sum(np.asarray(policy.visible_break))) > 1900
    assert _clean_text(tok, mean_field, ids) == "1. 立场分布：大部分网友支持。2. 情绪：质疑？"
    assert _clean_text(tok, policy, ids) == "1. 立场分布："
    # A leading line break does not give an empty action (the reference strips first).
    assert _clean_text(tok, policy, tok.encode("\n\n我不信，等官方消息\n后面")) == "我不信，等官方消息"
    assert _clean_text(tok, policy, tok.encode("  Not true.  \nMore")) == "Not true."
    assert _clean_text(tok, mean_field, tok.encode("\n Stance: most doubt it.\nEmotion: angry \n")) == \
        "Stance: most doubt it.Emotion: angry"


def test_random_token_sequences(vocab):
    """Any sequence of whole-character tokens, breaks and spaces: token space == text space."""
    name, tok, (policy, mean_field) = vocab
    rng = random.Random(0)
    pieces = ["\n", "\n\n", " ", "  ", "。\n", "：\n", "！\n", ",\n", "?\n", "\r\n", "网友", "支持", "质疑", " the",
              " rumour", "Hello", "？", "。", " 转发微博", "[怒]", "🙂", "\t"]
    pool = sorted({i for p in pieces for i in tok.encode(p) if "\ufffd" not in tok.decode([i])})
    for _ in range(60):
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 14))]
        text = tok.decode(ids)
        assert _clean_text(tok, policy, ids) == lines.first_line(text), (name, text)
        assert _clean_text(tok, mean_field, ids) == lines.join_lines(text), (name, text)


def test_decode_stops_where_the_first_line_ends(vocab):
    """The decode loop's stop rule ends a row exactly at the token that ends its first line."""
    _, tok, (policy, _) = vocab
    rule = policy.stop_rule()
    for text in ("\n\n我不信。\n第二行", "  Not true\nsecond", "一句话。\n", "no break at all"):
        ids = tok.encode(text)
        started = jnp.zeros((1,), bool)
        stop_at = None
        for i, t in enumerate(ids):
            token = jnp.asarray([t])
            if bool(rule.ends(token, started)[0]):
                stop_at = i
                break
            started = started | ~rule.whitespace[token]
        kept = ids if stop_at is None else ids[:stop_at + 1]
        # Stopping there loses nothing of the first line, and nothing before it was a line end.
        assert lines.first_line(tok.decode(kept)) == lines.first_line(text)
        if stop_at is not None:
            before = tok.decode(ids[:stop_at]).strip()
            assert "\n" not in before and "\r" not in before  # the line had not ended earlier
