"""One entry point for every event source: a JSONL file, a single-event JSON file, a rumdect directory,
or a CED root."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional

from mfjax.data import jsonl, twitter, weibo
from mfjax.data.events import Event, EventDataError

FORMATS = ("auto", "jsonl", "json", "rumdect", "ced")


def detect_format(path: str | os.PathLike) -> str:
    """'json' for a ``.json`` file (one event), 'jsonl' for another file, 'ced' for a directory with
    ``original-microblog/``, else 'rumdect'."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no events at {p}")
    if p.is_file():
        return "json" if p.suffix.lower() == ".json" else "jsonl"
    if (p / "original-microblog").is_dir():
        return "ced"
    return "rumdect"


def read_single_event(path: str | os.PathLike) -> Event:
    """One event from a ``.json`` file, by its shape: a rumdect event (an array of post records), a generic
    event object (``event_id``, ``topic``, ``agents``, as one line of the JSONL format), or a Twitter event
    (an object of tweet id -> [time, text]). Anything else is an error naming the file."""
    data = weibo.load_json(path)
    if isinstance(data, list):
        return weibo.read_rumdect_event(path)
    if isinstance(data, dict) and "agents" in data:
        return jsonl.event_from_dict(data, path=path, line=1)
    if isinstance(data, dict) and data and all(isinstance(k, str) and k.isdigit() for k in data):
        return twitter.read_twitter_event(path)[0]
    raise EventDataError("not a single event: expected a rumdect array of post records, an event object with "
                         "'event_id', 'topic' and 'agents', or a Twitter object of tweet id -> [time, text] "
                         "(a CED event is a folder: pass the CED root)", path=path)


def iter_events(path: str | os.PathLike, *, fmt: str = "auto", split: Optional[str] = None,
                limit: Optional[int] = None) -> Iterator[Event]:
    """Events from ``path`` in a deterministic order.

    ``split`` picks a sub-directory of a rumdect tree (e.g. 'train' / 'test' of ``Weibo/``) when it
    exists; ``limit`` stops after that many events.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "json":
        if limit is None or limit > 0:
            yield read_single_event(path)
    elif fmt == "jsonl":
        for n, event in enumerate(jsonl.iter_jsonl(path)):
            if limit is not None and n >= limit:
                return
            yield event
    elif fmt == "ced":
        yield from weibo.iter_ced_dir(path, limit=limit)
    else:
        directory = Path(path)
        if split is not None:
            if not (directory / split).is_dir():
                raise FileNotFoundError(f"{directory} has no split folder {split!r}")
            directory = directory / split
        yield from weibo.iter_rumdect_dir(directory, limit=limit)
