"""dispatch / undispatch: scatter a full tensor to local shards and gather it back."""

from __future__ import annotations

import torch

from ..comm import all_gather_tensor
from ..plans import Plan


def _pad(x: torch.Tensor, plan: Plan, dim: int) -> torch.Tensor:
    pad = plan.placement.pad
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _local(x_padded: torch.Tensor, plan: Plan, rank: int, dim: int) -> torch.Tensor:
    parts = [x_padded.narrow(dim, a, b - a) for a, b in plan.placement.rank_ranges[rank]]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _gather(x_local: torch.Tensor, plan: Plan, dim: int) -> torch.Tensor:
    shards = all_gather_tensor(x_local, plan.group)
    shape = list(x_local.shape)
    shape[dim] = plan.placement.padded_len
    full = x_local.new_empty(shape)
    for r, shard in enumerate(shards):
        pos = 0
        for a, b in plan.placement.rank_ranges[r]:
            full.narrow(dim, a, b - a).copy_(shard.narrow(dim, pos, b - a))
            pos += b - a
    return full.narrow(dim, 0, plan.placement.seqlen)


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan, dim):
        ctx.plan, ctx.dim = plan, dim
        return _local(_pad(x, plan, dim), plan, plan.rank, dim).contiguous()

    @staticmethod
    def backward(ctx, g):
        # Every rank holds the same full x, so each gets the whole gradient.
        return _gather(g.contiguous(), ctx.plan, ctx.dim), None, None


class _Undispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, plan, dim):
        ctx.plan, ctx.dim = plan, dim
        return _gather(x_local.contiguous(), plan, dim)

    @staticmethod
    def backward(ctx, g):
        return _local(_pad(g, ctx.plan, ctx.dim), ctx.plan, ctx.plan.rank, ctx.dim), None, None


def _check_dim(x: torch.Tensor, dim: int, want: int, name: str) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"seq_dim: {dim} is out of range for a {x.dim()}-d {name}")
    dim %= x.dim()
    if x.shape[dim] != want:
        raise ValueError(f"{name}: expected {want} tokens along seq_dim={dim}, got {x.shape[dim]}")
    return dim


def dispatch(x: torch.Tensor, plan: Plan, seq_dim: int = 1) -> torch.Tensor:
    """This rank's shard of ``x`` (the full sequence, identical on every rank): padding
    appended, then the plan's token ranges taken. Differentiable: the gradient of x is
    gathered from every rank's shard."""
    dim = _check_dim(x, seq_dim, plan.placement.seqlen, "x")
    return _Dispatch.apply(x, plan, dim)


def undispatch(x_local: torch.Tensor, plan: Plan, seq_dim: int = 1) -> torch.Tensor:
    """The full sequence from every rank's shard, padding trimmed; on every rank."""
    dim = _check_dim(x_local, seq_dim, plan.placement.local_len, "x_local")
    return _Undispatch.apply(x_local, plan, dim)


def get_position_ids(plan: Plan, device=None) -> torch.Tensor:
    """Global positions of this rank's local tokens (for RoPE); padding gets positions
    ``>= seqlen``."""
    return torch.tensor(plan.placement.global_indices(plan.rank), dtype=torch.long, device=device)
