"""Host-side helpers of the engine: length buckets and numpy padding of token rows (never traced)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def bucket_length(n: int, buckets: Sequence[int] | None = None, minimum: int = 16) -> int:
    """The smallest bucket >= n: from ``buckets`` when given, else the next power of two (>= minimum)."""
    if buckets:
        for b in sorted(buckets):
            if b >= n:
                return int(b)
        raise ValueError(f"length {n} exceeds the largest bucket {max(buckets)}")
    size = minimum
    while size < n:
        size *= 2
    return size


def pad_rows_host(rows: Sequence[Sequence[int]], width: int, pad_id: int, *, left: bool,
                  num_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pads token lists to numpy [num_rows or len(rows), width] on the left or right; returns
    (tokens, lengths). Rows past ``len(rows)`` are all padding with length 0."""
    n = len(rows) if num_rows is None else num_rows
    out = np.full((n, width), pad_id, np.int32)
    lengths = np.zeros((n,), np.int32)
    for i, row in enumerate(rows):
        if len(row) > width:
            raise ValueError(f"row {i} has {len(row)} tokens, more than the width {width}")
        lengths[i] = len(row)
        if len(row):
            if left:
                out[i, width - len(row):] = row
            else:
                out[i, :len(row)] = row
    return out, lengths
