"""Draw the frozen labeler-validation sample (EVALUATION.md §7) from the shared corpora.

    python experiments/labeler_validation/make_sample.py --data=../shared/data

writes `experiments/labeler_validation/{zh,en}/sample.jsonl`: about 400 real comments per language
(zh from CED, en from the Twitter rumour events), one JSON object per line:

    {"id", "event_id", "topic", "text", "is_repost", "split", "stratum"}

How it draws (deterministic for a given `--seed` and data):

1. Events. The events of the shipped test fixture (`mfjax/assets/events/`) are left out; from the rest,
   `--zh_events` CED events and `--en_events` Twitter events are drawn at random. A quarter of them are
   **dev** events (rules may be tuned on their items), the rest **test** events (never tuned on). The
   split is by event, so tuning on dev never sees a test item's topic. Every event not drawn here is
   free for writing rules; `validation_event_ids()` lists the drawn ones so tools can avoid them.
2. Candidates. An event's candidates are its first `--agents` responders in time order (the agents a
   simulation with that many agents would use), their text as the simulator sees it (a CED plain repost
   reads "转发微博" + its chain), with personal data masked by `mfjax/data/privacy.py`
   (@mentions, e-mails, digit runs of 7+). Texts identical to one already drawn are skipped.
3. Strata. Each candidate gets one surface stratum, fixed here and independent of any labeler, so that
   rare classes (doubt, question, emoticons) are in the sample: the first that applies of
   repost / doubt_word / question / emoticon / url / other (see `stratum_of`). Each split's quota is
   spread over strata by `STRATUM_SHARES`; within a stratum items are taken round-robin over the
   split's events (shuffled), one random candidate per visit, so every event contributes. A stratum
   short of candidates passes its shortfall on to the others (`FILL_ORDER`).
4. Optional generated comments: `--generated=<run dir>` adds up to `--generated_count` comments written
   by a simulation run (rows with source "generated"), with simulator ids
   `{system}#{event_id}#s{seed}#{agent}` and stratum "generated" (labelers drift on generated text).

Labels are made by annotators into `labels_a.jsonl` / `labels_b.jsonl` beside the sample (see
`GUIDELINES.md`); nothing here labels anything.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from mfjax.assets import make_fixture  # noqa: E402
from mfjax.data import privacy  # noqa: E402
from mfjax.data import twitter, weibo  # noqa: E402

DEV_SHARE = 0.25  # share of the drawn events (and of the items) in the dev split
SPLIT_SIZES = {"dev": 100, "test": 300}

# Share of each split's items per stratum. Rare surface classes are over-drawn on purpose: a
# validation set drawn in natural proportions would hold almost no doubt or question items.
STRATUM_SHARES = {
    "zh": {"repost": 0.10, "doubt_word": 0.15, "question": 0.20, "emoticon": 0.20, "url": 0.10,
           "other": 0.25},
    # 95 % of these tweets carry a URL: "url" is the common case and "other" (no URL) the rarer one.
    "en": {"repost": 0.10, "doubt_word": 0.15, "question": 0.15, "emoticon": 0.10, "url": 0.30,
           "other": 0.20},
}
STRATUM_ORDER = ("repost", "doubt_word", "question", "emoticon", "url", "other")
# Which strata fill a rare stratum's shortfall, first to last: ordinary comments first, so that a
# short stratum does not inflate the (trivially labelled) plain reposts.
FILL_ORDER = ("other", "question", "emoticon", "doubt_word", "url", "repost")

# Tiny fixed word lists that only shape the draw (they are not a labeler).
DOUBT_WORDS = {
    "zh": ("谣言", "假的", "真的吗", "真的假的", "辟谣", "不信"),
    "en": ("hoax", "fake", "rumor", "rumour", "not true", "false", "debunk"),
}
_URL = re.compile(r"https?://|www\.", re.I)
_WEIBO_EMOTICON = re.compile(r"\[[^\[\]\s]{1,8}\]")
_EMOJI = re.compile("[\U0001F300-\U0001FAFF\u2600-\u27BF]")
_EN_EMOTICON = re.compile(r"(?:^|\s)(?:[:;=]-?[()DPp/\\|]|<3)(?=\s|$)")
_RETWEET = re.compile(r"^\s*RT\s+@", re.I)


def is_plain_repost_text(text: str, language: str) -> bool:
    """Whether the simulator's reader marks this action as a repost.

    zh: the reader writes an empty CED/rumdect text as "转发微博" + its chain; en: a retweet starts
    with "RT @".
    """
    if language == "zh":
        return text == weibo.REPOST_TEXT or text.startswith(weibo.REPOST_TEXT + "//")
    return bool(_RETWEET.match(text))


def stratum_of(text: str, language: str) -> str:
    """The first surface stratum of `STRATUM_ORDER` that applies to `text`."""
    lowered = text.lower()
    if is_plain_repost_text(text, language):
        return "repost"
    if any(w in lowered for w in DOUBT_WORDS[language]):
        return "doubt_word"
    if "?" in text or "？" in text:
        return "question"
    if _EMOJI.search(text) or (_WEIBO_EMOTICON.search(text) if language == "zh"
                               else _EN_EMOTICON.search(text)):
        return "emoticon"
    if _URL.search(text):
        return "url"
    return "other"


def fixture_event_ids(data: Path) -> set:
    """Events the shipped fixture is cut from (tests use them; keep them out of the sample)."""
    names = weibo.ced_event_names(data / "ced")
    ced = {next(n for n, lab in names if lab == label) for label in ("rumor", "non-rumor")}
    return ced | {*make_fixture.TWITTER_EVENTS, make_fixture.RUMDECT_EVENT}


def draw_events(language: str, data: Path, count: int, rng: random.Random) -> dict:
    """{event_id: split} for `count` random events of the language's corpus, fixture excluded."""
    excluded = fixture_event_ids(data)
    if language == "zh":
        pool = sorted(n for n, _ in weibo.ced_event_names(data / "ced") if n not in excluded)
    else:
        pool = sorted(p.stem for p in weibo.list_json_files(data / "twitter" / "events")
                      if p.stem not in excluded)
    if count > len(pool):
        raise SystemExit(f"asked for {count} {language} events, the corpus has {len(pool)}")
    chosen = rng.sample(pool, count)
    n_dev = round(count * DEV_SHARE)
    return {e: ("dev" if i < n_dev else "test") for i, e in enumerate(chosen)}


