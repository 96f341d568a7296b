"""The paper's generation settings: one table that the launcher, the flagfiles and the benchmarks read.

The reference code calls transformers ``generate`` with some settings explicit and the rest left to the
checkpoint's ``generation_config.json`` (then HF's fallbacks); :func:`resolve` reproduces that precedence
with :meth:`~mfjax.engine.sampling.SamplingConfig.from_generation_config`, so a run records the values it
really sampled with.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from mfjax.engine.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class GenerationPreset:
    """What one model's ``generate`` call passes explicitly (None: left to the checkpoint / HF)."""

    temperature: Optional[float]
    repetition_penalty: float
    max_new_tokens: int
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_new_tokens: int = 0


# SPEC §2: policy T 0.8, top-p 0.85, top-k 50, penalty 1.2, 50 new tokens; mean field T 0.1, penalty 1.2,
# 200 new tokens and the reference's min_length = prompt + 10 (top-k / top-p from the checkpoint).
PAPER = {
    "policy": GenerationPreset(temperature=0.8, top_k=50, top_p=0.85, repetition_penalty=1.2, max_new_tokens=50),
    "mean_field": GenerationPreset(temperature=0.1, repetition_penalty=1.2, max_new_tokens=200, min_new_tokens=10),
}
PRESETS = {"paper": PAPER}


def resolve(preset: GenerationPreset, generation_config: Optional[Mapping[str, Any]] = None,
            **overrides: Any) -> SamplingConfig:
    """The sampling a ``generate`` call with ``preset`` (plus explicit ``overrides``: temperature, top_k,
    top_p, repetition_penalty; None leaves a setting as the preset has it) makes on a checkpoint whose
    generation config is ``generation_config``."""
    explicit = {k: v for k, v in dataclasses.asdict(preset).items()
                if k in ("temperature", "top_k", "top_p", "repetition_penalty") and v is not None}
    explicit.update({k: v for k, v in overrides.items() if v is not None})
    temperature = explicit.get("temperature")
    explicit["do_sample"] = bool(temperature)
    if not temperature:
        explicit.pop("temperature", None)
    return SamplingConfig.from_generation_config(generation_config, **explicit)
