"""The one way a verified schedule is made: placement -> routing -> finalize -> verify
(-> reversed backward). ``plan()`` and the cost model's exact path both go through
:func:`verified_schedule`, with the blocks' answers (which blocks have a visible pair,
what each costs) from :class:`MaskBlocks` for a mask, or from a closed form.

Pure Python: nothing here talks to torch.distributed.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

from ..masks import Mask
from ..placement import BALANCED, Placement, make_placement
from ..placement.layouts import DEFAULT_CHUNKS_PER_RANK
from ..schedule import (
    PieceId,
    Schedule,
    ScheduleReport,
    finalize,
    reverse_backward,
    spec_of,
    split_even,
    verify,
    verify_backward,
)


def placement_for(
    kind: str,
    mask: Mask,
    w: int,
    chunk_size: int | None,
    seed: int = 0,
    *,
    keys: bool = False,
    slack: float = 0.0,
    call_cost: float = 0.0,
    also: tuple[Mask, ...] = (),
) -> Placement:
    """Queries' (``keys=False``) or keys' placement; balanced kinds cost a chunk by the
    mask's area in its rows (or columns), summed over ``mask`` and the masks ``also``
    (the other layers of a model sharing this placement), plus ``call_cost`` pairs for
    each dense piece of ``mask`` that starts in its rows (queries' placement of a mask
    of several pieces; see :func:`~hamilton_attn.placement.layouts.balanced`)."""
    if kind in BALANCED:
        every = (mask, *also)
        if keys:

            def cost(a, b):
                return sum(m.slice((0, m.seqlen_q), (a, b)).area() for m in every)
        else:

            def cost(a, b):
                return sum(m.slice((a, b), (0, m.seqlen_k)).area() for m in every)

        n = mask.seqlen_k if keys else mask.seqlen_q
        chunk_keys = None
        if not keys and mask.seqlen_q == mask.seqlen_k:

            def chunk_keys(a, b):  # self-attention: the keys rows a..b attend to
                return [(bd.k0, bd.k1) for bd in mask.slice((a, b), (0, mask.seqlen_k)).bands]

        chunk_calls = None
        pieces = None if keys or not call_cost else mask.dense_pieces()
        if pieces is not None and len(pieces) > 1:
            starts = sorted(p[0] for p in pieces)

            def chunk_calls(a, b):  # dense pieces (kernel calls) starting in rows a..b
                return bisect.bisect_left(starts, b) - bisect.bisect_left(starts, a)

        return make_placement(
            kind,
            n,
            w,
            chunk_size=chunk_size,
            chunk_cost=cost,
            chunk_keys=chunk_keys,
            seed=seed,
            slack=slack,
            chunk_calls=chunk_calls,
            call_cost=call_cost,
        )
    return make_placement(kind, mask.seqlen_k if keys else mask.seqlen_q, w, chunk_size=chunk_size)


def shared_placements(shared, o, mask: Mask, w: int) -> tuple[Placement, Placement]:
    """``shared`` (queries' and keys' placements taken from another plan), checked
    against this plan's mask, group size and options ``o``."""
    pl, kv = shared
    if pl.world_size != w:
        raise ValueError(f"placement: the other plan is for {pl.world_size} ranks, not {w}")
    if pl.seqlen != mask.seqlen_q:
        raise ValueError(
            f"placement: the other plan places {pl.seqlen} query tokens, the mask has "
            f"{mask.seqlen_q}"
        )
    if o.dispatch != "auto" and o.dispatch != pl.kind:
        raise ValueError(
            f"dispatch: {o.dispatch!r} disagrees with the shared placement's {pl.kind!r}"
        )
    if o.kv_dispatch is None:
        if mask.seqlen_k != mask.seqlen_q:
            raise ValueError("mask: self-attention needs a square mask (see kv_dispatch)")
        return pl, pl
    if kv.seqlen != mask.seqlen_k:
        raise ValueError(
            f"placement: the other plan places {kv.seqlen} key tokens, the mask has {mask.seqlen_k}"
        )
    return pl, kv


def _merge_intervals(ivs) -> tuple[list[int], list[int]]:
    """Sorted disjoint ``[start, end)`` intervals covering ``ivs``, as starts and ends
    (touching intervals stay apart: only intersection tests read them)."""
    starts: list[int] = []
    ends: list[int] = []
    for a, b in sorted(ivs):
        if ends and a < ends[-1]:
            ends[-1] = max(ends[-1], b)
        else:
            starts.append(a)
            ends.append(b)
    return starts, ends


