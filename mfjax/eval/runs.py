"""Read simulator output folders and the real events they came from, and build the populations to label.

A run folder (written by `launch/simulate.py`) holds `manifest.json`, one `<event>.seed<k>.jsonl` per
world (one row per agent) and `<event>.seed<k>.mean_field.json`; `<event>.seed<k>.prompts.jsonl`
files and temporary files are ignored. Everything is checked before any slow work: a malformed file
or a mismatch raises `RunDataError` with one line naming the file (and line) at fault.

Ids: a real comment is `{event_id}#r{agent}`, a simulated one `{system}#{event_id}#s{seed}#{agent}`.
The real comment of a row must be the event's own text for that agent (checked by text hash), so
labels made for one run's real population are valid for every run of the same events.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from mfjax.eval.labelers.base import Comment, Population
from mfjax.eval.text import text_hash

SOURCES = ("warmup", "generated", "intervention", "key_node")
ROW_KEYS = ("event_id", "seed", "step", "agent", "real_action", "action", "source")
_WORLD_FILE = re.compile(r"^(?P<stem>.+)\.seed(?P<seed>-?\d+)\.jsonl$")
_REPOST_PREFIX = "转发微博"


class RunDataError(ValueError):
    """Bad simulator output; the message names the file (and line) at fault."""


@dataclasses.dataclass
class World:
    """One (event, seed) of a run: its rows in agent order."""

    event_id: str
    seed: int
    rows: list
    path: str


@dataclasses.dataclass
class Run:
    """One simulator output folder."""

    name: str  # the system's name in tables ("mf", "state", ...)
    path: str
    manifest: dict
    worlds: list  # [World]

    @property
    def config(self) -> dict:
        return self.manifest.get("config", {})

    @property
    def rollout(self) -> dict:
        return self.config.get("rollout", {})

    @property
    def algorithm(self) -> Optional[str]:
        return self.rollout.get("algorithm") or self.config.get("alg")

    @property
    def step_size(self) -> Optional[int]:
        return self.rollout.get("step_size")

    @property
    def warmup_steps(self) -> int:
        return int(self.rollout.get("warmup_steps") or 0)

    def world_keys(self) -> set:
        return {(w.event_id, w.seed) for w in self.worlds}


def _load_json(path: Path) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise RunDataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except OSError as e:
        raise RunDataError(f"{path}: cannot read ({e.strerror})") from None


def parse_runs_flag(value: Sequence[str] | str) -> list:
    """[(name or None, path)] from "mf=runs/mf,state=runs/state" or bare paths."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        name, sep, path = item.partition("=")
        if sep and name and "/" not in name and os.sep not in name:
            out.append((name, path))
        else:
            out.append((None, item))
    return out


