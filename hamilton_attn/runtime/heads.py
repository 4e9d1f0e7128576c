"""Head parallelism at run time: the all-to-alls of a head group, around the one executor.

``attend`` turns this rank's sequence shards into head shards inside its head group
(one batch of point-to-point messages per tensor: ``comm.start_p2p``, NCCL or gloo, with
the usual timeouts), runs the inner context-parallel plan on them
(``ContextParallelFunction``, any schedule across the head groups), and turns the output
back. Both all-to-alls are autograd Functions whose backward is the other one, so the
gradients of q, k and v come back as sequence shards. See :mod:`..planner.heads`.
"""

from __future__ import annotations

import torch

from .. import variants
from ..attention import once_differentiable
from ..planner.heads import HeadParallel, kv_repeat
from .comm import start_p2p
from .executor import ContextParallelFunction


def _exchange(parts: list[torch.Tensor], hp: HeadParallel, group):
    """Send ``parts[m]`` to member m and receive member m's part for this rank (parts
    are all alike in shape) into a contiguous buffer; this rank's own part stays."""
    me = hp.member
    got = [parts[me] if m == me else parts[m].new_empty(parts[m].shape) for m in range(hp.degree)]
    sends = [(parts[m].contiguous(), m) for m in range(hp.degree) if m != me]
    recvs = [(got[m], m) for m in range(hp.degree) if m != me]
    if sends:
        start_p2p(sends, recvs, group, hp.group_ranks).wait()
    return got


def seq_to_heads(x: torch.Tensor, hp: HeadParallel, group) -> torch.Tensor:
    """``[B, L, H, D]`` (this rank's tokens, all heads) -> ``[B, u*L, H/u, D]`` (the head
    group's tokens in member order, this member's heads)."""
    parts = list(x.split(x.shape[2] // hp.degree, dim=2))
    return torch.cat(_exchange(parts, hp, group), dim=1)


def heads_to_seq(x: torch.Tensor, hp: HeadParallel, group) -> torch.Tensor:
    """The inverse of :func:`seq_to_heads`."""
    parts = list(x.split(x.shape[1] // hp.degree, dim=1))
    return torch.cat(_exchange(parts, hp, group), dim=2)


class _Swap(torch.autograd.Function):
    """Sequence shards <-> head shards (``to_heads``), differentiable: the backward is the
    other direction."""

    @staticmethod
    def forward(ctx, x, hp, group, to_heads: bool):
        ctx.hp, ctx.group, ctx.to_heads = hp, group, to_heads
        return (seq_to_heads if to_heads else heads_to_seq)(x, hp, group)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        back = heads_to_seq if ctx.to_heads else seq_to_heads
        return back(g.contiguous(), ctx.hp, ctx.group), None, None, None


def attend(q, k, v, plan, scale: float, want_lse: bool, var=None, score_mod=None, shift=0):
    """``(out, lse or None)`` of a head-parallel plan for this rank's sequence shards
    (inputs already checked on every rank), under the resolved variant ``var`` (None:
    plain softmax) bound to this member's query heads."""
    hp: HeadParallel = plan.heads
    group = plan.group
    r = kv_repeat(k.shape[2], hp.degree)
    if r > 1:  # each KV head repeated so the members split them evenly (differentiable)
        k, v = k.repeat_interleave(r, dim=2), v.repeat_interleave(r, dim=2)
    qh, kh, vh = (_Swap.apply(t, hp, group, True) for t in (q, k, v))
    n = qh.shape[2]
    heads = slice(hp.member * n, (hp.member + 1) * n)
    bv = variants.bind(var, score_mod, batch=q.shape[0], heads=heads, shift=shift)
    sink, alibi = getattr(var, "sink", None), getattr(var, "alibi_slopes", None)
    out_h, lse_h = ContextParallelFunction.apply(
        qh, kh, vh, hp.inner, scale, bv, sink, alibi, heads
    )
    out = _Swap.apply(out_h, hp, group, False)
    lse = None
    if want_lse:  # [B, H/u, u*L] -> [B, H, L], through the same exchange (no gradient)
        lse = heads_to_seq(lse_h.transpose(1, 2).unsqueeze(-1).contiguous(), hp, group)
        lse = lse.squeeze(-1).transpose(1, 2).contiguous()
    return out, lse
