"""Small data files shipped inside the package (found through importlib.resources when installed).

`events/` holds a few real events in the generic JSONL format, cut short and stripped of personal
data, for tests and smoke runs; `make_fixture.py` regenerates them from the shared corpora.
"""

from __future__ import annotations

import importlib.resources

FIXTURE_FILES = ("ced_sample.jsonl", "rumdect_sample.jsonl", "twitter_sample.jsonl")


def events_path(name: str):
    """Path (a `Traversable`) of a shipped event file under `events/`."""
    if name not in FIXTURE_FILES:
        raise ValueError(f"unknown fixture {name!r}; have {FIXTURE_FILES}")
    return importlib.resources.files(__name__) / "events" / name


def read_fixture_events(name: str) -> list:
    """The events of a shipped fixture file, read with `mfjax.data.jsonl`."""
    from mfjax.data import jsonl

    with importlib.resources.as_file(events_path(name)) as path:
        return jsonl.read_jsonl(path)
