"""Training metrics (IBTUNE.md §10): a JSONL row per optimizer step, always; TensorBoard when ``tensorboardX``
is installed (the ``tb`` extra). Rows are flushed as they are written, so a killed run loses nothing it logged;
a resumed run first drops the rows past its checkpoint, so the file reads as one uninterrupted run. Only
process 0 writes. Rows carry numbers and model text (a decoded mean field), never user ids or names.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np

FILE = "metrics.jsonl"


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        value = np.asarray(value)
        return value.item() if value.ndim == 0 else value.tolist()
    return value


class MetricsWriter:
    """Appends rows to ``<out_dir>/metrics.jsonl`` (and TensorBoard event files under ``<out_dir>/tb``).

    Args:
      out_dir: the run folder.
      resume_step: keep only rows with ``step <= resume_step`` from an earlier run (None: start a new file).
      tensorboard: write TensorBoard too when tensorboardX is importable.
    """

    def __init__(self, out_dir: str, *, resume_step: Optional[int] = None, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(out_dir, FILE)
        self.tb = None
        if not self.enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        kept = []
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(kept)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(os.path.join(out_dir, "tb"))

    def write(self, step: int, row: Mapping[str, Any], *, text: Optional[Mapping[str, str]] = None) -> None:
        """One row for optimizer step ``step``: numbers (scalars become TensorBoard scalars) and optional text."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in row.items()}, **dict(text or {})}
        self._file.write(json.dumps(row, ensure_ascii=False, allow_nan=True) + "\n")
        self._file.flush()
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)
            for key, value in (text or {}).items():
                self.tb.add_text(key, value, step)
            self.tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(out_dir: str) -> list[dict]:
    """The rows of a run's metrics file."""
    with open(os.path.join(out_dir, FILE), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
