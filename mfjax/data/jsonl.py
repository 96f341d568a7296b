"""A generic JSONL event format, for domains and languages beyond the Weibo corpora.

One event per line:

    {"event_id": "...", "language": "zh" | "en", "topic": "...", "label": "...",  # label optional
     "topic_time": 1347334462.0,                                                # optional
     "agents": [{"uid": "...", "time": 1347334548.0, "text": "...",             # uid optional
                 "profile": {"gender": "f", "followers_count": 12, ...}}]}      # profile optional

`time` is unix seconds; profile keys are those of `mfjax.data.events.PROFILE_FIELDS` (unknown keys
are an error, so a typo cannot silently turn a field into "unknown"). Agents are sorted by time on
reading (stable). Errors name the file and the 1-based line number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional

from mfjax.data.events import PROFILE_FIELDS, Agent, Event, EventDataError, sort_agents

_EVENT_KEYS = {"event_id", "language", "topic", "label", "topic_time", "agents"}
_AGENT_KEYS = {"uid", "time", "text", "profile"}


def event_to_dict(event: Event) -> dict:
    """The JSONL object of an event (known profile fields only; None values are left out)."""
    out = {"event_id": event.event_id, "language": event.language, "topic": event.topic}
    if event.label is not None:
        out["label"] = event.label
    if event.topic_time is not None:
        out["topic_time"] = event.topic_time
    agents = []
    for a in event.agents:
        item = {"uid": a.uid, "time": a.time, "text": a.action}
        profile = a.profile()
        if profile:
            item["profile"] = profile
        agents.append(item)
    out["agents"] = agents
    return out


def event_from_dict(obj: Mapping, *, path=None, line: Optional[int] = None) -> Event:
    """Build an `Event` from one JSONL object; problems raise `EventDataError` naming the line."""

    def fail(message):
        return EventDataError(message, path=path, index=line, unit="line")

    if not isinstance(obj, dict):
        raise fail(f"expected a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - _EVENT_KEYS
    if unknown:
        raise fail(f"unknown event keys {sorted(unknown)}")
    for key in ("event_id", "language", "topic"):
        if not isinstance(obj.get(key), str):
            raise fail(f"missing or non-string {key!r}")
    if obj.get("label") is not None and not isinstance(obj["label"], str):
        raise fail("'label' must be a string")
    agents_raw = obj.get("agents")
    if not isinstance(agents_raw, list):
        raise fail("'agents' must be a list")
    agents = []
    for j, item in enumerate(agents_raw):
        where = f"agent {j}: "
        if not isinstance(item, dict):
            raise fail(where + "expected an object")
        unknown = set(item) - _AGENT_KEYS
        if unknown:
            raise fail(where + f"unknown keys {sorted(unknown)}")
        if "time" not in item or item["time"] is None:
            raise fail(where + "no 'time'")
        if not isinstance(item.get("text"), str):
            raise fail(where + "no 'text'")
        profile = item.get("profile") or {}
        if not isinstance(profile, dict):
            raise fail(where + "'profile' must be an object")
        unknown = set(profile) - set(PROFILE_FIELDS)
        if unknown:
            raise fail(where + f"unknown profile keys {sorted(unknown)}")
        try:
            agents.append(Agent(uid=str(item.get("uid", "")), time=item["time"],
                                action=item["text"], **profile))
        except (TypeError, ValueError) as e:
            raise fail(where + str(e)) from e
    try:
        return Event(event_id=obj["event_id"], topic=obj["topic"], agents=sort_agents(agents),
                     language=obj["language"], label=obj.get("label"),
                     source_path=None if path is None else f"{path}:{line}",
                     topic_time=obj.get("topic_time"))
    except (TypeError, ValueError) as e:
        raise fail(str(e)) from e


def iter_jsonl(path) -> Iterator[Event]:
    """Yield the events of a JSONL file in line order (blank lines are ignored)."""
    path = Path(path)
    with open(path, "r", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EventDataError(f"malformed JSON at column {e.colno}: {e.msg}",
                                     path=path, index=line_no, unit="line") from e
            yield event_from_dict(obj, path=path, line=line_no)


def read_jsonl(path) -> list:
    """All events of a JSONL file."""
    return list(iter_jsonl(path))


def write_jsonl(events: Iterable[Event], path) -> int:
    """Write events one per line (UTF-8, non-ASCII kept readable); returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for event in events:
            f.write(json.dumps(event_to_dict(event), ensure_ascii=False) + "\n")
            n += 1
    return n