def read_run(path: str | os.PathLike, name: Optional[str] = None) -> Run:
    """Read and check one run folder (manifest, world files, config hashes)."""
    folder = Path(path)
    if not folder.is_dir():
        raise RunDataError(f"{folder}: no such run folder")
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise RunDataError(f"{manifest_path}: missing (is {folder} a launch/simulate.py output folder?)")
    manifest = _load_json(manifest_path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        raise RunDataError(f"{manifest_path}: expected an object with a 'config' object")
    config_hash = manifest.get("config_hash")
    worlds = []
    for file in sorted(folder.iterdir()):
        m = _WORLD_FILE.match(file.name)
        if not m or file.name.endswith(".prompts.jsonl"):
            continue
        world = _read_world(file, int(m.group("seed")))
        _check_trajectory(file, world, config_hash)
        worlds.append(world)
    if not worlds:
        raise RunDataError(f"{folder}: no <event>.seed<k>.jsonl world files")
    run = Run(name=name or "", path=str(folder), manifest=manifest, worlds=worlds)
    run.name = name or run.algorithm or folder.name
    if run.step_size is None:
        raise RunDataError(f"{manifest_path}: config.rollout.step_size missing")
    return run


def _read_world(file: Path, seed: int) -> World:
    rows = []
    with open(file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RunDataError(f"{file}: line {n}: malformed JSON ({e.msg})") from None
            missing = [k for k in ROW_KEYS if k not in row]
            if missing:
                raise RunDataError(f"{file}: line {n}: missing keys {missing}")
            if row["source"] not in SOURCES:
                raise RunDataError(f"{file}: line {n}: unknown source {row['source']!r}")
            if row["seed"] != seed:
                raise RunDataError(f"{file}: line {n}: seed {row['seed']} but the file name says {seed}")
            if not isinstance(row["action"], str) or not isinstance(row["real_action"], str):
                raise RunDataError(f"{file}: line {n}: action / real_action must be strings")
            rows.append(row)
    if not rows:
        raise RunDataError(f"{file}: no rows")
    event_ids = {r["event_id"] for r in rows}
    if len(event_ids) != 1:
        raise RunDataError(f"{file}: rows of several events {sorted(event_ids)[:3]}")
    agents = [r["agent"] for r in rows]
    if len(set(agents)) != len(agents):
        raise RunDataError(f"{file}: duplicate agent rows")
    rows.sort(key=lambda r: r["agent"])
    return World(event_id=rows[0]["event_id"], seed=seed, rows=rows, path=str(file))


def _check_trajectory(file: Path, world: World, config_hash: Optional[str]) -> None:
    """The mean-field file must exist, match the world, and carry the manifest's config hash if any."""
    traj = file.with_name(file.name[: -len(".jsonl")] + ".mean_field.json")
    if not traj.is_file():
        return  # the trajectory is not needed for evaluation; its absence is not an error
    data = _load_json(traj)
    if not isinstance(data, dict):
        raise RunDataError(f"{traj}: expected a JSON object")
    if data.get("event_id") not in (None, world.event_id) or data.get("seed") not in (None, world.seed):
        raise RunDataError(f"{traj}: event/seed {data.get('event_id')}/{data.get('seed')} do not match {file.name}")
    file_hash = data.get("config_hash")
    if config_hash is not None and file_hash is not None and file_hash != config_hash:
        raise RunDataError(f"{traj}: config_hash {file_hash} differs from manifest.json's {config_hash} "
                           f"(the folder mixes worlds of different runs)")
    if config_hash is not None and file_hash is None:
        raise RunDataError(f"{traj}: no config_hash although manifest.json has one (left from an older run?)")


def check_comparable(runs: Sequence[Run]) -> None:
    """Runs in one table must share step size, warm-up, events and agents (an error names the runs)."""
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise RunDataError(f"--runs: duplicate system names {names}; name them, e.g. --runs=mf=DIR,state=DIR")
    base = runs[0]
    for run in runs[1:]:
        for what, a, b in (("step_size", base.step_size, run.step_size),
                           ("warmup_steps", base.warmup_steps, run.warmup_steps)):
            if a != b:
                raise RunDataError(f"--runs: {base.name} and {run.name} differ in {what} ({a} vs {b})")
        ea = {w.event_id for w in base.worlds}
        eb = {w.event_id for w in run.worlds}
        if ea != eb:
            raise RunDataError(f"--runs: {base.name} and {run.name} cover different events "
                               f"(only in {base.name}: {sorted(ea - eb)[:3]}, only in {run.name}: {sorted(eb - ea)[:3]})")
        agents_a = {w.event_id: len(w.rows) for w in base.worlds}
        for w in run.worlds:
            if agents_a[w.event_id] != len(w.rows):
                raise RunDataError(f"--runs: {base.name} and {run.name} differ in agents for event {w.event_id} "
                                   f"({agents_a[w.event_id]} vs {len(w.rows)} in {w.path})")


def events_source(runs: Sequence[Run], override: Optional[str]) -> tuple[str, Optional[str], str]:
    """(events path, split, format) for the runs: the flag when given, else the manifests' (which must agree)."""
    if override:
        return override, None, "auto"
    sources = {(r.config.get("events"), r.config.get("split"), r.config.get("events_format", "auto")) for r in runs}
    if len(sources) != 1:
        raise RunDataError(f"--runs: the manifests name different event sources {sorted(map(str, sources))}; "
                           f"pass --events")
    path, split, fmt = sources.pop()
    if not path:
        raise RunDataError(f"{runs[0].path}/manifest.json: config.events missing; pass --events")
    if not Path(path).exists():
        raise RunDataError(f"{runs[0].path}/manifest.json: events {path} not found here; pass --events=<path>")
    return path, split, fmt or "auto"


def load_events(path: str, event_ids: Iterable[str], *, split: Optional[str] = None, fmt: str = "auto") -> dict:
    """{event_id: Event} for the wanted ids (an id missing from the source is an error)."""
    from mfjax.data.sources import detect_format, iter_events

    wanted = set(event_ids)
    found = {}
    if (fmt == "auto" and detect_format(path) == "ced") or fmt == "ced":
        # A CED root is 600+ files: read the wanted events by name instead of walking them all.
        from mfjax.data import weibo

        for event_id in sorted(wanted):
            try:
                found[event_id] = weibo.read_ced_event(path, event_id)
            except (FileNotFoundError, ValueError) as e:
                raise RunDataError(f"--events {path}: event {event_id} of the runs: {e}") from None
        return found
    for event in iter_events(path, fmt=fmt, split=split):
        if event.event_id in wanted:
            found[event.event_id] = event
        if len(found) == len(wanted):
            break
    missing = wanted - set(found)
    if missing:
        raise RunDataError(f"--events {path}: events {sorted(missing)[:3]} of the runs are not there")
    return found


def check_real_actions(runs: Sequence[Run], events: Mapping) -> None:
    """Every row's real_action must be the event's text for that agent (hash compare)."""
    for run in runs:
        for world in run.worlds:
            agents = events[world.event_id].agents
            for row in world.rows:
                i = row["agent"]
                if i >= len(agents) or text_hash(agents[i].action) != text_hash(row["real_action"]):
                    raise RunDataError(f"{world.path}: agent {i}: real_action differs from the event's text "
                                       f"(outputs from other data? pass the right --events)")


def marked_repost(text: str, language: str) -> bool:
    """Whether the reader marked the text as a repost (zh "转发微博" + chain, en "RT @")."""
    if language == "zh":
        return text == _REPOST_PREFIX or text.startswith(_REPOST_PREFIX + "//")
    return text.lstrip().upper().startswith("RT @")


def real_id(event_id: str, agent: int) -> str:
    """Id of a real comment."""
    return f"{event_id}#r{agent}"


def sim_id(system: str, event_id: str, seed: int, agent: int) -> str:
    """Id of a simulated comment."""
    return f"{system}#{event_id}#s{seed}#{agent}"


def real_population(event, agents: Iterable[int]) -> Population:
    """The real comments of the given agents of an event."""
    comments = [Comment(real_id(event.event_id, i), event.agents[i].action, event.language,
                        marked_repost(event.agents[i].action, event.language)) for i in sorted(set(agents))]
    return Population(key=f"real/{event.event_id}", topic=event.topic, language=event.language, comments=comments)


def sim_population(run: Run, world: World, event, sources: Sequence[str]) -> Population:
    """The simulated comments of a world whose rows have one of `sources`."""
    comments = [Comment(sim_id(run.name, world.event_id, world.seed, r["agent"]), r["action"], event.language,
                        marked_repost(r["action"], event.language))
                for r in world.rows if r["source"] in sources]
    return Population(key=f"{run.name}/{world.event_id}/s{world.seed}", topic=event.topic,
                      language=event.language, comments=comments)
