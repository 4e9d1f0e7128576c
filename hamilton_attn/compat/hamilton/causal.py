"""Causal masking (the seed's source ranks per iteration), by the seed's names (pure
Python). Terms as in :mod:`.cycles`."""

from __future__ import annotations

from .cycles import num_ranks


def source_rank_per_iter(looping: list[list[int]]) -> list[list[list[int]]]:
    """Origin of every received KV chunk.

    Returns:
        ``src`` of shape ``[n - 1][n][C]``: ``src[t][r][c]`` is the rank whose
        chunk ``c`` rank ``r`` receives in iteration ``t`` along cycle ``c``, i.e.
        the rank ``t + 1`` hops before ``r`` on cycle ``c`` (``t = 0`` is the
        direct predecessor).  Never equal to ``r``; over ``t`` it runs through all
        other ranks.
    """
    n = num_ranks(looping)
    num_c = len(looping)
    pos = []  # pos[c][r] = index of r in cycle c
    for cyc in looping:
        p = [0] * n
        for i, r in enumerate(cyc):
            p[r] = i
        pos.append(p)
    return [
        [[looping[c][(pos[c][r] - (t + 1)) % n] for c in range(num_c)] for r in range(n)]
        for t in range(n - 1)
    ]


def calculate_source_rank_per_iter(looping: list[list[int]]) -> list[list[list[bool]]]:
    """Causal-mask flags: is the chunk received in iteration ``t`` from ``r``'s past?

    Convention: iteration ``t`` (``0 <= t <= n - 2``) is the chunk that has
    travelled ``t + 1`` hops along cycle ``c`` (see :func:`source_rank_per_iter`).
    With the sequence split contiguously in rank order, a chunk from a rank
    ``s < r`` lies entirely before ``r``'s queries and is attended with the full
    (unmasked) rectangle; a chunk from ``s > r`` lies entirely in the future and is
    skipped.

    Returns:
        shape ``[n - 1][n][C]``: ``flags[t][r][c] = source_rank_per_iter(looping)[t][r][c] < r``.
    """
    src = source_rank_per_iter(looping)
    return [[[s < r for s in row] for r, row in enumerate(step)] for step in src]
