"""Head parallelism (DeepSpeed-Ulysses) and hybrids of heads x context, as plans.

A group of W ranks with ``ulysses_degree`` u is a grid of ``W / u`` *head groups* of u
consecutive ranks (``[g*u, (g+1)*u)``: inside one node whenever u divides the devices
per node, so the all-to-all stays on NVLink, TransformerEngine's a2a+p2p). In a call,
an all-to-all inside each head group turns the members' sequence shards into head
shards: member j then holds every token of its group (the members' local tokens in
member order) for query heads ``[j*Hq/u, (j+1)*Hq/u)``. Across the groups, the members
with the same j form a *context-parallel group* of ``W / u`` ranks, which runs any of the
library's schedules on that head shard, as one ordinary plan (``HeadParallel.inner``)
whose ranks are the groups: the executor stays one. ``u = W`` is pure Ulysses (each rank
attends over the whole sequence alone). Another all-to-all turns the output back.

KV heads: with Hk a multiple of u they are split like the query heads; otherwise each is
repeated ``lcm(Hk, u) / Hk`` times first (MQA, Hk = 1, sends one KV head to every member),
so that a member's query heads find their KV heads among its own. u must divide Hq.

Pure Python: the plan says who exchanges what; runtime/heads.py moves the tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..masks import Mask
from ..placement import Placement


@dataclass(frozen=True)
class HeadParallel:
    """A plan's head parallelism: ``degree`` u; this rank is member ``member`` of the
    head group ``group_ranks`` (global ranks, member order); ``inner`` is the plan of
    its context-parallel group (ranks = head groups, each holding its members' tokens)."""

    degree: int
    member: int
    group_ranks: tuple[int, ...]
    inner: object  # the inner Plan


def check_degree(degree, world_size: int) -> int:
    """``degree`` as a positive divisor of the world size (ValueError naming both)."""
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"ulysses_degree: expected a positive int, got {degree!r}")
    if world_size % degree:
        raise ValueError(
            f"ulysses_degree: {degree} must divide the group's {world_size} ranks "
            "(head groups of equal size)"
        )
    return degree


def heads_problem(hq: int, hk: int, degree: int) -> str | None:
    """What stops ``degree``-way head parallelism of Hq query and Hk KV heads, or None."""
    if hq % degree:
        return (
            f"q: ulysses_degree {degree} must divide the {hq} query heads (uneven heads "
            "are not split)"
        )
    if hk < 1 or hq % hk:
        return f"k, v: {hk} heads must divide q's {hq} heads"
    return None


def kv_repeat(hk: int, degree: int) -> int:
    """How many times each KV head is repeated so ``degree`` members split them evenly:
    1 where degree divides Hk, else ``lcm(Hk, degree) / Hk``."""
    return math.lcm(hk, degree) // hk


def group_placement(placement: Placement, degree: int) -> Placement:
    """The placement over head groups: group g holds its members' tokens, in member
    order (what member j holds after the all-to-all, for its heads)."""
    w = placement.world_size
    ranges = tuple(
        tuple(r for m in range(g * degree, (g + 1) * degree) for r in placement.rank_ranges[m])
        for g in range(w // degree)
    )
    return Placement(
        f"{placement.kind}/heads{degree}",
        placement.seqlen,
        placement.padded_len,
        w // degree,
        ranges,
        placement.chunk_size,
    )


def head_layout(rank: int, ranks: tuple[int, ...], degree: int):
    """``(member, head group's global ranks, context group's global ranks, group
    index)`` of group rank ``rank`` in a group of global ``ranks``."""
    g, j = divmod(rank, degree)
    head_group = tuple(ranks[g * degree + m] for m in range(degree))
    context_group = tuple(ranks[h * degree + j] for h in range(len(ranks) // degree))
    return j, head_group, context_group, g


def padded_mask(mask: Mask, placement: Placement, kv_placement: Placement) -> Mask:
    return Mask(mask.bands, placement.padded_len, kv_placement.padded_len, _canonical=True)
