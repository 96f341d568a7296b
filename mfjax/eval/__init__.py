"""Evaluation of simulated against real populations (SPEC §4, EVALUATION.md).

Layout, one concern per module:

- `schema`: the 9 label dimensions, their values and ordinal codes, the judge's JSON schema;
- `text`: text hashes, the author's own words, the plain-repost rule;
- `labelers/`: the protocol and cache (`base`), the rule stacks (`rules_zh`, `rules_en`), the API judge
  (`judge`, over `http`); `lexicons/` holds the project's own emoticon and cue files;
- `runs`: reading simulator outputs and the real events, comment ids, populations;
- `metrics`, `bootstrap`, `agreement`: the numbers (numpy);
- `pipeline`: per-world metrics, CIs, curves and the experiments' analyses; `report`: metrics.json,
  report.md, figures; `evaluation`: the job behind `launch/evaluate.py`;
- `status` / `status.json`: which dimensions a labeler may report; `validation`: `--validate_labeler`.

Nothing here imports jax or the model code: evaluation is numpy on text outputs.
"""
