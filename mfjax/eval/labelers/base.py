"""The labeler protocol: a population of comments in, labels keyed by comment id out, plus a disk cache.

A batch is one **population** (the real comments of an event, or the generated comments of one
world) with its topic and language: English share detection compares comments within it, and the
judge needs the topic to read stance. Labels are returned keyed by comment id, never by position.
Every label row on disk records the labeler's name and version and the sha256 of the NFC text it
labelled, so a later join on a changed text is caught instead of silently misaligned.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Optional, Protocol, runtime_checkable

from mfjax.eval import schema
from mfjax.eval.text import text_hash


@dataclasses.dataclass(frozen=True)
class Comment:
    """One comment to label."""

    id: str
    text: str
    language: str
    is_repost: bool = False


@dataclasses.dataclass(frozen=True)
class Population:
    """Comments that belong together (one event's real comments, or one world's generated ones).

    `key` names the population in caches (e.g. "real/<event>" or "mf/<event>/s0").
    """

    key: str
    topic: str
    language: str
    comments: tuple

    def __post_init__(self):
        object.__setattr__(self, "comments", tuple(self.comments))
        seen = set()
        for c in self.comments:
            if c.id in seen:
                raise ValueError(f"population {self.key}: duplicate comment id {c.id!r}")
            if c.language != self.language:
                raise ValueError(f"population {self.key}: comment {c.id} is {c.language!r}, "
                                 f"the population {self.language!r}")
            seen.add(c.id)


@runtime_checkable
class Labeler(Protocol):
    """What every labeler provides."""

    name: str  # "rules", "judge", "local_llm"
    language: str  # "zh" or "en"

    @property
    def version(self) -> str:
        """Everything that changes the labels: code version, package versions, lexicon / prompt hashes."""

    def label(self, population: Population) -> dict:
        """{comment id: labels dict with every key of `schema.DIMENSIONS`} for the population.

        A comment the labeler could not finish (e.g. the judge's budget ran out) is absent from the
        result; it is never padded with a default.
        """


class LabelJoinError(ValueError):
    """A label row does not belong to the text it is joined with (id or text hash mismatch)."""


def version_slug(version: str) -> str:
    """A file-system safe folder name for a labeler version."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", version).strip("_")


def label_row(comment: Comment, labels: Mapping, labeler: Labeler) -> dict:
    """The stored row of one comment's labels."""
    return {"id": comment.id, "text_sha256": text_hash(comment.text), "labeler": labeler.name,
            "labeler_version": labeler.version, **{d: labels.get(d) for d in schema.DIMENSIONS}}


class LabelCache:
    """Label rows as JSONL under `<root>/<version slug>/<population key>.jsonl`.

    A population's file is written (atomically) once its labels are complete, so a crash never leaves
    a half file that looks complete. A cached row whose text hash differs from the comment's text is
    an error naming the file: the inputs changed under an old output directory.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, labeler: Labeler, population: Population) -> Path:
        """Where the population's labels live for this labeler version."""
        key = "/".join(version_slug(part) for part in population.key.split("/"))
        return self.root / version_slug(labeler.version) / f"{key}.jsonl"

    def load(self, labeler: Labeler, population: Population) -> Optional[dict]:
        """The cached labels of every comment of the population, or None when not all are cached."""
        path = self.path(labeler, population)
        if not path.is_file():
            return None
        rows = {}
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LabelJoinError(f"{path}: line {n}: malformed JSON ({e.msg})") from None
                rows[row["id"]] = row
        out = {}
        for c in population.comments:
            row = rows.get(c.id)
            if row is None:
                return None
            check_row(row, c, where=str(path))
            out[c.id] = {d: row.get(d) for d in schema.DIMENSIONS}
        return out

    def store(self, labeler: Labeler, population: Population, labels: Mapping) -> Path:
        """Write the population's labels (all comments must be labelled)."""
        path = self.path(labeler, population)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for c in population.comments:
                f.write(json.dumps(label_row(c, labels[c.id], labeler), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        return path


def check_row(row: Mapping, comment: Comment, *, where: str) -> None:
    """Raise `LabelJoinError` unless the row is this comment's (same id, same text hash)."""
    if row.get("id") != comment.id:
        raise LabelJoinError(f"{where}: label row {row.get('id')!r} joined with comment {comment.id!r}")
    if row.get("text_sha256") != text_hash(comment.text):
        raise LabelJoinError(f"{where}: comment {comment.id}: the stored text hash does not match the "
                             f"text now (inputs changed under an old output directory; delete it)")


def label_populations(labeler_for, populations: Iterable[Population], cache: Optional[LabelCache],
                      progress=None) -> tuple[dict, dict]:
    """Label every population, from the cache where possible.

    `labeler_for(language)` returns the labeler of a language. Returns ({comment id: labels},
    {language: labeler version}). `progress(n)` is called with the comments done after each
    population (a progress bar's update). Incomplete populations are returned as far as labelled
    and not cached.
    """
    labels: dict = {}
    versions: dict = {}
    for population in populations:
        labeler = labeler_for(population.language)
        versions[population.language] = labeler.version
        got = cache.load(labeler, population) if cache else None
        if got is None:
            got = labeler.label(population)
            unknown = set(got) - {c.id for c in population.comments}
            if unknown:
                raise LabelJoinError(f"labeler {labeler.name} returned unknown ids {sorted(unknown)[:3]}")
            if cache and len(got) == len(population.comments):
                cache.store(labeler, population, got)
        labels.update(got)
        if progress:
            progress(len(population.comments))
    return labels, versions
