"""Where tokens live: which global token ranges each rank holds (pure Python).

A placement cuts the (padded) global sequence into equal chunks and gives each rank
the same number of chunks; a rank's local tokens are its chunks concatenated in
increasing global order. Padding tokens sit at the end of the global sequence
(positions ``seqlen .. padded_len - 1``); the plan's mask gives them no visible pair,
so they never reach outputs or gradients, and ``undispatch`` trims them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DISPATCHES = ("contiguous", "zigzag", "stripe")


@dataclass(frozen=True, slots=True)
class Placement:
    """Per rank, the global ``[start, end)`` token ranges it holds, in local order."""

    kind: str
    seqlen: int
    padded_len: int
    world_size: int
    rank_ranges: tuple[tuple[tuple[int, int], ...], ...]
    chunk_size: int
    _local_len: int = field(init=False)

    def __post_init__(self):
        lens = {sum(b - a for a, b in rr) for rr in self.rank_ranges}
        if len(self.rank_ranges) != self.world_size or len(lens) != 1:
            raise ValueError(
                f"rank_ranges: expected {self.world_size} ranks of equal length, "
                f"got lengths {sorted(lens)}"
            )
        object.__setattr__(self, "_local_len", lens.pop())

    @property
    def local_len(self) -> int:
        """Tokens per rank, padding included."""
        return self._local_len

    @property
    def pad(self) -> int:
        return self.padded_len - self.seqlen

    def local_to_global(self, rank: int, local_ranges) -> list[tuple[int, int]]:
        """Map ranges of rank-local token indices to global ranges (split at chunk edges)."""
        out = []
        for la, lb in local_ranges:
            pos = 0
            for ga, gb in self.rank_ranges[rank]:
                n = gb - ga
                a, b = max(la, pos), min(lb, pos + n)
                if a < b:
                    out.append((ga + a - pos, ga + b - pos))
                pos += n
        return _coalesce(out)

    def global_indices(self, rank: int) -> list[int]:
        """Global position of each local token of ``rank`` (padding included)."""
        return [i for a, b in self.rank_ranges[rank] for i in range(a, b)]


def _coalesce(ranges):
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if a >= b:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def compute_pad_size(
    seqlen: int, world_size: int, chunk_size: int = 1, chunks_per_rank: int = 1
) -> int:
    """Tokens to append so that ``seqlen + pad`` splits into ``world_size * chunks_per_rank``
    chunks whose size is a multiple of ``chunk_size``."""
    for name, val in (
        ("seqlen", seqlen),
        ("world_size", world_size),
        ("chunk_size", chunk_size),
        ("chunks_per_rank", chunks_per_rank),
    ):
        if not isinstance(val, int) or val < (0 if name == "seqlen" else 1):
            raise ValueError(
                f"{name}: expected a {'non-negative' if name == 'seqlen' else 'positive'}"
                f" int, got {val!r}"
            )
    unit = world_size * chunks_per_rank * chunk_size
    return (-seqlen) % unit if seqlen else unit


def _chunked(kind, seqlen, world_size, chunk_size, chunks_per_rank, owner_of):
    n_chunks = world_size * chunks_per_rank
    padded = seqlen + compute_pad_size(seqlen, world_size, chunk_size, chunks_per_rank)
    size = padded // n_chunks
    per_rank: list[list[tuple[int, int]]] = [[] for _ in range(world_size)]
    for c in range(n_chunks):
        per_rank[owner_of(c)].append((c * size, (c + 1) * size))
    ranges = tuple(tuple(_coalesce(sorted(rr))) for rr in per_rank)
    return Placement(kind, seqlen, padded, world_size, ranges, size)


def contiguous(seqlen: int, world_size: int, *, chunk_size: int = 1) -> Placement:
    """Rank r holds the r-th of W equal slices."""
    return _chunked("contiguous", seqlen, world_size, chunk_size, 1, lambda c: c)


def zigzag(seqlen: int, world_size: int, *, chunk_size: int = 1) -> Placement:
    """2W chunks; rank r holds chunks r and 2W-1-r (balances causal work)."""
    w = world_size
    return _chunked(
        "zigzag", seqlen, world_size, chunk_size, 2, lambda c: c if c < w else 2 * w - 1 - c
    )


def stripe(
    seqlen: int,
    world_size: int,
    *,
    chunk_size: int | None = None,
    chunks_per_rank: int | None = None,
) -> Placement:
    """Round-robin chunks: chunk c goes to rank c % W. By default 4 chunks per rank."""
    if chunks_per_rank is None:
        chunks_per_rank = (
            4 if chunk_size is None else max(1, math.ceil(seqlen / (world_size * chunk_size)))
        )
    return _chunked(
        "stripe", seqlen, world_size, chunk_size or 1, chunks_per_rank, lambda c: c % world_size
    )


def make_placement(
    kind: str, seqlen: int, world_size: int, *, chunk_size: int | None = None
) -> Placement:
    if kind == "contiguous":
        return contiguous(seqlen, world_size, chunk_size=chunk_size or 1)
    if kind == "zigzag":
        return zigzag(seqlen, world_size, chunk_size=chunk_size or 1)
    if kind == "stripe":
        return stripe(seqlen, world_size, chunk_size=chunk_size)
    raise ValueError(f"dispatch: expected one of {DISPATCHES} or 'auto', got {kind!r}")
