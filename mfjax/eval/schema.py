"""The 9 label dimensions of SPEC §4 / EVALUATION.md §1: values, ordinal codes, the judge's JSON schema.

Every labeler (rules, API judge, annotators) produces one dict per comment with exactly the keys of
`DIMENSIONS`; a value outside its enum, or missing, becomes `None` ("null": counted, never defaulted).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Optional

# Categorical dimensions in report order, each with its values in code order. For ordinal
# dimensions the position is the ordinal code (negative < neutral < positive, oppose < neutral <
# support); binary ones are coded 0 / 1 in the listed order; nominal ones have no order.
VALUES: Mapping[str, tuple] = {
    "rumor": ("spread", "counter"),
    "sentiment_state": ("angry", "calm", "happy", "sad", "fear", "surprise"),
    "sentiment_tendency": ("negative", "neutral", "positive"),
    "behavior_type": ("comment", "share"),
    "stance": ("oppose", "neutral", "support"),
    "belief_degree": ("doubt", "believe"),
    "subjectivity": ("objective", "subjective"),
    "intent": ("question", "promotion", "opinion"),
}
CATEGORICAL = tuple(VALUES)
# Keywords: a list of at most MAX_KEYWORDS strings (compared as sets, e.g. Jaccard).
KEYWORDS = "keywords"
MAX_KEYWORDS = 5
DIMENSIONS = CATEGORICAL + (KEYWORDS,)

# Dimensions whose codes carry an order, so Wasserstein-1 on the codes means something. (On a
# binary dimension W1 is just |Δp|, reported by KL/JS already; nominal ones have none.)
ORDINAL = ("sentiment_tendency", "stance")
KIND = {d: ("ordinal" if d in ORDINAL else "binary" if len(v) == 2 else "nominal")
        for d, v in VALUES.items()}

# The plain-repost rule (EVALUATION.md §1): SPEC fixes share / calm / believe / spread; tendency,
# stance, subjectivity and intent follow the reference evaluator's worked example.
PLAIN_REPOST_LABELS: Mapping[str, Any] = {
    "rumor": "spread", "sentiment_state": "calm", "sentiment_tendency": "neutral",
    "behavior_type": "share", "stance": "neutral", "belief_degree": "believe",
    "subjectivity": "objective", "intent": "promotion", "keywords": [],
}

# Dimension definitions shown to judges (API prompt) and echoed by the annotation guidelines.
DEFINITIONS = {
    "rumor": "spread = passes the topic's claim on or reacts as if true; counter = pushes back "
             "(calls it a rumour, fake, false, unverified; corrects or debunks it)",
    "sentiment_state": "the dominant emotion of the author's own words; calm when none",
    "sentiment_tendency": "overall polarity of the author's tone",
    "behavior_type": "share = relays content without the author's own view (repost, headline, "
                     "link, call to spread); comment = adds the author's own words",
    "stance": "the author's position toward the topic's claim (not toward people in it)",
    "belief_degree": "doubt = questions whether the claim is true, asks for a source or calls it "
                     "fake; believe = takes it as true or shows no doubt",
    "subjectivity": "subjective = expresses opinion, feeling or judgement; objective = facts, "
                    "headlines, links, factual questions",
    "intent": "question = mainly asks; promotion = mainly relays information; opinion = mainly "
              "states a view or feeling",
    "keywords": f"up to {MAX_KEYWORDS} content words of the author's own text",
}


def code(dimension: str, value: Optional[str]) -> Optional[int]:
    """The integer code of a value (its position in `VALUES[dimension]`); None for None."""
    if value is None:
        return None
    return VALUES[dimension].index(value)


def clean_labels(raw: Mapping[str, Any]) -> tuple[dict, list]:
    """(labels with every dimension, [problems]) from a raw label dict.

    Out-of-enum or missing categorical values become None and are reported; keywords become a
    list of at most `MAX_KEYWORDS` non-empty strings (None when not a list).
    """
    out, problems = {}, []
    for dim in CATEGORICAL:
        value = raw.get(dim)
        if isinstance(value, str):
            value = value.strip().lower()
        if value is None or value in VALUES[dim]:
            out[dim] = value
        else:
            out[dim] = None
            problems.append(f"{dim}={value!r} not in {list(VALUES[dim])}")
        if dim not in raw:
            problems.append(f"{dim} missing")
    kw = raw.get(KEYWORDS)
    if kw is None:
        out[KEYWORDS] = None
    elif isinstance(kw, list):
        out[KEYWORDS] = [str(k).strip() for k in kw if isinstance(k, str) and k.strip()][:MAX_KEYWORDS]
    else:
        out[KEYWORDS] = None
        problems.append(f"keywords={kw!r} not a list")
    return out, problems


def item_schema() -> dict:
    """JSON schema of one judged comment: its id plus one enum per dimension (strict-mode ready)."""
    props: dict = {"id": {"type": "string"}}
    for dim, values in VALUES.items():
        props[dim] = {"type": "string", "enum": list(values)}
    props[KEYWORDS] = {"type": "array", "items": {"type": "string"}, "maxItems": MAX_KEYWORDS}
    return {"type": "object", "properties": props, "required": list(props),
            "additionalProperties": False}


def judge_schema() -> dict:
    """The judge's answer schema, `{"items": [item, ...]}` (OpenAI strict json_schema rules: every
    property required, no additional properties)."""
    return {"type": "object", "properties": {"items": {"type": "array", "items": item_schema()}},
            "required": ["items"], "additionalProperties": False}


def schema_hash() -> str:
    """Short stable hash of the judge schema (part of a judge labeler's version)."""
    text = json.dumps(judge_schema(), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
