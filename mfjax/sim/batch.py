"""Host side of a rollout: events (× seeds) tokenized once into fixed-width arrays.

An event is encoded once (its topic, every agent's state and real action, as tokens); a *world* is an
encoded event with a seed and its interventions. Worlds are stacked into :class:`RolloutInputs`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zlib
from typing import Iterable, Mapping, Sequence

import jax
import numpy as np

from mfjax.data.events import Event, select_agents
from mfjax.engine.host import pad_rows_host
from mfjax.sim import templates
from mfjax.sim.prompts import TokenTemplates
from mfjax.sim.types import OverrideKind, RolloutInputs, Widths

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
    origin: str | None = dataclasses.field(default=None, compare=False)  # "file: interventions[i]", for errors


# The reference's intervention: four doubting comments at step 4 (SPEC §2).
REFERENCE_INTERVENTIONS = tuple(
    Override(step=4, position=p, kind="intervention", text=t, origin=f"--reference_interventions[{i}]")
    for i, (p, t) in enumerate(zip((1, 3, 5, 7), ("真的假的？", "求真相", "我不相信，奥运会又不是闹着玩的？",
                                                  "等待真相，不要传谣！请大家理智看待！！")))
)


def check_overrides(overrides: Sequence[Override], num_agents: Mapping[str, int], *, step_size: int,
                    warmup_steps: int) -> list[Override]:
    """Refuses overrides that could not take effect; returns them unchanged.

    Errors (naming the entry): a step in the warm-up (its actions are the real ones anyway), a position
    outside a step of ``step_size`` agents, a negative step, an ``event_id`` that names no event, a slot past
    the end of the event it names. An override for every event (no ``event_id``) whose slot some short
    event lacks is a warning for those events. ``num_agents`` maps each event id to its agent count.
    """
    for o in overrides:
        where = o.origin or f"{o.kind} at step {o.step}, position {o.position}"
        if o.step < 0 or not 0 <= o.position < step_size:
            raise ValueError(f"{where}: step {o.step}, position {o.position} is outside a run of steps of "
                             f"{step_size} agents (positions are 0-based within a step)")
        if o.step < warmup_steps:
            raise ValueError(f"{where}: step {o.step} is a warm-up step (the first {warmup_steps}), whose actions "
                             f"are the real ones; an override there would have no effect")
        if o.event_id is not None and o.event_id not in num_agents:
            raise ValueError(f"{where}: event_id {o.event_id!r} names no event of this run")
        targets = [o.event_id] if o.event_id is not None else list(num_agents)
        slot = o.step * step_size + o.position
        short = [e for e in targets if slot >= num_agents[e]]
        if short and o.event_id is not None:
            raise ValueError(f"{where}: event {o.event_id} has {num_agents[o.event_id]} agents, "
                             f"so step {o.step}, position {o.position} (agent {slot}) does not exist")
        if short:
            logger.warning("%s: %d event(s) have no agent at step %d, position %d (e.g. %s); skipped there", where,
                           len(short), o.step, o.position, short[0])
    return list(overrides)


def read_overrides(path: str) -> list[Override]:
    """Reads an overrides JSON file: ``{"interventions": [{"step", "position", "text", "event_id"?}],
    "key_nodes": [{"step", "position", "event_id"?}]}`` (either list may be absent)."""
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read the interventions file ({e.strerror})") from None
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
                                    text=text, event_id=item.get("event_id"), origin=f"{path}: {key}[{i}]"))
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
    truncated_actions: int  # real actions cut by a user's cap (0 without one)
    step_size: int

    @property
    def num_steps(self) -> int:
        """Steps this event fills (its last step may be partial)."""
        return -(-self.num_agents // self.step_size)


def cap_action(text: str, tokenizer, max_tokens: int | None) -> tuple[list[int], bool]:
    """The tokens of ``text``, or of its longest prefix of whole characters that fits ``max_tokens``
    (never a split character); returns (tokens, whether it was cut)."""
    ids = tokenizer.encode(text)
    if max_tokens is None or len(ids) <= max_tokens:
        return ids, False
    lo, hi = 0, len(text)  # the longest character prefix whose tokens fit: bisect on characters
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenizer.encode(text[:mid])) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return tokenizer.encode(text[:lo]), True


def encode_event(event: Event, tokenizer, tt: TokenTemplates, *, num_agents: int, step_size: int,
                 algorithm: str, mf_with_states: bool, max_action_tokens: int | None = None,
                 strict: bool = True) -> EncodedEvent:
    """Tokenizes an event's topic, agents' states and real actions (the first ``num_agents``).

    Real actions are read whole; only a user's cap (``max_action_tokens``) cuts them, at a character
    boundary, and the cut ones are counted in ``truncated_actions``.
    """
    if event.language != tt.language:
        raise ValueError(f"event {event.event_id} ({event.source_path}) is in {event.language!r} but the "
                         f"templates are {tt.language!r}")
    agents = select_agents(event, num_agents, strict=strict)
    states = [templates.state_text(a, language=event.language) for a in agents]
    actions, truncated = [], 0
    for a in agents:
        ids, cut = cap_action(a.action, tokenizer, max_action_tokens)
        actions.append(ids)
        truncated += cut
    if truncated:
        logger.info("event %s: %d real actions cut to at most %d tokens (whole characters)", event.event_id,
                    truncated, max_action_tokens)
    sft = algorithm == "state_sft"
    return EncodedEvent(
        event=event,
        num_agents=len(agents),
        policy_head=tt.head_ids(tokenizer, tt.policy_head_text(event.topic)),
        mf_head=tt.head_ids(tokenizer, tt.mf_head_pre_text(event.topic)),
        agent_part=[tokenizer.encode(tt.agent_part_text(s, state_sft=sft)) for s in states],
        mf_state_line=[tokenizer.encode(tt.mf_state_line_pre_text(i % step_size, s)) for i, s in enumerate(states)]
        if mf_with_states else [[] for _ in states],
        real_action=actions,
        followers=[-1 if a.followers_count is None else int(a.followers_count) for a in agents],
        truncated_actions=truncated,
        step_size=step_size,
    )


def _round_up(n: int, multiple: int = 16) -> int:
    # 16-token steps: every padded token of a prompt buffer is computed like a real one in the prefill, so
    # coarser rounding costs compute on every step; 16 still lets similar datasets share a compile.
    return max(multiple, -(-n // multiple) * multiple)


def widths_for(encoded: Sequence[EncodedEvent], tt: TokenTemplates, tokenizer, *, step_size: int, warmup_steps: int,
               generated_width: int, mf_with_states: bool, overrides: Sequence[Override] = ()) -> Widths:
    """Static buffer widths for these events, rounded up so similar datasets share a compile.

    ``action_width`` holds the longest real action whole (and the policy's cleaned output, and every
    intervention text); ``mf_lines_width`` the longest step of agent lines a mean-field prompt can carry:
    real actions where they are used (warm-up, key nodes), the longest possible generated or intervention
    text elsewhere.
    """
    longest = lambda rows: max((len(r) for r in rows), default=1)
    texts = {o.text: len(tokenizer.encode(o.text)) for o in overrides if o.kind == "intervention"}
    action_width = _round_up(max([generated_width, *texts.values()] + [longest(e.real_action) for e in encoded]))
    line_pre = tt.mf_line_pre.lengths
    line_post = len((tt.mf_state_line_post if mf_with_states else tt.mf_line_post).tokens)
    lines_width = 0
    for enc in encoded:
        kinds = {(o.step, o.position): o for o in overrides if o.event_id in (None, enc.event.event_id)}
        for k in range(enc.num_steps):
            total = 0
            for j, a in enumerate(range(k * step_size, min((k + 1) * step_size, enc.num_agents))):
                o = kinds.get((k, j))
                if k < warmup_steps or (o is not None and o.kind == "key_node"):
                    action = len(enc.real_action[a])
                elif o is not None:
                    action = texts[o.text]
                else:
                    action = generated_width
                pre = len(enc.mf_state_line[a]) if mf_with_states else int(line_pre[j])
                total += pre + action + line_post
            lines_width = max(lines_width, total)
    return Widths(
        action=action_width,
        policy_head=_round_up(max(len(e.policy_head) for e in encoded)),
        agent_part=_round_up(max(longest(e.agent_part) for e in encoded)),
        mf_head=_round_up(max(len(e.mf_head) for e in encoded)),
        mf_state_line=max(1, max(longest(e.mf_state_line) for e in encoded)),
        mf_lines=_round_up(lines_width),
    )


def world_key(seed: int, event_id: str) -> jax.Array:
    """The PRNG key of (seed, event): independent of the batch the world runs in."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(event_id.encode()) & 0x7FFFFFFF)


