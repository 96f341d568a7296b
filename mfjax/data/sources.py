"""One entry point for every event source: a JSONL file, a rumdect directory, or a CED root."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional

from mfjax.data import jsonl, weibo
from mfjax.data.events import Event

FORMATS = ("auto", "jsonl", "rumdect", "ced")


def detect_format(path: str | os.PathLike) -> str:
    """'jsonl' for a file, 'ced' for a directory with ``original-microblog/``, else 'rumdect'."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no events at {p}")
    if p.is_file():
        return "jsonl"
    if (p / "original-microblog").is_dir():
        return "ced"
    return "rumdect"


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
    if fmt == "jsonl":
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
