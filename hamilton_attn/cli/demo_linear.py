"""The linear-attention rows of ``hamilton-attn demo``.

Retention (RetNet's decays), simple GLA (a gate per token) and Mamba2's SSD (one group
of B / C, a scalar A per head) on the demo's packed documents, which cross ranks, under
a ``dispatch="contiguous"`` plan on the demo's ranks, with each state exchange (LASP-2's
all-gather and the ring), forward and backward. Rank 0 checks the output and every
input's gradient against the token-by-token recurrence
(:func:`hamilton_attn.testing.linear_oracle.linear_recurrence_oracle`) in float64, with
flash-attention's bound: twice the error of the same recurrence in the run's dtype.

Legend: B batch (1: packed documents), S tokens, H heads, K key dim, V value dim, W world
size; tensors bshd.
"""

from __future__ import annotations

import time

import torch

from ..masks import Mask
from ..testing.linear_oracle import linear_recurrence_oracle
from ..testing.oracle import error_bound, max_err

KINDS = ("retention", "gla", "ssd")
STRATEGIES = ("allgather", "ring")
#: Heads and head dims of the linear rows (small: the oracle is a loop over tokens).
H, K, V = 4, 32, 32


def _leaves(kind: str, seqlen: int, dtype) -> list[torch.Tensor]:
    """The differentiable inputs of ``kind``, the same on every rank (CPU, ``dtype``):
    q, k, v (retention); q, k, v, g (GLA); x, dt, A, B, C (SSD)."""
    gen = torch.Generator().manual_seed(4321)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    if kind == "ssd":
        x, bc = rnd(1, seqlen, H, V), [rnd(1, seqlen, 1, K) * K**-0.5 for _ in range(2)]
        dt = torch.nn.functional.softplus(rnd(1, seqlen, H) - 2)
        a = -torch.linspace(0.5, 2.0, H)
        leaves = [x, dt, a, *bc]
    else:
        leaves = [rnd(1, seqlen, H, d) for d in (K, K, V)]
        if kind == "gla":
            leaves.append(torch.nn.functional.logsigmoid(rnd(1, seqlen, H) + 3))
    return [t.to(dtype).requires_grad_() for t in leaves]


def _call(kind: str, local: list[torch.Tensor], **kw) -> torch.Tensor:
    import hamilton_attn as ha

    if kind == "ssd":
        x, dt, a, b, c = local
        return ha.ssd(x, dt, a, b, c, **kw)
    if kind == "gla":
        return ha.simple_gla(*local, **kw)
    return ha.retention(*local, **kw)


def _oracle(kind: str, leaves, weight, cu: list[int], dtype):
    """``(o, gradients of the loss (o * weight).sum())`` of the recurrence in ``dtype``."""
    x = [t.detach().to(dtype).requires_grad_() for t in leaves]
    if kind == "ssd":  # q = C, k = B (one group for every head), v = x * dt, g = dt * A
        xs, dt, a, b, c = x
        args = (c.expand(-1, -1, H, -1), b.expand(-1, -1, H, -1), xs * dt[..., None], dt * a)
        scale = 1.0
    elif kind == "gla":
        args, scale = tuple(x), None
    else:
        gamma = 1 - 2.0 ** (-5.0 - torch.arange(H, dtype=dtype))  # RetNet's decays
        args, scale = (*x, gamma.log()), None
    o, _ = linear_recurrence_oracle(*args, scale=scale, cu_seqlens=cu, dtype=dtype)
    return o, torch.autograd.grad((o * weight.to(dtype)).sum(), x)


def linear_rows(ctx, mask: Mask, dev: torch.device, dtype, atol: float) -> list[tuple]:
    """This rank's share of the linear rows (rank 0 returns them, the others ``[]``);
    ``mask``: the demo's causal documents; columns those of ``demo.HEADER``."""
    import hamilton_attn as ha
    from hamilton_attn.linear.checks import mask_documents

    seqlen, cu = mask.seqlen_q, list(mask_documents(mask))
    weight = torch.randn(1, seqlen, H, V, generator=torch.Generator().manual_seed(99))
    rows = []
    for kind in KINDS:
        leaves = _leaves(kind, seqlen, dtype)
        if ctx.rank == 0:
            ref, ref_g = _oracle(kind, leaves, weight, cu, torch.float64)
            low, low_g = _oracle(kind, leaves, weight, cu, dtype)
            base_f = max_err(low, ref)
            base_b = max(max_err(a, b) for a, b in zip(low_g, ref_g, strict=True))
            mag = max(1.0, ref.abs().max().item(), *(g.abs().max().item() for g in ref_g))
        for strategy in STRATEGIES:
            t0 = time.perf_counter()
            p = ha.plan(mask, ctx.group, schedule="ring", dispatch="contiguous")
            plan_ms = (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()
            x = [t.detach().to(dev).requires_grad_() for t in leaves]
            local = [ha.dispatch(t, p) if t.dim() > 1 else t for t in x]  # A [H]: replicated
            o = ha.undispatch(_call(kind, local, plan=p, strategy=strategy), p)
            grads = list(torch.autograd.grad((o.float() * weight.to(dev)).sum(), x))
            for i, t in enumerate(x):  # a replicated input's gradient: this rank's share
                if t.dim() == 1:
                    torch.distributed.all_reduce(grads[i], group=ctx.group)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            run_ms = (time.perf_counter() - t0) * 1e3
            if ctx.rank != 0:
                continue
            ef = max_err(o.cpu(), ref)
            eb = max(max_err(a.cpu(), b) for a, b in zip(grads, ref_g, strict=True))
            ok = ef <= error_bound(base_f, atol=atol * mag) and eb <= error_bound(
                base_b, atol=atol * mag
            )
            w = ctx.world_size
            state = H * K * V * (8 if dtype == torch.float64 else 4)  # one state's bytes
            sent = state * (w - 1 if strategy == "allgather" else min(1, w - 1))
            rows.append((f"linear ({strategy})", "contiguous", f"docs+{kind}", f"{ef:.1e}",
                         f"{eb:.1e}", 1 if strategy == "allgather" else w - 1,
                         f"{sent / 1024:.1f} KiB", f"{plan_ms:.0f}", f"{run_ms:.0f}",
                         "PASS" if ok else "FAIL"))  # fmt: skip
    return rows
