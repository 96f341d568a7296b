"""Readers for the two Weibo rumour corpora: rumdect (Ma et al. 2016) and CED (Song et al. 2019).

Both become `mfjax.data.events.Event`s: topic = the source post's text, agents = the responders
sorted by time, each agent's action = its text, with the SPEC rule for an empty text
("转发微博" + the repost chain). Malformed input raises `EventDataError` naming the file and the
record index; anything skipped on purpose is counted in a logged warning, never dropped silently.

Time zones: rumdect `t` and the CED source post `time` are unix seconds already. CED reaction
`date` strings ("YYYY-MM-DD HH:MM:SS") are Beijing local time, read as UTC+8 (China has had no
daylight saving since 1991, so a fixed offset is exact). Checked on the 600 shared CED events: read
this way, the median first reaction comes about one minute after its source post.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
from pathlib import Path
from typing import Iterator, Mapping, Optional

from mfjax.data.events import Agent, Event, EventDataError, sort_agents

logger = logging.getLogger(__name__)

# Weibo's own text for a repost written without a comment (SPEC §2).
REPOST_TEXT = "转发微博"

RUMDECT_PROFILE_KEYS = (
    "user_location", "user_description", "gender", "friends_count", "followers_count",
    "reposts_count", "comments_count", "attitudes_count", "verified", "verified_type",
)

CED_LABEL_DIRS = {"rumor-repost": "rumor", "non-rumor-repost": "non-rumor"}
CED_SOURCE_DIR = "original-microblog"
_SHANGHAI = datetime.timezone(datetime.timedelta(hours=8), "Asia/Shanghai")
# Weibo shows dates of the current year as "MM月DD日 HH:MM": the year is lost at crawl time.
_YEARLESS_DATE = re.compile(r"^\d{1,2}月\d{1,2}日 \d{1,2}:\d{2}$")

# How CED empty reaction texts become actions; see `read_ced_event`.
CED_EMPTY_TEXT_MODES = ("chain", "source")


def load_json(path) -> object:
    """Parse a JSON file; a syntax error becomes `EventDataError` naming the file and position."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise EventDataError(f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}",
                             path=path) from e
    except UnicodeDecodeError as e:
        raise EventDataError(f"not UTF-8: {e}", path=path) from e


def _check_list_of_dicts(data, path) -> list:
    if not isinstance(data, list):
        raise EventDataError(f"expected a JSON array of records, got {type(data).__name__}",
                             path=path)
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise EventDataError(f"expected an object, got {type(record).__name__}",
                                 path=path, index=i)
    return data


def _number(value, key, path, index) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EventDataError(f"field {key!r} must be a number, got {value!r}",
                             path=path, index=index)
    return float(value)


def _profile(record: Mapping, path, index) -> dict:
    """Profile fields of a rumdect record, type-checked; absent keys are None."""
    out = {}
    for key in RUMDECT_PROFILE_KEYS:
        value = record.get(key)
        if value is None:
            out[key] = None
            continue
        if key == "verified":
            ok = isinstance(value, bool)
        elif key in ("user_location", "user_description", "gender"):
            ok = isinstance(value, str)
        else:
            ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok:
            raise EventDataError(f"field {key!r} has an unexpected value {value!r}",
                                 path=path, index=index)
        out[key] = value
    return out


def rumdect_action(record: Mapping, *, path=None, index: Optional[int] = None) -> str:
    """The real action of a rumdect record: `text`, or "转发微博" + `original_text` when empty."""
    text = record.get("text")
    original = record.get("original_text")
    if text is None and original is None:
        raise EventDataError("record has no text (both 'text' and 'original_text' missing)",
                             path=path, index=index)
    for key, value in (("text", text), ("original_text", original)):
        if value is not None and not isinstance(value, str):
            raise EventDataError(f"field {key!r} must be a string, got {value!r}",
                                 path=path, index=index)
    if text:
        return text
    return REPOST_TEXT + (original or "")


