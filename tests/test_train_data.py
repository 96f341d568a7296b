"""The IB-Tune data walk: events in time order in chunks, resets at event boundaries, every sample once per
epoch, idle slots masked, deterministic shuffling, resumable state; the train / held-out split."""

from __future__ import annotations

import collections
import dataclasses
import json

import numpy as np
import pytest

from mfjax.train.data import ChunkWalker, split_events

CHUNKS = [3, 1, 4, 2, 5]


def walk(walker):
    return [dataclasses.asdict(s) for s in walker]


def test_every_chunk_once_per_epoch_in_order_with_resets():
    walker = ChunkWalker(CHUNKS, slots=2, seed=3, epochs=2)
    steps = list(walker)
    seen = collections.Counter()
    last_chunk = {}  # (slot) -> (event, epoch, chunk) it holds
    for step in steps:
        for s in range(2):
            e, c, ep = int(step.event[s]), int(step.chunk[s]), int(step.epoch[s])
            if e < 0:
                assert not step.reset[s] and not step.has_next[s]
                continue
            seen[(ep, e, c)] += 1
            assert step.has_next[s] == (c + 1 < CHUNKS[e])
            if step.reset[s]:
                assert c == 0  # a slot takes a new event at its first chunk, and only there
            else:  # otherwise it continues its event with the next chunk: time order, no jump
                assert last_chunk[s] == (e, ep, c - 1)
            last_chunk[s] = (e, ep, c)
    want = {(ep, e, c) for ep in range(2) for e, n in enumerate(CHUNKS) for c in range(n)}
    assert set(seen) == want and set(seen.values()) == {1}  # each sample exactly once per epoch, none dropped
    assert walker.done and walker.next() is None
    assert walker.total_micro_steps() == len(steps)
    # The slots run side by side: fewer micro-steps than chunks, and no slot idles before the queue is empty.
    assert len(steps) < 2 * sum(CHUNKS)
    idle = [i for i, s in enumerate(steps) if np.any(s.event < 0)]
    resets = [i for i, s in enumerate(steps) if np.any(s.reset)]
    assert not idle or min(idle) > max(resets)  # a slot idles only once the queue is empty
    tail = list(ChunkWalker(CHUNKS, 2, seed=0))[-1]
    assert list(tail.event).count(-1) == 1 and not tail.has_next.any()  # the end of a walk: one slot idle, masked


def test_shuffling_is_seeded():
    a, b = ChunkWalker(CHUNKS, 2, seed=1, epochs=2), ChunkWalker(CHUNKS, 2, seed=1, epochs=2)
    assert json.dumps(walk(a), default=str) == json.dumps(walk(b), default=str)
    orders = {tuple(ChunkWalker(CHUNKS, 2, seed=s).order(0)) for s in range(6)}
    assert len(orders) > 1  # the seed changes the order
    w = ChunkWalker(CHUNKS, 2, seed=1, epochs=3)
    assert sorted(w.order(0)) == sorted(w.order(1)) == list(range(5)) and tuple(w.order(0)) != tuple(w.order(1))
    plain = ChunkWalker(CHUNKS, 1, seed=1, shuffle=False)
    assert [int(s.event[0]) for s in plain if s.reset[0]] == list(range(5))


@pytest.mark.parametrize("stop", [0, 1, 4, 7])
def test_state_restore_continues_the_same_walk(stop):
    straight = walk(ChunkWalker(CHUNKS, 3, seed=5, epochs=2))
    first = ChunkWalker(CHUNKS, 3, seed=5, epochs=2)
    head = [dataclasses.asdict(first.next()) for _ in range(stop)]
    state = json.loads(json.dumps(first.state()))  # what a checkpoint stores
    resumed = ChunkWalker(CHUNKS, 3, seed=5, epochs=2).restore(state)
    assert resumed.micro_step == stop
    tail = walk(resumed)
    for got, want in zip(head + tail, straight, strict=True):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_restore_refuses_another_walk():
    state = ChunkWalker(CHUNKS, 2, seed=5).state()
    with pytest.raises(ValueError, match="seed"):
        ChunkWalker(CHUNKS, 2, seed=6).restore(state)
    with pytest.raises(ValueError, match="num_chunks"):
        ChunkWalker(CHUNKS[:-1], 2, seed=5).restore(state)
    with pytest.raises(ValueError, match="slots"):
        ChunkWalker(CHUNKS, 3, seed=5).restore(state)


def test_split_by_event_id():
    @dataclasses.dataclass
    class Ev:
        event_id: str

    events = [Ev(f"e{i}") for i in range(20)]
    train, held = split_events(events, heldout=0.25, seed=0)
    assert len(held) == 5 and len(train) == 15
    assert {e.event_id for e in train}.isdisjoint(e.event_id for e in held)
    train2, held2 = split_events(list(reversed(events)), heldout=5, seed=0)
    assert {e.event_id for e in held2} == {e.event_id for e in held}  # independent of the reading order
    assert {e.event_id for e in split_events(events, heldout=5, seed=1)[1]} != {e.event_id for e in held}
    with pytest.raises(ValueError):
        split_events(events, heldout=30)
