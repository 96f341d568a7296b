"""Hardware ceilings the benchmarks report against (DESIGN.md, measured on H100 / H200)."""

from __future__ import annotations

# Device name fragment -> (bf16 matmul FLOP/s, HBM bytes/s).
KNOWN_PEAKS = {"H200": (730e12, 4.3e12), "H100": (730e12, 3.0e12)}


def device_peaks(kind: str, peak_tflops: float | None = None,
                 hbm_tbps: float | None = None) -> tuple[float | None, float | None]:
    """(peak FLOP/s, HBM bytes/s) for the roofline: the given values first, then the known devices."""
    flops = peak_tflops * 1e12 if peak_tflops else None
    bw = hbm_tbps * 1e12 if hbm_tbps else None
    for name, (known_flops, known_bw) in KNOWN_PEAKS.items():
        if name in kind:
            return flops or known_flops, bw or known_bw
    return flops, bw
