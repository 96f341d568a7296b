"""The event schema every reader produces: one `Event` = a topic and its time-ordered `Agent`s.

Readers (rumdect / CED Weibo JSON, generic JSONL, Twitter) all convert into these frozen
dataclasses, so the simulator never sees a source format. Personal data that the simulation does not
use (screen names, user names, avatars, exact geo) is kept out of the schema on purpose.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping, Optional

logger = logging.getLogger(__name__)

# Languages that have prompt templates (mfjax.sim.templates); a new language needs both.
LANGUAGES = ("zh", "en")

# Profile fields of an agent, in schema order, with the Python type each holds when known.
PROFILE_FIELDS: Mapping[str, type] = {
    "user_location": str,
    "user_description": str,
    "gender": str,
    "friends_count": int,
    "followers_count": int,
    "reposts_count": int,
    "comments_count": int,
    "attitudes_count": int,
    "verified": bool,
    "verified_type": int,
}


class EventDataError(ValueError):
    """Malformed event data; the message names the file and the record (or line) at fault."""

    def __init__(self, message: str, *, path: Any = None, index: Optional[int] = None,
                 unit: str = "record"):
        self.path = None if path is None else str(path)
        self.index = index
        self.unit = unit
        where = []
        if self.path is not None:
            where.append(self.path)
        if index is not None:
            where.append(f"{unit} {index}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


@dataclasses.dataclass(frozen=True)
class Agent:
    """One responder: who acted, when, what they wrote, and their (optional) profile.

    Every profile field is None where the source does not know it (CED reposters, Twitter);
    the state template then writes an explicit "unknown" value instead of inventing one.
    """

    uid: str
    time: float  # unix seconds
    action: str  # the real action text (a comment, or a repost text)
    user_location: Optional[str] = None
    user_description: Optional[str] = None
    gender: Optional[str] = None  # 'm' / 'f' as in Weibo
    friends_count: Optional[int] = None
    followers_count: Optional[int] = None
    reposts_count: Optional[int] = None
    comments_count: Optional[int] = None
    attitudes_count: Optional[int] = None
    verified: Optional[bool] = None
    verified_type: Optional[int] = None

    def __post_init__(self):
        if not isinstance(self.uid, str):
            raise TypeError(f"Agent.uid must be str, got {type(self.uid).__name__}")
        if not isinstance(self.action, str):
            raise TypeError(f"Agent.action must be str, got {type(self.action).__name__}")
        if isinstance(self.time, bool) or not isinstance(self.time, (int, float)) \
                or not math.isfinite(self.time):
            raise TypeError(f"Agent.time must be a finite number, got {self.time!r}")
        object.__setattr__(self, "time", float(self.time))
        for name, kind in PROFILE_FIELDS.items():
            value = getattr(self, name)
            if value is None:
                continue
            # bool is an int subclass: keep counts and flags apart.
            ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
            if not ok:
                raise TypeError(f"Agent.{name} must be {kind.__name__} or None, got {value!r}")

    def profile(self) -> dict:
        """The known profile fields as a dict (fields that are None are left out)."""
        return {k: getattr(self, k) for k in PROFILE_FIELDS if getattr(self, k) is not None}

    @property
    def has_profile(self) -> bool:
        """Whether any profile field is known."""
        return bool(self.profile())


@dataclasses.dataclass(frozen=True)
class Event:
    """A discussion: the topic (source post text) and its responders in time order."""

    event_id: str
    topic: str
    agents: tuple  # tuple[Agent, ...], sorted by time (ties keep source order)
    language: str = "zh"
    label: Optional[str] = None  # e.g. 'rumor' / 'non-rumor'
    source_path: Optional[str] = None  # where the event was read from
    topic_time: Optional[float] = None  # unix seconds of the source post, when known

    def __post_init__(self):
        if not isinstance(self.agents, tuple):
            object.__setattr__(self, "agents", tuple(self.agents))
        if self.language not in LANGUAGES:
            raise ValueError(f"event {self.event_id}: language {self.language!r} not in "
                             f"{LANGUAGES}")
        if not isinstance(self.topic, str):
            raise TypeError(f"event {self.event_id}: topic must be str")
        for i, agent in enumerate(self.agents):
            if not isinstance(agent, Agent):
                raise TypeError(f"event {self.event_id}: agents[{i}] is not an Agent")
            if i and agent.time < self.agents[i - 1].time:
                raise ValueError(f"event {self.event_id}: agents not in time order at {i}")
        if self.topic_time is not None:
            object.__setattr__(self, "topic_time", float(self.topic_time))

    @property
    def num_agents(self) -> int:
        """Number of responders."""
        return len(self.agents)


def sort_agents(agents) -> tuple:
    """Agents sorted by time; ties keep their source order (the sort is stable)."""
    return tuple(sorted(agents, key=lambda a: a.time))


def select_agents(event: Event, num_agents: Optional[int], *, strict: bool = True) -> tuple:
    """The first `num_agents` agents of `event` in time order (all of them when None).

    An event with fewer agents than asked raises `EventDataError` naming its file when `strict`;
    otherwise all its agents are returned and a warning says how many were missing.
    """
    if num_agents is None:
        return event.agents
    if num_agents < 0:
        raise ValueError(f"num_agents must be >= 0, got {num_agents}")
    have = len(event.agents)
    if have < num_agents:
        message = f"event {event.event_id} has {have} agents, fewer than the {num_agents} asked"
        if strict:
            raise EventDataError(message, path=event.source_path)
        logger.warning("%s: %s; using all %d", event.source_path or event.event_id, message, have)
    return event.agents[:num_agents]
