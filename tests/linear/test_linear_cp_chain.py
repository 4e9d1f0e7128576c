"""Linear attention's states across calls under a plan: a final state fed back as the
next call's initial state (segment-by-segment training), and a loss on the final
states alone, both against the float64 recurrence over the whole sequence.

Both failed before ``initial_state`` got the group's whole gradient and every rank's
final states stayed in the graph: chaining two 12-token segments at W = 2 gave a dk
error of 0.45 (the owner of segment 1's final state saw none of segment 2's gradient),
and a loss on the final states alone raised on the ranks that own no sequence's last
token while the others waited in the exchange until the timeout.

Legend: B batch, S tokens per segment, H heads, K key dim, V value dim, W world size.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import hamilton_attn as ha
from hamilton_attn.testing.linear_oracle import linear_recurrence_oracle
from hamilton_attn.testing.oracle import max_err

B, S, H, K, V = 2, 13, 2, 3, 4
DOCS = [0, 3, 11, 19, 27]
TOL = 1e-10


def _rnd(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _gate(gen, kind, b, s):
    if kind == "token":
        return -torch.rand(b, s, H, generator=gen, dtype=torch.float64) * 1.2
    return -torch.rand(H, generator=gen, dtype=torch.float64) * 0.5 - 0.05


def _chain(ctx, kind, strategy, seed):
    """Two segments of S tokens; segment 1's final state is segment 2's initial state;
    the loss reads both segments' outputs and segment 2's final state."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _rnd(gen, B, 2 * S, H, K), _rnd(gen, B, 2 * S, H, K), _rnd(gen, B, 2 * S, H, V)
    g = _gate(gen, kind, B, 2 * S)
    h0 = _rnd(gen, B, H, K, V)
    leaves = [t.requires_grad_() for t in (q, k, v, g, h0)]
    p = ha.plan(ha.Mask.causal(S), ctx.group, dispatch="contiguous", schedule="ring")

    def seg(t, i):
        return ha.dispatch(t[:, i * S : (i + 1) * S], p) if t.dim() >= 3 else t

    kw = dict(plan=p, return_final_state=True, strategy=strategy, backend="torch")
    o1, f1 = ha.linear_attention(*(seg(t, 0) for t in (q, k, v, g)), initial_state=h0, **kw)
    o2, f2 = ha.linear_attention(*(seg(t, 1) for t in (q, k, v, g)), initial_state=f1, **kw)
    o = torch.cat([ha.undispatch(o1, p), ha.undispatch(o2, p)], dim=1)
    wo = torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view_as(o).sin()
    wf = torch.linspace(-2, 1, f2.numel(), dtype=torch.float64).view_as(f2).cos()
    got = torch.autograd.grad((o * wo).sum() + (f2 * wf).sum(), leaves)
    got = list(got)
    if g.dim() == 1:  # a replicated g: each rank's share
        dist.all_reduce(got[3], group=ctx.group)
    ro, rf = linear_recurrence_oracle(q, k, v, g, initial_state=h0, dtype=torch.float64)
    want = torch.autograd.grad((ro * wo).sum() + (rf * wf).sum(), leaves)
    errs = {"o": max_err(o, ro), "final": max_err(f2, rf)}
    errs.update({n: max_err(a, b) for n, a, b in zip("q k v g h0".split(), got, want, strict=True)})
    return errs


def _chains(ctx, cases):
    return [_chain(ctx, *c, seed=i) for i, c in enumerate(cases)]


CHAINS = [("token", "allgather"), ("token", "ring"), ("head", "ring"), ("head", "allgather")]


@pytest.mark.parametrize("w", [2, 3])
def test_final_state_fed_back_as_initial_state_differentiates_exactly(pool, w):
    for rank, results in enumerate(pool.run(_chains, w, CHAINS)):
        for case, errs in zip(CHAINS, results, strict=True):
            for n, e in errs.items():
                assert e <= TOL, f"W={w} rank {rank} {case}: {n} error {e:.3e}"


def _grads(loss, leaves):
    got = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(t) if d is None else d for t, d in zip(leaves, got, strict=True)]


def _final_only(ctx, strategy):
    """Packed documents; the loss reads the final states only (most ranks own none)."""
    gen = torch.Generator().manual_seed(5)
    s = DOCS[-1]
    q, k, v = _rnd(gen, 1, s, H, K), _rnd(gen, 1, s, H, K), _rnd(gen, 1, s, H, V)
    g = _gate(gen, "token", 1, s)
    h0 = _rnd(gen, len(DOCS) - 1, H, K, V)
    leaves = [t.requires_grad_() for t in (q, k, v, g, h0)]
    p = ha.plan(ha.Mask.varlen(DOCS, causal=True), ctx.group, dispatch="contiguous",
                schedule="ring")  # fmt: skip
    _, fin = ha.linear_attention(*(ha.dispatch(t, p) for t in (q, k, v, g)), plan=p,
                                 initial_state=h0, return_final_state=True,
                                 strategy=strategy, backend="torch")  # fmt: skip
    wf = torch.linspace(-1, 2, fin.numel(), dtype=torch.float64).view_as(fin).sin()
    got = _grads((fin * wf).sum(), leaves)  # q: no part in a final state
    _, rf = linear_recurrence_oracle(q, k, v, g, cu_seqlens=DOCS, initial_state=h0,
                                     dtype=torch.float64)  # fmt: skip
    want = _grads((rf * wf).sum(), leaves)
    errs = {"final": max_err(fin, rf)}
    errs.update({n: max_err(a, b) for n, a, b in zip("q k v g h0".split(), got, want, strict=True)})
    return errs


@pytest.mark.parametrize("w", [3, 4])
@pytest.mark.parametrize("strategy", ["allgather", "ring"])
def test_loss_on_final_states_alone_reaches_every_rank(pool, w, strategy):
    for rank, errs in enumerate(pool.run(_final_only, w, strategy)):
        for n, e in errs.items():
            assert e <= TOL, f"W={w} rank {rank} {strategy}: {n} error {e:.3e}"


def _final_gather_rows(ctx):
    """Rows of the final-state gather's message on this rank (the 4-d gathers: the
    forward's final states; the allgather strategy's own messages are flat)."""
    from hamilton_attn.linear import scan

    seen, real = [], scan.gather_plan_order

    def record(x, plan):
        if x.dim() == 4:
            seen.append(x.shape[0])
        return real(x, plan)

    docs = [0, 2, 4, 6, 9, 12, 15, 19, 23, 27]  # 9 documents
    gen = torch.Generator().manual_seed(2)
    q, k, v = _rnd(gen, 1, 27, H, K), _rnd(gen, 1, 27, H, K), _rnd(gen, 1, 27, H, V)
    p = ha.plan(ha.Mask.varlen(docs, causal=True), ctx.group, dispatch="contiguous",
                schedule="ring")  # fmt: skip
    scan.gather_plan_order = record
    try:
        with torch.no_grad():
            _, fin = ha.linear_attention(*(ha.dispatch(t, p) for t in (q, k, v)), plan=p,
                                         return_final_state=True, strategy="ring")  # fmt: skip
    finally:
        scan.gather_plan_order = real
    _, want = linear_recurrence_oracle(q, k, v, None, cu_seqlens=docs, dtype=torch.float64)
    return seen, max_err(fin, want)


def test_final_states_gather_only_the_rows_each_rank_owns(pool):
    """9 documents over 4 ranks: each rank sends the rows it owns (at most 3 here), not
    all 9, and every rank still gets all 9 final states."""
    for seen, err in pool.run(_final_gather_rows, 4):
        assert seen and max(seen) <= 3, seen
        assert err <= TOL
