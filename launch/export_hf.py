"""Exports an mfjax orbax checkpoint as an HF safetensors folder (loads in ``transformers``).

    python launch/export_hf.py --checkpoint_dir=/path/to/ckpt --out_dir=/path/to/hf \
        [--tokenizer_dir=/path/to/tokenizer] [--dtype=bfloat16] [--step=N]

Without ``--tokenizer_dir`` the tokenizer files are copied from the folder the checkpoint was imported
from, when it still exists.
"""

import os
import sys

if __package__ in (None, ""):
    # Run as a script (``python launch/export_hf.py``): make the repository root importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from mfjax.io import checkpoint, hf  # noqa: E402

CKPT = flags.DEFINE_string("checkpoint_dir", None, "Orbax checkpoint directory to read.", required=True)
OUT = flags.DEFINE_string("out_dir", None, "HF folder to write.", required=True)
TOKENIZER = flags.DEFINE_string("tokenizer_dir", None, "Folder whose tokenizer files are copied along.")
DTYPE = flags.DEFINE_string("dtype", "keep", "dtype of the written tensors; 'keep' keeps the stored dtypes.")
STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (latest when unset).")
MAX_SHARD = flags.DEFINE_float("max_shard_bytes", 2e9, "Split the weights into shards above this size.")


def export_hf(
    checkpoint_dir: str,
    out_dir: str,
    tokenizer_dir: str | None = None,
    dtype: str | None = None,
    step: int | None = None,
    max_shard_bytes: float = 2e9,
) -> str:
    """Writes step ``step`` (latest by default) of ``checkpoint_dir`` to ``out_dir``; returns ``out_dir``."""
    meta = checkpoint.read_metadata(checkpoint_dir, step)
    cfg, params = checkpoint.restore_checkpoint(checkpoint_dir, step)
    if tokenizer_dir is None and os.path.isdir(meta.get("source_dir") or ""):
        tokenizer_dir = meta["source_dir"]
    hf.save_hf(
        out_dir,
        cfg,
        params,
        tokenizer_dir=tokenizer_dir,
        generation_config=meta.get("generation_config"),
        max_shard_bytes=max_shard_bytes,
        dtype=None if dtype in (None, "", "keep") else dtype,
    )
    logging.info("exported %s to %s (tokenizer from %s)", checkpoint_dir, out_dir, tokenizer_dir)
    return out_dir


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    export_hf(CKPT.value, OUT.value, TOKENIZER.value, DTYPE.value, STEP.value, MAX_SHARD.value)


if __name__ == "__main__":
    app.run(main)
