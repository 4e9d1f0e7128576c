"""Where tokens live: which global token ranges each rank holds (pure Python).

A placement cuts the (padded) global sequence into equal chunks and gives each rank
the same number of chunks; a rank's local tokens are its chunks concatenated in
increasing global order. Padding tokens sit at the end of the global sequence
(positions ``seqlen .. padded_len - 1``); the plan's mask gives them no visible pair,
so they never reach outputs or gradients, and ``undispatch`` trims them.
"""

from __future__ import annotations

import heapq
import math
import random as _random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

DISPATCHES = (
    "contiguous",
    "zigzag",
    "stripe",
    "minheap",
    "balanced_zigzag",
    "sequential",
    "random",
    "exact",
)
# Dispatches that cost chunks by the mask (the plan hands them the mask's chunk costs).
BALANCED = ("minheap", "balanced_zigzag", "sequential", "random", "exact")
DEFAULT_CHUNKS_PER_RANK = 16
# balanced_zigzag keeps each rank's tokens in two runs whatever the chunk count, so it
# balances on a finer grid by default.
RUNS_CHUNKS_PER_RANK = 64
EXACT_MAX_CHUNKS = 16
# minheap with locality may pick a rank up to this fraction of the mean per-rank work
# heavier than the lightest one, when that rank needs fewer KV chunks fetched.
LOCALITY_SLACK = 0.02


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


