"""``plan(mask, group)``: where tokens live, how KV moves, verified before anything runs."""

from __future__ import annotations

import bisect
import functools
import inspect
import os
import zlib
from dataclasses import dataclass, field

from .comm import group_info
from .dispatch import BALANCED, DISPATCHES, Placement, make_placement
from .dispatch.placement import DEFAULT_CHUNKS_PER_RANK
from .kernels import BACKENDS
from .masks import Mask
from .schedule import (
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

    @property
    def key(self) -> tuple:
        """Identifies the plan across ranks (the rank itself excluded)."""
        return (
            self.user_mask.shape,
            self.user_mask.digest().hex(),
            self.placement.rank_ranges,
            self.placement.padded_len,
            None if self.self_attention else self.kv_placement.rank_ranges,
            self.schedule.name,
            self.world_size,
            self.group_ranks,
        )

    @functools.cached_property
    def digest(self) -> int:
        """A 31-bit digest of ``key`` that is equal in every interpreter (Python's own
        ``hash`` of strings is salted per process)."""
        return zlib.crc32(repr(self.key).encode()) & 0x7FFFFFFF

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


def _pick_dispatch(mask: Mask) -> str:
    return "contiguous" if mask.is_full() else "zigzag"


def _pick_schedule(mask: Mask, world_size: int, topology: str | None) -> str:
    """The planner's fastest predicted schedule for this mask on ``topology`` (default:
    ``HAMILTON_ATTN_TOPOLOGY``, else one NVSwitch node of W devices); ring if the
    planner has no answer."""
    from .planner.cost import auto_schedule

    topology = topology or os.environ.get("HAMILTON_ATTN_TOPOLOGY") or None
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
    :func:`~hamilton_attn.dispatch.placement.balanced`)."""
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


@functools.lru_cache(maxsize=64)
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

    def block(r: int, p: PieceId) -> Mask:
        key = (r, p)
        if key not in holder:
            kr = kv_placement.local_to_global(p.owner, cut[p.part])
            holder[key] = padded.gather(placement.rank_ranges[r], kr)
        return holder[key]

    def needs(r: int, p: PieceId) -> bool:
        return not block(r, p).is_empty()

    def cost(r: int, p: PieceId) -> float:
        return float(block(r, p).area())

    if "needs" in accepts:
        opts.update(needs=needs, cost=cost)
    routing = build_routing(schedule, w, kv_placement.local_len, **opts)
    if routing.parts != cut:
        cut = routing.parts
        holder.clear()
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
    work = tuple(
        padded.gather(placement.rank_ranges[r], [(0, kv_placement.padded_len)]).area()
        for r in range(w)
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
        group: the process group (default: the world group; none: one process).
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
        from .dispatch.placement import LOCALITY_SLACK as balance_slack
    if not isinstance(balance_slack, (int, float)) or not 0 <= balance_slack <= 1:
        raise ValueError(f"balance_slack: expected a number in [0, 1], got {balance_slack!r}")
    call_cost = CALL_COST_PAIRS if call_cost is None else call_cost
    if isinstance(call_cost, bool) or not isinstance(call_cost, (int, float)) or call_cost < 0:
        raise ValueError(f"call_cost: expected a number >= 0 (pairs), got {call_cost!r}")
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
