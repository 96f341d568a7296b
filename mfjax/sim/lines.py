"""Line handling in token space: SPEC's string operations on generated text, without leaving jit.

SPEC (and the reference code) decode what a model wrote, strip it, and then keep the first line (the
policy's action) or remove the line breaks (the mean field). mfjax keeps generated text as tokens inside
the compiled rollout, so it does the same in token space and gets the same bytes:

* :func:`first_line` / :func:`join_lines` define the two operations on text (the host reference);
* :class:`LineTables` holds, per token id, whether it is whitespace, whether it holds a line break, and
  the token's *variants* re-encoded from its own bytes: cut at its first break (the policy) or with its
  breaks removed (the mean field), with its leading and/or trailing whitespace stripped;
* :func:`clean` picks, inside jit, each generated token's variant from its place in the text (before the
  first visible character, the first visible token, the last visible token, past the end of the line)
  and compacts the result. Only the tokens at those places are ever re-encoded ("at most that token").

Many vocabularies merge punctuation with the line break that follows it (Qwen2 has ~2,000 such tokens:
"。\\n", "：\\n", "？\\n", …); dropping those tokens whole would drop the punctuation too.

A whitespace character whose UTF-8 bytes are split across two tokens counts as visible (its halves are not
whitespace on their own); no common vocabulary splits the whitespace characters that occur in text.
"""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np

from mfjax.engine.generate import LineStop

BREAKS = ("\n", "\r")
FIRST_LINE, JOIN = "first_line", "join"
_BREAK_RE = re.compile("[\r\n]")


# ------------------------------------------------------------------------------------------ text
def first_line(text: str) -> str:
    """The policy's action (SPEC §2): the stripped text up to its first line break, without trailing
    whitespace. The final ``rstrip`` makes the result independent of what follows the break, so stopping
    generation at the break gives the same action as generating on and splitting afterwards."""
    return _BREAK_RE.split(text.strip(), maxsplit=1)[0].rstrip()


def join_lines(text: str) -> str:
    """The mean field (SPEC §2): the text with its line breaks removed, stripped."""
    return _BREAK_RE.sub("", text).strip()


# ------------------------------------------------------------------------------------------ token bytes
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte, inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class _Codec:
    """Bytes of each token id, and bytes back to token ids, for byte-level BPE and sentencepiece-style
    (``▁`` for space, ``<0xNN>`` byte fallback) fast tokenizers."""

    def __init__(self, tokenizer):
        self.hf = tokenizer.hf
        backend = self.hf.backend_tokenizer
        decoder = json.loads(backend.to_str()).get("decoder") or {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}
        self.byte_level = "ByteLevel" in kinds
        self.model = backend.model
        self.special = set(self.hf.all_special_ids) | {
            i for i, t in self.hf.added_tokens_decoder.items() if t.special}
        if self.byte_level:
            self.to_byte = _byte_decoder()
            self.to_char = {b: c for c, b in self.to_byte.items()}
        self.single: dict[bytes, int] = {}  # bytes -> the one token that holds exactly them
        self.table: list[bytes] = []
        self._memo: dict[bytes, list[int]] = {}

    def index(self, data: list[bytes]) -> None:
        """Remembers every token's bytes, and which byte strings are single tokens (a fast path)."""
        self.table = data
        for i, b in enumerate(data):
            if b and i not in self.special:
                self.single.setdefault(b, i)

    def token_bytes(self, ids) -> list[bytes]:
        """The bytes each token stands for (b"" for special tokens, which decoding skips)."""
        pieces = self.hf.convert_ids_to_tokens([int(i) for i in ids])
        out = []
        for i, piece in zip(ids, pieces):
            if int(i) in self.special or piece is None:
                out.append(b"")
            elif self.byte_level:
                out.append(bytes(self.to_byte[c] for c in piece) if all(c in self.to_byte for c in piece)
                           else piece.encode("utf-8"))  # an added (non-special) token: its text
            else:
                m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
                out.append(bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode("utf-8"))
        return out

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids whose bytes are exactly ``data`` (BPE of the piece, as the model would merge it)."""
        if not data:
            return []
        if data in self.single:
            return [self.single[data]]
        if data not in self._memo:
            self._memo[data] = self._encode(data)
        return self._memo[data]

    def _encode(self, data: bytes) -> list[int]:
        if self.byte_level:
            ids = [t.id for t in self.model.tokenize("".join(self.to_char[b] for b in data))]
        else:
            ids = [t.id for t in self.model.tokenize(data.decode("utf-8", "surrogateescape").replace(" ", "▁"))]
        got = b"".join(self.table[i] if i < len(self.table) else b"?" for i in ids)
        if got != data:
            raise ValueError(f"the tokenizer cannot re-encode the bytes {data!r} of one of its own tokens "
                             f"(got {got!r}); line handling needs a byte-level BPE or sentencepiece-style tokenizer")
        return ids


def _text(data: bytes) -> str:
    # Partial UTF-8 sequences become lone surrogates: never whitespace, never a break, and lossless.
    return data.decode("utf-8", "surrogateescape")


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _cut(text: str, mode: str) -> str:
    """The token's text cut at its first break (first_line) or without breaks (join)."""
    return _BREAK_RE.split(text, maxsplit=1)[0] if mode == FIRST_LINE else _BREAK_RE.sub("", text)


