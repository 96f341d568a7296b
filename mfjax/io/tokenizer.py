"""A thin tokenizer wrapper over ``transformers.AutoTokenizer`` with what the simulator needs.

Besides encode/decode it exposes the checkpoint's chat template as a (head, tail) pair of strings around
the user content, so prompts can be assembled in token space as ``head + segments + tail`` (the shared
topic / mean-field segments are tokenized once and reused across agents).
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

# Stands in for the user message while rendering the template; split on afterwards. Chosen so that no
# template or tokenizer normalisation touches it (plain ASCII letters and digits).
_PLACEHOLDER = "MFJAXUSERCONTENT7Q3Z9"


class Tokenizer:
    """Wraps a fast HF tokenizer (BPE, byte-level BPE, or sentencepiece converted to fast)."""

    def __init__(self, hf_tokenizer, generation_config: dict | None = None, path: str | None = None):
        self.hf = hf_tokenizer
        self.path = path
        self._generation_config = dict(generation_config or {})

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Loads the tokenizer (and ``generation_config.json`` when present) from an HF folder."""
        from transformers import AutoTokenizer  # heavy import, only when a tokenizer is needed

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer folder {path} does not exist")
        hf_tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        generation_config = None
        gen_path = os.path.join(path, "generation_config.json")
        if os.path.exists(gen_path):
            with open(gen_path, encoding="utf-8") as f:
                generation_config = json.load(f)
        return cls(hf_tokenizer, generation_config, path)

    # ------------------------------------------------------------------------------------ ids <-> text
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings inside it (e.g. ``<|im_start|>``) map to their ids."""
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Token ids of each text (one call into the fast tokenizer for the whole batch)."""
        if not texts:
            return []
        out = self.hf(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
        return [list(ids) for ids in out]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        """Text of each id sequence."""
        return self.hf.batch_decode(
            [[int(i) for i in ids] for ids in batch], skip_special_tokens=skip_special_tokens
        )

    def start_tokens(self, chat_head: str = "") -> tuple[int, ...]:
        """The special tokens ``tokenizer(text)`` puts before a text by default (BOS for Llama-, Mistral- and
        Gemma-style tokenizers; none for Qwen2's or GPT-2's), so that a prompt assembled from separately
        encoded segments starts as the reference's ``tokenizer(prompt)`` would. Empty when ``chat_head``
        (a chat template's head) already begins with them."""
        plain = self.encode("x")
        special = self.encode("x", add_special_tokens=True)
        if len(special) <= len(plain) or special[len(special) - len(plain):] != plain:
            return ()
        start = tuple(special[:len(special) - len(plain)])
        if chat_head and tuple(self.encode(chat_head)[:len(start)]) == start:
            return ()
        return start

    # ------------------------------------------------------------------------------------ chat template
    @property
    def has_chat_template(self) -> bool:
        """Whether the checkpoint ships a chat template."""
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(self, user_text: str, system: str | None = None) -> str:
        """``user_text`` wrapped in the chat template with the generation prompt appended.

        Without a chat template (base models) returns the text unchanged, or prefixed by ``system`` and
        a blank line when one is given.
        """
        if not self.has_chat_template:
            return user_text if system is None else f"{system}\n\n{user_text}"
        return self._render(user_text, system)

    def chat_template_parts(self, system: str | None = None) -> tuple[str, str]:
        """The (head, tail) strings the chat template puts around the user content.

        ``head + user_text + tail == apply_chat_template(user_text, system)`` for any ``user_text`` the
        template inserts verbatim (all common templates do). ``("", "")`` without a chat template.
        """
        if not self.has_chat_template:
            return ("", "") if system is None else (f"{system}\n\n", "")
        rendered = self._render(_PLACEHOLDER, system)
        if rendered.count(_PLACEHOLDER) != 1:
            raise ValueError("the chat template does not insert the user message exactly once, cannot split it")
        head, tail = rendered.split(_PLACEHOLDER)
        return head, tail

    def _render(self, user_text: str, system: str | None) -> str:
        messages = [{"role": "user", "content": user_text}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        try:
            return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:
            # Some templates (Gemma) refuse a system role; the usual practice is to prefix the user turn.
            if system is None or "system" not in str(e).lower():
                raise
            return self.hf.apply_chat_template(
                [{"role": "user", "content": f"{system}\n\n{user_text}"}], tokenize=False, add_generation_prompt=True
            )

    @property
    def generation_config(self) -> dict:
        """The checkpoint's ``generation_config.json`` (empty when it has none)."""
        return dict(self._generation_config)

    # ------------------------------------------------------------------------------------ special ids
    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation: the tokenizer's eos plus ``generation_config.json``'s, in that order."""
        ids: list[int] = []
        if self.hf.eos_token_id is not None:
            ids.append(int(self.hf.eos_token_id))
        gen = self._generation_config.get("eos_token_id")
        for i in gen if isinstance(gen, list) else ([] if gen is None else [gen]):
            if int(i) not in ids:
                ids.append(int(i))
        return tuple(ids)

    @property
    def pad_token_id(self) -> int:
        """The pad id, falling back to the first eos id (many chat checkpoints define no pad token)."""
        if self.hf.pad_token_id is not None:
            return int(self.hf.pad_token_id)
        if self.eos_token_ids:
            return self.eos_token_ids[0]
        raise ValueError("the tokenizer has neither a pad token nor an eos token")

    @property
    def bos_token_id(self) -> int | None:
        """The bos id, or ``None``."""
        return None if self.hf.bos_token_id is None else int(self.hf.bos_token_id)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (added tokens included).

        The model's embedding table may be larger (padded); it is never smaller for a sound checkpoint.
        """
        return len(self.hf)

    def __repr__(self) -> str:
        return f"Tokenizer({type(self.hf).__name__}, vocab={self.vocab_size}, path={self.path!r})"
