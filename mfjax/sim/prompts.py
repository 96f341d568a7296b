"""Prompts in token space: templates tokenized once on the host, assembled inside jit.

Every template of :mod:`mfjax.sim.templates` is cut at its placeholders into constant pieces, each
tokenized once. Inside the rollout, a prompt is a list of segments (tokens [W, L] with lengths [W]) that
:func:`pack_segments` writes one after another into a fixed buffer, so prompts change every step
without a host round trip or a recompilation.

Segments are tokenized separately, so a BPE merge across a segment boundary that whole-string
tokenization would make does not happen; the text (``decode``) is still the template's byte for byte.
Generated text (actions, the mean field) stays in tokens, exactly as the model wrote it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mfjax.sim import templates

Segment = tuple  # (tokens [W or 1, L] int32, lengths [W] / scalar) or (tokens [W, L], mask [W, L] bool)


# ----------------------------------------------------------------------------------------- in jit
def _mask(segment: Segment, rows: int) -> tuple[jax.Array, jax.Array]:
    tokens, lengths_or_mask = segment
    tokens = jnp.asarray(tokens)
    tokens = jnp.broadcast_to(tokens, (rows, tokens.shape[-1])).astype(jnp.int32)
    second = jnp.asarray(lengths_or_mask)
    if second.ndim == 2:
        return tokens, jnp.broadcast_to(second, tokens.shape).astype(bool)
    lengths = jnp.broadcast_to(second, (rows,)).astype(jnp.int32)
    return tokens, jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]


def pack_segments(segments: Sequence[Segment], width: int, pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """Concatenates per-row segments into a right-padded buffer [W, width]; returns (tokens, lengths).

    A segment is (tokens, lengths) — its first ``lengths`` tokens — or (tokens, mask) — the tokens where
    ``mask`` holds (a block of many short pieces, e.g. a step's agent lines). All segments are laid side by
    side and compacted in one scatter. Anything past ``width`` is dropped (callers size ``width`` as the
    sum of the segments' real capacities, so nothing is).
    """
    rows = max(jnp.asarray(t).shape[0] for t, _ in segments)
    pairs = [_mask(seg, rows) for seg in segments]
    tokens = jnp.concatenate([t for t, _ in pairs], axis=1)
    keep = jnp.concatenate([m for _, m in pairs], axis=1)
    out, lengths = compact(tokens, keep, pad_id, width=width)
    return out, lengths


def lines_block(parts: Sequence[Segment], on: jax.Array) -> Segment:
    """One block of per-line pieces: ``parts`` are [W, B, L_i] tokens with [W, B] lengths (or broadcastable
    constants); line b is kept where ``on`` [W, B]. Returns (tokens [W, B·ΣL_i], mask) for
    :func:`pack_segments`: the lines in order, each line's pieces in order."""
    W, B = on.shape
    tokens, masks = [], []
    for piece, lengths in parts:
        piece = jnp.asarray(piece)
        piece = jnp.broadcast_to(piece, (W, B, piece.shape[-1])).astype(jnp.int32)
        lengths = jnp.broadcast_to(jnp.asarray(lengths), (W, B))
        tokens.append(piece)
        masks.append((jnp.arange(piece.shape[-1])[None, None, :] < lengths[..., None]) & on[..., None])
    tokens = jnp.concatenate(tokens, axis=2)
    mask = jnp.concatenate(masks, axis=2)
    return tokens.reshape(W, -1), mask.reshape(W, -1)


def left_pad(tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    """Right-padded rows [W, L] re-laid left-padded (real tokens at the end)."""
    width = tokens.shape[1]
    idx = (jnp.arange(width)[None, :] + lengths[:, None]) % width
    return jnp.take_along_axis(tokens, idx, axis=1)


def compact(tokens: jax.Array, keep: jax.Array, pad_id: int = 0, width: int | None = None):
    """Keeps the tokens where ``keep`` [W, L], in order, right-padded to ``width`` (default L); returns
    (tokens, lengths)."""
    W, L = tokens.shape
    width = L if width is None else width
    dest = jnp.where(keep, jnp.cumsum(keep, axis=1) - 1, width)
    dest = jnp.minimum(dest, width)
    out = jnp.full((W, width + 1), pad_id, jnp.int32).at[jnp.arange(W)[:, None], dest].set(tokens.astype(jnp.int32))
    return out[:, :width], jnp.minimum(jnp.sum(keep, axis=1), width).astype(jnp.int32)


def constant(table: "Piece") -> Segment:
    """A constant piece as a segment (broadcast over rows by :func:`pack_segments`)."""
    return jnp.asarray(table.tokens, jnp.int32).reshape(1, -1), jnp.asarray(len(table.tokens), jnp.int32)


def gated(segment: Segment, on: jax.Array) -> Segment:
    """The segment where ``on`` [W], empty elsewhere."""
    tokens, lengths = segment
    return tokens, jnp.where(on, lengths, 0)


def pick(table: "PieceTable", index: jax.Array) -> Segment:
    """Per-row choice among numbered pieces (e.g. "第{i}位网友评论：" for i = index + 1)."""
    return jnp.asarray(table.tokens)[index], jnp.asarray(table.lengths)[index]


# ------------------------------------------------------------------------------------------ host
@dataclasses.dataclass(frozen=True)
class Piece:
    """A constant text piece and its tokens."""

    text: str
    tokens: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class PieceTable:
    """Numbered variants of one piece, padded to one width: tokens [n, L], lengths [n]."""

    texts: tuple[str, ...]
    tokens: np.ndarray
    lengths: np.ndarray


def _split(template: str, field: str) -> tuple[str, str]:
    """The text before and after ``{field}`` in ``template`` (which must hold it once)."""
    marker = "{" + field + "}"
    if template.count(marker) != 1:
        raise ValueError(f"template {template!r} must contain {marker} exactly once")
    before, after = template.split(marker)
    return before, after


def _table(tokenizer, texts: Sequence[str], pad_id: int) -> PieceTable:
    ids = [tokenizer.encode(t) for t in texts]
    width = max(1, max(len(i) for i in ids))
    tokens = np.full((len(ids), width), pad_id, np.int32)
    for r, row in enumerate(ids):
        tokens[r, :len(row)] = row
    return PieceTable(tuple(texts), tokens, np.array([len(i) for i in ids], np.int32))


@dataclasses.dataclass(frozen=True)
class TokenTemplates:
    """The constant pieces of every prompt, tokenized for one tokenizer and language."""

    language: str
    start: tuple[int, ...]  # special tokens the tokenizer puts before a text by default (e.g. BOS)
    chat_head: Piece
    chat_tail: Piece
    mf_ctx_open: Piece
    mf_ctx_close: Piece
    recent_header: Piece
    popular_header: Piece
    comment_pre: PieceTable  # "第{i}位网友评论：" for i = 1 … K
    comment_post: Piece
    profile: Piece
    mf_head_post: Piece
    mf_line_pre: PieceTable  # "第{i}个网友评论：" for i = 1 … B
    mf_line_post: Piece
    mf_state_line_post: Piece
    mf_tail: Piece  # "\n" + summary instruction (+ the chat template's tail)

    @classmethod
    def build(cls, tokenizer, language: str, *, chat: bool, step_size: int,
              num_comments: int = max(templates.RECENT_K, templates.POPULAR_K)) -> "TokenTemplates":
        """Tokenizes every constant piece. ``chat`` wraps prompts in the checkpoint's chat template."""
        t = templates.templates_for(language)
        pad = tokenizer.pad_token_id
        piece = lambda text: Piece(text, tuple(tokenizer.encode(text)) if text else ())
        head, tail = tokenizer.chat_template_parts() if chat and tokenizer.has_chat_template else ("", "")
        start = tokenizer.start_tokens(head)
        ctx_open, ctx_close = _split(t.mf_context, "m")
        comment_pre, comment_post = _split(t.comment_line, "comment")
        _, head_post = _split(t.mf_head, "m_prev")
        line_pre, line_post = _split(t.mf_agent_line, "action")
        _, state_line_post = _split(t.mf_agent_state_line, "action")
        return cls(
            language=language,
            start=start,
            chat_head=piece(head),
            chat_tail=piece(tail),
            mf_ctx_open=piece(ctx_open),
            mf_ctx_close=piece(ctx_close),
            recent_header=piece(t.recent_header),
            popular_header=piece(t.popular_header),
            comment_pre=_table(tokenizer, [comment_pre.format(i=i) for i in range(1, num_comments + 1)], pad),
            comment_post=piece(comment_post),
            profile=piece(t.profile),
            mf_head_post=piece(head_post),
            mf_line_pre=_table(tokenizer, [line_pre.format(i=i) for i in range(1, step_size + 1)], pad),
            mf_line_post=piece(line_post),
            mf_state_line_post=piece(state_line_post),
            mf_tail=piece(templates.mean_field_tail(language=language) + tail),
        )

    # Per-event and per-agent pieces (host, once per run).
    def head_ids(self, tokenizer, text: str) -> list[int]:
        """The tokens of a prompt's first segment: the tokenizer's start tokens (e.g. BOS) + ``text``."""
        return list(self.start) + tokenizer.encode(text)

    def policy_head_text(self, topic: str) -> str:
        """Chat head + "当前讨论的话题是：{topic}" — the start of every policy prompt of an event."""
        return self.chat_head.text + templates.templates_for(self.language).topic.format(topic=topic)

    def agent_part_text(self, state: str, *, state_sft: bool = False) -> str:
        """State + "\\n" + instruction + chat tail — the agent's own part of the policy prompt."""
        return templates.policy_agent_part(state, language=self.language, state_sft=state_sft) + self.chat_tail.text

    def mf_head_pre_text(self, topic: str) -> str:
        """Chat head + "当前话题：{topic}\\n过往网友评论总结：" — the start of an event's mean-field prompt."""
        before, _ = _split(templates.templates_for(self.language).mf_head, "m_prev")
        return self.chat_head.text + before.format(topic=topic)

    def mf_state_line_pre_text(self, position: int, state: str) -> str:
        """"第{i}个网友的个人资料：{state}\\n该网友的评论：" for an agent at ``position`` (0-based) in its step."""
        before, _ = _split(templates.templates_for(self.language).mf_agent_state_line, "action")
        return before.format(i=position + 1, state=state)
