"""Plain text API for notebooks: ``generate(model, tokenizer, prompts) -> texts`` and scoring.

Tokenizes on the host, pads to length buckets (so new prompt lengths within a bucket reuse the compiled
program), runs the jitted token-level functions, and detokenizes.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from mfjax.config import ModelConfig, default_attn_impl
from mfjax.engine.generate import GenerateConfig, generate_tokens_jit, prefill_prefix_jit
from mfjax.engine.host import bucket_length, pad_rows_host
from mfjax.engine.sampling import SamplingConfig, row_keys
from mfjax.engine.score import score_tokens_jit
from mfjax.models.weights import Weights


def _pad(rows, width: int, pad_id: int, left: bool):
    tokens, lengths = pad_rows_host(rows, width, pad_id, left=left)
    return jnp.asarray(tokens), jnp.asarray(lengths)


class Engine:
    """A model's weights (the stored layout, shared with its :class:`CausalLM`), its tokenizer, and bucketing
    settings."""

    def __init__(self, cfg: ModelConfig, weights: Weights, tokenizer, *, attn_impl: str | None = None,
                 buckets: Sequence[int] | None = None):
        if not isinstance(weights, Weights):
            raise TypeError(f"Engine takes mfjax.models.weights.Weights, got {type(weights).__name__}")
        self.cfg = cfg
        self.weights = weights
        self.tokenizer = tokenizer
        self.attn_impl = attn_impl or default_attn_impl()
        self.buckets = tuple(buckets) if buckets else None

    @classmethod
    def from_model(cls, model, tokenizer, **kwargs) -> "Engine":
        """From a :class:`mfjax.models.module.CausalLM` (the same arrays, no copy)."""
        kwargs.setdefault("attn_impl", model.attn_impl)
        return cls(model.cfg, model.weights(), tokenizer, **kwargs)

    def _encode(self, texts: Sequence[str], chat: bool) -> list[list[int]]:
        # As HF: a chat template writes its own special tokens; a plain prompt gets the tokenizer's (BOS).
        if chat:
            return [self.tokenizer.encode(self.tokenizer.apply_chat_template(t)) for t in texts]
        return [self.tokenizer.encode(t, add_special_tokens=True) for t in texts]

    def _check_ids(self, name: str, rows: Sequence[Sequence[int]], *, allow_empty: bool = False) -> None:
        """Token rows must be non-empty lists of ids in [0, vocab): anything else is a ValueError naming
        the argument and row (an id >= vocab would read NaN embeddings, a negative one would wrap around)."""
        if isinstance(rows, (str, bytes)) or not hasattr(rows, "__len__"):
            raise ValueError(f"{name} must be a list of token-id lists, got {type(rows).__name__}")
        if not len(rows):
            raise ValueError(f"{name} is empty")
        vocab = self.cfg.vocab_size
        for i, row in enumerate(rows):
            if not allow_empty and len(row) == 0:
                raise ValueError(f"{name}[{i}] is empty: every row needs at least one token")
            bad = [int(t) for t in row if not 0 <= int(t) < vocab]
            if bad:
                raise ValueError(f"{name}[{i}] holds token id {bad[0]} outside the vocabulary [0, {vocab})")

    def generate_ids(self, prompts: Sequence[Sequence[int]], *, prefix: Sequence[int] | None = None,
                     gcfg: GenerateConfig, seed: int = 0) -> list[list[int]]:
        """Token-level generation; returns each row's new tokens up to and including its stop token."""
        self._check_ids("prompts", prompts)
        if prefix is not None:
            self._check_ids("prefix", [prefix])
        suffix, lens = _pad(prompts, bucket_length(max(len(p) for p in prompts), self.buckets), gcfg.pad_token_id,
                            left=True)
        pre = None
        if prefix is not None:
            ptoks, plens = _pad([prefix], bucket_length(len(prefix), self.buckets), gcfg.pad_token_id, left=False)
            pre = prefill_prefix_jit(self.weights, self.cfg, ptoks, plens, attn_impl=gcfg.attn_impl)
        keys = row_keys(seed, jnp.arange(len(prompts)), 0)
        out = generate_tokens_jit(self.weights, self.cfg, gcfg, suffix, lens, keys, pre)
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        return [tokens[i, :lengths[i]].tolist() for i in range(len(prompts))]

    def generate(self, prompts: Sequence[str], *, shared_prefix: str | None = None, max_new_tokens: int = 50,
                 min_new_tokens: int = 0, sampling: SamplingConfig | None = None, seed: int = 0,
                 stop_token_ids: Sequence[int] | None = None, chat: bool = False) -> list[str]:
        """Generates a continuation of each prompt (``shared_prefix`` + prompt when a prefix is given).

        ``sampling`` defaults to greedy. With ``chat``, the checkpoint's chat template wraps
        ``shared_prefix + prompt`` as one user turn (the template's head joins the prefix).
        """
        if not prompts:
            return []
        _check_texts("prompts", prompts)
        tok = self.tokenizer
        gcfg = GenerateConfig(
            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
            sampling=sampling or SamplingConfig(temperature=None),
            stop_token_ids=tuple(stop_token_ids if stop_token_ids is not None else tok.eos_token_ids),
            pad_token_id=tok.pad_token_id, attn_impl=self.attn_impl,
        )
        if shared_prefix is None:
            ids = self.generate_ids(self._encode(prompts, chat), gcfg=gcfg, seed=seed)
        else:
            head, tail = tok.chat_template_parts() if chat and tok.has_chat_template else ("", "")
            prefix = list(tok.start_tokens(head)) + tok.encode(head + shared_prefix)
            rows = [tok.encode(p + tail) for p in prompts]
            ids = self.generate_ids(rows, prefix=prefix, gcfg=gcfg, seed=seed)
        return [tok.decode(r) for r in ids]

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> np.ndarray:
        """Summed log-probability of each continuation given its prompt (float64 [B])."""
        _check_texts("prompts", prompts)
        _check_texts("continuations", continuations)
        if len(prompts) != len(continuations):
            raise ValueError(f"prompts has {len(prompts)} texts but continuations has {len(continuations)}")
        tok = self.tokenizer
        p_ids = [tok.encode(p, add_special_tokens=True) for p in prompts]  # as HF: BOS where the tokenizer adds one
        c_ids = [tok.encode(c) for c in continuations]
        self._check_ids("prompts", p_ids)
        self._check_ids("continuations", c_ids)
        prompt, plens = _pad(p_ids, bucket_length(max(map(len, p_ids)), self.buckets), tok.pad_token_id, left=True)
        target, tlens = _pad(c_ids, bucket_length(max(map(len, c_ids)), self.buckets), tok.pad_token_id, left=False)
        logprobs = score_tokens_jit(self.weights, self.cfg, prompt, plens, target, tlens, attn_impl=self.attn_impl)
        return np.asarray(logprobs, np.float64).sum(axis=1)


def _check_texts(name: str, texts) -> None:
    """A list of non-empty strings, or a ValueError naming the argument and the item."""
    if isinstance(texts, (str, bytes)):
        raise ValueError(f"{name} must be a list of strings, not one string")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{name}[{i}] is a {type(text).__name__}, not a string")
        if not text:
            raise ValueError(f"{name}[{i}] is empty")


def generate(model, tokenizer, prompts: Sequence[str], **kwargs) -> list[str]:
    """One-call text generation for notebooks: ``generate(CausalLM.from_hf(d), Tokenizer.from_dir(d), [...])``."""
    engine_kwargs = {k: kwargs.pop(k) for k in ("attn_impl", "buckets") if k in kwargs}
    return Engine.from_model(model, tokenizer, **engine_kwargs).generate(prompts, **kwargs)
