"""dispatch / undispatch: scatter a full tensor to local shards and gather it back."""

from __future__ import annotations

import torch

from ..comm import all_gather_tensor
from ..plans import Plan


def _placement(plan: Plan, role: str):
    if role == "q":
        return plan.placement
    if role == "kv":
        return plan.kv_placement
    raise ValueError(f"role: expected 'q' (query-side tensors) or 'kv', got {role!r}")


def _pad(x: torch.Tensor, pl, dim: int) -> torch.Tensor:
    pad = pl.pad
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _local(x_padded: torch.Tensor, pl, rank: int, dim: int) -> torch.Tensor:
    parts = [x_padded.narrow(dim, a, b - a) for a, b in pl.rank_ranges[rank]]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _gather(x_local: torch.Tensor, plan: Plan, pl, dim: int) -> torch.Tensor:
    shards = all_gather_tensor(x_local, plan.group)
    shape = list(x_local.shape)
    shape[dim] = pl.padded_len
    full = x_local.new_empty(shape)
    for r, shard in enumerate(shards):
        pos = 0
        for a, b in pl.rank_ranges[r]:
            full.narrow(dim, a, b - a).copy_(shard.narrow(dim, pos, b - a))
            pos += b - a
    return full.narrow(dim, 0, pl.seqlen)


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan, pl, dim):
        ctx.plan, ctx.pl, ctx.dim = plan, pl, dim
        return _local(_pad(x, pl, dim), pl, plan.rank, dim).contiguous()

    @staticmethod
    def backward(ctx, g):
        # Every rank holds the same full x, so each gets the whole gradient.
        return _gather(g.contiguous(), ctx.plan, ctx.pl, ctx.dim), None, None, None


class _Undispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, plan, pl, dim):
        ctx.plan, ctx.pl, ctx.dim = plan, pl, dim
        return _gather(x_local.contiguous(), plan, pl, dim)

    @staticmethod
    def backward(ctx, g):
        local = _local(_pad(g, ctx.pl, ctx.dim), ctx.pl, ctx.plan.rank, ctx.dim)
        return local, None, None, None


def _check_dim(x: torch.Tensor, dim: int, want: int, name: str) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"seq_dim: {dim} is out of range for a {x.dim()}-d {name}")
    dim %= x.dim()
    if x.shape[dim] != want:
        raise ValueError(f"{name}: expected {want} tokens along seq_dim={dim}, got {x.shape[dim]}")
    return dim


def dispatch(x: torch.Tensor, plan: Plan, seq_dim: int = 1, role: str = "q") -> torch.Tensor:
    """This rank's shard of ``x`` (the full sequence, identical on every rank): padding
    appended, then the plan's token ranges taken. ``role="kv"`` shards a key/value-side
    tensor of a cross-attention plan (its own placement). Differentiable: the gradient
    of x is gathered from every rank's shard."""
    pl = _placement(plan, role)
    dim = _check_dim(x, seq_dim, pl.seqlen, "x")
    return _Dispatch.apply(x, plan, pl, dim)


def undispatch(
    x_local: torch.Tensor, plan: Plan, seq_dim: int = 1, role: str = "q"
) -> torch.Tensor:
    """The full sequence from every rank's shard, padding trimmed; on every rank."""
    pl = _placement(plan, role)
    dim = _check_dim(x_local, seq_dim, pl.local_len, "x_local")
    return _Undispatch.apply(x_local, plan, pl, dim)


def get_position_ids(plan: Plan, device=None, role: str = "q") -> torch.Tensor:
    """Global positions of this rank's local tokens (for RoPE); padding gets positions
    ``>= seqlen``."""
    pl = _placement(plan, role)
    return torch.tensor(pl.global_indices(plan.rank), dtype=torch.long, device=device)