def read_event(language: str, data: Path, event_id: str):
    """The event as the simulator reads it."""
    if language == "zh":
        return weibo.read_ced_event(data / "ced", event_id)
    event, _ = twitter.read_twitter_event(data / "twitter" / "events" / f"{event_id}.json")
    return event


def candidates(language: str, data: Path, events: dict, agents: int) -> dict:
    """{split: {stratum: {event_id: [item, ...]}}} of every candidate comment."""
    out: dict = collections.defaultdict(lambda: collections.defaultdict(dict))
    for event_id in sorted(events):
        event = read_event(language, data, event_id)
        topic = privacy.mask_personal(event.topic, language)
        items = collections.defaultdict(list)
        for index, agent in enumerate(event.agents[:agents]):
            text = privacy.mask_personal(agent.action, language)
            if not text.strip():
                continue
            stratum = stratum_of(text, language)
            items[stratum].append({
                "id": f"{event_id}#r{index}", "event_id": event_id, "topic": topic, "text": text,
                "is_repost": is_plain_repost_text(text, language), "split": events[event_id],
                "stratum": stratum})
        for stratum, found in items.items():
            out[events[event_id]][stratum][event_id] = found
    return out


def quotas(total: int, shares: dict) -> dict:
    """Integer quotas per stratum summing to `total` (largest remainders)."""
    raw = {s: total * shares[s] for s in STRATUM_ORDER}
    q = {s: int(v) for s, v in raw.items()}
    for s in sorted(raw, key=lambda s: -(raw[s] - q[s]))[: total - sum(q.values())]:
        q[s] += 1
    return q


def draw_split(pool: dict, total: int, shares: dict, rng: random.Random, seen: set) -> list:
    """`total` items from one split's pool, per stratum round-robin over shuffled events."""
    chosen: list = []
    want = quotas(total, shares)
    shortfall = 0
    for stratum in STRATUM_ORDER + ("*",):
        if stratum == "*":
            # Shortfalls of rare strata are filled from all strata, in FILL_ORDER.
            strata, need = list(FILL_ORDER), shortfall
        else:
            strata, need = [stratum], want[stratum]
        taken = 0
        for s in strata:
            by_event = {e: list(items) for e, items in sorted(pool.get(s, {}).items())}
            order = sorted(by_event)
            rng.shuffle(order)
            while taken < need and any(by_event[e] for e in order):
                for e in order:
                    if taken >= need:
                        break
                    items = by_event[e]
                    while items:
                        item = items.pop(rng.randrange(len(items)))
                        if item["text"] not in seen:
                            seen.add(item["text"])
                            chosen.append(item)
                            taken += 1
                            break
        if stratum != "*":
            shortfall += need - taken
    return chosen


