"""Linear attention under context parallelism (gloo ranks) against the float64 recurrence.

Every case runs ``dispatch -> linear_attention(plan=p) -> undispatch`` on ranks 0..W-1 of
the shared ``pool`` (tests/conftest.py) with inputs drawn identically on every rank, and
compares on every rank the output, the final states and the full gradients of q, k, v,
g and the initial state (dispatch's backward gathers the sharded ones; a replicated
``g [H]`` holds each rank's share, summed over the group here; ``initial_state`` holds
the whole gradient on every rank) with
``linear_recurrence_oracle`` on the whole sequence. W in {1, 2, 3, 4, 8}, both exchange
strategies, S = 53 (padding on the last rank whenever W does not divide it), documents
``DOCS`` that cross rank boundaries, start exactly at a rank's first token (7 and 14
at W = 8, 14 at W = 4), hold a rank's whole run inside one document (16..45 at W = 4, 8)
and include one-token documents (``test_document_layouts_are_covered`` holds that).
Bad input raises ValueError on EVERY rank, and the group still works afterwards.

Legend: B batch, S tokens, H heads, K key dim, V value dim, W world size; bshd.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import hamilton_attn as ha
from hamilton_attn.testing.linear_oracle import linear_recurrence_oracle
from hamilton_attn.testing.oracle import max_err

S, H, K, V = 53, 3, 5, 4
DOCS = [0, 7, 14, 15, 16, 45, S]
F64_TOL = 1e-10
WORLDS = (1, 2, 3, 4, 8)


def _case(kind, strategy, *, docs=True, batch=1, init=True, dtype="float64", seqlen=S):
    return dict(kind=kind, strategy=strategy, docs=docs, B=batch, init=init, dtype=dtype,
                S=seqlen)  # fmt: skip


CASES = [
    _case("gla", "allgather"),
    _case("gla", "ring"),
    _case("retention", "ring", docs=False, batch=2),
    _case("retention", "allgather", docs=False, batch=2, init=False),
    _case("none", "auto", init=False),
    _case("ssd", "ring"),
]


def _inputs(c, seed):
    """Full (unsharded) float64 inputs, the same on every rank: q, k, v, g, initial state."""
    gen = torch.Generator().manual_seed(seed)
    b, s = c["B"], c["S"]

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, v = rnd(b, s, H, K), rnd(b, s, H, K), rnd(b, s, H, V)
    if c["kind"] in ("gla", "ssd"):  # per token, some steps near 0 and some strong
        g = -torch.rand(b, s, H, generator=gen, dtype=torch.float64) * 1.5
    elif c["kind"] == "retention":
        g = torch.log(1 - 2.0 ** (-1.0 - torch.arange(H, dtype=torch.float64)))
    else:
        g = None
    n = len(DOCS) - 1 if c["docs"] else b
    h0 = rnd(n, H, K, V) if c["init"] else None
    return q, k, v, g, h0


def _one(ctx, c, seed=0):
    """Errors of one case on this rank (and magnitudes, for float32 baselines)."""
    dt = getattr(torch, c["dtype"])
    mask = ha.Mask.varlen(DOCS, causal=True) if c["docs"] else ha.Mask.causal(c["S"])
    p = ha.plan(mask, ctx.group, dispatch="contiguous", schedule="ring", backend="reference")
    q, k, v, g, h0 = _inputs(c, seed)
    names = ["q", "k", "v"] + ["g"] * (g is not None) + ["h0"] * (h0 is not None)
    leaves = [t.to(dt).requires_grad_() for t in (q, k, v, g, h0) if t is not None]
    full = dict(zip(names, leaves, strict=True))
    ql, kl, vl = (ha.dispatch(full[n], p) for n in "qkv")
    gl = full.get("g")
    if gl is not None and gl.dim() == 3:
        gl = ha.dispatch(gl, p)
    kw = dict(plan=p, initial_state=full.get("h0"), return_final_state=True,
              strategy=c["strategy"], backend="torch")  # fmt: skip
    if c["kind"] == "ssd":
        # x = v, dt = -g / 0.5 (A = -0.5 per head), B = k, C = q: one group per head.
        a = torch.full((H,), -0.5, dtype=torch.float64)
        h0m = None if kw["initial_state"] is None else kw["initial_state"].transpose(-1, -2)
        kw["initial_state"] = h0m
        o_l, fin = ha.ssd(vl, gl / a, a.to(dt), kl, ql, **kw)
        fin = fin.transpose(-1, -2)
    else:
        o_l, fin = ha.linear_attention(ql, kl, vl, gl, **kw)
    o = ha.undispatch(o_l, p)
    wo = torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view_as(o).cos()
    wf = torch.linspace(-1, 1, fin.numel(), dtype=torch.float64).view_as(fin).sin()
    loss = (o * wo.to(dt)).sum() + (fin * wf.to(dt)).sum()
    got = torch.autograd.grad(loss, leaves, allow_unused=True)  # h0: ranks without a start
    got = {n: torch.zeros_like(t) if d is None else d
           for n, t, d in zip(names, leaves, got, strict=True)}  # fmt: skip
    if g is not None and g.dim() == 1:  # each rank's share of a replicated g's gradient
        got["g"] = got["g"].clone()
        dist.all_reduce(got["g"], group=ctx.group)
    got.update(o=o.detach(), fin=fin.detach())

    def oracle(dtype):
        lv = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, g, h0) if t is not None]
        ld = dict(zip(names, lv, strict=True))
        scale, vv = None, ld["v"]
        if c["kind"] == "ssd":  # Mamba2: h_t = exp(dt A) h + dt B^T x, y = C h
            scale, vv = 1.0, ld["v"] * (ld["g"] / -0.5)[..., None]
        oo, ff = linear_recurrence_oracle(
            ld["q"], ld["k"], vv, ld.get("g"), scale=scale, dtype=dtype,
            cu_seqlens=DOCS if c["docs"] else None, initial_state=ld.get("h0"),
        )  # fmt: skip
        gr = torch.autograd.grad((oo * wo.to(dtype)).sum() + (ff * wf.to(dtype)).sum(), lv)
        return {"o": oo.detach(), "fin": ff.detach(), **dict(zip(names, gr, strict=True))}

    want = oracle(torch.float64)
    r = {"err": {n: max_err(got[n], want[n]) for n in want},
         "mag": {n: want[n].abs().max().item() for n in want},
         "shape": all(got[n].shape == want[n].shape for n in want)}  # fmt: skip
    if dt != torch.float64:
        same = oracle(dt)
        r["base"] = {n: max_err(same[n], want[n]) for n in want}
    return r


def _cases(ctx, cases):
    return [_one(ctx, c) for c in cases]


@pytest.mark.parametrize("w", WORLDS)
def test_every_kind_and_strategy_matches_the_recurrence(pool, w):
    per_rank = pool.run(_cases, w, CASES)
    assert len(per_rank) == w
    for rank, results in enumerate(per_rank):
        for c, r in zip(CASES, results, strict=True):
            tag = f"W={w} rank {rank} {c}"
            assert r["shape"], tag
            for n, e in r["err"].items():
                assert e <= F64_TOL * max(1.0, r["mag"][n]), f"{tag}: {n} error {e:.3e}"


def test_document_layouts_are_covered():
    """The documents cross rank boundaries at every W > 1, start at a rank's first token
    at W = 4 and 8, and hold a rank's whole run at W = 4 and 8."""
    for w in (2, 3, 4, 8):
        n = -(-S // w)  # tokens per rank
        starts = [r * n for r in range(w)]
        assert any(d % n for d in DOCS[1:-1]), w
        if w in (4, 8):
            assert set(DOCS[1:-1]) & set(starts[1:]), w
            assert any(16 <= r and r + n <= 45 for r in starts), w


def _f32_errors(ctx, w_seed):
    c = _case("gla", "auto", dtype="float32", seqlen=256, docs=False, init=True)
    return _one(ctx, c, seed=w_seed)


def test_float32_error_does_not_grow_with_world_size(pool):
    """float32 at W = 8 is at most 1.5x as far from the float64 recurrence as at W = 1
    (same inputs, 256 tokens: 4 chunks of 64 on one rank, 32 tokens per rank at W = 8),
    and both within flash-attention's bound of the float32 recurrence."""
    one = pool.run(_f32_errors, 1, 7)[0]
    eight = pool.run(_f32_errors, 8, 7)[0]
    eps = torch.finfo(torch.float32).eps
    for n in one["err"]:
        slack = 4 * eps * max(1.0, one["mag"][n])
        assert eight["err"][n] <= 1.5 * one["err"][n] + slack, (n, one["err"][n], eight["err"][n])
        assert one["err"][n] <= 2 * one["base"][n] + slack, (n, one["err"][n], one["base"][n])


# -- bad input: a ValueError on every rank, none hangs ----------------------------------


def _bad_call(kind, rank, p, q, k, v, g):
    """This rank's call for ``kind`` (on the plan ``p`` of causal documents)."""
    kw = {"plan": p}
    if kind == "positive_gate_one_rank":
        g = g.abs() if rank == 1 else g
    elif kind == "heads_one_rank":
        q = q[:, :, :2] if rank == 0 else q
    elif kind == "cu_seqlens_with_plan":
        kw["cu_seqlens"] = [0, q.shape[1]]
    elif kind == "local_length":
        q, k, v, g = q[:, 1:], k[:, 1:], v[:, 1:], g[:, 1:]
    elif kind == "initial_state_shape":
        kw["initial_state"] = torch.zeros(2, H, K, V, dtype=q.dtype)
    elif kind == "h0_grad_one_rank":  # valid on each rank, but only one backward gathers
        kw["initial_state"] = torch.zeros(len(DOCS) - 1, H, K, V, dtype=q.dtype)
        kw["initial_state"].requires_grad_(rank == 0)
    elif kind == "strategy_differs":  # valid on each rank, but not the same
        kw["strategy"] = "ring" if rank % 2 else "allgather"
    elif kind == "dtype_one_rank":
        v = v.float() if rank == 0 else v
    elif kind == "zigzag_plan":
        kw["plan"] = ha.plan(p.user_mask, p.group, dispatch="zigzag", schedule="ring")
    elif kind == "full_mask_plan":
        full = ha.Mask.full(p.user_mask.seqlen_q)
        kw["plan"] = ha.plan(full, p.group, dispatch="contiguous", schedule="ring")
    return ha.linear_attention(q, k, v, g, **kw)


BAD = {  # kind: the argument the offending rank's error names
    "positive_gate_one_rank": "g: log decay must be",
    "heads_one_rank": "q, k, v",
    "cu_seqlens_with_plan": "cu_seqlens",
    "local_length": "local tokens",
    "initial_state_shape": "initial_state",
    "strategy_differs": "strategy",
    "h0_grad_one_rank": "initial_state (given, requiring grad)",
    "dtype_one_rank": "q, k, v",
    "zigzag_plan": "plan: linear attention needs dispatch='contiguous'",
    "full_mask_plan": "plan: linear attention needs a causal mask",
}


def _bad(ctx):
    m = ha.Mask.varlen(DOCS, causal=True)
    p = ha.plan(m, ctx.group, dispatch="contiguous", schedule="ring")
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, S, H, d, generator=gen, dtype=torch.float64) for d in (K, K, V))
    g = -torch.rand(1, S, H, generator=gen, dtype=torch.float64)
    ql, kl, vl, gl = (ha.dispatch(t, p) for t in (q, k, v, g))
    out = {}
    for kind in BAD:
        try:
            _bad_call(kind, ctx.rank, p, ql, kl, vl, gl)
            out[kind] = ("no error", "")
        except Exception as err:  # noqa: BLE001 - the test is about which error
            out[kind] = (type(err).__name__, str(err))
    good = ha.linear_attention(ql, kl, vl, gl, plan=p)
    out["good_after"] = ("ok" if torch.isfinite(good).all() else "bad", "")
    return out


@pytest.mark.parametrize("w", [2, 3])
def test_bad_input_raises_value_error_on_every_rank(pool, w):
    per_rank = pool.run(_bad, w)
    for kind, text in BAD.items():
        for rank, res in enumerate(per_rank):
            typ, msg = res[kind]
            assert typ == "ValueError", f"{kind}, rank {rank}: {typ}: {msg}"
        msgs = [res[kind][1] for res in per_rank]
        assert any(text in m for m in msgs), (kind, msgs)
    assert all(res["good_after"][0] == "ok" for res in per_rank)
