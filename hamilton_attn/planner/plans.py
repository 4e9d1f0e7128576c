"""``plan(mask, group)``: where tokens live, how KV moves, verified before anything runs."""

from __future__ import annotations

import dataclasses
import functools
import gc
from dataclasses import dataclass, field, fields
from typing import NamedTuple

from .. import config
from ..kernels import BACKENDS
from ..masks import Mask
from ..placement import DISPATCHES, Placement
from ..placement.layouts import LOCALITY_SLACK
from ..runtime.comm import as_group, group_info, resolve_group
from ..runtime.state import PlanState
from ..schedule import BUILDERS, PieceId, Schedule, ScheduleReport, spec_of
from .cost import split_name
from .fingerprint import plan_digest
from .heads import HeadParallel, check_degree, group_placement, head_layout
from .pipeline import MaskBlocks, placement_for, shared_placements, verified_schedule


class Members(NamedTuple):
    """The ranks a plan runs on: the group, this process's rank in it, its size, and
    the members' global ranks."""

    group: object
    rank: int
    world_size: int
    ranks: tuple[int, ...]


@dataclass(eq=False)
class Plan:
    """Everything a context-parallel call needs, identical on every rank of ``group``.

    ``mask`` is the user's mask grown to the padded lengths (padding sees nothing and is
    seen by nothing). ``placement`` says which query tokens each rank holds and
    ``kv_placement`` which key/value tokens (the same object for self-attention).
    ``report`` holds what the verifier counted (tokens moved per rank and link, peak
    buffers); ``work`` the mask's area (pairs computed) per rank, and ``imbalance``
    max/mean of it. ``members``: the group and this rank in it; ``options``: the
    :class:`PlanOptions` it was made with. Per-plan runtime state (block masks cut,
    checks passed, kernels chosen) lives in ``_state`` (:mod:`..runtime.state`).
    Plans are cached: equal arguments give the same object.
    """

    user_mask: Mask
    mask: Mask
    placement: Placement
    kv_placement: Placement
    schedule: Schedule
    report: ScheduleReport
    work: tuple[int, ...]
    members: Members
    options: PlanOptions
    heads: HeadParallel | None = None  # head parallelism (planner/heads.py), if any
    _state: PlanState = field(default_factory=PlanState, repr=False)  # runtime/state.py

    @property
    def group(self):
        """The process group (or :class:`SimulatedGroup`) the plan runs on."""
        return self.members.group

    @property
    def rank(self) -> int:
        return self.members.rank

    @property
    def world_size(self) -> int:
        return self.members.world_size

    @property
    def group_ranks(self) -> tuple[int, ...]:
        """The group's members' global ranks."""
        return self.members.ranks

    @property
    def backend(self) -> str:
        return self.options.backend

    @property
    def check(self) -> str:
        return self.options.check

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
        raw = plan_digest(self)
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
        m = self._state.block_masks.get(key)
        if m is None:
            m = self.mask.gather(self.placement.rank_ranges[rank], self.piece_ranges(piece))
            self._state.block_masks[key] = m
        return m

    def block(self, rank: int, piece: PieceId) -> tuple[Mask, tuple[int, int], tuple[int, int]]:
        """The block trimmed to its mask's bounding box: ``(mask, q_range, k_range)`` with
        the mask re-based to the box (kernels and merges touch only rows and keys that
        matter: a zigzag rank's remote block covers half its rows)."""
        key = ("box", rank, piece)
        hit = self._state.block_masks.get(key)
        if hit is None:
            m = self.block_mask(rank, piece)
            qr = (min(b.q0 for b in m.bands), max(b.q1 for b in m.bands))
            kr = (min(b.k0 for b in m.bands), max(b.k1 for b in m.bands))
            hit = (m.slice(qr, kr), qr, kr)
            self._state.block_masks[key] = hit
        return hit

    def fused_block(
        self, rank: int, pieces: tuple[PieceId, ...]
    ) -> tuple[Mask, tuple[int, int], tuple[int, int]]:
        """Like :meth:`block` for several pieces computed in one kernel call: the keys
        are the pieces' tokens concatenated in the order given."""
        if len(pieces) == 1:
            return self.block(rank, pieces[0])
        key = ("fused", rank, pieces)
        hit = self._state.block_masks.get(key)
        if hit is None:
            kr = [r for p in pieces for r in self.piece_ranges(p)]
            m = self.mask.gather(self.placement.rank_ranges[rank], kr)
            qr = (min(b.q0 for b in m.bands), max(b.q1 for b in m.bands))
            kb = (min(b.k0 for b in m.bands), max(b.k1 for b in m.bands))
            hit = (m.slice(qr, kb), qr, kb)
            self._state.block_masks[key] = hit
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