def generated_items(run_dirs: list, count: int, language: str, rng: random.Random,
                    seen: set) -> list:
    """Up to `count` generated comments (rows with source "generated") from simulation outputs."""
    rows = []
    for run in run_dirs:
        run = Path(run)
        manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
        system = manifest["config"].get("rollout", {}).get("algorithm") or manifest["config"].get("alg", "sim")
        for path in sorted(run.glob("*.seed*.jsonl")):
            if path.name.endswith(".prompts.jsonl"):
                continue
            for line in path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                if row["source"] == "generated" and row["action"].strip():
                    rows.append((system, row))
    rng.shuffle(rows)
    out = []
    for system, row in rows:
        if len(out) >= count:
            break
        text = privacy.mask_personal(row["action"], language)
        if text in seen:
            continue
        seen.add(text)
        out.append({"id": f"{system}#{row['event_id']}#s{row['seed']}#{row['agent']}",
                    "event_id": row["event_id"], "topic": None, "text": text,
                    "is_repost": is_plain_repost_text(text, language),
                    "split": "dev" if rng.random() < DEV_SHARE else "test",
                    "stratum": "generated"})
    return out


def main(argv=None) -> None:
    """Draw both languages' samples and print what each holds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(_REPO.parent / "shared" / "data"),
                        help="root holding ced/ and twitter/")
    parser.add_argument("--seed", type=int, default=20261203)
    parser.add_argument("--zh_events", type=int, default=100)
    parser.add_argument("--en_events", type=int, default=80)
    parser.add_argument("--agents", type=int, default=300,
                        help="candidates are each event's first N responders")
    parser.add_argument("--generated", action="append", default=[],
                        help="LANG=RUN_DIR of a simulation run to draw generated comments from")
    parser.add_argument("--generated_count", type=int, default=50)
    parser.add_argument("--out", default=str(_HERE))
    args = parser.parse_args(argv)
    data = Path(args.data)
    generated = collections.defaultdict(list)
    for spec in args.generated:
        lang, _, run = spec.partition("=")
        if lang not in STRATUM_SHARES or not run:
            raise SystemExit(f"--generated={spec}: expected zh=RUN_DIR or en=RUN_DIR")
        generated[lang].append(run)

    for language, n_events in (("zh", args.zh_events), ("en", args.en_events)):
        # One generator per language, seeded from the run seed and the language: adding a
        # language or changing one language's settings never changes the other's draw.
        rng = random.Random(f"{args.seed}/{language}")
        events = draw_events(language, data, n_events, rng)
        pool = candidates(language, data, events, args.agents)
        seen: set = set()
        items = []
        for split, size in SPLIT_SIZES.items():
            items += draw_split(pool[split], size, STRATUM_SHARES[language], rng, seen)
        if generated[language]:
            # Topics of generated items are filled from their real events' topics when known.
            items += generated_items(generated[language], args.generated_count, language, rng, seen)
        _fill_generated_topics(items, language, data)
        out = Path(args.out) / language / "sample.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
        counts = collections.Counter((i["split"], i["stratum"]) for i in items)
        print(f"{out}: {len(items)} items from {len({i['event_id'] for i in items})} events")
        for (split, stratum), n in sorted(counts.items()):
            print(f"  {split:4s} {stratum:10s} {n}")


def _fill_generated_topics(items: list, language: str, data: Path) -> None:
    """Generated items get the (masked) topic of their event, read from the corpus or the fixture."""
    missing = {i["event_id"] for i in items if i["topic"] is None}
    topics = {}
    if missing:
        from mfjax.assets import read_fixture_events

        fixture = {"zh": "ced_sample.jsonl", "en": "twitter_sample.jsonl"}[language]
        for event in read_fixture_events(fixture):
            topics[event.event_id] = privacy.mask_personal(event.topic, language)
    for item in items:
        if item["topic"] is None:
            if item["event_id"] not in topics:
                raise SystemExit(f"no topic for generated item {item['id']}")
            item["topic"] = topics[item["event_id"]]


def validation_event_ids(sample_dir: Path = _HERE) -> set:
    """Event ids that appear in the committed samples (to keep rule-writing material apart)."""
    ids = set()
    for path in sample_dir.glob("*/sample.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            ids.add(json.loads(line)["event_id"])
    return ids


if __name__ == "__main__":
    main()