def read_rumdect_event(path, *, label: Optional[str] = None) -> Event:
    """Read one rumdect event file (a JSON array of 30-field post records, SPEC §1).

    The topic is the record whose `parent` is null. If several records have a null parent, the
    first in file order is the topic and the others stay agents (with a warning), as in the
    reference, which takes the file's first record as the topic.
    """
    path = Path(path)
    records = _check_list_of_dicts(load_json(path), path)
    sources = [i for i, r in enumerate(records) if r.get("parent") is None]
    if not sources:
        raise EventDataError("no source post (no record with a null 'parent')", path=path)
    if len(sources) > 1:
        logger.warning("%s: %d records have a null parent; record %d is the topic, the other "
                       "%d are kept as agents", path, len(sources), sources[0], len(sources) - 1)
    source_index = sources[0]
    agents = []
    topic = topic_time = None
    for i, record in enumerate(records):
        if "t" not in record or record["t"] is None:
            raise EventDataError("record has no time 't'", path=path, index=i)
        time = _number(record["t"], "t", path, i)
        action = rumdect_action(record, path=path, index=i)
        if i == source_index:
            # The source post's own text is the topic; the repost rule does not apply to it.
            topic, topic_time = (record.get("text") or record.get("original_text") or ""), time
            continue
        if record.get("uid") is None:
            raise EventDataError("record has no 'uid'", path=path, index=i)
        agents.append(Agent(uid=str(record["uid"]), time=time, action=action,
                            **_profile(record, path, i)))
    return Event(event_id=path.stem, topic=topic, agents=sort_agents(agents), language="zh",
                 label=label, source_path=str(path), topic_time=topic_time)


