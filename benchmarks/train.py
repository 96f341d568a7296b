"""One IB-Tune train step (LoRA SFT: forward, backward through the frozen base, AdamW on the LoRA): tokens/s and
MFU, and on CPU side by side with torch + peft on the same model, batch and LoRA.

    PYTHONPATH=. python benchmarks/train.py                        # GPU: Qwen2-1.5B shape, bf16 (goal: >= 50 % MFU)
    PYTHONPATH=. python benchmarks/train.py --tiny                 # CPU smoke run of the GPU path (tiny shape)
    PYTHONPATH=. python benchmarks/train.py --model=smollm2 --peer=on --dtype=float32   # CPU: mfjax vs torch+peft

A benchmark, not a test: never run by CI. Weights are random (the same tensors in both frameworks: the torch
model is written as an HF folder and mfjax loads it). The step is the one stage 2 and the state-SFT baseline
take (``mfjax.train.losses.sft_loss``'s maths without a shared prefix, so that both frameworks do the same
work): B rows × T tokens, the CE of tokens 1 … T−1 (logits at every position, as HF computes them), grads of
the LoRA only, optax / torch AdamW. mfjax: one jitted step, state donated; ``remat`` none (what torch does:
activations kept) and full (recomputed; the training default, far less memory).

Model FLOPs per step (MFU's numerator; recomputation is not counted):
  forward  2·P_lin·B·T + 4·L·N·H·B·T·(T+1)/2 (causal attention: QKᵀ and PV over the keys up to each query)
           + 2·P_lora·B·T (x·A, (x·A)·B on the seven projections)
  backward the base is frozen, so its projections need the input gradient only (1× their forward, no weight
           gradient); attention 2× its forward (dQ, dK from dS; dP, dV); the LoRA 2× its forward (input and
           weight gradients). Total: 2× the projections' forward + 3× attention's + 3× the LoRA's.
P_lin = every projection and the LM head. MFU = model FLOPs / time / peak: the device's bf16 peak on GPU,
the matmul peak measured on this CPU (float32 ``jnp.dot``, ``common.cpu_matmul_peak``) on CPU.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import common  # noqa: E402

MODEL = flags.DEFINE_enum("model", "qwen2_1_5b", ["qwen2_1_5b", "smollm2"], "Model shape.")
TINY = flags.DEFINE_bool("tiny", False, "Tiny config and batch: a smoke run of the whole script on CPU.")
BATCH = flags.DEFINE_integer("batch", None, "Rows per step (default: 16 on GPU, 4 on CPU).")
SEQ = flags.DEFINE_integer("seq", None, "Tokens per row (default: 512 on GPU, 256 on CPU).")
RANK = flags.DEFINE_integer("rank", None, "LoRA rank on the seven projections (default: 64 GPU, 16 CPU).")
DTYPE = flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"], "Base weights (default: bf16 GPU, fp32 CPU).")
REMAT = flags.DEFINE_list("remat", ["none", "full"], "mfjax rematerialisation policies to time.")
PEER = flags.DEFINE_enum("peer", "auto", ["auto", "on", "off"], "torch + peft side by side (auto: on CPU).")
STEPS = flags.DEFINE_integer("steps", 3, "Timed steps after the compile / warm-up step (median reported).")
PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None, "Peak for MFU (default: 730 bf16 on H100/H200; measured on CPU).")
OUT_JSON = flags.DEFINE_string("out_json", None, "Write the results here as JSON.")

SMOLLM2_135M = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                    hidden_act="silu", bos_token_id=1, eos_token_id=2)
TINY_CFG = dict(common.QWEN2_1_5B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def hf_config(shape: dict):
    import transformers

    shape = dict(shape)
    kind = shape.pop("model_type")
    cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}[kind]
    return cls(**shape)


def model_flops(cfg, batch: int, seq: int, rank: int) -> float:
    """Model FLOPs of one train step (see the module docstring)."""
    D, F, L, N, K, H, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
                           cfg.head_dim, cfg.vocab_size)
    per_layer = D * N * H + 2 * D * K * H + N * H * D + 3 * D * F
    lin = L * per_layer + D * V
    lora = L * rank * ((D + N * H) + 2 * (D + K * H) + (N * H + D) + 2 * (D + F) + (F + D))
    tokens = batch * seq
    attention = 4 * L * N * H * batch * seq * (seq + 1) / 2
    return 2 * (2 * lin * tokens) + 3 * attention + 3 * (2 * lora * tokens)


def mfjax_step(cfg, weights, rank: int, remat, tokens):
    """A jitted LoRA SFT step over tokens [B, T]; returns (step function, initial state)."""
    import jax
    import jax.numpy as jnp
    import optax

    from mfjax.engine.score import score_tokens
    from mfjax.models import lora as lora_lib

    spec = lora_lib.LoraSpec(rank=rank, alpha=2 * rank)
    lora = lora_lib.init_lora(cfg, spec, jax.random.key(0))
    tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.0)
    B, T = tokens.shape
    ones = jnp.ones((B,), jnp.int32)

    def loss_fn(lora, weights, tokens):
        # The first token is the prompt, the other T-1 are scored: the CE over the whole row, as torch below.
        lp = score_tokens(weights, cfg, tokens[:, :1], ones, tokens[:, 1:], ones * (T - 1), lora=lora, remat=remat)
        return -jnp.mean(lp)

    def step(state, weights, tokens):
        lora, opt = state
        loss, grads = jax.value_and_grad(loss_fn)(lora, weights, tokens)
        updates, opt = tx.update(grads, opt, lora)
        return (optax.apply_updates(lora, updates), opt), loss

    return jax.jit(step, donate_argnums=(0,)), (lora, tx.init(lora))


def time_mfjax(cfg, weights, rank, remat, tokens, steps):
    import jax

    step, state = mfjax_step(cfg, weights, rank, None if remat == "none" else remat, tokens)
    t0 = time.perf_counter()
    state, loss = step(state, weights, tokens)
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, loss = step(state, weights, tokens)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), compile_s, float(loss)


def time_torch(model_dir, rank, tokens, steps, dtype_name):
    import peft
    import torch
    import transformers

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.config._attn_implementation = "sdpa"
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(model, config)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95),
                            weight_decay=0.0)
    ids = torch.as_tensor(tokens, dtype=torch.long)

    def step():
        logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), loss


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mfjax.config import ModelConfig
    from mfjax.io.hf import load_hf

    on_gpu = jax.default_backend() == "gpu"
    shape = TINY_CFG if TINY.value else (SMOLLM2_135M if MODEL.value == "smollm2" else common.QWEN2_1_5B)
    batch = BATCH.value or (16 if on_gpu else (2 if TINY.value else 4))
    seq = SEQ.value or (512 if on_gpu else (32 if TINY.value else 256))
    rank = RANK.value or (64 if on_gpu else 16)
    dtype_name = DTYPE.value or ("bfloat16" if on_gpu else "float32")
    peer = PEER.value == "on" or (PEER.value == "auto" and not on_gpu)
    kind = jax.devices()[0].device_kind
    if on_gpu:
        peak = (PEAK_TFLOPS.value * 1e12) if PEAK_TFLOPS.value else common.device_peaks(kind)[0]
        peak_name = "bf16 peak"
    else:
        peak = common.cpu_matmul_peak()
        peak_name = "measured CPU fp32 matmul peak"
    cfg = ModelConfig.from_hf(dict(shape))
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, seq)).astype(np.int32)
    flops = model_flops(cfg, batch, seq, rank)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = None
        if peer:
            import torch
            import transformers

            torch.manual_seed(0)
            hf = transformers.AutoModelForCausalLM.from_config(hf_config(shape), dtype=torch.float32)
            model_dir = os.path.join(tmp, "model")
            hf.save_pretrained(model_dir)
            del hf
            _, weights = load_hf(model_dir, dtype=jnp.dtype(dtype_name))
        else:
            from mfjax.models.weights import init_weights

            weights = init_weights(cfg, jax.random.key(0), dtype=jnp.dtype(dtype_name))
        for remat in REMAT.value:
            seconds, compile_s, loss = time_mfjax(cfg, weights, rank, remat, jnp.asarray(tokens), STEPS.value)
            rows.append(dict(engine="mfjax", how=f"jit step, remat {remat}", seconds=seconds, compile_s=compile_s,
                             loss=loss))
        if peer:
            del weights
            seconds, loss = time_torch(model_dir, rank, tokens, STEPS.value, dtype_name)
            rows.append(dict(engine="torch+peft", how="eager, sdpa attention, no checkpointing", seconds=seconds,
                             compile_s=None, loss=loss))
    for r in rows:
        r["tokens_per_s"] = batch * seq / r["seconds"]
        r["model_tflops_per_s"] = flops / r["seconds"] / 1e12
        r["mfu"] = flops / r["seconds"] / peak if peak else None
    torch_row = next((r for r in rows if r["engine"] == "torch+peft"), None)
    for r in rows:
        r["speed_vs_torch"] = torch_row["seconds"] / r["seconds"] if torch_row else None

    print(f"# one LoRA train step: {MODEL.value if not TINY.value else 'tiny'} shape, {batch} × {seq} tokens, rank "
          f"{rank} on 7 projections, {dtype_name}, {kind}; {flops / 1e12:.3f} model TFLOP/step; {peak_name} "
          f"{(peak or 0) / 1e12:.3f} TFLOP/s")
    print("| engine | how | s/step | tokens/s | model TFLOP/s | MFU | × torch | compile s | loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    num = lambda value, spec: "–" if value is None else format(value, spec)
    for r in rows:
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        print(f"| {r['engine']} | {r['how']} | {r['seconds']:.3f} | {r['tokens_per_s']:,.0f} | "
              f"{r['model_tflops_per_s']:.4f} | {num(mfu, '.1f')} % | {num(r['speed_vs_torch'], '.2f')} | "
              f"{num(r['compile_s'], '.1f')} | {r['loss']:.4f} |")
    if OUT_JSON.value:
        with open(OUT_JSON.value, "w") as f:
            json.dump({"rows": rows, "batch": batch, "seq": seq, "rank": rank, "dtype": dtype_name, "device": kind,
                       "peak_flops": peak, "model_flops": flops, "host": platform.node(),
                       "load": os.getloadavg()}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
