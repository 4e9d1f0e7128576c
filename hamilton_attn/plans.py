"""``plan(mask, group)``: where tokens live, how KV moves, verified before anything runs."""

from __future__ import annotations

import functools
import os
import zlib
from dataclasses import dataclass, field

from .comm import group_info
from .dispatch import DISPATCHES, Placement, make_placement
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
    verify,
    verify_backward,
)


@dataclass(eq=False)
class Plan:
    """Everything a context-parallel call needs, identical on every rank of ``group``.

    ``mask`` is the user's mask grown to the padded length (padding sees nothing and is
    seen by nothing). ``report`` holds what the verifier counted (tokens moved per rank
    and link, peak buffers). Plans are cached: equal arguments give the same object.
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
    _block_masks: dict = field(default_factory=dict, repr=False)
    _checked: set = field(default_factory=set, repr=False)

    @property
    def key(self) -> tuple:
        """Identifies the plan across ranks (the rank itself excluded)."""
        return (
            self.user_mask.shape,
            self.user_mask.digest().hex(),
            self.placement.kind,
            self.placement.padded_len,
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
        return self.placement.local_len

    def piece_ranges(self, piece: PieceId) -> list[tuple[int, int]]:
        """Global key ranges of a piece."""
        return self.placement.local_to_global(piece.owner, self.schedule.parts[piece.part])

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

    def describe(self) -> str:
        return (
            f"Plan(W={self.world_size}, dispatch={self.placement.kind}, "
            f"schedule={self.schedule.name}, seqlen={self.placement.seqlen} "
            f"(+{self.placement.pad} pad), {self.report.summary()})"
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


@functools.lru_cache(maxsize=64)
def _cached_plan(
    mask, group, schedule, dispatch, chunk_size, backend, check, backward, topology, options
):
    rank, w, ranks = group_info(group)
    if mask.seqlen_q != mask.seqlen_k:
        raise ValueError(
            f"mask: context-parallel self-attention needs a square mask, got {mask.shape}"
        )
    if dispatch == "auto":
        dispatch = _pick_dispatch(mask)
    if schedule == "auto":
        schedule = _pick_schedule(mask, w, topology)
        if schedule == "hamilton_2level" and "node_size" not in dict(options):
            schedule = "ring"  # two-level needs the node size the user did not give
    placement = make_placement(dispatch, mask.seqlen_q, w, chunk_size=chunk_size)
    padded = Mask(mask.bands, placement.padded_len, placement.padded_len, _canonical=True)
    routing = build_routing(schedule, w, placement.local_len, **dict(options))
    holder: dict = {}

    def needs(r: int, p: PieceId) -> bool:
        key = (r, p)
        if key not in holder:
            kr = placement.local_to_global(p.owner, routing.parts[p.part])
            holder[key] = padded.gather(placement.rank_ranges[r], kr)
        return not holder[key].is_empty()

    sched = finalize(routing, needs)
    report = verify(sched, needs, local_len=placement.local_len)
    if backward == "reverse":
        reversed_ = reverse_backward(sched)
        if reversed_ is None:
            raise ValueError(
                f"backward: 'reverse' does not apply to {sched.name} with this "
                "mask (a rank only forwards some piece); use 'replay'"
            )
        verify_backward(reversed_, needs)
        sched = reversed_
    p = Plan(mask, padded, placement, sched, report, group, rank, w, ranks, backend, check)
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
    **schedule_options,
) -> Plan:
    """Plan context-parallel attention of ``mask`` (over the global sequence) on ``group``.

    Args:
        mask: a square :class:`Mask` over the whole (unpadded) sequence.
        group: the process group (default: the world group; none: one process).
        schedule: how KV moves: ``ring``, ``bidi_ring``, ``line``, ``allgather``,
            ``hamilton``, ``hamilton_2level``, ``direct``, any registered schedule, or
            ``auto`` (the planner's fastest predicted for ``topology``).
        dispatch: which tokens each rank holds: ``contiguous``, ``zigzag``, ``stripe``,
            or ``auto`` (contiguous for full masks, else zigzag).
        chunk_size: chunk sizes are a multiple of this (padding added as needed).
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
        tuple(sorted(schedule_options.items())),
    )