def list_json_files(directory) -> list:
    """The `*.json` files of a directory, sorted by name (a deterministic order)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"not a directory: {directory}")
    return sorted(p for p in directory.iterdir() if p.suffix == ".json" and p.is_file())


def iter_rumdect_dir(directory, *, labels: Optional[Mapping[str, str]] = None,
                     limit: Optional[int] = None) -> Iterator[Event]:
    """Yield the events of a rumdect directory in file-name order.

    `labels` maps an event id (file stem) to its label; `limit` stops after that many events.
    """
    for n, path in enumerate(list_json_files(directory)):
        if limit is not None and n >= limit:
            return
        yield read_rumdect_event(path, label=(labels or {}).get(path.stem))


def read_rumdect_dir(directory, *, labels: Optional[Mapping[str, str]] = None,
                     limit: Optional[int] = None) -> list:
    """All events of a rumdect directory (e.g. `Weibo/test`) in file-name order."""
    return list(iter_rumdect_dir(directory, labels=labels, limit=limit))


def parse_ced_date(value: str) -> float:
    """Unix seconds of a CED "YYYY-MM-DD HH:MM:SS" date, read as Beijing time (UTC+8)."""
    parsed = datetime.datetime.strptime(value, "%Y-%m-%d %H:%M:%S")
    return parsed.replace(tzinfo=_SHANGHAI).timestamp()


def _ced_source_time(value, path) -> float:
    # Most source posts carry unix seconds; a few carry Weibo's API date string.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.datetime.strptime(value, "%a %b %d %H:%M:%S %z %Y").timestamp()
        except ValueError:
            pass
    raise EventDataError(f"source post has no usable 'time': {value!r}", path=path)


def ced_event_names(root) -> list:
    """(name, label) of every CED event under `root`, sorted by name then label folder."""
    root = Path(root)
    out = []
    for folder, label in sorted(CED_LABEL_DIRS.items()):
        directory = root / folder
        if directory.is_dir():
            out.extend((p.stem, label) for p in list_json_files(directory))
    if not out:
        raise FileNotFoundError(f"no CED repost folders {sorted(CED_LABEL_DIRS)} under {root}")
    return sorted(out)


def _ced_label_of(root: Path, name: str) -> str:
    found = [label for folder, label in CED_LABEL_DIRS.items()
             if (root / folder / f"{name}.json").is_file()]
    if len(found) != 1:
        raise EventDataError(f"event {name} must be in exactly one of {sorted(CED_LABEL_DIRS)}, "
                             f"found in {len(found)}", path=root)
    return found[0]


def _chain_texts(records: list) -> dict:
    """Repost chain of each reaction, as rumdect's `original_text` would hold it without names.

    rumdect writes a repost of a repost as "own text//@name:parent chain"; CED has no names and
    names are personal data anyway, so the chain here is "own text//parent chain".
    """
    by_mid = {}
    for r in records:
        by_mid.setdefault(r["mid"], r)
    memo: dict = {}

    def chain(mid: str) -> str:
        # Iterative walk up the parents: chains can be hundreds deep, and a loop must end.
        path, seen = [], set()
        cur = mid
        while cur in by_mid and cur not in memo and cur not in seen:
            seen.add(cur)
            path.append(cur)
            cur = by_mid[cur].get("parent") or ""
        tail = memo.get(cur, "")
        for m in reversed(path):
            own = by_mid[m]["text"]
            parent = by_mid[m].get("parent") or ""
            tail = own + ("//" + tail if parent in by_mid and tail else "")
            memo[m] = tail
        return memo.get(mid, "")

    return {mid: chain(mid) for mid in by_mid}


def read_ced_event(root, name: str, *, empty_text: str = "chain") -> Event:
    """Read one CED event: source post from `original-microblog/`, reactions from the label folder.

    Reposters have no profile, so every agent's profile fields are None. An empty reaction text
    (a plain repost) follows the SPEC rule "转发微博" + the repost chain: with `empty_text="chain"`
    (default) the chain is rebuilt from `parent` links, so a plain repost of the source reads
    "转发微博" (what Weibo itself writes, and what every such repost in rumdect reads) and a plain
    repost of a comment reads "转发微博//<that comment's chain>". `empty_text="source"` appends the
    source post text instead ("转发微博" + topic).

    Reactions whose date lacks the year ("MM月DD日 HH:MM", 8 of ~277k in the shared sample) cannot
    be placed in time; they are skipped with a warning that counts them. Exact duplicate `mid`s
    (the crawl lists some posts twice) keep their first occurrence, also counted in a warning.
    """
    if empty_text not in CED_EMPTY_TEXT_MODES:
        raise ValueError(f"empty_text must be one of {CED_EMPTY_TEXT_MODES}, got {empty_text!r}")
    root = Path(root)
    name = name[:-5] if name.endswith(".json") else name
    label = _ced_label_of(root, name)
    source_path = root / CED_SOURCE_DIR / f"{name}.json"
    source = load_json(source_path)
    if not isinstance(source, dict):
        raise EventDataError("source post must be a JSON object", path=source_path)
    topic = source.get("text")
    if not isinstance(topic, str):
        raise EventDataError("source post has no 'text'", path=source_path)
    topic_time = _ced_source_time(source.get("time"), source_path)

    folder = next(f for f, lab in CED_LABEL_DIRS.items() if lab == label)
    path = root / folder / f"{name}.json"
    records = _check_list_of_dicts(load_json(path), path)
    kept, times = [], []
    yearless = duplicates = 0
    seen_mids = set()
    for i, r in enumerate(records):
        date = r.get("date")
        if not isinstance(date, str) or not date:
            raise EventDataError("record has no time 'date'", path=path, index=i)
        if not isinstance(r.get("text"), str):
            raise EventDataError("record has no text", path=path, index=i)
        if not isinstance(r.get("mid"), str) or not r["mid"]:
            raise EventDataError("record has no 'mid'", path=path, index=i)
        if _YEARLESS_DATE.match(date):
            yearless += 1
            continue
        try:
            time = parse_ced_date(date)
        except ValueError as e:
            raise EventDataError(f"unparseable date {date!r}", path=path, index=i) from e
        if r["mid"] in seen_mids:
            duplicates += 1
            continue
        seen_mids.add(r["mid"])
        kept.append(r)
        times.append(time)
    if yearless:
        logger.warning("%s: skipped %d reaction(s) whose date has no year", path, yearless)
    if duplicates:
        logger.warning("%s: skipped %d duplicate reaction(s) (same mid)", path, duplicates)

    chains = _chain_texts(kept) if empty_text == "chain" else {}
    agents = []
    for r, time in zip(kept, times):
        if r["text"]:
            action = r["text"]
        elif empty_text == "chain":
            # The chain of an empty repost is "//" + its parent's chain: rumdect's rule verbatim.
            action = REPOST_TEXT + chains[r["mid"]]
        else:
            action = REPOST_TEXT + topic
        uid = "" if r.get("uid") is None else str(r["uid"])
        agents.append(Agent(uid=uid, time=time, action=action))
    return Event(event_id=name, topic=topic, agents=sort_agents(agents), language="zh",
                 label=label, source_path=str(path), topic_time=topic_time)


def iter_ced_dir(root, *, limit: Optional[int] = None, label: Optional[str] = None,
                 empty_text: str = "chain") -> Iterator[Event]:
    """Yield CED events under `root` sorted by name; `label` keeps only 'rumor' or 'non-rumor'."""
    n = 0
    for name, event_label in ced_event_names(root):
        if label is not None and event_label != label:
            continue
        if limit is not None and n >= limit:
            return
        n += 1
        yield read_ced_event(root, name, empty_text=empty_text)


def read_ced_dir(root, *, limit: Optional[int] = None, label: Optional[str] = None,
                 empty_text: str = "chain") -> list:
    """All CED events under `root` (see `iter_ced_dir`)."""
    return list(iter_ced_dir(root, limit=limit, label=label, empty_text=empty_text))