# ------------------------------------------------------------------------------------------ tables
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LineTables:
    """Per-token facts and variants for one mode (built on the host once per tokenizer, read in jit).

    Variants, by index: 0 the token's text cut (first_line) or joined (join); 1 the same after stripping
    its leading whitespace; 2 after stripping its trailing whitespace; 3 both. Each is re-encoded from the
    token's own bytes into at most ``width`` tokens (padded with -1).
    """

    whitespace: jax.Array  # [V] bool: the token's text is all whitespace (or empty: special tokens)
    has_break: jax.Array  # [V] bool: it holds a line break
    visible_break: jax.Array  # [V] bool: it holds a break after a visible character of its own
    visible_cut: jax.Array  # [V] bool: variant 0 has a visible character
    variants: jax.Array  # [4, V, width] int32
    variant_len: jax.Array  # [4, V] int32
    mode: str = dataclasses.field(default=FIRST_LINE, metadata=dict(static=True))

    @property
    def width(self) -> int:
        return self.variants.shape[-1]

    def stop_rule(self) -> LineStop:
        """The decode loop's rule for stopping where the first line ends."""
        return LineStop(whitespace=self.whitespace, has_break=self.has_break, visible_break=self.visible_break)

    @classmethod
    def build(cls, tokenizer, vocab_size: int, mode: str, codec: "_Codec | None" = None) -> "LineTables":
        """Tables for ``mode`` (:data:`FIRST_LINE` or :data:`JOIN`) over ids [0, vocab_size)."""
        if mode not in (FIRST_LINE, JOIN):
            raise ValueError(f"mode must be {FIRST_LINE!r} or {JOIN!r}, got {mode!r}")
        n = min(vocab_size, tokenizer.vocab_size)
        if codec is None:
            codec = _Codec(tokenizer)
        if len(codec.table) != n:
            codec.index(codec.token_bytes(range(n)))
        data = codec.table
        whitespace = np.ones((vocab_size,), bool)  # ids past the tokenizer (embedding padding): invisible
        has_break = np.zeros((vocab_size,), bool)
        visible_break = np.zeros((vocab_size,), bool)
        visible_cut = np.zeros((vocab_size,), bool)
        rows: list[list[list[int]]] = [[], [], [], []]
        for i, raw in enumerate(data):
            text = _text(raw)
            whitespace[i] = text.strip() == ""
            has_break[i] = bool(_BREAK_RE.search(text))
            visible_break[i] = bool(_BREAK_RE.search(text.lstrip()))
            cut = _cut(text, mode)
            lcut = _cut(text.lstrip(), mode)
            visible_cut[i] = cut.strip() != ""
            for v, variant in enumerate((cut, lcut, cut.rstrip(), lcut.rstrip())):
                rows[v].append([i] if variant == text else codec.encode_bytes(_bytes(variant)))
        width = max(1, max(len(r) for per in rows for r in per))
        variants = np.full((4, vocab_size, width), -1, np.int32)
        lengths = np.zeros((4, vocab_size), np.int32)
        for v, per in enumerate(rows):
            for i, ids in enumerate(per):
                variants[v, i, :len(ids)] = ids
                lengths[v, i] = len(ids)
        return cls(whitespace=jnp.asarray(whitespace), has_break=jnp.asarray(has_break),
                   visible_break=jnp.asarray(visible_break), visible_cut=jnp.asarray(visible_cut),
                   variants=jnp.asarray(variants), variant_len=jnp.asarray(lengths), mode=mode)


