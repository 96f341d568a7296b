"""Builders of tiny random HF checkpoints (torch) and a tiny offline tokenizer, shared by the tests.

Every tensor of a tiny model is random (norm weights and biases included), so a layout or mapping
mistake on any single parameter changes the logits.
"""

from __future__ import annotations

import os
from typing import Any

# Shapes small enough for sub-second torch forwards, large enough to tell N, K and H apart.
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)

# Named cases: (family, config overrides). Parametrise tests over ``sorted(TINY_CASES)``.
TINY_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True)),
    "llama3": (
        "llama",
        dict(
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "mistral": ("mistral", dict(tie_word_embeddings=False, sliding_window=4)),
    "gemma2": (
        "gemma2",
        dict(
            sliding_window=4,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            query_pre_attn_scalar=16,
        ),
    ),
}


def tiny_hf_config(family: str, **overrides):
    """A transformers config of ``family`` ('qwen2', 'llama', 'mistral', 'gemma2') at the tiny shapes."""
    import transformers

    classes = {
        "qwen2": transformers.Qwen2Config,
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "gemma2": transformers.Gemma2Config,
    }
    config = classes[family](**{**TINY, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **overrides})
    # Eager attention everywhere: it is the reference maths (Gemma 2 soft-capping needs it anyway).
    config._attn_implementation = "eager"
    return config


def randomize_(model, seed: int = 0, std: float = 0.1) -> None:
    """Fills every parameter with random values in place; norms around their identity."""
    import torch

    gemma = model.config.model_type.startswith("gemma")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                # Gemma scales by (1 + w): identity is w = 0; the others scale by w: identity is 1.
                p.copy_((0.0 if gemma else 1.0) + 0.1 * noise)
            else:
                p.copy_(std * noise)


def make_tiny_hf_model(family: str, tmp_path, *, seed: int = 0, tokenizer: bool = False, **overrides):
    """A random tiny HF model saved with ``save_pretrained``.

    Args:
      family: 'qwen2', 'llama', 'mistral', 'gemma2', or a key of :data:`TINY_CASES` (its overrides
        apply first, then ``overrides``).
      tmp_path: parent folder; the model goes to ``tmp_path / <family>``.
      seed: seed of the random weights.
      tokenizer: also save the tiny sentencepiece tokenizer of :func:`make_tiny_tokenizer` there.
      **overrides: config fields.

    Returns:
      ``(model_dir, torch_model)`` with the model in eval mode, float32.
    """
    import torch
    import transformers

    name = family
    if family in TINY_CASES:
        family, case = TINY_CASES[family]
        overrides = {**case, **overrides}
    config = tiny_hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, seed)
    model.eval()
    model_dir = os.path.join(os.fspath(tmp_path), name)
    model.save_pretrained(model_dir)
    if tokenizer:
        make_tiny_tokenizer(model_dir, vocab_size=config.vocab_size)
    return model_dir, model


TRAINING_TEXT = [
    "A rumour about the new policy spread quickly on Weibo this morning.",
    "Many users doubted the report and asked for official confirmation.",
    "谣言在微博上迅速传播，许多网友表示怀疑。",
    "官方随后发布声明，澄清了事实真相。",
    "Some people were angry, others were simply curious about what happened.",
    "大家都在讨论这个事件的影响。",
    "The mean field summarises how the population reacts over time.",
]

# A ChatML template, the format of the real checkpoints the project targets (Qwen2, SmolLM2).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_tiny_tokenizer(out_dir, *, vocab_size: int = 128, chat_template: str | None = CHATML_TEMPLATE):
    """Trains a sentencepiece model offline on mixed Chinese/English text and saves it as an HF tokenizer.

    Ids 0-2 are ``<unk>``, ``<s>``, ``</s>`` (bos 1, eos 2, pad = eos), matching :data:`TINY`'s config.
    Returns the folder.
    """
    import shutil
    import tempfile

    import sentencepiece as spm
    import transformers

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        corpus = os.path.join(work, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as f:
            f.write("\n".join(TRAINING_TEXT * 3) + "\n")
        # transformers 5 converts a sentencepiece model to a fast tokenizer when it loads a folder
        # holding ``tokenizer.model``; the prefix gives that file name.
        spm.SentencePieceTrainer.train(
            input=corpus,
            model_prefix=os.path.join(work, "tokenizer"),
            vocab_size=vocab_size - 2,  # room for the two ChatML markers added below
            model_type="bpe",
            character_coverage=1.0,
            normalization_rule_name="identity",  # keep full-width punctuation as written
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            hard_vocab_limit=False,
            minloglevel=2,
        )
        tok = transformers.LlamaTokenizer.from_pretrained(work, legacy=False)
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.pad_token = tok.eos_token
        if chat_template is not None:
            tok.chat_template = chat_template
        tok.save_pretrained(out_dir)
        # Real sentencepiece checkpoints ship the .model next to tokenizer.json; keep it the same here.
        shutil.copyfile(os.path.join(work, "tokenizer.model"), os.path.join(out_dir, "tokenizer.model"))
    return out_dir


def hf_logits(model, tokens, mask):
    """transformers float32 logits at the positions ``generate`` uses for a padded batch.

    A plain forward does not derive positions from the attention mask, so they are passed:
    cumsum(mask) - 1, clipped at 0 on the padding.
    """
    import numpy as np
    import torch

    positions = np.clip(np.cumsum(mask, axis=-1) - 1, 0, None)
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(tokens, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            position_ids=torch.as_tensor(positions, dtype=torch.long),
        )
    return out.logits.float().numpy()
