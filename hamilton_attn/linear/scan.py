"""The cross-rank state exchange of linear attention, as autograd Functions.

Rank r of a contiguous plan holds one run of tokens. Computed with no incoming state,
its run leaves a state ``M_r`` ``[B, H, K, V]`` and passes an incoming state on scaled
by ``a_r`` ``[B, H]`` (``exp`` of the run's summed log decays, or 0 when a document
starts inside the run: the incoming state stops there). The state entering rank r is
the prefix combine::

    S_in_0 = 0,    S_in_{r+1} = a_r S_in_r + M_r

and its adjoint runs the other way: with ``U_r`` the gradient reaching ``S_in_{r+1}``,
``U_{W-1} = 0``, ``U_{r-1} = dS_in_r + a_r U_r``, we get ``dM_r = U_r`` and
``da_r = sum_{K, V} U_r * S_in_r``.

:class:`StateScan` runs it as ``"allgather"`` (LASP-2: one all-gather of ``(M_r, a_r)``,
each rank folds the earlier ones; the backward gathers ``dS_in``) or ``"ring"`` (``S_in``
passes r -> r + 1, W - 1 sequential hops; the backward passes ``U`` back). Every wait has
the library's timeout (``HAMILTON_ATTN_TIMEOUT``). :class:`GatherFinal` replicates the
per-sequence final states, each computed by the rank holding the sequence's last token;
:class:`ReplicatedGrad` gives a replicated ``initial_state`` the group's whole gradient,
so a final state fed back as the next call's initial state differentiates exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..runtime.comm import all_gather_tensor, start_p2p

#: gloo tags of the exchange's messages (apart from attention's transfers, tag 0, and
#: the library's gathers and status exchanges).
GATHER_TAG = 0x4841_0010
RING_TAG = 0x4841_0011


def _plan_order(plan) -> list[int]:
    """Per plan rank, its index in a gather's result (group members by global rank)."""
    where = {g: i for i, g in enumerate(sorted(plan.group_ranks))}
    return [where[g] for g in plan.group_ranks]


def gather_plan_order(x: torch.Tensor, plan) -> list[torch.Tensor]:
    """Every rank's ``x`` (one shape everywhere), in plan-rank order."""
    parts = all_gather_tensor(x.contiguous(), plan.group, tag=GATHER_TAG)
    return [parts[i] for i in _plan_order(plan)]


def _hop(send: Callable, dst: int | None, recv_like: torch.Tensor, src: int | None, plan):
    """Receive a tensor shaped like ``recv_like`` from plan rank ``src`` (zeros for None),
    then send ``send(received)`` to ``dst`` (None: no send); returns the received one."""
    got = torch.zeros_like(recv_like)
    if src is not None:
        start_p2p([], [(got, src)], plan.group, plan.group_ranks, tag=RING_TAG).wait()
    if dst is not None:
        out = send(got).contiguous()
        start_p2p([(out, dst)], [], plan.group, plan.group_ranks, tag=RING_TAG).wait()
    return got