def _pick_schedule(
    mask: Mask, world_size: int, topology: str | None, heads=None, degree: int | None = None
) -> str:
    """The planner's fastest predicted schedule for this mask on ``topology`` (default:
    ``HAMILTON_ATTN_TOPOLOGY``, else one NVSwitch node of W devices); ring if the
    planner has no answer. With ``heads`` ``(Hq, Hk)`` known, Ulysses and the hybrids
    compete too (a name ``S+ulyssesU``, or ``ulysses``). With a ``degree`` the user
    chose, only the schedules at that degree compete (heads unknown: priced with 32,
    or 8 per member where 32 does not split)."""
    from .cost import DEFAULT_CANDIDATES, auto_schedule
    from .model import Shapes

    topology = topology or config.get().topology
    shapes = None if heads is None else Shapes(heads=heads[0], kv_heads=heads[1])
    candidates = None
    if degree is not None and degree > 1:
        if shapes is None:
            hq = 32 if 32 % degree == 0 else 8 * degree
            shapes = Shapes(heads=hq, kv_heads=hq // 4 if hq % 4 == 0 else hq)
        bases = [n for n in DEFAULT_CANDIDATES if n != "hamilton_2level"]
        candidates = (
            ["ulysses"] if degree == world_size else [f"{n}+ulysses{degree}" for n in bases]
        )
    try:
        return auto_schedule(mask, world_size, topology, shapes=shapes, candidates=candidates)
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


@dataclass(frozen=True, kw_only=True)
class PlanOptions:
    """:func:`plan`'s options (documented there), validated on construction; with the
    mask and the group, the key of the plan cache. ``balance_slack`` and ``call_cost``
    None take their defaults (``LOCALITY_SLACK``, :data:`CALL_COST_PAIRS`);
    ``schedule_options`` (the builder's own options, e.g. ``degree=``) may be given as
    a dict and is kept sorted."""

    schedule: str = "auto"
    dispatch: str = "auto"
    chunk_size: int | None = None
    backend: str = "auto"
    check: str = "first"
    backward: str = "replay"
    topology: str | None = None
    kv_dispatch: str | None = None
    dispatch_seed: int = 0
    balance_slack: float | None = None
    call_cost: float | None = None
    ulysses_degree: int | None = None
    heads: tuple[int, int] | None = None
    #: The group's global ranks in plan order (from a 2-d DeviceMesh), or None: the
    #: group's own order.
    rank_order: tuple[int, ...] | None = None
    #: ``(queries' placement, keys' placement)`` taken from another plan (``placement=``):
    #: every layer of a model then holds the same tokens on each rank.
    shared_placement: tuple[Placement, Placement] | None = None
    #: Other masks whose work the balanced dispatches weigh with this one's.
    balance_masks: tuple[Mask, ...] = ()
    schedule_options: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        if self.schedule not in ("auto", "ulysses") and self.schedule not in BUILDERS:
            raise ValueError(
                f"schedule: expected one of {sorted(BUILDERS)}, 'ulysses' or 'auto', got "
                f"{self.schedule!r}"
            )
        u = self.ulysses_degree
        if u is not None and (isinstance(u, bool) or not isinstance(u, int) or u < 1):
            raise ValueError(f"ulysses_degree: expected a positive int or None, got {u!r}")
        h = self.heads
        if h is not None:
            ok = isinstance(h, tuple) and len(h) == 2 and all(isinstance(x, int) for x in h)
            if not ok or min(h) < 1 or h[0] % h[1]:
                raise ValueError(
                    f"heads: expected (query heads, KV heads) ints with Hk dividing Hq, got {h!r}"
                )
        if self.dispatch != "auto" and self.dispatch not in DISPATCHES:
            raise ValueError(
                f"dispatch: expected one of {DISPATCHES} or 'auto', got {self.dispatch!r}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {self.backend!r}")
        if self.check not in ("first", "always", "never"):
            raise ValueError(f"check: expected 'first', 'always' or 'never', got {self.check!r}")
        if self.backward not in ("replay", "reverse"):
            raise ValueError(f"backward: expected 'replay' or 'reverse', got {self.backward!r}")
        cs = self.chunk_size
        if cs is not None and (not isinstance(cs, int) or cs < 1):
            raise ValueError(f"chunk_size: expected a positive int or None, got {cs!r}")
        kv = self.kv_dispatch
        if kv is not None and kv != "auto" and kv not in DISPATCHES:
            raise ValueError(
                f"kv_dispatch: expected None, 'auto' or one of {DISPATCHES}, got {kv!r}"
            )
        if not isinstance(self.dispatch_seed, int):
            raise ValueError(f"dispatch_seed: expected an int, got {self.dispatch_seed!r}")
        slack = LOCALITY_SLACK if self.balance_slack is None else self.balance_slack
        if not isinstance(slack, (int, float)) or not 0 <= slack <= 1:
            raise ValueError(f"balance_slack: expected a number in [0, 1], got {slack!r}")
        cost = CALL_COST_PAIRS if self.call_cost is None else self.call_cost
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or cost < 0:
            raise ValueError(f"call_cost: expected a number >= 0 (pairs), got {cost!r}")
        extra = self.schedule_options
        extra = tuple(sorted(extra.items() if isinstance(extra, dict) else extra))
        object.__setattr__(self, "balance_slack", float(slack))
        object.__setattr__(self, "call_cost", float(cost))
        object.__setattr__(self, "schedule_options", extra)


@functools.lru_cache(maxsize=64)
def _cached_plan(mask: Mask, group, options: PlanOptions) -> Plan:
    was = gc.isenabled()
    # Python's cyclic collector paused (its state restored): a plan allocates W^3
    # acyclic objects (transfers, blocks, dict keys: 254K transfers for hamilton at
    # W = 64), and each generation-2 pass walks all of them: 40% of that plan's time.
    # Reference counting still frees everything at once.
    gc.disable()
    try:
        return _build_plan(mask, group, options)
    finally:
        if was:
            gc.enable()


def _build_plan(mask: Mask, group, o: PlanOptions) -> Plan:
    rank, w, ranks = group_info(group)
    if o.rank_order is not None:  # a mesh's order: plan rank r is global rank order[r]
        if sorted(o.rank_order) != sorted(ranks):
            raise ValueError(f"group: the mesh's ranks {o.rank_order} are not the group's")
        rank, ranks = o.rank_order.index(ranks[rank]), o.rank_order
    if o.kv_dispatch is None and mask.seqlen_q != mask.seqlen_k:
        raise ValueError(
            f"mask: self-attention (kv_dispatch=None) needs a square mask, got {mask.shape};"
            " give kv_dispatch= to dispatch keys on their own (cross-attention)"
        )
    extra = dict(o.schedule_options)
    dispatch = _pick_dispatch(mask) if o.dispatch == "auto" else o.dispatch
    schedule, picked_degree = o.schedule, None
    if schedule == "auto":
        picked = _pick_schedule(mask, w, o.topology, o.heads, o.ulysses_degree)
        schedule, picked_degree = split_name(picked)
        if schedule != "ulysses" and spec_of(schedule).node_size and "node_size" not in extra:
            schedule = "ring"  # it needs the node size the user did not give
        picked_degree = None if picked_degree in (0, 1) else picked_degree
    if o.shared_placement is not None:
        placement, kv_placement = shared_placements(o.shared_placement, o, mask, w)
    else:
        placement = placement_for(dispatch, mask, w, o.chunk_size, o.dispatch_seed,
                                  slack=o.balance_slack, call_cost=o.call_cost,
                                  also=o.balance_masks)  # fmt: skip
        kv_placement = placement
    if o.kv_dispatch is not None and o.shared_placement is None:
        kv_dispatch = _pick_dispatch(mask) if o.kv_dispatch == "auto" else o.kv_dispatch
        kv_placement = placement_for(
            kv_dispatch, mask, w, o.chunk_size, o.dispatch_seed, keys=True, slack=o.balance_slack
        )
    padded = Mask(mask.bands, placement.padded_len, kv_placement.padded_len, _canonical=True)
    members = Members(group, rank, w, ranks)
    degree = w if schedule == "ulysses" else (o.ulysses_degree or picked_degree or 1)
    if schedule == "ulysses" and o.ulysses_degree not in (None, w):
        raise ValueError(
            f"ulysses_degree: schedule='ulysses' splits heads over all {w} ranks, got "
            f"ulysses_degree={o.ulysses_degree} (give another schedule for a hybrid)"
        )
    if schedule == "ulysses" and degree == 1:
        schedule = "ring"  # one rank: nothing to split, the local block alone
    if degree > 1:
        return _head_parallel_plan(mask, padded, placement, kv_placement, schedule, degree,
                                   members, o)  # fmt: skip
    made = verified_schedule(
        schedule,
        kv_placement,
        extra,
        lambda parts: MaskBlocks(padded, placement, kv_placement, parts),
        backward=o.backward,
    )
    # Rows are disjoint, so a rank's work is the sum over its query ranges (joining
    # them into one mask first, as a gather does, changes no count).
    work = tuple(
        sum(padded._slice(qa, qb, 0, kv_placement.padded_len).area() for qa, qb in rr)
        for rr in placement.rank_ranges
    )
    p = Plan(mask, padded, placement, kv_placement, made.schedule, made.report, work, members, o)
    p._state.block_masks.update(made.blocks.block_masks)
    return p


def _head_parallel_plan(mask, padded, placement, kv_placement, schedule, degree, members, o):
    """A plan whose calls split heads over head groups of ``degree`` ranks and run
    ``schedule`` across the groups (:mod:`.heads`)."""
    w = members.world_size
    check_degree(degree, w)
    member, head_ranks, context_ranks, g = head_layout(members.rank, members.ranks, degree)
    gp = group_placement(placement, degree)
    gkv = gp if kv_placement is placement else group_placement(kv_placement, degree)
    inner_name = "ring" if schedule == "ulysses" else schedule
    extra = dict(o.schedule_options)
    m = extra.get("node_size")
    if m is not None:  # a context group has m / degree ranks in each node
        if m % degree:
            raise ValueError(
                f"node_size: {m} devices per node do not hold whole head groups of "
                f"{degree} (ulysses_degree)"
            )
        extra["node_size"] = m // degree
    made = verified_schedule(
        inner_name,
        gkv,
        extra,
        lambda parts: MaskBlocks(padded, gp, gkv, parts),
        backward=o.backward,
    )
    group_work = tuple(
        sum(padded._slice(qa, qb, 0, gkv.padded_len).area() for qa, qb in rr)
        for rr in gp.rank_ranges
    )
    inner_options = dataclasses.replace(o, schedule=inner_name, ulysses_degree=None)
    inner = Plan(mask, padded, gp, gkv, made.schedule, made.report, group_work,
                 Members(members.group, g, w // degree, context_ranks), inner_options)  # fmt: skip
    inner._state.block_masks.update(made.blocks.block_masks)
    # Each member computes its group's pairs for 1/degree of the heads.
    work = tuple(group_work[r // degree] / degree for r in range(w))
    heads = HeadParallel(degree, member, head_ranks, inner)
    return Plan(mask, padded, placement, kv_placement, made.schedule, made.report, work,
                members, o, heads)  # fmt: skip


# plan()'s own arguments that are PlanOptions fields.
_PLAN_ARGS = frozenset(
    "schedule dispatch chunk_size backend check backward topology kv_dispatch dispatch_seed "
    "balance_slack call_cost ulysses_degree heads".split()
)


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
    ulysses_degree: int | None = None,
    heads: tuple[int, int] | None = None,
    placement: Plan | None = None,
    balance_masks=(),
    **schedule_options,
) -> Plan:
    """Plan context-parallel attention of ``mask`` (over the global sequence) on ``group``.

    Args:
        mask: a square :class:`Mask` over the whole (unpadded) sequence.
        group: the process group (default: the world group; none: one process), a
            1-d DeviceMesh (e.g. the sub-mesh ``mesh["cp"]`` of a ``dp x cp`` mesh: the
            ranks that share one sequence), or a 2-d DeviceMesh with a dim named
            ``ulysses`` (or ``heads``): heads are split over that dim and the sequence
            over the other (``ulysses_degree`` is its size). This process must be a
            member. Under a launcher (``WORLD_SIZE`` > 1) with no process group, the
            default is refused; ``SimulatedGroup(1)`` plans for this rank alone.
        schedule: how KV moves: ``ring``, ``bidi_ring``, ``line``, ``allgather``,
            ``hamilton``, ``hamilton_2level``, ``direct``, ``groupcast`` (each KV chunk
            only to the ranks that need it, in ``degree=`` stages, ``node_size=`` for
            once-per-node crossing), any registered schedule, ``ulysses`` (heads split
            over all ranks by all-to-all, each rank attends over the whole sequence), or
            ``auto`` (the planner's fastest predicted for ``topology``).
        placement: another plan whose token placement this one takes (queries', and
            keys' for cross-attention), or a :class:`~hamilton_attn.placement.Placement`
            (self-attention: which global tokens each rank holds, as a peer's API shards
            them), so that tensors dispatched once serve every layer
            of a model (full, sliding-window, other windows): plan the first layer with
            ``balance_masks=`` (the other layers' masks, weighed with its own by the
            balanced dispatches), the others with ``placement=`` that plan. What a plan
            can detect of a tensor is its local length: two plans with different
            placements of equal lengths take each other's tensors without an error and
            give wrong results, hence one shared placement.
        balance_masks: masks of the other layers that will share this plan's placement.
        heads: ``(Hq, Hk)`` the calls will use, so that ``schedule="auto"`` may pick
            Ulysses or a hybrid (unknown heads: context-parallel schedules only).
        ulysses_degree: head parallelism of degree u (a divisor of W): head groups of
            u consecutive ranks split the heads by all-to-all, and ``schedule`` runs
            across the W/u groups on each head shard (``planner/heads.py``: u must
            divide the query heads; KV heads are repeated to ``lcm(Hk, u)`` when u does
            not divide them). None or 1: none.
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
    spec = as_group(group)  # a process group, or a 1-d / head-parallel 2-d DeviceMesh
    group, rank_order, degree = spec.group, spec.rank_order, spec.ulysses_degree
    if degree is not None:  # 2-d: heads over one dim, the sequence over the other
        if schedule == "ulysses":
            raise ValueError(
                "schedule: 'ulysses' splits heads over all ranks, but the mesh splits them "
                "over its head dim alone: give the schedule for its sequence dim (or "
                "'auto'), or pass a process group for Ulysses over every rank"
            )
        if ulysses_degree not in (None, degree):
            raise ValueError(
                f"ulysses_degree: the mesh's head dim has {degree} ranks, got {ulysses_degree}"
            )
        ulysses_degree = degree
    if schedule in BUILDERS and spec_of(schedule).node_size:
        if schedule_options.get("node_size") is None:  # torchrun's devices per node
            schedule_options["node_size"] = config.get().local_world_size
    shared = None
    if placement is not None:
        if isinstance(placement, Plan):
            shared = (placement.placement, placement.kv_placement)
        elif isinstance(placement, Placement):  # a layout given as data (peers' shards)
            shared = (placement, placement)
        else:
            raise ValueError(
                "placement: expected another hamilton_attn.Plan or a Placement, got "
                f"{type(placement).__name__}"
            )
    balance_masks = tuple(balance_masks)
    for i, m in enumerate(balance_masks):
        if not isinstance(m, Mask) or m.shape != mask.shape:
            raise ValueError(
                f"balance_masks[{i}]: expected a Mask of the same shape {mask.shape}, got "
                f"{getattr(m, 'shape', type(m).__name__)}"
            )
    given = locals()
    options = PlanOptions(
        **{f.name: given[f.name] for f in fields(PlanOptions) if f.name in _PLAN_ARGS},
        rank_order=rank_order,
        shared_placement=shared,
        balance_masks=balance_masks,
        schedule_options=schedule_options,
    )
    # Before the cache: whether this process may plan on ``group`` can change without
    # the arguments changing (torchrun's WORLD_SIZE, a non-member of a subgroup).
    group = resolve_group(group)
    group_info(group)
    return _cached_plan(mask, group, options)
