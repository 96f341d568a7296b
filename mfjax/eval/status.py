"""Which label dimensions a labeler may report (EVALUATION.md §7), from `mfjax/eval/status.json`.

A verdict for the exact labeler version (written by `launch/evaluate.py --validate_labeler`) wins;
otherwise the pilot status of the labeler's family (e.g. "rules-zh") applies; a labeler with neither
(the API judge, the paper's own labeler) reports every dimension. A dimension whose status is
`judge_only` is withheld from metrics with the reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from mfjax.eval import schema

STATUS_PATH = Path(__file__).resolve().parent / "status.json"
JUDGE_ONLY, PASS, PROVISIONAL, UNRESTRICTED = "judge_only", "pass", "provisional", "reported"


def load(path: Optional[os.PathLike] = None) -> dict:
    """The status file's content."""
    with open(path or STATUS_PATH, encoding="utf-8") as f:
        return json.load(f)


def family(version: str) -> str:
    """'rules-zh' of 'rules-zh/1 pysenti=…'."""
    return version.split("/", 1)[0].split(" ", 1)[0]


def dimension_status(version: str, status: Optional[dict] = None) -> dict:
    """{dimension: (status, reason)} for every categorical dimension of a labeler version."""
    status = status or load()
    verdict = status.get("verdicts", {}).get(version)
    out = {}
    for dim in schema.CATEGORICAL:
        if verdict and dim in verdict.get("dimensions", {}):
            v = verdict["dimensions"][dim]
            if v["verdict"] == JUDGE_ONLY:
                out[dim] = (JUDGE_ONLY, f"κ {v.get('kappa', float('nan')):.2f} under the bar {v.get('bar')} "
                                        f"on the validation test split ({verdict.get('validated_on', '?')})")
            else:
                out[dim] = (PASS, f"κ {v.get('kappa', float('nan')):.2f} ≥ {v.get('bar')} on the validation test split")
            continue
        pilot = status.get("pilot", {}).get(family(version))
        if pilot and dim in pilot:
            s = pilot[dim]
            reason = ("pilot (EVALUATION.md §3): judge only until the validation sample decides" if s == JUDGE_ONLY
                      else "pilot (EVALUATION.md §3): provisional until the validation sample decides")
            out[dim] = (s, reason)
        else:
            out[dim] = (UNRESTRICTED, "no validation status for this labeler")
    return out


def reportable(version: str, status: Optional[dict] = None) -> dict:
    """{dimension: reason} of the withheld dimensions, and the list of reportable ones."""
    st = dimension_status(version, status)
    withheld = {d: r for d, (s, r) in st.items() if s == JUDGE_ONLY}
    return {"withheld": withheld, "reportable": [d for d in schema.CATEGORICAL if d not in withheld],
            "status": {d: s for d, (s, _) in st.items()}}