def world_key_data(seed: int, event_id: str) -> np.ndarray:
    """:func:`world_key` as raw uint32 data (host arrays of every process can hold it)."""
    return np.asarray(jax.random.key_data(world_key(seed, event_id)))


def _rows(rows: Sequence[Sequence[int]], n: int, width: int, pad: int, what: str, event_id: str):
    """Right-padded numpy [n, width] rows of one event's ``what``; an overlong row names the event."""
    try:
        return pad_rows_host(rows, width, pad, left=False, num_rows=n)
    except ValueError as e:
        raise ValueError(f"event {event_id}: {what}: {e}") from None


def stack_worlds(worlds: Sequence[tuple[EncodedEvent, int]], rcfg, tokenizer,
                 overrides: Iterable[Override] = ()) -> RolloutInputs:
    """Stacks (encoded event, seed) worlds into host (numpy) :class:`RolloutInputs` (agent slots padded to
    the run's N = num_steps × step_size of ``rcfg``, a :class:`mfjax.sim.rollout.RolloutConfig`).

    ``overrides`` must have passed :func:`check_overrides` for these events."""
    w = rcfg.widths
    N, B, La, pad = rcfg.num_agents, rcfg.step_size, w.action, rcfg.pad_id
    overrides = list(overrides)
    cols = {name: [] for name in ("policy_head", "policy_head_len", "mf_head", "mf_head_len", "agent_part",
                                  "agent_part_len", "mf_state_line", "mf_state_line_len", "real_action",
                                  "real_action_len", "followers", "agent_valid", "override", "override_action",
                                  "override_action_len")}
    keys = []
    for enc, seed in worlds:
        eid = enc.event.event_id
        one = lambda row, width, what: _rows([row], 1, width, pad, what, eid)
        t, n = one(enc.policy_head, w.policy_head, "policy head")
        cols["policy_head"].append(t[0]); cols["policy_head_len"].append(n[0])
        t, n = one(enc.mf_head, w.mf_head, "mean-field head")
        cols["mf_head"].append(t[0]); cols["mf_head_len"].append(n[0])
        t, n = _rows(enc.agent_part, N, w.agent_part, pad, "agent prompt", eid)
        cols["agent_part"].append(t); cols["agent_part_len"].append(n)
        t, n = _rows(enc.mf_state_line, N, w.mf_state_line, pad, "mean-field state line", eid)
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
            slot = o.step * B + o.position
            if o.event_id not in (None, eid) or slot >= enc.num_agents:
                continue
            if o.kind == "intervention":
                kind[slot] = OverrideKind.INTERVENTION
                texts[slot] = tokenizer.encode(o.text)
            else:
                kind[slot] = OverrideKind.KEY_NODE
        t, n = _rows(texts, N, La, pad, "intervention", eid)
        cols["override"].append(kind); cols["override_action"].append(t); cols["override_action_len"].append(n)
        keys.append(world_key_data(seed, eid))
    arrays = {k: np.stack(v) for k, v in cols.items()}
    return RolloutInputs(**arrays, world_key=np.stack(keys))


def pad_worlds(worlds: list, multiple: int) -> tuple[list, int]:
    """Repeats the last world so the count is a multiple of ``multiple`` (the data-parallel size);
    returns (worlds, number of real ones). The copies' outputs are discarded."""
    real = len(worlds)
    while len(worlds) % multiple:
        worlds = worlds + [worlds[-1]]
    return worlds, real