def passthrough_tables(vocab_size: int, mode: str) -> LineTables:
    """Tables that change nothing: no token is whitespace or a break (benchmarks on random weights, whose
    output is noise, measure full-length generation without line handling)."""
    variants = np.full((4, vocab_size, 1), -1, np.int32)
    variants[:, :, 0] = np.arange(vocab_size)
    none = jnp.zeros((vocab_size,), bool)
    return LineTables(whitespace=none, has_break=none, visible_break=none, visible_cut=jnp.ones((vocab_size,), bool),
                      variants=jnp.asarray(variants), variant_len=jnp.ones((4, vocab_size), jnp.int32), mode=mode)


def build_line_tables(tokenizer, vocab_size: int) -> tuple[LineTables, LineTables]:
    """(policy first-line tables, mean-field join tables), sharing one pass over the vocabulary."""
    codec = _Codec(tokenizer)
    return (LineTables.build(tokenizer, vocab_size, FIRST_LINE, codec),
            LineTables.build(tokenizer, vocab_size, JOIN, codec))


# ------------------------------------------------------------------------------------------ in jit
def clean_width(tables: LineTables, max_tokens: int) -> int:
    """Width of :func:`clean`'s output for ``max_tokens`` generated tokens: every token maps to itself
    except the first visible one, the one that ends the line and the last visible one."""
    return max_tokens + 3 * (tables.width - 1)


def clean(tables: LineTables, tokens: jax.Array, lengths: jax.Array, pad_id: int) -> tuple[jax.Array, jax.Array]:
    """Generated tokens [B, M] (``lengths`` [B], stop tokens excluded) -> the tokens of
    ``first_line(decode(...))`` or ``join_lines(decode(...))`` by the tables' mode, right-padded to
    :func:`clean_width`; returns (tokens, lengths)."""
    B, M = tokens.shape
    tokens = tokens.astype(jnp.int32)
    position = jnp.arange(M)[None, :]
    valid = position < lengths[:, None]
    visible = valid & ~tables.whitespace[tokens]
    seen = jnp.cumsum(visible, axis=1)
    started = (seen - visible) > 0  # visible text before this token
    first = visible & ~started
    keep = valid & (started | first)  # whitespace before the first visible character is stripped
    if tables.mode == FIRST_LINE:
        ends = valid & jnp.where(started, tables.has_break[tokens], first & tables.visible_break[tokens])
        keep &= (jnp.cumsum(ends, axis=1) - ends) == 0  # nothing after the token that ends the line
        shows = keep & (first | tables.visible_cut[tokens])
    else:
        shows = keep & visible
    # Trailing whitespace is stripped: nothing after the last token that shows a visible character.
    last = jnp.max(jnp.where(shows, position, -1), axis=1, keepdims=True)
    keep &= position <= last
    variant = first.astype(jnp.int32) + 2 * (position == last).astype(jnp.int32)
    pieces = tables.variants[variant, tokens]  # [B, M, width]
    piece_len = jnp.where(keep, tables.variant_len[variant, tokens], 0)
    mask = jnp.arange(tables.width)[None, None, :] < piece_len[..., None]
    flat, flat_mask = pieces.reshape(B, -1), mask.reshape(B, -1)
    out_width = clean_width(tables, M)
    dest = jnp.where(flat_mask, jnp.cumsum(flat_mask, axis=1) - 1, out_width)
    out = jnp.full((B, out_width + 1), pad_id, jnp.int32).at[jnp.arange(B)[:, None], dest].set(flat, mode="drop")
    return out[:, :out_width], jnp.sum(flat_mask, axis=1).astype(jnp.int32)
