"""The data walk of IB-Tune (IBTUNE.md §6): events split by id, walked in time order in chunks of one step.

* :func:`split_events` — train / held-out by a seeded hash of ``event_id`` (independent of file order).
* :class:`ChunkWalker` — E slots walk the training events. A micro-step takes chunk t (the simulator's step
  t: agents [tB, (t+1)B)) of the event in every slot; a slot whose event ends takes the next event of the
  queue and starts from an empty mean field (``reset``), so no mean field crosses an event boundary. The
  queue is a seeded permutation of the events per epoch, epochs one after another, so every chunk of every
  event is visited exactly once per epoch and nothing is dropped; when the queue runs out, slots idle
  (masked) until the last event ends. The walker is plain numpy and Python: its whole state is a small
  dict (:meth:`ChunkWalker.state`) that a checkpoint stores and :meth:`ChunkWalker.restore` resumes from.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Optional, Sequence

import numpy as np


def split_events(events: Sequence, *, heldout: float | int, seed: int = 0) -> tuple[list, list]:
    """(train, held-out) events: the held-out ones are those with the smallest seeded hash of their id.

    ``heldout`` is a fraction in [0, 1) or a count. The split depends only on the ids and the seed (not on
    the order events were read in), so adding events never moves an existing one across the split by
    accident of position."""
    events = list(events)
    n = len(events)
    count = int(round(heldout * n)) if isinstance(heldout, float) and heldout < 1 else int(heldout)
    if not 0 <= count <= n:
        raise ValueError(f"heldout={heldout} asks for {count} of {n} events")
    ranked = sorted(range(n), key=lambda i: (zlib.crc32(f"{seed}:{events[i].event_id}".encode()), i))
    held = set(ranked[:count])
    return [e for i, e in enumerate(events) if i not in held], [e for i, e in enumerate(events) if i in held]


@dataclasses.dataclass(frozen=True)
class WalkStep:
    """One micro-step for E slots (numpy arrays)."""

    event: np.ndarray  # [E] int: index into the walker's events; -1 for an idle slot
    chunk: np.ndarray  # [E] int: the chunk (simulator step) of that event
    reset: np.ndarray  # [E] bool: the slot starts a new event here (its mean field starts empty)
    has_next: np.ndarray  # [E] bool: the event has a chunk after this one (stage 1 scores it)
    epoch: np.ndarray  # [E] int: the epoch of the slot's event (-1 idle)

    @property
    def active(self) -> np.ndarray:
        return self.event >= 0


class ChunkWalker:
    """Walks events chunk by chunk with E slots (see the module docstring).

    Args:
      num_chunks: chunks (steps of ``step_size`` agents) of each event, e.g. ceil(agents / 16).
      slots: E, events walked side by side.
      seed: seeds the per-epoch permutations.
      epochs: passes over the events.
      shuffle: permute events per epoch (else their given order).
    """

    def __init__(self, num_chunks: Sequence[int], slots: int, *, seed: int = 0, epochs: int = 1,
                 shuffle: bool = True):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        self.num_chunks = [int(c) for c in num_chunks]
        if not self.num_chunks or min(self.num_chunks) < 1:
            raise ValueError("every event needs at least one chunk, and there must be at least one event")
        self.slots, self.seed, self.epochs, self.shuffle = slots, seed, epochs, shuffle
        self._epoch, self._pos = 0, 0  # the queue: epoch, position in its order
        self._slot_event = [-1] * slots
        self._slot_epoch = [-1] * slots
        self._slot_chunk = [0] * slots
        self.micro_step = 0

    # ------------------------------------------------------------------------------ queue
    def order(self, epoch: int) -> np.ndarray:
        """The events of ``epoch`` in walk order (a seeded permutation, the same on every run)."""
        n = len(self.num_chunks)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def _pop(self) -> tuple[int, int]:
        """The next (event, epoch) of the queue, or (-1, -1) when every epoch is used up."""
        while self._epoch < self.epochs:
            order = self.order(self._epoch)
            if self._pos < len(order):
                event = int(order[self._pos])
                self._pos += 1
                return event, self._epoch
            self._epoch, self._pos = self._epoch + 1, 0
        return -1, -1

    # ------------------------------------------------------------------------------ walking
    @property
    def done(self) -> bool:
        """No slot holds an event and the queue is empty."""
        if any(e >= 0 for e in self._slot_event):
            return False
        return self._epoch >= self.epochs or (self._epoch == self.epochs - 1 and self._pos >= len(self.num_chunks))

    def next(self) -> Optional[WalkStep]:
        """The next micro-step, or None when the walk is done."""
        reset = [False] * self.slots
        for s in range(self.slots):
            if self._slot_event[s] < 0:
                event, epoch = self._pop()
                if event >= 0:
                    self._slot_event[s], self._slot_epoch[s], self._slot_chunk[s] = event, epoch, 0
                    reset[s] = True
        if all(e < 0 for e in self._slot_event):
            return None
        event = np.array(self._slot_event, np.int64)
        chunk = np.array(self._slot_chunk, np.int64)
        has_next = np.array([e >= 0 and c + 1 < self.num_chunks[e] for e, c in zip(event, chunk)], bool)
        step = WalkStep(event=event, chunk=chunk, reset=np.array(reset, bool), has_next=has_next,
                        epoch=np.array(self._slot_epoch, np.int64))
        for s in range(self.slots):  # advance: a finished event frees its slot for the next micro-step
            if self._slot_event[s] >= 0:
                self._slot_chunk[s] += 1
                if self._slot_chunk[s] >= self.num_chunks[self._slot_event[s]]:
                    self._slot_event[s], self._slot_epoch[s], self._slot_chunk[s] = -1, -1, 0
        self.micro_step += 1
        return step

    def __iter__(self):
        while (step := self.next()) is not None:
            yield step

    def total_micro_steps(self) -> int:
        """Micro-steps of a whole walk from the start (walks a fresh copy; cheap: host integers only)."""
        twin = ChunkWalker(self.num_chunks, self.slots, seed=self.seed, epochs=self.epochs, shuffle=self.shuffle)
        return sum(1 for _ in twin)

    # ------------------------------------------------------------------------------ state
    def state(self) -> dict:
        """The walk's position as a JSON-able dict (queue epoch and position, each slot's event, epoch and
        chunk, micro-steps taken, and what identifies the walk)."""
        return {"epoch": self._epoch, "position": self._pos, "slot_event": list(self._slot_event),
                "slot_epoch": list(self._slot_epoch), "slot_chunk": list(self._slot_chunk),
                "micro_step": self.micro_step, "seed": self.seed, "slots": self.slots, "epochs": self.epochs,
                "shuffle": self.shuffle, "num_chunks_crc": zlib.crc32(np.asarray(self.num_chunks, np.int64).tobytes())}

    def restore(self, state: dict) -> "ChunkWalker":
        """Resumes from :meth:`state` of a walker over the same events and settings (else a ValueError naming
        what differs)."""
        mine = self.state()
        for key in ("seed", "slots", "epochs", "shuffle", "num_chunks_crc"):
            if state.get(key) != mine[key]:
                raise ValueError(f"the saved data walk has {key}={state.get(key)!r}, this run {mine[key]!r} "
                                 f"(other events or walk settings than the checkpoint's)")
        self._epoch, self._pos = int(state["epoch"]), int(state["position"])
        self._slot_event = [int(x) for x in state["slot_event"]]
        self._slot_epoch = [int(x) for x in state["slot_epoch"]]
        self._slot_chunk = [int(x) for x in state["slot_chunk"]]
        self.micro_step = int(state["micro_step"])
        return self
