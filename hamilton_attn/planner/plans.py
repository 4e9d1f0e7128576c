"""``plan(mask, group)``: where tokens live, how KV moves, verified before anything runs."""

from __future__ import annotations

import bisect
import functools
import gc
import hashlib
import inspect
from array import array
from dataclasses import dataclass, field

from .. import config
from ..kernels import BACKENDS
from ..masks import Mask
from ..placement import BALANCED, DISPATCHES, Placement, make_placement
from ..placement.layouts import DEFAULT_CHUNKS_PER_RANK
from ..runtime.comm import group_info, resolve_group
from ..schedule import (
    BUILDERS,
    PieceId,
    Schedule,
    ScheduleReport,
    build_routing,
    finalize,
    reverse_backward,
    split_even,
    verify,
    verify_backward,
)


@dataclass(eq=False)
class Plan:
    """Everything a context-parallel call needs, identical on every rank of ``group``.

    ``mask`` is the user's mask grown to the padded lengths (padding sees nothing and is
    seen by nothing). ``placement`` says which query tokens each rank holds and
    ``kv_placement`` which key/value tokens (the same object for self-attention).
    ``report`` holds what the verifier counted (tokens moved per rank and link, peak
    buffers); ``work`` the mask's area (pairs computed) per rank, and ``imbalance``
    max/mean of it. Plans are cached: equal arguments give the same object.
    """

    user_mask: Mask
    mask: Mask
    placement: Placement
    schedule: Schedule
    report: ScheduleReport
    group: object
    rank: int
    world_size: int
    group_ranks: tuple[int, ...]
    backend: str
    check: str
    kv_placement: Placement | None = None
    work: tuple[int, ...] = ()
    _block_masks: dict = field(default_factory=dict, repr=False)
    _checked: set = field(default_factory=set, repr=False)
    _gather_checked: set = field(default_factory=set, repr=False)  # undispatch signatures

    def __post_init__(self):
        if self.kv_placement is None:
            self.kv_placement = self.placement

    @property
    def self_attention(self) -> bool:
        """K/V share the queries' placement (else they are dispatched on their own)."""
        return self.kv_placement is self.placement

    @property
    def imbalance(self) -> float:
        """Largest per-rank work over the mean (1.0 is perfect balance)."""
        mean = sum(self.work) / max(1, len(self.work))
        return max(self.work) / mean if mean else 1.0

    @functools.cached_property
    def fingerprint(self) -> tuple[int, int]:
        """128 bits (two signed int64s) that identify the plan across ranks, the rank
        itself excluded: the mask, both placements, the final verified schedule (every
        step's blocks, transfers and gradient transfers, the pieces' cut, the backward
        and what it keeps) and the options that change a call (backend, check). Equal in
        every interpreter (no salted ``hash``); computed once."""
        raw = _fingerprint(self)
        return (
            int.from_bytes(raw[:8], "little", signed=True),
            int.from_bytes(raw[8:], "little", signed=True),
        )

    @property
    def local_len(self) -> int:
        """Local query tokens per rank (padding included)."""
        return self.placement.local_len

    @property
    def kv_local_len(self) -> int:
        """Local key/value tokens per rank (padding included)."""
        return self.kv_placement.local_len

    def piece_ranges(self, piece: PieceId) -> list[tuple[int, int]]:
        """Global key ranges of a piece."""
        return self.kv_placement.local_to_global(piece.owner, self.schedule.parts[piece.part])

    def block_mask(self, rank: int, piece: PieceId) -> Mask:
        """The mask of ``rank``'s local queries against ``piece``, in local coordinates."""
        key = (rank, piece)
        m = self._block_masks.get(key)
        if m is None:
            m = self.mask.gather(self.placement.rank_ranges[rank], self.piece_ranges(piece))
            self._block_masks[key] = m
        return m

    def block(self, rank: int, piece: PieceId) -> tuple[Mask, tuple[int, int], tuple[int, int]]:
        """The block trimmed to its mask's bounding box: ``(mask, q_range, k_range)`` with
        the mask re-based to the box (kernels and merges touch only rows and keys that
        matter: a zigzag rank's remote block covers half its rows)."""
        key = ("box", rank, piece)
        hit = self._block_masks.get(key)
        if hit is None:
            m = self.block_mask(rank, piece)
            qr = (min(b.q0 for b in m.bands), max(b.q1 for b in m.bands))
            kr = (min(b.k0 for b in m.bands), max(b.k1 for b in m.bands))
            hit = (m.slice(qr, kr), qr, kr)
            self._block_masks[key] = hit
        return hit

    def fused_block(
        self, rank: int, pieces: tuple[PieceId, ...]
    ) -> tuple[Mask, tuple[int, int], tuple[int, int]]:
        """Like :meth:`block` for several pieces computed in one kernel call: the keys
        are the pieces' tokens concatenated in the order given."""
        if len(pieces) == 1:
            return self.block(rank, pieces[0])
        key = ("fused", rank, pieces)
        hit = self._block_masks.get(key)
        if hit is None:
            kr = [r for p in pieces for r in self.piece_ranges(p)]
            m = self.mask.gather(self.placement.rank_ranges[rank], kr)
            qr = (min(b.q0 for b in m.bands), max(b.q1 for b in m.bands))
            kb = (min(b.k0 for b in m.bands), max(b.k1 for b in m.bands))
            hit = (m.slice(qr, kb), qr, kb)
            self._block_masks[key] = hit
        return hit

    def describe(self) -> str:
        kv = (
            ""
            if self.self_attention
            else (
                f", kv_dispatch={self.kv_placement.kind}, seqlen_k={self.kv_placement.seqlen}"
                f" (+{self.kv_placement.pad} pad)"
            )
        )
        return (
            f"Plan(W={self.world_size}, dispatch={self.placement.kind}, "
            f"schedule={self.schedule.name}, seqlen={self.placement.seqlen} "
            f"(+{self.placement.pad} pad){kv}, imbalance {self.imbalance:.3f}, "
            f"{self.report.summary()})"
        )


