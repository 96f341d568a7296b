"""Imports an HF safetensors folder into an mfjax orbax checkpoint.

    python launch/import_hf.py --hf_dir=/path/to/hf --checkpoint_dir=/path/to/ckpt [--dtype=bfloat16] [--step=0]

The checkpoint stores the HF config (and ``generation_config.json`` when the folder has one) next to the
weights, and remembers the source folder so ``export_hf`` can take the tokenizer from there by default.
"""

import json
import os
import sys

if __package__ in (None, ""):
    # Run as a script (``python launch/import_hf.py``): make the repository root importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from mfjax.io import checkpoint, hf  # noqa: E402

HF_DIR = flags.DEFINE_string("hf_dir", None, "HF folder with config.json and *.safetensors.", required=True)
CKPT = flags.DEFINE_string("checkpoint_dir", None, "Orbax checkpoint directory to write.", required=True)
DTYPE = flags.DEFINE_string("dtype", "float32", "dtype of the stored params; 'keep' keeps the file dtypes.")
STEP = flags.DEFINE_integer("step", 0, "Checkpoint step to write.")


def import_hf(hf_dir: str, checkpoint_dir: str, dtype: str | None = "float32", step: int = 0) -> str:
    """Reads ``hf_dir`` and saves it as step ``step`` of ``checkpoint_dir``; returns the checkpoint dir."""
    cfg, params = hf.load_hf(hf_dir, dtype=None if dtype in (None, "", "keep") else dtype)
    extra = {"source_dir": os.path.abspath(hf_dir)}
    gen_path = os.path.join(hf_dir, hf.GENERATION_CONFIG_FILE)
    if os.path.exists(gen_path):
        with open(gen_path, encoding="utf-8") as f:
            extra["generation_config"] = json.load(f)
    out = checkpoint.save_checkpoint(checkpoint_dir, params, cfg, step=step, metadata=extra)
    logging.info("imported %s (%s, %d params) into %s step %d", hf_dir, cfg.model_type, cfg.param_count, out, step)
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import_hf(HF_DIR.value, CKPT.value, DTYPE.value, STEP.value)


if __name__ == "__main__":
    app.run(main)
