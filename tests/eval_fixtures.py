"""Synthetic simulator output folders for the evaluation tests (no model runs): generic-JSONL events
and run folders shaped like `launch/simulate.py`'s, with manifests, config hashes and world files."""

import json
import os
import random

COMMENTS = ["[怒]太过分了！", "[哈哈]笑死", "真的假的？", "转发微博", "这是谣言，别信", "[泪]好可怜", "北京今天下雨",
            "支持！", "好可怕[吃惊]", "为什么会这样？", "关注我抽奖 http://t.cn/a", "转发微博//@用户:天哪", "呵呵",
            "一路走好[蜡烛]", "我觉得不太可能", "厉害了"]
STEP, WARMUP, AGENTS = 8, 1, 32


def make_events(path, n_events=3, comments=None, language="zh"):
    """Write `n_events` events of AGENTS agents (texts drawn from `comments`, default COMMENTS) as JSONL."""
    comments = comments or COMMENTS
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for e in range(n_events):
            agents = [{"uid": f"u{i}", "time": 1000.0 + i, "text": rng.choice(comments)} for i in range(AGENTS)]
            f.write(json.dumps({"event_id": f"ev{e}", "language": language, "topic": f"某地发生第{e}件事",
                                "agents": agents}, ensure_ascii=False) + "\n")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def make_run(folder, events_path, events, alg, seeds=(0, 1), config_hash="abc123", interventions=None,
             seed_offset=0, comments=None):
    """Write a run folder: manifest with a config hash, one world file + mean-field file per (event, seed),
    and a prompts file the evaluator must ignore. Warm-up rows copy the real text; interventions replace
    the given (step, position) actions."""
    os.makedirs(folder, exist_ok=True)
    config = {"events": str(events_path), "split": None, "event_ids": [e["event_id"] for e in events],
              "seeds": list(seeds), "policy_model": "/models/fake", "mean_field_model": "/models/fake", "overrides": [],
              "rollout": {"algorithm": alg, "step_size": STEP, "warmup_steps": WARMUP, "num_steps": AGENTS // STEP}}
    with open(os.path.join(folder, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump({"created": "now", "config": config, "config_hash": config_hash}, f)
    for e in events:
        for seed in seeds:
            rng = random.Random(f"{alg}/{e['event_id']}/{seed + seed_offset}")
            rows = []
            for i, agent in enumerate(e["agents"]):
                step = i // STEP
                source = "warmup" if step < WARMUP else "generated"
                action = agent["text"] if source == "warmup" else rng.choice(comments or COMMENTS)
                if interventions and (step, i % STEP) in interventions:
                    source, action = "intervention", interventions[(step, i % STEP)]
                rows.append({"event_id": e["event_id"], "seed": seed, "step": step, "agent": i, "state": "…",
                             "real_action": agent["text"], "generated_action": "" if source == "warmup" else action,
                             "action": action, "source": source, "mean_field": "", "nll": 3.0 + rng.random(),
                             "nll_tokens": 4})
            stem = os.path.join(folder, f"{e['event_id']}.seed{seed}")
            with open(stem + ".jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            with open(stem + ".mean_field.json", "w", encoding="utf-8") as f:
                json.dump({"event_id": e["event_id"], "seed": seed, "config_hash": config_hash,
                           "trajectory": [{"step": k, "mean_field": ""} for k in range(AGENTS // STEP)]}, f)
            with open(stem + ".prompts.jsonl", "w", encoding="utf-8") as f:
                f.write("{not read by the evaluator\n")