def _ints(h, values: list[int]) -> None:
    h.update(array("q", values).tobytes())


def _hash_steps(h, steps) -> None:
    # Length-prefixed flat int64 records, one buffer per step: a hamilton plan of 1M
    # tokens on 64 ranks has some 630K transfers and blocks, which this hashes in 0.7 s
    # (the plan itself takes 50 s) where repr() of the dataclasses alone took over 4 s.
    if steps is None:
        _ints(h, [-1])
        return
    _ints(h, [len(steps)])
    for st in steps:
        buf = [len(st.compute)]
        for pieces in st.compute:
            buf.append(len(pieces))
            buf.extend([x for pc in pieces for x in (pc.owner, pc.part)])
        for transfers in (st.transfers, st.grad_transfers):
            buf.append(len(transfers))
            buf.extend([x for t in transfers for x in (t.piece.owner, t.piece.part, t.src, t.dst)])
        _ints(h, buf)


def _hash_ranges(h, ranges) -> None:
    """``ranges``: per item, a tuple of ``(a, b)`` pairs."""
    _ints(h, [len(ranges)])
    for rr in ranges:
        _ints(h, [len(rr), *(x for ab in rr for x in ab)])


def _fingerprint(p: Plan) -> bytes:
    s = p.schedule
    h = hashlib.blake2b(digest_size=16)
    head = (
        "plan-fingerprint-1",
        p.user_mask.shape,
        p.user_mask.digest().hex(),
        p.mask.shape,
        p.world_size,
        p.group_ranks,
        p.backend,
        p.check,
        p.self_attention,
        s.name,
        s.world_size,
        s.comm,
        s.grad_route,
        float(s.buffer_budget).hex(),
    )
    h.update(repr(head).encode())
    for pl in (p.placement, p.kv_placement):
        h.update(repr((pl.kind, pl.seqlen, pl.padded_len, pl.world_size, pl.chunk_size)).encode())
        _hash_ranges(h, pl.rank_ranges)
    _hash_ranges(h, s.parts)
    _hash_steps(h, s.steps)
    _hash_steps(h, s.backward_steps)
    if s.retain is None:
        _ints(h, [-1])
    else:
        _ints(h, [len(s.retain)])
        for kept in s.retain:
            _ints(h, [len(kept), *(x for pc in kept for x in (pc.owner, pc.part))])
    return h.digest()


def _pick_dispatch(mask: Mask) -> str:
    return "contiguous" if mask.is_full() else "zigzag"


