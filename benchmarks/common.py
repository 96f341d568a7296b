"""What both benchmarks measure against: the Qwen2-1.5B shape and the hardware ceilings (DESIGN.md)."""

from __future__ import annotations

# Qwen2-1.5B (config.json of the hub checkpoint, the fields the decoder reads).
QWEN2_1_5B = dict(
    model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
    num_attention_heads=12, num_key_value_heads=2, head_dim=128, max_position_embeddings=32768,
    rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
    bos_token_id=151643, eos_token_id=151643,
)

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


def cpu_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """This CPU's float32 matmul rate (FLOP/s), measured: the best of ``repeats`` jitted n×n @ n×n products
    (XLA's CPU GEMM on every core it uses). The denominator of MFU on a CPU."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    return 2 * n**3 / best_seconds(lambda: dot(a, b).block_until_ready(), repeats)


def best_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """The fastest of ``repeats`` timed calls of ``fn`` after ``warmup`` untimed ones (compilation, caches)."""
    import time

    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
