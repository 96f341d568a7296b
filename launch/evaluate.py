"""Evaluate simulated populations against the real ones (SPEC §4, EVALUATION.md).

With no flags, evaluates the demo's output folder (`runs/demo`, written by `python launch/simulate.py`)
with the offline rule labelers. Typical use::

  python launch/evaluate.py --runs=mf=runs/mf,state=runs/state --out_dir=runs/eval
  python launch/evaluate.py --runs=... --labeler=api --judge_base_url=https://api.openai.com/v1 \\
      --judge_model=gpt-4o-mini-2024-07-18 --judge_api_key_env=OPENAI_API_KEY --judge_budget_usd=5
  python launch/evaluate.py --validate_labeler      # agreement of the rules with the reference labels

Writes `<out_dir>/metrics.json`, `report.md`, `curves_<dimension>.png`, `kl_by_method.png` and the
label cache `labels/`. Every input is checked before labelling starts; bad input is one line naming
the flag or file.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    # Run as a script from a source checkout: make the package importable without installing it.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

DEMO_RUN = "runs/demo"

flags.DEFINE_list("runs", None, "Run folders: name=dir,name=dir or bare dirs (name = the manifest's algorithm). "
                  f"Default: {DEMO_RUN} when present.")
flags.DEFINE_string("events", None, "Events the runs came from (default: the manifests' --events).")
flags.DEFINE_enum("labeler", "rules", ["rules", "api"], "Offline rule labelers, or an OpenAI-compatible API judge.")
flags.DEFINE_string("out_dir", "runs/eval", "Output folder (metrics.json, report.md, figures, labels/).")
flags.DEFINE_float("kl_alpha", 0.5, "Additive smoothing per class on both sides of KL(real || sim).")
flags.DEFINE_integer("bootstrap", 2000, "Cluster-bootstrap resamples (0: no CIs).")
flags.DEFINE_integer("bootstrap_seed", 0, "Seed of the bootstrap and of the F1 chance line.")
flags.DEFINE_bool("include_warmup", False, "Also compare warm-up rows (identical to reality by construction).")
flags.DEFINE_list("experiment", ["main"], "Analyses: main, trend, intervention, horizon.")
flags.DEFINE_string("intervention_pair", None, "WITH:WITHOUT system names for --experiment=intervention.")
flags.DEFINE_integer("horizon_window", 5, "Steps per window of --experiment=horizon.")
flags.DEFINE_bool("progress", True, "Show a progress bar while labelling.")
# API judge
flags.DEFINE_string("judge_base_url", None, "OpenAI-compatible base URL, e.g. https://api.openai.com/v1.")
flags.DEFINE_string("judge_model", None, "Judge model, a dated snapshot (e.g. gpt-4o-mini-2024-07-18).")
flags.DEFINE_string("judge_api_key_env", "OPENAI_API_KEY", "NAME of the environment variable holding the key "
                    "(the key itself is never logged or stored).")
flags.DEFINE_integer("judge_concurrency", 8, "Requests in flight at most.")
flags.DEFINE_integer("judge_batch", 5, "Comments per request.")
flags.DEFINE_float("judge_timeout", 60.0, "Seconds per request.")
flags.DEFINE_integer("judge_max_attempts", 6, "Attempts per request (429 / 5xx / timeouts are retried).")
flags.DEFINE_integer("judge_seed", 0, "Sampling seed sent with every request (temperature is 0).")
flags.DEFINE_float("judge_budget_usd", None, "Stop cleanly before spending more (needs the two prices).")
flags.DEFINE_float("judge_price_in", None, "USD per 1M prompt tokens.")
flags.DEFINE_float("judge_price_out", None, "USD per 1M completion tokens.")
flags.DEFINE_integer("judge_max_tokens", None, "Stop cleanly before using more tokens (prompt + completion).")
flags.DEFINE_enum("judge_response_format", "json_schema", ["json_schema", "json_object"],
                  "json_schema (strict) or json_object + validation for servers without schemas.")
# Validation
flags.DEFINE_bool("validate_labeler", False, "Measure the rule labelers against the reference labels.")
flags.DEFINE_string("validation_dir", None, "Sample + labels folder (default: experiments/labeler_validation).")
flags.DEFINE_string("data", None, "Shared corpora root for --validate_labeler (default: ../shared/data).")
flags.DEFINE_string("status_file", None, "Reportability file (default: mfjax/eval/status.json): which dimensions "
                    "each labeler may report, e.g. verdicts of a labeler validated elsewhere.")
flags.DEFINE_bool("write_status", True, "--validate_labeler writes its verdicts to mfjax/eval/status.json.")

FLAGS = flags.FLAGS
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _judge_factory():
    from mfjax.eval.labelers import judge

    if not FLAGS.judge_base_url or not FLAGS.judge_model:
        raise app.UsageError("--labeler=api needs --judge_base_url and --judge_model")
    if FLAGS.judge_budget_usd is not None and (FLAGS.judge_price_in is None or FLAGS.judge_price_out is None):
        raise app.UsageError("--judge_budget_usd needs --judge_price_in and --judge_price_out")
    if not os.environ.get(FLAGS.judge_api_key_env):
        raise app.UsageError(f"--judge_api_key_env={FLAGS.judge_api_key_env}: that environment variable is not set")
    config = judge.JudgeConfig(
        base_url=FLAGS.judge_base_url, model=FLAGS.judge_model, api_key_env=FLAGS.judge_api_key_env,
        batch_size=FLAGS.judge_batch, concurrency=FLAGS.judge_concurrency, timeout_s=FLAGS.judge_timeout,
        max_attempts=FLAGS.judge_max_attempts, seed=FLAGS.judge_seed, budget_usd=FLAGS.judge_budget_usd,
        price_in_per_m=FLAGS.judge_price_in, price_out_per_m=FLAGS.judge_price_out,
        max_total_tokens=FLAGS.judge_max_tokens, response_format=FLAGS.judge_response_format,
        cache_dir=os.path.join(FLAGS.out_dir, "judge_cache"))
    budget = judge.Budget.from_config(config)  # one budget shared by both languages' judges
    return lambda language: judge.Judge(config, language, budget=budget)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if FLAGS.validate_labeler:
        from mfjax.eval import validation

        sample_dir = FLAGS.validation_dir or os.path.join(_REPO, "experiments", "labeler_validation")
        data = FLAGS.data or os.path.join(os.path.dirname(_REPO), "shared", "data")
        return validation.main(sample_dir, data, write_status=FLAGS.write_status,
                               n_resamples=FLAGS.bootstrap, seed=FLAGS.bootstrap_seed)
    from mfjax.eval import evaluation, pipeline

    runs = FLAGS.runs
    if runs is None:
        if not os.path.isdir(DEMO_RUN):
            print(f"mfjax: no --runs given and no demo output at {DEMO_RUN}. Run the demo first "
                  f"(python launch/simulate.py), or pass --runs=name=DIR,...", file=sys.stderr)
            return 2
        print(f"mfjax: no --runs given: evaluating the demo output {DEMO_RUN} with the offline rule labelers",
              flush=True)
        runs = [DEMO_RUN]
    settings = pipeline.Settings(kl_alpha=FLAGS.kl_alpha, n_bootstrap=FLAGS.bootstrap,
                                 bootstrap_seed=FLAGS.bootstrap_seed, include_warmup=FLAGS.include_warmup,
                                 horizon_window=FLAGS.horizon_window)
    options = evaluation.Options(
        runs=runs, out_dir=FLAGS.out_dir, labeler=FLAGS.labeler, events=FLAGS.events, settings=settings,
        experiments=FLAGS.experiment, intervention_pair=FLAGS.intervention_pair,
        judge_factory=_judge_factory() if FLAGS.labeler == "api" else None, judge_model=FLAGS.judge_model,
        progress=FLAGS.progress, status_path=FLAGS.status_file)
    try:
        payload = evaluation.run(options)
    except evaluation.EvaluationError as e:
        print(f"mfjax: {e}", file=sys.stderr)
        return 2
    headline = {s: payload["results"]["estimates"][s]["_headline"]["kl_mean_over_dims"]
                for s in payload["results"]["systems"]}
    from mfjax.eval.report import fmt

    print(f"mfjax: labeler {', '.join(payload['labeler_versions'].values())}; reported dimensions: "
          f"{', '.join(payload['reportable']) or 'none'}; withheld: {', '.join(payload['withheld']) or 'none'}")
    for s, est in headline.items():
        print(f"  {s}: KL(real || sim), mean over reported dimensions = {fmt(est)}")
    print(f"mfjax: wrote {FLAGS.out_dir}/metrics.json, report.md and {len(payload['figures'])} figure(s) "
          f"in {payload['elapsed_s']}s")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