def _seen_keys(mask: Mask, placement: Placement) -> list[list[tuple[list[int], list[int]]]]:
    """Per rank and query range, the keys some of its rows see, as sorted disjoint
    intervals (``_merge_intervals``): a normalised band's columns are each seen by one
    of its rows, so the union of its clipped bands' column ranges is exact."""
    return [
        [
            _merge_intervals((b.k0, b.k1) for b in mask._slice(qa, qb, 0, mask.seqlen_k).bands)
            for qa, qb in rr
        ]
        for rr in placement.rank_ranges
    ]


class MaskBlocks:
    """The blocks of ``mask`` (padded) for queries placed by ``placement`` and keys by
    ``kv_placement``, with the keys of each rank cut into ``parts``: :meth:`needs`
    (any visible pair?), :meth:`cost` (the block's area) and :meth:`block` (its mask).
    All answered from sweeps over whole ranks, worked out on the first question."""

    def __init__(self, mask: Mask, placement: Placement, kv_placement: Placement, parts):
        self.mask, self.placement, self.kv_placement = mask, placement, kv_placement
        self.w = placement.world_size
        seen = _seen_keys(mask, placement)
        self._seen_all = [
            _merge_intervals(iv for st, en in per for iv in zip(st, en)) for per in seen
        ]
        self.block_masks: dict = {}  # (rank, piece) -> Mask, cut by block()
        self.cut(parts)

    def cut(self, parts) -> None:
        """Answer for pieces cut into ``parts`` from now on (forgets earlier answers)."""
        self.parts = parts
        self.n_parts = len(parts)
        self._piece_keys: list = [None] * (self.w * self.n_parts)
        self._need: list = []
        self._need_pieces: list = []
        self._cost: list = []
        self.block_masks.clear()

    def keys_of(self, p: PieceId):
        """The piece's global key ranges."""
        i = p.owner * self.n_parts + p.part
        kr = self._piece_keys[i]
        if kr is None:
            kr = self._piece_keys[i] = self.kv_placement.local_to_global(
                p.owner, self.parts[p.part]
            )
        return kr

    def _ids(self):
        n = self.n_parts
        return [PieceId(i // n, i % n) for i in range(self.w * n)]

    def block(self, r: int, p: PieceId) -> Mask:
        key = (r, p)
        m = self.block_masks.get(key)
        if m is None:
            m = self.block_masks[key] = self.mask.gather(
                self.placement.rank_ranges[r], self.keys_of(p)
            )
        return m

    def needs(self, r: int, p: PieceId) -> bool:
        # A block has a visible pair iff the piece holds a key that some row of the
        # rank sees. Answered from one sweep of the pieces' key ranges (they cut the
        # keys) against each rank's seen intervals, instead of cutting every one of
        # the W^2 x pieces blocks' masks out (the executor cuts its own when it runs).
        if not self._need:
            ranges = sorted(
                (a, b, i) for i, p in enumerate(self._ids()) for a, b in self.keys_of(p)
            )
            firsts = [a for a, _, _ in ranges]
            for starts, ends in self._seen_all:
                got = set()
                for a, b in zip(starts, ends):
                    j = max(bisect.bisect_right(firsts, a) - 1, 0)
                    while j < len(ranges) and ranges[j][0] < b:
                        if ranges[j][1] > a:
                            got.add(ranges[j][2])
                        j += 1
                self._need.append(got)
        return p.owner * self.n_parts + p.part in self._need[r]

    def needs_per_rank(self) -> list[set[PieceId]]:
        """The same answers in bulk: per rank, the set of pieces it needs (finalize and
        verify test some 520K blocks at W = 64: set lookups instead of calls)."""
        if not self._need_pieces:
            self.needs(0, PieceId(0, 0))  # runs the sweep if not yet done
            pid = self._ids()
            self._need_pieces.extend({pid[i] for i in got} for got in self._need)
        return self._need_pieces

    def cost(self, r: int, p: PieceId) -> float:
        # The block's area. Worked out for every block at once on the first call
        # (groupcast asks for some 260K blocks at W = 64): per rank, the pairs its rows
        # see in the keys [0, k) are sum_i max(0, k - L_i) - max(0, k - E_i) over its
        # rows' key intervals [L_i, E_i) (one per row and band), evaluated at every
        # piece's key-range ends from sorted ends and prefix sums. Exact integers
        # (float64 sums of at most a few areas < 2^53).
        if not self._cost:
            self._cost.extend(self._areas())
        return self._cost[r][p.owner * self.n_parts + p.part]

    def _areas(self) -> list[list[float]]:
        import numpy as np

        n_all = self.w * self.n_parts
        lo_l, hi_l, idx_l = [], [], []
        for i, p in enumerate(self._ids()):
            for a, b in self.keys_of(p):
                lo_l.append(a)
                hi_l.append(b)
                idx_l.append(i)
        ka = np.array(lo_l + hi_l, dtype=np.int64)
        idx = np.array(idx_l, dtype=np.intp)
        n_r = len(lo_l)
        out = []
        mask = self.mask
        for rr in self.placement.rank_ranges:
            ls, es = [], []
            for qa, qb in rr:
                for bd in mask._slice(qa, qb, 0, mask.seqlen_k).bands:
                    q = np.arange(bd.q0, bd.q1, dtype=np.int64)
                    ls.append(np.maximum(q + bd.lo, bd.k0))
                    es.append(np.minimum(q + bd.hi, bd.k1 - 1) + 1)
            if not ls:
                out.append([0.0] * n_all)
                continue
            pairs = np.zeros(len(ka), dtype=np.int64)
            for ends, sign in ((np.sort(np.concatenate(ls)), 1), (np.sort(np.concatenate(es)), -1)):
                pre = np.concatenate((np.zeros(1, dtype=np.int64), np.cumsum(ends)))
                n_below = np.searchsorted(ends, ka, side="left")
                pairs += sign * (n_below * ka - pre[n_below])
            areas = pairs[n_r:] - pairs[:n_r]
            out.append(np.bincount(idx, weights=areas, minlength=n_all).tolist())
        return out

    def as_needs(self) -> Callable[[int, PieceId], bool]:
        """:meth:`needs` as the callable the schedule passes take, with its bulk form."""

        def needs(r: int, p: PieceId) -> bool:
            return self.needs(r, p)

        needs.per_rank = self.needs_per_rank
        return needs


@dataclass
class Verified:
    """What :func:`verified_schedule` gives: the schedule (its backward reversed where
    asked), the verifier's report, and the blocks' answers for the schedule's cut."""

    schedule: Schedule
    report: ScheduleReport
    needs: Callable[[int, PieceId], bool]
    blocks: object


def default_chunk(kv_placement: Placement) -> int | None:
    """The pieces of builders that cut by chunk: the dispatch's chunk, joined into
    pieces of several chunks where a rank has more than the default count
    (balanced_zigzag's fine grid): fewer, larger messages and blocks."""
    size, n = kv_placement.chunk_size, kv_placement.local_len
    if n % size == 0:
        while n // size > DEFAULT_CHUNKS_PER_RANK and n % (2 * size) == 0:
            size *= 2
    return size if n % size == 0 else None


def verified_schedule(
    name: str,
    kv_placement: Placement,
    options: dict,
    blocks_for: Callable[[tuple], object],
    *,
    backward: str = "replay",
) -> Verified:
    """Build schedule ``name`` for ``kv_placement``'s ranks, finalize and verify it.

    ``blocks_for(parts)`` gives an object answering ``needs(r, piece)`` and
    ``cost(r, piece)`` (and ``as_needs()``, ``cut(parts)``) for the keys cut into
    ``parts``; a builder that cuts pieces its own way is answered for its cut.
    ``backward="reverse"`` replaces the backward by the time-reversed one (ValueError
    where it does not apply)."""
    spec = spec_of(name)
    w, local_len = kv_placement.world_size, kv_placement.local_len
    opts = dict(options)
    if spec.takes_chunk:
        opts.setdefault("chunk", default_chunk(kv_placement))
    chunk = opts.get("chunk")
    cut = split_even(local_len, local_len // chunk if chunk else 1)
    blocks = blocks_for(cut)
    if spec.takes_mask:
        opts.update(needs=blocks.needs, cost=blocks.cost)
    routing = spec.build(w, local_len, **opts)
    if routing.parts != cut:
        blocks.cut(routing.parts)
    needs = blocks.as_needs()
    sched = finalize(routing, needs)
    report = verify(sched, needs, local_len=local_len)
    if backward == "reverse":
        reversed_ = reverse_backward(sched)
        if reversed_ is None:
            raise ValueError(
                f"backward: 'reverse' does not apply to {sched.name} with this "
                "mask (a rank only forwards some piece); use 'replay'"
            )
        verify_backward(reversed_, needs)
        sched = reversed_
    return Verified(sched, report, needs, blocks)
