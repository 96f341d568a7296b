"""Host side of a rollout: events (× seeds) tokenized once into fixed-width arrays.

An event is encoded once (its topic, every agent's state and real action, as tokens); a *world* is an
encoded event with a seed and its interventions. Worlds are stacked into :class:`RolloutInputs`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import zlib
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mfjax.data.events import Event, select_agents
from mfjax.engine.generate import pad_rows_host
from mfjax.sim import rollout as R
from mfjax.sim import templates as T
from mfjax.sim.prompts import TokenTemplates

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Override:
    """Replace (intervention, with ``text``) or reveal (key node) the action at (step, position).

    ``position`` is 0-based within the step; ``event_id`` None applies to every event.
    """

    step: int
    position: int
    kind: str  # 'intervention' or 'key_node'
    text: str | None = None
    event_id: str | None = None


# The reference's intervention: four doubting comments at step 4 (SPEC §2).
REFERENCE_INTERVENTIONS = tuple(
    Override(step=4, position=p, kind="intervention", text=t)
    for p, t in zip((1, 3, 5, 7), ("真的假的？", "求真相", "我不相信，奥运会又不是闹着玩的？", "等待真相，不要传谣！请大家理智看待！！"))
)


def read_overrides(path: str) -> list[Override]:
    """Reads an overrides JSON file: ``{"interventions": [{"step", "position", "text", "event_id"?}],
    "key_nodes": [{"step", "position", "event_id"?}]}`` (either list may be absent)."""
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(spec, dict) or set(spec) - {"interventions", "key_nodes"}:
        raise ValueError(f"{path}: expected an object with 'interventions' and/or 'key_nodes' lists")
    out = []
    for kind, key in (("intervention", "interventions"), ("key_node", "key_nodes")):
        for i, item in enumerate(spec.get(key, [])):
            try:
                text = item.get("text")
                if kind == "intervention" and not isinstance(text, str):
                    raise KeyError("text")
                out.append(Override(step=int(item["step"]), position=int(item["position"]), kind=kind,
                                    text=text, event_id=item.get("event_id")))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}: {key}[{i}] is missing or has a bad field ({e})") from None
    return out


@dataclasses.dataclass
class EncodedEvent:
    """An event's token pieces (Python lists), shared by all of its seeds."""

    event: Event
    num_agents: int
    policy_head: list[int]
    mf_head: list[int]
    agent_part: list[list[int]]
    mf_state_line: list[list[int]]
    real_action: list[list[int]]
    followers: list[int]
    truncated_actions: int


def encode_event(event: Event, tokenizer, tt: TokenTemplates, *, num_agents: int, step_size: int,
                 max_action_tokens: int, algorithm: str, mf_with_states: bool, strict: bool = True) -> EncodedEvent:
    """Tokenizes an event's topic, agents' states and real actions (the first ``num_agents``)."""
    if event.language != tt.language:
        raise ValueError(f"event {event.event_id} ({event.source_path}) is in {event.language!r} but the "
                         f"templates are {tt.language!r}")
    agents = select_agents(event, num_agents, strict=strict)
    states = [T.state_text(a, language=event.language) for a in agents]
    actions, truncated = [], 0
    for a in agents:
        ids = tokenizer.encode(a.action)
        if len(ids) > max_action_tokens:
            truncated += 1
            ids = ids[:max_action_tokens]
        actions.append(ids)
    if truncated:
        logger.info("event %s: %d real actions cut to %d tokens", event.event_id, truncated, max_action_tokens)
    sft = algorithm == "state_sft"
    return EncodedEvent(
        event=event,
        num_agents=len(agents),
        policy_head=tokenizer.encode(tt.policy_head_text(event.topic)),
        mf_head=tokenizer.encode(tt.mf_head_pre_text(event.topic)),
        agent_part=[tokenizer.encode(tt.agent_part_text(s, state_sft=sft)) for s in states],
        mf_state_line=[tokenizer.encode(tt.mf_state_line_pre_text(i % step_size, s)) for i, s in enumerate(states)]
        if mf_with_states else [[] for _ in states],
        real_action=actions,
        followers=[-1 if a.followers_count is None else int(a.followers_count) for a in agents],
        truncated_actions=truncated,
    )


def _round_up(n: int, multiple: int = 64) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def widths_for(encoded: Sequence[EncodedEvent]) -> dict[str, int]:
    """Buffer widths (rounded up to 64 tokens so similar datasets share a compile) for these events."""
    longest = lambda rows: max((len(r) for r in rows), default=1)
    return dict(
        policy_head_width=_round_up(max(len(e.policy_head) for e in encoded)),
        agent_part_width=_round_up(max(longest(e.agent_part) for e in encoded)),
        mf_head_width=_round_up(max(len(e.mf_head) for e in encoded)),
        mf_state_line_width=max(1, max(longest(e.mf_state_line) for e in encoded)),
    )