def _pick_schedule(mask: Mask, world_size: int, topology: str | None) -> str:
    """The planner's fastest predicted schedule for this mask on ``topology`` (default:
    ``HAMILTON_ATTN_TOPOLOGY``, else one NVSwitch node of W devices); ring if the
    planner has no answer."""
    from .cost import auto_schedule

    topology = topology or config.get().topology
    try:
        return auto_schedule(mask, world_size, topology)
    except (ValueError, KeyError) as err:
        if topology is not None:  # the user's own topology is wrong: say so
            msg = str(err)
            raise ValueError(msg if msg.startswith("topology") else f"topology: {msg}") from err
        return "ring"


#: A kernel call's fixed cost in visible pairs, added per dense piece of the mask (a
#: packed document, say) to the rows where the piece starts when balanced dispatches
#: weigh chunks. A rank given many short documents makes as many kernel calls, each
#: with a launch, ramp and tail that the pair count misses: on one H200, 25 us per
#: cuDNN call beyond its pairs at 620 TF/s (``benchmarks/results/op_profile_docs_*``),
#: which at 32 heads of dimension 128 (4 * 32 * 128 flops per pair) is about 2**20 pairs.
CALL_COST_PAIRS = 2**20


def _make_placement(
    kind,
    mask: Mask,
    w: int,
    chunk_size,
    seed: int,
    keys: bool,
    slack: float,
    call_cost: float = 0.0,
) -> Placement:
    """Queries' (``keys=False``) or keys' placement; balanced kinds cost a chunk by the
    mask's area in its rows (or columns), plus ``call_cost`` pairs for each dense piece
    that starts in its rows (queries' placement of a mask of several pieces; see
    :func:`~hamilton_attn.placement.layouts.balanced`)."""
    if kind in BALANCED:
        if keys:

            def cost(a, b):
                return mask.slice((0, mask.seqlen_q), (a, b)).area()
        else:

            def cost(a, b):
                return mask.slice((a, b), (0, mask.seqlen_k)).area()

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


def _without_gc(fn):
    """Run ``fn`` with Python's cyclic collector paused (its previous state restored).
    A plan allocates W^3 acyclic objects (transfers, blocks, dict keys: 254K transfers
    for hamilton at W = 64), and each generation-2 pass walks all of them: 40% of
    that plan's time. Reference counting still frees everything at once."""

    @functools.wraps(fn)
    def run(*args):
        was = gc.isenabled()
        gc.disable()
        try:
            return fn(*args)
        finally:
            if was:
                gc.enable()

    return run


