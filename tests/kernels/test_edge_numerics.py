"""Edge numerics (issue #14, items 2, 3, 4, 17): non-finite values at keys a row cannot
see, double backward, the softmax scale's edge values, and torch.compile.

The oracle for non-finite inputs is written per row from the definition: row i's
output is the softmax over the keys it sees of their scores, times those keys' values,
in float64, differentiated by autograd. A key a row does not see never enters that
row's arithmetic, so a NaN there cannot reach it; a dense masked oracle (``p @ v``
with zeros at masked keys) would itself spread the NaN (0 x NaN = NaN).

Legend: B batch, S tokens, Hq/Hk heads, D head dim, W world size; bshd tensors.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import hamilton_attn as ha
from hamilton_attn.masks import Mask
from hamilton_attn.testing.oracle import (
    attention_oracle,
    dense_from_rects,
    dense_varlen,
    dense_window,
)

S, HQ, HK, D = 24, 4, 2, 8
BAD_KEY = 12  # seen by some rows and not by others in every mask below
HOLE_KEY = 9  # seen by no row of the "holes" mask


def masks_and_dense(name: str, s: int = S):
    """(Mask, bool [s, s] oracle mask built without hamilton_attn.masks)."""
    if name == "docs":
        cu = [0, 7, 16, s]
        return Mask.varlen(cu), dense_varlen(cu)
    if name == "holes":  # full blocks that leave keys 8..11 and 20..23 unseen
        qr, kr = [(0, 12), (12, s)], [(0, 8), (12, 20)]
        return Mask.from_ranges(qr, kr, "full", s), dense_from_rects(qr, kr, "full", s, s)
    if name == "window":
        return Mask.sliding_window(s, (5, 0)), dense_window(s, s, 5, 0)
    kind = {"causal": "causal", "inv_causal": "inv_causal", "bi_causal": "bi_causal"}[name]
    return (
        Mask.from_ranges([(0, s)], [(0, s)], kind, s),
        dense_from_rects([(0, s)], [(0, s)], kind, s, s),
    )


def rows_mask(dense) -> Mask:
    """The Mask of a bool ``[rows, keys]`` matrix, one rectangle per run of keys."""
    qr, kr = [], []
    for i, row in enumerate(dense.tolist()):
        for j, on in enumerate(row):
            if on and (j == 0 or not row[j - 1]):
                end = j
                while end < len(row) and row[end]:
                    end += 1
                qr.append((i, i + 1))
                kr.append((j, end))
    return Mask.from_ranges(qr, kr, "full", dense.shape[0], dense.shape[1])


MASKS = ("docs", "holes", "causal", "window", "inv_causal", "bi_causal")
SDPA_MASKS = ("docs", "holes", "causal")  # FULL / CAUSAL pieces only


def row_oracle(q, k, v, dense, scale):
    """Out ``[B, S, Hq, D]`` in float64, each row over the keys it sees only."""
    hq, hk = q.shape[2], k.shape[2]
    kk = k.repeat_interleave(hq // hk, dim=2)
    vv = v.repeat_interleave(hq // hk, dim=2)
    rows = []
    for i in range(q.shape[1]):
        idx = dense[i].nonzero().flatten()
        if idx.numel() == 0:
            rows.append(torch.zeros_like(q[:, i]))
            continue
        s = torch.einsum("bhd,bjhd->bhj", q[:, i], kk[:, idx]) * scale
        rows.append(torch.einsum("bhj,bjhd->bhd", torch.softmax(s, -1), vv[:, idx]))
    return torch.stack(rows, dim=1)


def draw(seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)

    def r(h):
        return torch.randn(1, S, h, D, dtype=torch.float64, generator=gen).to(dtype)

    return r(HQ), r(HK), r(HK), r(HQ)


def poison(k, v, which: str, value: float, key: int):
    k, v = k.clone(), v.clone()
    (v if which == "v" else k)[0, key, 1, 3] = value
    return k, v


def grads_of(fn, q, k, v, g):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    return (out.detach(), *torch.autograd.grad(out, leaves, g))


def assert_same_numbers(got, want, what):
    """Same finite / non-finite pattern; equal within float64 rounding where finite."""
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        fa, fb = torch.isfinite(a), torch.isfinite(b)
        leaked = (~fa & fb).sum().item()
        assert leaked == 0, f"{what}: {name} has {leaked} non-finite entries the oracle has not"
        if name == "out":
            # Gradients at pairs a row with a non-finite score sees may come out NaN
            # (softmax's backward) or 0 (exp(S - lse) with lse = inf): both the formula.
            assert (fa == fb).all(), f"{what}: {name} finite where the oracle is not"
        err = (a[fb].double() - b[fb]).abs().max().item() if fb.any() else 0.0
        assert err < 1e-9, f"{what}: {name} error {err:.3e}"


def backends_for(mask_name):
    out = ["reference", "auto", "flex"]
    return out + ["sdpa"] if mask_name in SDPA_MASKS else out


CASES = [
    (m, b, which, val)
    for m in MASKS
    for b in backends_for(m)
    for which in ("v", "k")
    for val in (float("nan"), float("inf"))
]


@pytest.mark.parametrize("mask_name,backend,which,value", CASES)
def test_nonfinite_at_unseen_key_reaches_no_blind_row(mask_name, backend, which, value):
    mask, dense = masks_and_dense(mask_name)
    key = HOLE_KEY if mask_name == "holes" else BAD_KEY
    assert dense[:, key].any() != (mask_name == "holes") and not dense[:, key].all()
    q, k, v, g = draw(zlib.crc32(repr((mask_name, backend, which, value)).encode()))
    k, v = poison(k, v, which, value, key)
    scale = 1 / math.sqrt(D)

    def ours(q_, k_, v_):
        return ha.attention(q_, k_, v_, mask, backend=backend)

    got = grads_of(ours, q, k, v, g)
    want = grads_of(lambda *t: row_oracle(*t, dense, scale), q, k, v, g)
    assert_same_numbers(got, want, f"{mask_name}/{backend}/{which}={value}")
    blind = ~dense[:, key]
    assert torch.isfinite(got[0][:, blind]).all() and torch.isfinite(got[1][:, blind]).all()


@pytest.mark.parametrize(
    "backend,mask_name", [("reference", "window"), ("flex", "window"), ("sdpa", "causal")]
)
def test_kernel_backward_keeps_nan_merged_rows_to_their_keys(backend, mask_name):
    """A block's backward with a merged out / lse that is NaN on some rows (another
    block's NaN key) and an upstream gradient inf on another: those rows must not reach
    dK / dV of keys they do not see, nor dq of other rows."""
    from hamilton_attn.kernels import get_kernel

    mask, dense = masks_and_dense(mask_name)
    q, k, v, g = (t.transpose(1, 2) for t in draw(7))
    out, lse = get_kernel("reference").forward(q, k, v, mask, 0.3)
    out, lse, g = out.clone(), lse.clone(), g.clone()
    out[:, :, 13], lse[:, :, 14], g[:, :, 15] = float("nan"), float("nan"), float("inf")
    dq, dk, dv = get_kernel(backend).backward(g, q, k, v, out, lse, mask, 0.3)
    seen = dense[13:16].any(0)  # keys that rows 13..15 see
    assert torch.isfinite(dk[:, :, ~seen]).all() and torch.isfinite(dv[:, :, ~seen]).all()
    assert torch.isfinite(dq[:, :, 16:]).all() and torch.isfinite(dq[:, :, :13]).all()
    # The finite rest equals the exact shares of the rows that stay finite.
    keep = torch.ones(S, dtype=torch.bool)
    keep[13:16] = False
    sub = [t[:, :, keep] for t in (g, q, out, lse)]
    rdq, rdk, rdv = get_kernel("reference").backward(
        sub[0], sub[1], k, v, sub[2], sub[3], rows_mask(dense[keep]), 0.3
    )
    torch.testing.assert_close(dq[:, :, keep], rdq, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dk[:, :, ~seen], rdk[:, :, ~seen], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dv[:, :, ~seen], rdv[:, :, ~seen], rtol=1e-12, atol=1e-12)


# -- calc_attn at W = 2 -------------------------------------------------------------------


def _w_window_nonfinite(ctx, which, value):
    mask = Mask.sliding_window(S, (5, 0))
    q, k, v, g = draw(11)
    k, v = poison(k, v, which, value, 3)  # key 3: rows 3..8 see it
    p = ha.plan(mask, ctx.group, schedule="ring", dispatch="contiguous")

    def ours(q_, k_, v_):
        loc = [ha.dispatch(t, p) for t in (q_, k_, v_)]
        return ha.undispatch(ha.calc_attn(*loc, p), p)

    return grads_of(ours, q, k, v, g)


@pytest.mark.parametrize("which,value", [("v", float("nan")), ("k", float("inf"))])
def test_calc_attn_window_nonfinite_reaches_no_blind_row(pool, which, value):
    dense = dense_window(S, S, 5, 0)
    q, k, v, g = draw(11)
    k, v = poison(k, v, which, value, 3)
    want = grads_of(lambda *t: row_oracle(*t, dense, 1 / math.sqrt(D)), q, k, v, g)
    for rank, got in enumerate(pool.run(_w_window_nonfinite, 2, which, value)):
        assert_same_numbers(got, want, f"rank {rank} {which}={value}")
        assert torch.isfinite(got[0][:, 9:]).all()  # the 15 rows that never see key 3


# -- item 3: double backward ----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "auto", "sdpa", "flex"])
def test_double_backward_raises(backend):
    q, k, v, g = draw(3)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = ha.attention(q, k, v, causal=True, backend=backend)
    (dq,) = torch.autograd.grad(out, q, g, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        torch.autograd.grad(dq.sum(), (q, k, v))


def _w_double_backward(ctx):
    p = ha.plan(Mask.causal(S), ctx.group)
    q, k, v, g = draw(5)
    loc = [ha.dispatch(t, p).detach().requires_grad_() for t in (q, k, v)]
    out = ha.calc_attn(*loc, p)
    (dq,) = torch.autograd.grad(out, loc[0], ha.dispatch(g, p), create_graph=True)
    try:
        torch.autograd.grad(dq.sum(), loc)
    except RuntimeError as err:
        return str(err)
    return None


def test_calc_attn_double_backward_raises(pool):
    for msg in pool.run(_w_double_backward, 2):
        assert msg is not None and "once_differentiable" in msg


# -- item 4: scale and head dim -----------------------------------------------------------------


BAD_SCALES = [float("inf"), float("-inf"), float("nan"), "0.5", True, 1j]


@pytest.mark.parametrize("scale", BAD_SCALES, ids=str)
def test_bad_scale_raises(scale):
    q, k, v, _ = draw(1)
    with pytest.raises(ValueError, match="scale"):
        ha.attention(q, k, v, causal=True, scale=scale)
    p = ha.plan(Mask.causal(S))
    with pytest.raises(ValueError, match="scale"):
        ha.calc_attn(q, k, v, p, scale=scale)


def test_zero_head_dim_raises():
    q = torch.randn(1, S, HQ, 0, dtype=torch.float64)
    k = torch.randn(1, S, HK, 0, dtype=torch.float64)
    with pytest.raises(ValueError, match="head dim"):
        ha.attention(q, k, k, causal=True)
    with pytest.raises(ValueError, match="head dim"):
        ha.calc_attn(q, k, k, ha.plan(Mask.causal(S)))


@pytest.mark.parametrize("scale", [0.0, -0.0, 1e13, -2.5, 1e-30])
@pytest.mark.parametrize(
    "mask_name,backend",
    [(m, b) for m in MASKS for b in backends_for(m)],
)
def test_edge_scales_match_oracle(scale, mask_name, backend):
    mask, dense = masks_and_dense(mask_name)
    q, k, v, g = draw(zlib.crc32(repr((scale, mask_name, backend)).encode()))

    def ours(q_, k_, v_):
        return ha.attention(q_, k_, v_, mask, backend=backend, scale=scale)

    def oracle(q_, k_, v_):
        bhsd = [t.transpose(1, 2) for t in (q_, k_, v_)]
        return attention_oracle(*bhsd, dense, scale)[0].transpose(1, 2)

    got = grads_of(ours, q, k, v, g)
    want = grads_of(oracle, q, k, v, g)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), f"{name}: non-finite at scale {scale}"
        if abs(scale) > 1e6 and name != "out":
            # |lse| ~ 1e13 holds 1e-3 absolute: exp(S - lse) is only that good, and dq, dk
            # multiply a cancellation by the scale. Finite is what can be asked.
            continue
        err = (a - b).abs().max().item()
        assert err < 1e-8 * max(1.0, b.abs().max().item()), f"{name}: error {err:.3e}"


def test_calc_attn_zero_scale_matches_oracle():
    mask, dense = masks_and_dense("causal")
    q, k, v, g = draw(9)
    p = ha.plan(mask)
    got = grads_of(lambda *t: ha.calc_attn(*t, p, scale=0.0), q, k, v, g)

    def oracle(*t):
        return attention_oracle(*(x.transpose(1, 2) for x in t), dense, 0.0)[0].transpose(1, 2)

    want = grads_of(oracle, q, k, v, g)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all() and (a - b).abs().max().item() < 1e-9


# -- item 17: torch.compile ---------------------------------------------------------------------


def _compile_masks():
    # Fresh masks: nothing cached on them by an eager call before the trace.
    return {
        "causal": Mask.from_ranges([(0, S)], [(0, S)], "causal", S),
        "docs": Mask.varlen([0, 5, 13, S], causal=True),
        "window": Mask.sliding_window(S, (4, 0)),
    }


@pytest.mark.parametrize("name", ["causal", "docs", "window"])
def test_compile_fullgraph_one_device(name):
    torch._dynamo.reset()
    mask = _compile_masks()[name]
    q, k, v, g = draw(13, torch.float32)

    def fn(q_, k_, v_):
        return ha.attention(q_, k_, v_, mask)

    breaks = []

    def counting(gm, example_inputs):
        breaks.append(gm)
        return gm.forward

    from hamilton_attn.kernels.sdpa import CONSTANT_PLAN_UNDER_COMPILE

    # torch < 2.13 cannot hold a Mask as a constant in dynamo: there compiled attention
    # runs with graph breaks (checked equal to eager), and fullgraph is 2.13's.
    compiled = torch.compile(fn, fullgraph=CONSTANT_PLAN_UNDER_COMPILE, backend="aot_eager")
    got = grads_of(compiled, q, k, v, g)
    want = grads_of(fn, q, k, v, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    mask2 = _compile_masks()[name]

    def fn2(q_, k_, v_):
        return ha.attention(q_, k_, v_, mask2)

    torch.compile(fn2, backend=counting)(q, k, v)
    if CONSTANT_PLAN_UNDER_COMPILE:
        assert len(breaks) == 1, f"{len(breaks)} graphs: torch.compile broke the graph"
    torch._dynamo.reset()