class StateScan(torch.autograd.Function):
    """``S_in_r`` from every rank's ``(M_r [B, H, K, V], a_r [B, H])`` (one dtype).
    ``h0``: None, or the call's :class:`ReplicatedGrad` initial state, an input only so
    that every rank's backward reaches that one's (its gradient here is zero)."""

    @staticmethod
    def forward(ctx, m, a, h0, plan, strategy: str):
        r, w = plan.rank, plan.world_size
        ctx.plan, ctx.strategy = plan, strategy
        if w == 1:
            s_in = torch.zeros_like(m)
        elif strategy == "allgather":
            packed = torch.cat([m.reshape(-1), a.reshape(-1)])
            parts = gather_plan_order(packed, plan)
            ms = [p[: m.numel()].view_as(m) for p in parts]
            decays = [p[m.numel() :].view_as(a) for p in parts]
            s_in = torch.zeros_like(m)
            for i in range(r):
                s_in = decays[i][..., None, None] * s_in + ms[i]
            ctx.decays = decays
        else:
            s_in = _hop(
                lambda got: a[..., None, None] * got + m,
                r + 1 if r + 1 < w else None,
                m,
                r - 1 if r > 0 else None,
                plan,
            )
        ctx.h0_like = None if h0 is None else (h0.shape, h0.dtype, h0.device)
        ctx.save_for_backward(s_in, a)
        return s_in

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, ds_in):
        s_in, a = ctx.saved_tensors
        plan = ctx.plan
        r, w = plan.rank, plan.world_size
        ds_in = ds_in.contiguous()
        d_h0 = None if ctx.h0_like is None else torch.zeros(ctx.h0_like[0], dtype=ctx.h0_like[1],
                                                            device=ctx.h0_like[2])  # fmt: skip
        if w == 1:
            return torch.zeros_like(s_in), torch.zeros_like(a), d_h0, None, None
        if ctx.strategy == "allgather":
            grads = gather_plan_order(ds_in, plan)
            u = torch.zeros_like(ds_in)
            for j in range(w - 1, r, -1):
                u = grads[j] + ctx.decays[j][..., None, None] * u
        else:
            u = _hop(
                lambda got: ds_in + a[..., None, None] * got,
                r - 1 if r > 0 else None,
                ds_in,
                r + 1 if r + 1 < w else None,
                plan,
            )
        return u, (u * s_in).sum((-1, -2)), d_h0, None, None


class ReplicatedGrad(torch.autograd.Function):
    """Identity forward on a tensor every rank holds whole (``initial_state``); the
    backward sums the ranks' gradients (in plan-rank order: the same bits everywhere),
    so every rank gets the gradient of the group's whole loss. It must be reached on
    every rank: :class:`StateScan` takes its result as an input for that."""

    @staticmethod
    def forward(ctx, x, plan):
        ctx.plan = plan
        return x.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return torch.stack(gather_plan_order(grad.contiguous(), ctx.plan)).sum(0), None


class GatherFinal(torch.autograd.Function):
    """The final states ``[N, H, K, V]`` on every rank: row n from plan rank
    ``owner[n]``. ``fin`` ``[P, H, K, V]`` holds this rank's pieces, piece i being row
    ``rows[i]`` (-1: a sequence whose last token another rank holds). Like
    ``undispatch``, the backward takes this rank's gradient of the replicated result as
    the whole gradient of its own rows (every rank computes the same loss of it).
    ``s_in`` (this rank's incoming state) is an input only so that every rank's backward
    reaches the exchange's, also where the loss reads the final states alone."""

    @staticmethod
    def forward(ctx, fin, s_in, rows: tuple[int, ...], owner: tuple[int, ...], plan):
        ctx.rows, ctx.s_in_like = rows, (s_in.shape, s_in.dtype, s_in.device)
        # Each rank sends only the rows it owns (every rank knows ``owner``), padded to
        # the most any rank owns: about N / W rows each, not N.
        owned = [[n for n, o in enumerate(owner) if o == r] for r in range(plan.world_size)]
        slot = [0] * len(owner)
        for rows_r in owned:
            for k, n in enumerate(rows_r):
                slot[n] = k
        piece = {row: i for i, row in enumerate(rows) if row >= 0}
        mine = fin.new_zeros(max(map(len, owned)), *fin.shape[1:])
        for k, row in enumerate(owned[plan.rank]):
            mine[k] = fin[piece[row]]
        if plan.world_size == 1:
            return mine
        parts = torch.stack(gather_plan_order(mine, plan))  # [W, most owned, H, K, V]
        dev = fin.device
        return parts[torch.tensor(owner, device=dev), torch.tensor(slot, device=dev)]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        shape, dtype, device = ctx.s_in_like
        d_fin = grad.new_zeros(len(ctx.rows), *grad.shape[1:])
        for i, row in enumerate(ctx.rows):
            if row >= 0:
                d_fin[i] = grad[row]
        return d_fin, torch.zeros(shape, dtype=dtype, device=device), None, None, None