@functools.lru_cache(maxsize=64)
@_without_gc
def _cached_plan(
    mask,
    group,
    schedule,
    dispatch,
    chunk_size,
    backend,
    check,
    backward,
    topology,
    kv_dispatch,
    dispatch_seed,
    balance_slack,
    call_cost,
    options,
):
    rank, w, ranks = group_info(group)
    if kv_dispatch is None and mask.seqlen_q != mask.seqlen_k:
        raise ValueError(
            f"mask: self-attention (kv_dispatch=None) needs a square mask, got {mask.shape};"
            " give kv_dispatch= to dispatch keys on their own (cross-attention)"
        )
    if dispatch == "auto":
        dispatch = _pick_dispatch(mask)
    if schedule == "auto":
        schedule = _pick_schedule(mask, w, topology)
        if schedule == "hamilton_2level" and "node_size" not in dict(options):
            schedule = "ring"  # two-level needs the node size the user did not give
    placement = _make_placement(
        dispatch,
        mask,
        w,
        chunk_size,
        dispatch_seed,
        keys=False,
        slack=balance_slack,
        call_cost=call_cost,
    )
    if kv_dispatch is None:
        kv_placement = placement
    else:
        kv_dispatch = _pick_dispatch(mask) if kv_dispatch == "auto" else kv_dispatch
        kv_placement = _make_placement(
            kv_dispatch, mask, w, chunk_size, dispatch_seed, keys=True, slack=balance_slack
        )
    padded = Mask(mask.bands, placement.padded_len, kv_placement.padded_len, _canonical=True)
    opts = dict(options)
    accepts = inspect.signature(BUILDERS[schedule]).parameters
    if "chunk" in accepts:  # builders that cut pieces by chunk: the dispatch's chunk,
        # joined into pieces of several chunks where a rank has more than the default
        # count (balanced_zigzag's fine grid): fewer, larger messages and blocks.
        size, n = kv_placement.chunk_size, kv_placement.local_len
        if n % size == 0:
            while n // size > DEFAULT_CHUNKS_PER_RANK and n % (2 * size) == 0:
                size *= 2
        opts.setdefault("chunk", size if n % size == 0 else None)
    # The pieces' cut that mask-aware builders ask about (read by block() at call time;
    # replaced below if the builder cuts differently).
    chunk = opts.get("chunk")
    cut = split_even(kv_placement.local_len, kv_placement.local_len // chunk if chunk else 1)
    holder: dict = {}
    n_parts = len(cut)
    piece_keys: list = [None] * (w * n_parts)  # [owner * parts + part] -> global key ranges
    seen = _seen_keys(padded, placement)
    seen_all = [_merge_intervals(iv for st, en in per for iv in zip(st, en)) for per in seen]

    def keys_of(p: PieceId):
        i = p.owner * n_parts + p.part
        kr = piece_keys[i]
        if kr is None:
            kr = piece_keys[i] = kv_placement.local_to_global(p.owner, cut[p.part])
        return kr

    def block(r: int, p: PieceId) -> Mask:
        key = (r, p)
        if key not in holder:
            holder[key] = padded.gather(placement.rank_ranges[r], keys_of(p))
        return holder[key]

    need: list = []  # [rank] -> {owner * parts + part of each piece it needs}

    def needs(r: int, p: PieceId) -> bool:
        # A block has a visible pair iff the piece holds a key that some row of the
        # rank sees. Answered from one sweep of the pieces' key ranges (they cut the
        # keys) against each rank's seen intervals, instead of cutting every one of
        # the W^2 x pieces blocks' masks out (the executor cuts its own when it runs).
        if not need:
            ranges = sorted(
                (a, b, i)
                for i in range(w * n_parts)
                for a, b in keys_of(PieceId(i // n_parts, i % n_parts))
            )
            firsts = [a for a, _, _ in ranges]
            for starts, ends in seen_all:
                got = set()
                for a, b in zip(starts, ends):
                    j = max(bisect.bisect_right(firsts, a) - 1, 0)
                    while j < len(ranges) and ranges[j][0] < b:
                        if ranges[j][1] > a:
                            got.add(ranges[j][2])
                        j += 1
                need.append(got)
        return p.owner * n_parts + p.part in need[r]

    need_pieces: list = []  # needs_per_rank's answer, once (read, never changed)

    def needs_per_rank() -> list[set[PieceId]]:
        # The same answers in bulk: per rank, the set of pieces it needs (finalize and
        # verify test some 520K blocks at W = 64: set lookups instead of calls).
        if not need_pieces:
            needs(0, PieceId(0, 0))  # runs the sweep if not yet done
            pid = [PieceId(i // n_parts, i % n_parts) for i in range(w * n_parts)]
            need_pieces.extend({pid[i] for i in got} for got in need)
        return need_pieces

    needs.per_rank = needs_per_rank

    cost_tab: list = []  # [rank] -> [owner * parts + part] -> the block's area

    def cost(r: int, p: PieceId) -> float:
        # The block's area. Worked out for every block at once on the first call
        # (groupcast asks for some 260K blocks at W = 64): per rank, the pairs its rows
        # see in the keys [0, k) are sum_i max(0, k - L_i) - max(0, k - E_i) over its
        # rows' key intervals [L_i, E_i) (one per row and band), evaluated at every
        # piece's key-range ends from sorted ends and prefix sums. Exact integers
        # (float64 sums of at most a few areas < 2^53).
        if not cost_tab:
            import numpy as np

            lo_l, hi_l, idx_l = [], [], []
            for i in range(w * n_parts):
                for a, b in keys_of(PieceId(i // n_parts, i % n_parts)):
                    lo_l.append(a)
                    hi_l.append(b)
                    idx_l.append(i)
            ka = np.array(lo_l + hi_l, dtype=np.int64)
            idx = np.array(idx_l, dtype=np.intp)
            n_r = len(lo_l)
            for rr in placement.rank_ranges:
                ls, es = [], []
                for qa, qb in rr:
                    for bd in padded._slice(qa, qb, 0, padded.seqlen_k).bands:
                        q = np.arange(bd.q0, bd.q1, dtype=np.int64)
                        ls.append(np.maximum(q + bd.lo, bd.k0))
                        es.append(np.minimum(q + bd.hi, bd.k1 - 1) + 1)
                if not ls:
                    cost_tab.append([0.0] * (w * n_parts))
                    continue
                pairs = np.zeros(len(ka), dtype=np.int64)
                for ends, sign in (
                    (np.sort(np.concatenate(ls)), 1),
                    (np.sort(np.concatenate(es)), -1),
                ):
                    pre = np.concatenate((np.zeros(1, dtype=np.int64), np.cumsum(ends)))
                    n_below = np.searchsorted(ends, ka, side="left")
                    pairs += sign * (n_below * ka - pre[n_below])
                areas = pairs[n_r:] - pairs[:n_r]
                cost_tab.append(np.bincount(idx, weights=areas, minlength=w * n_parts).tolist())
        return cost_tab[r][p.owner * n_parts + p.part]

    if "needs" in accepts:
        opts.update(needs=needs, cost=cost)
    routing = build_routing(schedule, w, kv_placement.local_len, **opts)
    if routing.parts != cut:
        cut = routing.parts
        holder.clear()
        n_parts = len(cut)
        piece_keys[:] = [None] * (w * n_parts)
        need.clear()
        need_pieces.clear()
        cost_tab.clear()
    sched = finalize(routing, needs)
    report = verify(sched, needs, local_len=kv_placement.local_len)
    if backward == "reverse":
        reversed_ = reverse_backward(sched)
        if reversed_ is None:
            raise ValueError(
                f"backward: 'reverse' does not apply to {sched.name} with this "
                "mask (a rank only forwards some piece); use 'replay'"
            )
        verify_backward(reversed_, needs)
        sched = reversed_
    # Rows are disjoint, so a rank's work is the sum over its query ranges (joining
    # them into one mask first, as a gather does, changes no count).
    work = tuple(
        sum(padded._slice(qa, qb, 0, kv_placement.padded_len).area() for qa, qb in rr)
        for rr in placement.rank_ranges
    )
    p = Plan(
        mask,
        padded,
        placement,
        sched,
        report,
        group,
        rank,
        w,
        ranks,
        backend,
        check,
        kv_placement,
        work,
    )
    p._block_masks.update(holder)
    return p


def plan(
    mask: Mask,
    group=None,
    *,
    schedule: str = "auto",
    dispatch: str = "auto",
    chunk_size: int | None = None,
    backend: str = "auto",
    check: str = "first",
    backward: str = "replay",
    topology: str | None = None,
    kv_dispatch: str | None = None,
    dispatch_seed: int = 0,
    balance_slack: float | None = None,
    call_cost: float | None = None,
    **schedule_options,
) -> Plan:
    """Plan context-parallel attention of ``mask`` (over the global sequence) on ``group``.

    Args:
        mask: a square :class:`Mask` over the whole (unpadded) sequence.
        group: the process group (default: the world group; none: one process). This
            process must be a member. Under a launcher (``WORLD_SIZE`` > 1) with no
            process group, the default is refused; ``SimulatedGroup(1)`` plans for
            this rank alone.
        schedule: how KV moves: ``ring``, ``bidi_ring``, ``line``, ``allgather``,
            ``hamilton``, ``hamilton_2level``, ``direct``, ``groupcast`` (each KV chunk
            only to the ranks that need it, in ``degree=`` stages, ``node_size=`` for
            once-per-node crossing), any registered schedule, or ``auto`` (the
            planner's fastest predicted for ``topology``).
        dispatch: which query tokens each rank holds: ``contiguous``, ``zigzag``,
            ``stripe``, ``auto`` (contiguous for full masks, else zigzag), or a
            work-balanced dispatch over chunks of ``chunk_size`` tokens costed by the
            mask's area: ``minheap`` (greedy, largest first), ``balanced_zigzag`` (two
            runs of consecutive tokens per rank, lengths balanced: documents stay
            whole), ``exact`` (optimal, at most 16 chunks), and the baselines
            ``sequential`` and ``random``.
        chunk_size: chunk sizes are a multiple of this (padding added as needed); for
            the balanced dispatches, the chunk size itself (default: 16 chunks per rank,
            64 for ``balanced_zigzag``).
        kv_dispatch: None (self-attention: keys and values are the queries' tokens, the
            mask is square), or a dispatch for keys and values of their own
            (cross-attention, any ``Sq x Sk`` mask; balanced kinds cost columns).
        dispatch_seed: seed of the ``random`` dispatch.
        balance_slack: how much work balance ``minheap`` may trade for locality: it may
            give a chunk to a rank up to this fraction of the mean per-rank work heavier
            than the lightest, when that rank then fetches fewer KV chunks (default
            0.02; 0 is the plain greedy).
        call_cost: what one kernel call costs beyond its pairs, in pairs, when the
            balanced dispatches weigh chunks: each dense piece of the mask (a packed
            document) adds it to the chunk where it starts, so a rank handed many
            short documents gets fewer tokens. Default :data:`CALL_COST_PAIRS`
            (about 25 us on an H200 at 32 heads of dimension 128); 0 balances pairs
            alone.
        backend: local kernel for every block (``auto`` picks per block).
        check: cross-rank consistency check of inputs and plan before communication:
            ``first`` (once per input signature), ``always``, or ``never``.
        topology: the cluster ``auto`` plans for, e.g. ``nvswitch:8``, ``full_mesh:8``,
            ``nodes:2x8`` (default ``HAMILTON_ATTN_TOPOLOGY``, else one NVSwitch node).
        backward: ``replay`` (the forward's steps again, KV re-sent, dK/dV routed
            home) or ``reverse`` (the steps in reverse order: each rank keeps the KV it
            received last from the forward, so no dK/dV transfer is left exposed at the
            end; costs that KV's memory between forward and backward: ring, one shard).

    The schedule is verified (every needed block computed once, every gradient home,
    buffers bounded) before it is returned; a bad argument raises ValueError here, on
    every rank, before any communication.
    """
    if not isinstance(mask, Mask):
        raise ValueError(f"mask: expected a hamilton_attn.Mask, got {type(mask).__name__}")
    if schedule != "auto" and schedule not in BUILDERS:
        raise ValueError(
            f"schedule: expected one of {sorted(BUILDERS)} or 'auto', got {schedule!r}"
        )
    if dispatch != "auto" and dispatch not in DISPATCHES:
        raise ValueError(f"dispatch: expected one of {DISPATCHES} or 'auto', got {dispatch!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if check not in ("first", "always", "never"):
        raise ValueError(f"check: expected 'first', 'always' or 'never', got {check!r}")
    if backward not in ("replay", "reverse"):
        raise ValueError(f"backward: expected 'replay' or 'reverse', got {backward!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    if kv_dispatch is not None and kv_dispatch != "auto" and kv_dispatch not in DISPATCHES:
        raise ValueError(
            f"kv_dispatch: expected None, 'auto' or one of {DISPATCHES}, got {kv_dispatch!r}"
        )
    if not isinstance(dispatch_seed, int):
        raise ValueError(f"dispatch_seed: expected an int, got {dispatch_seed!r}")
    if balance_slack is None:
        from ..placement.layouts import LOCALITY_SLACK as balance_slack
    if not isinstance(balance_slack, (int, float)) or not 0 <= balance_slack <= 1:
        raise ValueError(f"balance_slack: expected a number in [0, 1], got {balance_slack!r}")
    call_cost = CALL_COST_PAIRS if call_cost is None else call_cost
    if isinstance(call_cost, bool) or not isinstance(call_cost, (int, float)) or call_cost < 0:
        raise ValueError(f"call_cost: expected a number >= 0 (pairs), got {call_cost!r}")
    # Before the cache: whether this process may plan on ``group`` can change without
    # the arguments changing (torchrun's WORLD_SIZE, a non-member of a subgroup).
    group = resolve_group(group)
    group_info(group)
    if schedule == "hamilton_2level" and schedule_options.get("node_size") is None:
        # torchrun's devices per node, where the caller gives none.
        schedule_options["node_size"] = config.get().local_world_size
    return _cached_plan(
        mask,
        group,
        schedule,
        dispatch,
        chunk_size,
        backend,
        check,
        backward,
        topology,
        kv_dispatch,
        dispatch_seed,
        float(balance_slack),
        float(call_cost),
        tuple(sorted(schedule_options.items())),
    )
