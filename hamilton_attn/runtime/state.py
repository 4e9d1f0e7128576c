"""What a plan learns while it is used, in one place: ``plan._state``.

A :class:`~hamilton_attn.planner.plans.Plan` is built once and shared by every call that
uses it (plans are cached). Whatever the calls compute from it once and reuse lives in its
:class:`PlanState`, so it lives exactly as long as the plan and nothing else keys tables
on plans. It holds caches (recomputing any of them gives the same answer) and the sets of
input signatures the ranks already agreed on (``check="first"`` skips their exchange).
This module imports nothing from the planner, so the planner may import it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class PlanState:
    """Per-plan caches and agreed signatures; one per plan, made with it."""

    #: Block masks in local coordinates: ``(rank, piece)`` -> mask, ``("box", rank,
    #: piece)`` and ``("fused", rank, pieces)`` -> ``(mask, q_range, k_range)``
    #: (:meth:`Plan.block_mask`, :meth:`Plan.block`, :meth:`Plan.fused_block`; the
    #: planner fills it with the masks it already cut while verifying).
    block_masks: dict = field(default_factory=dict)
    #: ``calc_attn`` input signatures ``(q shape, k shape, dtype, scale)`` every rank of
    #: the group checked together (``api._check``).
    checked: set = field(default_factory=set)
    #: Gather signatures ``(shape, dtype, seq_dim)`` every rank checked together
    #: (``undispatch`` and ``dispatch``'s gradient: ``shard._agree``).
    gather_checked: set = field(default_factory=set)
    #: The executor's piece fates, per phase (``"fwd"`` | ``"bwd"``): per rank, per piece,
    #: ``(last step it is used there, kept for the backward there)`` (``executor._fates``).
    fates: dict = field(default_factory=dict)
    #: ``(steps, (acc_low, msg_low, n_dq))`` of the last ``executor.grad_precision`` call,
    #: or None: the answer depends on the steps alone.
    grad_precision: tuple | None = None
    #: The kernel of each block: ``(rank, pieces, backend, kernels.selection_key(...))``
    #: -> kernel (``kernels.memo_kernel``).
    kernels: dict = field(default_factory=dict)
    #: Global positions of a block's rows and keys for the variants (ALiBi, score_mod):
    #: ``(rank, pieces, device)`` -> ``(q_pos, k_pos)`` int64 tensors
    #: (``executor._block_variant``).
    positions: dict = field(default_factory=dict)
    #: Whether the plan's named backend runs this rank's blocks for an input signature
    #: ``(device, dtype, head dims, strides)`` -> None or the reason
    #: (``api._backend_problem``).
    backend_ok: dict = field(default_factory=dict)
