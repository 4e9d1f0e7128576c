"""dispatch / undispatch: scatter a full tensor to local shards and gather it back."""

from __future__ import annotations

import zlib

import torch

from ..planner.plans import Plan
from .checks import agreed_before, exchange_rows
from .comm import all_gather_tensor, timeout_problem

# Known dtypes by position (a code every interpreter agrees on, and a name to report);
# any other dtype gets a CRC of its name.
_DTYPES = (
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
)
_SHOWN_DIMS = 8  # dims sent for the message; every dim goes into the shape's CRC


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) + 1 if dtype in _DTYPES else zlib.crc32(str(dtype).encode()) << 8


def _status(x: torch.Tensor, plan: Plan, dim: int, problem: str | None) -> list[int]:
    shape = list(x.shape)
    shown = (shape + [-1] * _SHOWN_DIMS)[:_SHOWN_DIMS]
    crc = zlib.crc32(repr((shape, dim)).encode())
    return [
        int(problem is not None),
        *plan.fingerprint,
        _dtype_code(x.dtype),
        x.dim(),
        dim,
        crc,
        *shown,
    ]


def _describe(row: list[int]) -> str:
    code, ndim, shown = row[3], row[4], row[7:]
    dtype = _DTYPES[code - 1] if 0 < code <= len(_DTYPES) else "another dtype"
    dims = ", ".join(map(str, shown[:ndim]))
    tail = "," if ndim == 1 else (", ..." if ndim > _SHOWN_DIMS else "")
    return f"({dims}{tail}) {dtype}"


def _agree(
    x: torch.Tensor, plan: Plan, dim: int, problem: str | None = None, name: str = "x_local"
) -> None:
    """Raise ValueError on every rank unless all ranks gather tensors of one shape and
    dtype with one plan (a gather of unequal tensors aborts gloo, and NCCL hangs). On
    CUDA it costs one small exchange on the first gather of each signature per plan
    (every gather for ``check="always"``); on CPU tensors (gloo) every gather exchanges,
    since a rank that alone meets a new signature would enter the exchange while its
    peers already gather, and gloo aborts on the size mismatch."""
    problem = problem or timeout_problem()
    sig = (tuple(x.shape), x.dtype, dim)
    seen = plan._state.gather_checked
    if agreed_before(plan, seen, sig, problem, may_skip=x.is_cuda):
        return
    mine = _status(x, plan, dim, problem)
    everyone = exchange_rows(plan, mine, problem, x.device, name, "")
    if any(row != mine for row in everyone):
        shown = ", ".join(f"rank {r}: {_describe(row)}" for r, row in enumerate(everyone))
        if any(row[5] != mine[5] for row in everyone):
            shown += f"; seq_dim {[row[5] for row in everyone]}"
        raise ValueError(
            f"{name}: expected the same shape and dtype on every rank of the group, got " + shown
        )
    seen.add(sig)


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


def _group_order(plan: Plan) -> list[int]:
    """Per plan rank, its index among the group's members (ordered by global rank)."""
    by_global = sorted(plan.group_ranks)
    if list(plan.group_ranks) == by_global:
        return list(range(len(by_global)))
    where = {g: i for i, g in enumerate(by_global)}
    return [where[g] for g in plan.group_ranks]


def _gather(x_local: torch.Tensor, plan: Plan, pl, dim: int, name: str = "x_local"):
    _agree(x_local, plan, dim, name=name)
    shards = all_gather_tensor(x_local, plan.group)
    shape = list(x_local.shape)
    shape[dim] = pl.padded_len
    full = x_local.new_empty(shape)
    # Shards come in the group's order; a plan from a DeviceMesh may order its ranks
    # otherwise (plan rank r is global rank plan.group_ranks[r]).
    order = _group_order(plan)
    for r, shard in enumerate(shards[i] for i in order):
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
        grad = _gather(g.contiguous(), ctx.plan, ctx.pl, ctx.dim, "dispatch's gradient")
        return grad, None, None, None


class _Undispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, plan, pl, dim):
        ctx.plan, ctx.pl, ctx.dim = plan, pl, dim
        return _gather(x_local.contiguous(), plan, pl, dim)

    @staticmethod
    def backward(ctx, g):
        local = _local(_pad(g, ctx.pl, ctx.dim), ctx.pl, ctx.plan.rank, ctx.dim)
        return local, None, None, None


def _dim_problem(x: torch.Tensor, dim: int, want: int, name: str) -> str | None:
    if not -x.dim() <= dim < x.dim():
        return f"seq_dim: {dim} is out of range for a {x.dim()}-d {name}"
    dim %= x.dim()
    if x.shape[dim] != want:
        return f"{name}: expected {want} tokens along seq_dim={dim}, got {x.shape[dim]}"
    return None


def _check_dim(x: torch.Tensor, dim: int, want: int, name: str) -> int:
    problem = _dim_problem(x, dim, want, name)
    if problem:
        raise ValueError(problem)
    return dim % x.dim()


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
    problem = _dim_problem(x_local, seq_dim, pl.local_len, "x_local")
    if problem:
        # Every rank hears of it before the gather (its peers would wait in it).
        _agree(x_local, plan, int(seq_dim), problem)
    return _Undispatch.apply(x_local, plan, pl, seq_dim % x_local.dim())


def get_position_ids(plan: Plan, device=None, role: str = "q") -> torch.Tensor:
    """Global positions of this rank's local tokens (for RoPE); padding gets positions
    ``>= seqlen``."""
    pl = _placement(plan, role)
    return torch.tensor(pl.global_indices(plan.rank), dtype=torch.long, device=device)