def chunk_grid(seqlen: int, world_size: int, chunk_size: int | None) -> tuple[int, int]:
    """``(chunk size, chunks per rank)`` of a balanced dispatch: the given chunk size
    with as many chunks per rank as the sequence needs, or by default up to
    ``DEFAULT_CHUNKS_PER_RANK`` chunks per rank of equal size."""
    if chunk_size is None:
        cpr = max(1, min(DEFAULT_CHUNKS_PER_RANK, seqlen // world_size))
        size = max(1, math.ceil(seqlen / (world_size * cpr)))
        return size, cpr
    return chunk_size, max(1, math.ceil(seqlen / (world_size * chunk_size)))


def _assign_minheap(costs: Sequence[float], world_size: int, per_rank: int) -> list[int]:
    """Most expensive chunk first, each to the least-loaded rank with room left
    (LPT with equal counts); ties go to the lower rank, so every rank agrees."""
    order = sorted(range(len(costs)), key=lambda c: (-costs[c], c))
    heap = [(0.0, r) for r in range(world_size)]
    room = [per_rank] * world_size
    owner = [0] * len(costs)
    for c in order:
        load, r = heapq.heappop(heap)
        owner[c] = r
        room[r] -= 1
        if room[r]:
            heapq.heappush(heap, (load + costs[c], r))
    return owner


def _assign_local(
    costs: Sequence[float],
    world_size: int,
    per_rank: int,
    wants: Sequence[frozenset[int]],
    slack: float,
) -> list[int]:
    """Min-heap with locality: most expensive chunk first; among the ranks with room
    whose load is within ``slack x`` (mean final load) of the lightest, the one where
    the chunk adds the fewest KV chunks to fetch (``wants[c]``: the chunks whose keys
    chunk c's queries attend to), less one if the rank already wants chunk c's keys."""
    tol = slack * sum(costs) / world_size
    order = sorted(range(len(costs)), key=lambda c: (-costs[c], c))
    load = [0.0] * world_size
    room = [per_rank] * world_size
    held: list[set[int]] = [set() for _ in range(world_size)]
    want: list[set[int]] = [set() for _ in range(world_size)]
    owner = [0] * len(costs)
    for c in order:
        open_ = [r for r in range(world_size) if room[r]]
        floor = min(load[r] for r in open_)

        def extra(r: int, c: int = c) -> int:
            return len(wants[c] - want[r] - held[r]) - (c in want[r])

        r = min((r for r in open_ if load[r] <= floor + tol), key=lambda r: (extra(r), load[r], r))
        owner[c] = r
        room[r] -= 1
        load[r] += costs[c]
        held[r].add(c)
        want[r] |= wants[c]
    return owner


def _assign_runs(costs: Sequence[float], world_size: int, per_rank: int) -> list[int]:
    """Each rank a run from the front and a run from the back of what is left (zigzag
    with run lengths chosen for balance); the last rank takes the middle, one run. The
    split of each rank's ``per_rank`` chunks minimises the heaviest rank's work, by
    dynamic programming over (rank, front chunks used) when that is small enough
    (``W^2 * per_rank^2 <= 4e6``), else greedily rank by rank (each nearest an even
    share of the work left). Ties go to the split nearest half and half. Few runs per
    rank keep documents whole, so a rank's own block has few dense pieces."""
    n, w, per = len(costs), world_size, per_rank
    pre = [0.0]
    for c in costs:
        pre.append(pre[-1] + c)

    def work(r: int, lo: int, f: int) -> float:
        hi = n - (r * per - lo)
        return pre[lo + f] - pre[lo] + pre[hi] - pre[hi - per + f]

    fronts: list[int] = []
    if w * w * per * per <= 4_000_000:
        # best[lo] = lightest possible heaviest rank among ranks r.. given lo front
        # chunks used by ranks 0..r-1; choice[r][lo] = that rank's front run length.
        best = [pre[n - (w - 1) * per + lo] - pre[lo] for lo in range((w - 1) * per + 1)]
        choice: list[list[int]] = [[] for _ in range(w - 1)]
        # Each (rank, lo) row of the table at once: the same float operations in the
        # same order as work(), then the same tie-break (nearest half, then fewest).
        import numpy as np  # as Mask.digest does (torch's .numpy())

        pre_a = np.asarray(pre)
        fs = np.arange(per + 1)
        tie = np.abs(2 * fs - per) * (per + 1) + fs
        for r in range(w - 2, -1, -1):
            nxt = np.asarray(best)
            los = np.arange(r * per + 1)[:, None]
            his = n - (r * per - los)
            val = np.maximum(
                pre_a[los + fs] - pre_a[los] + pre_a[his] - pre_a[his - per + fs], nxt[los + fs]
            )
            low = val.min(axis=1, keepdims=True)
            pick = np.argmin(np.where(val == low, tie, np.iinfo(np.int64).max), axis=1)
            choice[r] = pick.tolist()
            best = val[np.arange(len(pick)), pick].tolist()
        lo = 0
        for r in range(w - 1):
            fronts.append(choice[r][lo])
            lo += fronts[-1]
    else:
        lo = 0
        for r in range(w - 1):
            share = (pre[n - (r * per - lo)] - pre[lo]) / (w - r)
            f = min(
                range(per + 1),
                key=lambda f, lo=lo, r=r, share=share: (
                    abs(work(r, lo, f) - share),
                    abs(2 * f - per),
                    f,
                ),
            )
            fronts.append(f)
            lo += f
    owner = [w - 1] * n
    lo, hi = 0, n
    for r, f in enumerate(fronts):
        for c in [*range(lo, lo + f), *range(hi - per + f, hi)]:
            owner[c] = r
        lo, hi = lo + f, hi - (per - f)
    return owner


def _assign_exact(costs: Sequence[float], world_size: int, per_rank: int) -> list[int]:
    """The assignment minimising the largest per-rank cost (branch and bound, seeded
    with min-heap's answer); for at most ``EXACT_MAX_CHUNKS`` chunks."""
    n = len(costs)
    if n > EXACT_MAX_CHUNKS:
        raise ValueError(
            f"dispatch: 'exact' handles at most {EXACT_MAX_CHUNKS} chunks, got {n} "
            "(use 'minheap', or a larger chunk_size)"
        )
    best_owner = _assign_minheap(costs, world_size, per_rank)
    best = [0.0] * world_size
    for c, r in enumerate(best_owner):
        best[r] += costs[c]
    bound = [max(best)]
    order = sorted(range(n), key=lambda c: -costs[c])
    load, room, owner = [0.0] * world_size, [per_rank] * world_size, [0] * n

    def search(i: int) -> None:
        if i == n:
            if max(load) < bound[0]:
                bound[0] = max(load)
                best_owner[:] = owner
            return
        c, tried = order[i], set()
        for r in range(world_size):
            key = (load[r], room[r])  # symmetric ranks: try one of each kind
            if not room[r] or key in tried or load[r] + costs[c] >= bound[0]:
                continue
            tried.add(key)
            load[r] += costs[c]
            room[r] -= 1
            owner[c] = r
            search(i + 1)
            load[r] -= costs[c]
            room[r] += 1

    search(0)
    return best_owner


def balanced(
    kind: str,
    seqlen: int,
    world_size: int,
    chunk_cost: Callable[[int, int], float],
    *,
    chunk_size: int | None = None,
    seed: int = 0,
    chunk_keys: Callable[[int, int], Sequence[tuple[int, int]]] | None = None,
    slack: float = LOCALITY_SLACK,
    chunk_calls: Callable[[int, int], int] | None = None,
    call_cost: float = 0.0,
) -> Placement:
    """Cut the padded sequence into equal chunks, give every rank the same number, and
    balance the work ``chunk_cost(start, end)`` (the mask's area in those rows), plus
    ``call_cost`` per kernel call ``chunk_calls(start, end)`` says starts there; a call
    counts at most a mean chunk's area, so on short sequences, where every call is
    mostly fixed cost, the count cannot outweigh the pairs by more than a chunk each:
    ``minheap`` (greedy, largest first), ``balanced_zigzag`` (two runs per rank,
    lengths balanced), ``exact`` (optimal, small cases),
    ``sequential`` (rank r takes the r-th run of consecutive chunks) or ``random``
    (a permutation seeded by ``seed``)."""
    if kind == "balanced_zigzag" and chunk_size is None:
        chunk_size = max(1, math.ceil(seqlen / (world_size * RUNS_CHUNKS_PER_RANK)))
    size, cpr = chunk_grid(seqlen, world_size, chunk_size)
    n = world_size * cpr
    padded = n * size
    if kind == "sequential":
        owner = [c // cpr for c in range(n)]
    elif kind == "random":
        perm = list(range(n))
        _random.Random(seed).shuffle(perm)
        owner = [0] * n
        for i, c in enumerate(perm):
            owner[c] = i // cpr
    else:
        # Chunks past the sequence (padding) cost nothing and are never asked about.
        spans = [(c * size, min((c + 1) * size, seqlen)) for c in range(n)]
        costs = [float(chunk_cost(a, b)) if a < seqlen else 0.0 for a, b in spans]
        if chunk_calls is not None and call_cost > 0:
            per_call = min(call_cost, sum(costs) / n)
            costs = [
                x + per_call * chunk_calls(a, b) if a < seqlen else x
                for x, (a, b) in zip(costs, spans)
            ]
        if kind == "minheap" and chunk_keys is not None and slack > 0:
            wants = []
            for c, (a, b) in enumerate(spans):
                got: set[int] = set()
                for ka, kb in chunk_keys(a, b) if costs[c] else ():
                    got.update(range(ka // size, (kb - 1) // size + 1))
                got.discard(c)
                wants.append(frozenset(got))
            owner = _assign_local(costs, world_size, cpr, wants, slack)
        else:
            assign = {"exact": _assign_exact, "balanced_zigzag": _assign_runs}
            owner = assign.get(kind, _assign_minheap)(costs, world_size, cpr)
    per_rank: list[list[tuple[int, int]]] = [[] for _ in range(world_size)]
    for c in range(n):
        per_rank[owner[c]].append((c * size, (c + 1) * size))
    ranges = tuple(tuple(_coalesce(rr)) for rr in per_rank)
    return Placement(kind, seqlen, padded, world_size, ranges, size)


def make_placement(
    kind: str,
    seqlen: int,
    world_size: int,
    *,
    chunk_size: int | None = None,
    chunk_cost: Callable[[int, int], float] | None = None,
    chunk_keys: Callable[[int, int], Sequence[tuple[int, int]]] | None = None,
    seed: int = 0,
    slack: float = LOCALITY_SLACK,
    chunk_calls: Callable[[int, int], int] | None = None,
    call_cost: float = 0.0,
) -> Placement:
    if kind in BALANCED:
        cost = chunk_cost or (lambda a, b: b - a)
        return balanced(
            kind,
            seqlen,
            world_size,
            cost,
            chunk_size=chunk_size,
            seed=seed,
            chunk_keys=chunk_keys,
            slack=slack,
            chunk_calls=chunk_calls,
            call_cost=call_cost,
        )
    if kind == "contiguous":
        return contiguous(seqlen, world_size, chunk_size=chunk_size or 1)
    if kind == "zigzag":
        return zigzag(seqlen, world_size, chunk_size=chunk_size or 1)
    if kind == "stripe":
        return stripe(seqlen, world_size, chunk_size=chunk_size)
    raise ValueError(f"dispatch: expected one of {DISPATCHES} or 'auto', got {kind!r}")