def world_key(seed: int, event_id: str) -> jax.Array:
    """The PRNG key of (seed, event): independent of the batch the world runs in."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(event_id.encode()) & 0x7FFFFFFF)


def _rows(rows: Sequence[Sequence[int]], n: int, width: int, pad: int, what: str, event_id: str):
    """Right-padded numpy [n, width] rows of one event's ``what``; an overlong row names the event."""
    try:
        return pad_rows_host(rows, width, pad, left=False, num_rows=n)
    except ValueError as e:
        raise ValueError(f"event {event_id}: {what}: {e}") from None


def stack_worlds(worlds: Sequence[tuple[EncodedEvent, int]], rcfg: "R.RolloutConfig", tokenizer,
                 overrides: Iterable[Override] = ()) -> R.RolloutInputs:
    """Stacks (encoded event, seed) worlds into :class:`RolloutInputs` (agent slots padded to N)."""
    N, B, La, pad = rcfg.num_agents, rcfg.step_size, rcfg.max_action_tokens, rcfg.policy.pad_token_id
    overrides = list(overrides)
    for o in overrides:
        if not (0 <= o.step < rcfg.num_steps and 0 <= o.position < B):
            raise ValueError(f"override at step {o.step}, position {o.position} is outside the run "
                             f"({rcfg.num_steps} steps of {B} agents)")
    cols = {name: [] for name in ("policy_head", "policy_head_len", "mf_head", "mf_head_len", "agent_part",
                                  "agent_part_len", "mf_state_line", "mf_state_line_len", "real_action",
                                  "real_action_len", "followers", "agent_valid", "override", "override_action",
                                  "override_action_len")}
    keys = []
    for enc, seed in worlds:
        eid = enc.event.event_id
        one = lambda row, width, what: _rows([row], 1, width, pad, what, eid)
        t, n = one(enc.policy_head, rcfg.policy_head_width, "policy head")
        cols["policy_head"].append(t[0]); cols["policy_head_len"].append(n[0])
        t, n = one(enc.mf_head, rcfg.mf_head_width, "mean-field head")
        cols["mf_head"].append(t[0]); cols["mf_head_len"].append(n[0])
        t, n = _rows(enc.agent_part, N, rcfg.agent_part_width, pad, "agent prompt", eid)
        cols["agent_part"].append(t); cols["agent_part_len"].append(n)
        t, n = _rows(enc.mf_state_line, N, rcfg.mf_state_line_width, pad, "mean-field state line", eid)
        cols["mf_state_line"].append(t); cols["mf_state_line_len"].append(n)
        t, n = _rows(enc.real_action, N, La, pad, "real action", eid)
        cols["real_action"].append(t); cols["real_action_len"].append(n)
        followers = np.full((N,), -1, np.int32)
        followers[:enc.num_agents] = enc.followers
        cols["followers"].append(followers)
        valid = np.zeros((N,), bool)
        valid[:enc.num_agents] = True
        cols["agent_valid"].append(valid)
        kind = np.zeros((N,), np.int32)
        texts: list[list[int]] = [[] for _ in range(N)]
        for o in overrides:
            if o.event_id not in (None, eid):
                continue
            slot = o.step * B + o.position
            if o.kind == "intervention":
                kind[slot] = R.OVERRIDE_INTERVENTION
                texts[slot] = tokenizer.encode(o.text)[:La]
            else:
                kind[slot] = R.OVERRIDE_KEY_NODE
        t, n = _rows(texts, N, La, pad, "intervention", eid)
        cols["override"].append(kind); cols["override_action"].append(t); cols["override_action_len"].append(n)
        keys.append(world_key(seed, eid))
    arrays = {k: jnp.asarray(np.stack(v)) for k, v in cols.items()}
    return R.RolloutInputs(**arrays, world_key=jnp.stack(keys))


def pad_worlds(worlds: list, multiple: int) -> tuple[list, int]:
    """Repeats the last world so the count is a multiple of ``multiple`` (the data-parallel size);
    returns (worlds, number of real ones). The copies' outputs are discarded."""
    real = len(worlds)
    while len(worlds) % multiple:
        worlds = worlds + [worlds[-1]]
    return worlds, real


def output_name(event_id: str, seed: int) -> str:
    """File name of a world's output (event ids may hold characters unsafe in paths)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in event_id)
    return f"{safe}.seed{seed}.jsonl"


def is_done(out_dir: str, event_id: str, seed: int) -> bool:
    """Whether a world's output was fully written by an earlier run."""
    return os.path.exists(os.path.join(out_dir, output_name(event_id, seed)))
