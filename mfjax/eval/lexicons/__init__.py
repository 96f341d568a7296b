"""Lexicon data of the rule labelers: the project's own files here, third-party lexicons read at runtime.

The JSON files of this folder (emoticon maps, cue lists, stop words) are written for mfjax (see
SOURCE.md). Research-only lexicons are never copied into the repository: DUTIR (Chinese emotions)
and NRC (English emotions) are read from an installed `cntext` package, whose data folder is found
without importing cntext (its import pulls pandas and more, and it is installed with --no-deps).
Without cntext the rule labelers work from emoticons and cues alone and their version says so.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.resources
import importlib.util
import json
import re
from pathlib import Path
from typing import Optional

FILES = ("emoticons_zh.json", "cues_zh.json", "emoticons_en.json", "cues_en.json")


@functools.lru_cache(maxsize=None)
def load(name: str) -> dict:
    """A lexicon file of this folder, parsed (the "_about" entry dropped)."""
    if name not in FILES:
        raise ValueError(f"unknown lexicon {name!r}; have {FILES}")
    text = (importlib.resources.files(__name__) / name).read_text(encoding="utf-8")
    data = json.loads(text)
    data.pop("_about", None)
    return data


@functools.lru_cache(maxsize=None)
def files_hash(*names: str) -> str:
    """Short sha256 over the named lexicon files (part of a rule labeler's version)."""
    h = hashlib.sha256()
    for name in names:
        h.update((importlib.resources.files(__name__) / name).read_bytes())
    return h.hexdigest()[:6]


def compile_any(patterns) -> re.Pattern:
    """One regex matching any of the patterns (a never-matching one for an empty list)."""
    patterns = list(patterns)
    if not patterns:
        return re.compile(r"(?!x)x")
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.I)


def _cntext_data_dir() -> Optional[Path]:
    spec = importlib.util.find_spec("cntext")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "io" / "data"
        if candidate.is_dir():
            return candidate
    return None


def package_version(package: str) -> Optional[str]:
    """The installed version of a package the labelers read (part of a labeler's version), or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cntext_version() -> Optional[str]:
    """The installed cntext version, or None."""
    return package_version("cntext")


@functools.lru_cache(maxsize=None)
def cntext_dictionary(file_name: str) -> Optional[dict]:
    """{category: [words]} of a cntext lexicon YAML (e.g. zh_common_DUTIR.yaml), or None when absent."""
    directory = _cntext_data_dir()
    if directory is None or not (directory / file_name).is_file():
        return None
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(directory / file_name, encoding="utf-8") as f:
        data = yaml.load(f, Loader=loader)
    return {str(k): [str(w) for w in v] for k, v in data["Dictionary"].items()}


def word_to_states(dictionary: Optional[dict], mapping: dict, *, min_len: int = 1) -> dict:
    """{word: (state, ...)} from a category dictionary and a category → state mapping."""
    out: dict = {}
    if not dictionary:
        return out
    for category, state in mapping.items():
        for word in dictionary.get(category, ()):
            if len(word) >= min_len:
                out.setdefault(word, set()).add(state)
    return {w: tuple(sorted(s)) for w, s in out.items()}
