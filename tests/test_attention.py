"""``hamilton_attn.attention`` forward and backward against the float64 oracle.

Only the ``reference`` backend and ``auto`` are exercised here; ``auto`` may route to
another backend (sdpa on CPU), so every bound is the flash-attention style one from
:func:`hamilton_attn.testing.oracle.assert_close_to_oracle`, valid for any backend
computing in float32.
"""

from __future__ import annotations

import math

import pytest
import torch

from hamilton_attn import attention
from hamilton_attn.masks import Mask
from hamilton_attn.testing.oracle import (
    assert_close_to_oracle,
    attention_oracle,
    dense_block_causal,
    dense_from_rects,
    dense_prefix_lm,
    dense_shared_question,
    dense_varlen,
    dense_window,
    max_err,
    rect_dense,
)

BACKENDS = ["reference", "auto"]
NEG_INF = float("-inf")


def to_bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "bshd":
        return x.permute(0, 2, 1, 3)
    if layout == "thd":
        return x.permute(1, 0, 2).unsqueeze(0)
    return x


def make_inputs(gen, layout, b, hq, hk, sq, sk, d, dtype):
    def shape(h, s):
        return {"bshd": (b, s, h, d), "bhsd": (b, h, s, d), "thd": (s, h, d)}[layout]

    # Scaled so that softmax rows are neither uniform nor one-hot.
    q = torch.randn(shape(hq, sq), generator=gen) * 1.5
    k = torch.randn(shape(hk, sk), generator=gen) * 1.5
    v = torch.randn(shape(hk, sk), generator=gen)
    dout = torch.randn(shape(hq, sq), generator=gen)
    return [t.to(dtype) for t in (q, k, v)], dout.to(dtype)


def run_and_check(
    *,
    mask,
    dense,
    layout="bshd",
    backend="reference",
    dtype=torch.float32,
    b=2,
    hq=4,
    hk=2,
    d=32,
    scale=None,
    causal=False,
    seed=0,
    factor=2.0,
):
    """Forward + backward through ``attention`` vs the float64 oracle and a
    same-precision oracle; checks empty rows exactly. Returns (out, lse, grads)."""
    sq, sk = dense.shape
    if layout == "thd":
        b = 1
    gen = torch.Generator().manual_seed(seed)
    (q, k, v), dout = make_inputs(gen, layout, b, hq, hk, sq, sk, d, dtype)
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out, lse = attention(
        q, k, v, mask, causal=causal, scale=scale, layout=layout, backend=backend, return_lse=True
    )
    out.backward(dout)

    assert out.dtype == dtype and out.shape == q.shape[:-1] + (v.shape[-1],)
    lse_shape = (hq, sq) if layout == "thd" else (b, hq, sq)
    assert tuple(lse.shape) == lse_shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not lse.requires_grad
    lse_bhs = lse.unsqueeze(0) if layout == "thd" else lse

    eff_scale = 1 / math.sqrt(d) if scale is None else scale
    refs = {}
    for prec in (torch.float64, dtype):
        leaves = [to_bhsd(t.detach(), layout).clone().requires_grad_(True) for t in (q, k, v)]
        o, l = attention_oracle(*leaves, dense, eff_scale, dtype=prec)
        o.backward(to_bhsd(dout, layout).to(prec))
        refs[prec] = (o, l, [t.grad for t in leaves])
    ref_o, ref_l, ref_g = refs[torch.float64]
    low_o, low_l, low_g = refs[dtype]
    atol = 1e-10 if dtype == torch.float64 else None
    tag = f"{backend} {layout} {dtype}"

    out_bhsd = to_bhsd(out.detach(), layout)
    assert_close_to_oracle(out_bhsd, ref_o, low_o, factor, atol, name=f"{tag} out")
    grads = [to_bhsd(t.grad, layout) for t in (q, k, v)]
    for name, g, rg, lg in zip("qkv", grads, ref_g, low_g):
        assert g.dtype == dtype, name
        g_atol = atol
        if dtype == torch.float32:
            # A flash-style backward (delta = rowsum(dO * O), dS = P * (dP - delta)) sums in
            # another order than autograd on the oracle: O(10) ulps at the gradient's scale.
            # 32 ulps is still orders of magnitude below a masking or scaling error.
            g_atol = 32 * torch.finfo(dtype).eps * max(1.0, rg.abs().max().item())
        assert_close_to_oracle(g, rg, lg, factor, g_atol, name=f"{tag} d{name}")

    # lse: -inf exactly on rows that see nothing, oracle-close elsewhere.
    empty = ~dense.any(dim=1)
    assert torch.equal(torch.isneginf(lse_bhs), torch.isneginf(ref_l)), f"{tag} lse -inf rows"
    assert not torch.isnan(lse_bhs).any()
    fin = torch.isfinite(ref_l)
    if fin.any():
        lse_mag = max(1.0, ref_l[fin].abs().max().item())
        lse_atol = 1e-10 if dtype == torch.float64 else 2e-5 * lse_mag
        assert_close_to_oracle(
            lse_bhs[fin], ref_l[fin], low_l[fin], factor, lse_atol, name=f"{tag} lse"
        )
    # Rows that see nothing: out exactly 0 and no gradient to their queries.
    if empty.any():
        assert (out_bhsd[:, :, empty] == 0).all(), f"{tag}: empty rows not zero"
        assert (grads[0][:, :, empty] == 0).all(), f"{tag}: dq of empty rows not zero"
    # Keys nobody sees get no gradient either.
    unseen = ~dense.any(dim=0)
    if unseen.any():
        assert (grads[1][:, :, unseen] == 0).all() and (grads[2][:, :, unseen] == 0).all(), tag
    return out, lse, grads


# -- masks from every builder -------------------------------------------------------------

CU_Q, CU_K = [0, 5, 5, 30, 38, 59], [0, 9, 20, 20, 47, 61]  # doc 3 has no keys: rows 30..37 empty

MASK_CASES = {
    # name: (mask or None, causal flag, brute-force dense)
    "none-full": (None, False, torch.ones(59, 97, dtype=torch.bool)),
    "causal-flag-Sq>Sk": (None, True, rect_dense(97, 59, "causal")),
    "causal-Sq<Sk": (Mask.causal(59, 97), False, rect_dense(59, 97, "causal")),
    "causal-Sq>Sk": (Mask.causal(97, 59), False, rect_dense(97, 59, "causal")),
    "window": (Mask.sliding_window(97, (7, 3), 59), False, dense_window(97, 59, 7, 3)),
    "window-left": (Mask.sliding_window(59, (16, -1)), False, dense_window(59, 59, 16, -1)),
    "window-diag": (Mask.sliding_window(59, (0, 0)), False, dense_window(59, 59, 0, 0)),
    "varlen-causal": (
        Mask.varlen(CU_Q, CU_K, causal=True),
        False,
        dense_varlen(CU_Q, CU_K, causal=True),
    ),
    "varlen-window": (
        Mask.varlen(CU_Q, CU_K, window=(4, 2)),
        False,
        dense_varlen(CU_Q, CU_K, window=(4, 2)),
    ),
    "varlen-full": (Mask.varlen(CU_Q, CU_K), False, dense_varlen(CU_Q, CU_K)),
    "block-causal": (
        Mask.block_causal(59, [7, 0, 20, 32]),
        False,
        dense_block_causal([7, 0, 20, 32]),
    ),
    "prefix-lm": (Mask.prefix_lm(59, 11), False, dense_prefix_lm(59, 11)),
    "shared-question": (
        Mask.shared_question(9, [20, 0, 30]),
        False,
        dense_shared_question(9, [20, 0, 30]),
    ),
    "overlapping-rects": (
        Mask.from_ranges(
            [(0, 30), (10, 40), (45, 59), (20, 59)],
            [(5, 50), (0, 20), (40, 59), (30, 61)],
            ["causal", "inv_causal", "bi_causal", "full"],
            59,
            61,
        ),
        False,
        dense_from_rects(
            [(0, 30), (10, 40), (45, 59), (20, 59)],
            [(5, 50), (0, 20), (40, 59), (30, 61)],
            ["causal", "inv_causal", "bi_causal", "full"],
            59,
            61,
        ),
    ),
    "empty": (
        Mask.from_ranges([], [], "full", 37, 41),
        False,
        torch.zeros(37, 41, dtype=torch.bool),
    ),
}


def test_mask_cases_match_brute_force():
    """The dense matrices used as oracle inputs below agree with the masks."""
    for name, (mask, _, dense) in MASK_CASES.items():
        if mask is not None:
            assert torch.equal(mask.to_dense(), dense), name


@pytest.mark.parametrize("case", list(MASK_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_mask_forward_backward(backend, case):
    mask, causal, dense = MASK_CASES[case]
    run_and_check(mask=mask, dense=dense, causal=causal, backend=backend, seed=len(case))


# -- layouts, GQA, dtypes, head dims ------------------------------------------------------


@pytest.mark.parametrize("layout", ["bshd", "bhsd", "thd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts(backend, layout):
    if layout == "thd":
        mask, _, dense = MASK_CASES["varlen-causal"]
    else:
        mask, _, dense = MASK_CASES["causal-Sq<Sk"]
    out, lse, _ = run_and_check(mask=mask, dense=dense, layout=layout, backend=backend, seed=3)
    if layout == "thd":
        assert out.dim() == 3 and lse.shape == (4, dense.shape[0])


def test_layouts_agree():
    """The same numbers in the three layouts give the same result."""
    gen = torch.Generator().manual_seed(8)
    mask = Mask.varlen([0, 20, 59], [0, 30, 61], causal=True)
    q = torch.randn(1, 4, 59, 16, generator=gen)
    k = torch.randn(1, 2, 61, 16, generator=gen)
    v = torch.randn(1, 2, 61, 16, generator=gen)
    o_bhsd = attention(q, k, v, mask, layout="bhsd")
    o_bshd = attention(*(t.transpose(1, 2) for t in (q, k, v)), mask, layout="bshd")
    o_thd, lse = attention(
        *(t[0].transpose(0, 1) for t in (q, k, v)), mask, layout="thd", return_lse=True
    )
    assert max_err(o_bshd.transpose(1, 2), o_bhsd) < 1e-6
    assert max_err(o_thd.transpose(0, 1).unsqueeze(0), o_bhsd) < 1e-6
    assert lse.shape == (4, 59)


@pytest.mark.parametrize(
    "hq,hk", [(4, 4), (4, 2), (8, 2), (8, 1)], ids=["mha", "gqa2", "gqa4", "mqa"]
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gqa(backend, hq, hk):
    mask, _, dense = MASK_CASES["prefix-lm"]
    run_and_check(mask=mask, dense=dense, backend=backend, hq=hq, hk=hk, seed=hq * 10 + hk)


def test_gqa_equals_repeated_kv():
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(2, 31, 8, 16, generator=gen)
    k = torch.randn(2, 45, 2, 16, generator=gen)
    v = torch.randn(2, 45, 2, 16, generator=gen)
    mask = Mask.causal(31, 45)
    o = attention(q, k, v, mask)
    o_rep = attention(q, k.repeat_interleave(4, dim=2), v.repeat_interleave(4, dim=2), mask)
    assert max_err(o, o_rep) < 1e-6


DTYPE_CASES = ["causal-flag-Sq>Sk", "varlen-window", "overlapping-rects", "shared-question"]


@pytest.mark.parametrize("case", DTYPE_CASES)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes(backend, dtype, case):
    mask, causal, dense = MASK_CASES[case]
    run_and_check(mask=mask, dense=dense, causal=causal, backend=backend, dtype=dtype, d=64, seed=7)


@pytest.mark.parametrize("d", [8, 24, 64, 128, 256])
@pytest.mark.parametrize("backend", BACKENDS)
def test_head_dims(backend, d):
    mask, _, dense = MASK_CASES["block-causal"]
    run_and_check(mask=mask, dense=dense, backend=backend, d=d, hq=2, hk=1, b=1, seed=d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_head_dim_256_low_precision(backend, dtype):
    mask, causal, dense = MASK_CASES["causal-flag-Sq>Sk"]
    run_and_check(
        mask=mask,
        dense=dense,
        causal=causal,
        backend=backend,
        dtype=dtype,
        d=256,
        hq=2,
        hk=1,
        b=1,
        seed=256,
    )


# -- rows that see nothing ----------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_empty_mask(backend, dtype):
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 13, 4, 16, generator=gen).to(dtype).requires_grad_(True)
    k = torch.randn(2, 17, 2, 16, generator=gen).to(dtype).requires_grad_(True)
    v = torch.randn(2, 17, 2, 16, generator=gen).to(dtype).requires_grad_(True)
    out, lse = attention(
        q, k, v, Mask.from_ranges([], [], "full", 13, 17), backend=backend, return_lse=True
    )
    out.backward(torch.randn(out.shape, generator=gen).to(dtype))
    assert out.dtype == dtype and (out == 0).all()
    assert torch.isneginf(lse).all()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.dtype == dtype and (t.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_more_queries_than_keys_empty_top_rows(backend):
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(1, 10, 2, 8, generator=gen, requires_grad=True)
    k = torch.randn(1, 4, 2, 8, generator=gen, requires_grad=True)
    v = torch.randn(1, 4, 2, 8, generator=gen, requires_grad=True)
    out, lse = attention(q, k, v, causal=True, backend=backend, return_lse=True)
    out.sum().backward()
    assert (out[:, :6] == 0).all() and torch.isneginf(lse[..., :6]).all()
    assert torch.isfinite(lse[..., 6:]).all()
    # Row 6 sees only key 0: its output is v[0] exactly up to rounding.
    assert max_err(out[:, 6], v[:, 0]) < 1e-6
    assert (q.grad[:, :6] == 0).all() and torch.isfinite(q.grad).all()


# -- gradcheck, scale, lse ----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    gen = torch.Generator().manual_seed(13)
    sq, sk = 7, 9
    # Overlapping rectangles; row 6 sees nothing.
    mask = Mask.from_ranges(
        [(0, 5), (2, 6), (0, 3)], [(0, 6), (3, 9), (4, 9)], ["causal", "bi_causal", "full"], sq, sk
    )
    assert mask.to_dense()[:6].any(dim=1).all() and not mask.to_dense()[6].any()
    q = torch.randn(2, 4, sq, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, sk, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, sk, 4, generator=gen, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v):
        return attention(q, k, v, mask, layout="bhsd", backend=backend)

    # auto may run this mask as several small sdpa calls (~16 ms each on CPU); the full
    # Jacobian needs ~1000 forwards, so auto checks random projections of it instead.
    fast = backend != "reference"
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_scale(backend):
    mask, _, dense = MASK_CASES["window"]
    out_a, _, _ = run_and_check(mask=mask, dense=dense, backend=backend, scale=0.37, seed=21)
    out_b, _, _ = run_and_check(mask=mask, dense=dense, backend=backend, scale=None, seed=21)
    assert max_err(out_a, out_b) > 1e-2  # the scale really changed the result


@pytest.mark.parametrize("layout", ["bshd", "bhsd", "thd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_return_lse_shapes(backend, layout):
    gen = torch.Generator().manual_seed(14)
    b, hq, hk, sq, sk, d = (1 if layout == "thd" else 3), 6, 3, 11, 11, 8
    (q, k, v), _ = make_inputs(gen, layout, b, hq, hk, sq, sk, d, torch.float32)
    only = attention(q, k, v, causal=True, layout=layout, backend=backend)
    assert isinstance(only, torch.Tensor) and only.shape == q.shape
    out, lse = attention(q, k, v, causal=True, layout=layout, backend=backend, return_lse=True)
    assert torch.equal(out, only)
    assert lse.shape == ((hq, sq) if layout == "thd" else (b, hq, sq))
    assert lse.dtype == torch.float32
    # lse of the full row is logsumexp of the scaled scores.
    qb, kb = to_bhsd(q, layout), to_bhsd(k, layout).repeat_interleave(2, dim=1)
    s = (qb.double() @ kb.double().transpose(-1, -2)) / math.sqrt(d)
    want = torch.logsumexp(s[..., -1, :], dim=-1)
    got = lse[:, -1] if layout == "thd" else lse[..., -1]
    assert max_err(got, want.squeeze(0) if layout == "thd" else want) < 1e-4


def test_auto_matches_reference():
    gen = torch.Generator().manual_seed(15)
    for name in ("causal-Sq>Sk", "block-causal", "varlen-window"):
        mask, _, dense = MASK_CASES[name]
        sq, sk = dense.shape
        q = torch.randn(2, sq, 4, 32, generator=gen)
        k = torch.randn(2, sk, 2, 32, generator=gen)
        v = torch.randn(2, sk, 2, 32, generator=gen)
        a, la = attention(q, k, v, mask, backend="auto", return_lse=True)
        r, lr = attention(q, k, v, mask, backend="reference", return_lse=True)
        assert max_err(a, r) < 1e-5, name
        assert torch.equal(torch.isneginf(la), torch.isneginf(lr)), name
        fin = torch.isfinite(lr)
        assert max_err(la[fin], lr[fin]) < 1e-5, name


# -- errors -------------------------------------------------------------------------------


def _no_interpreter(fn):
    from hamilton_attn import config

    with config.override(triton_interpret=False):
        return fn()


def _t(*shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


ERRORS = {
    "mask and causal": (
        lambda: attention(
            _t(1, 5, 2, 8), _t(1, 5, 2, 8), _t(1, 5, 2, 8), Mask.causal(5), causal=True
        ),
        ["mask", "causal"],
    ),
    "mask wrong shape": (
        lambda: attention(_t(1, 5, 2, 8), _t(1, 7, 2, 8), _t(1, 7, 2, 8), Mask.causal(5)),
        ["mask"],
    ),
    "mask transposed": (
        lambda: attention(_t(1, 5, 2, 8), _t(1, 7, 2, 8), _t(1, 7, 2, 8), Mask.causal(7, 5)),
        ["mask"],
    ),
    "mask not a Mask": (
        lambda: attention(
            _t(1, 5, 2, 8), _t(1, 5, 2, 8), _t(1, 5, 2, 8), torch.ones(5, 5, dtype=torch.bool)
        ),
        ["mask"],
    ),
    "unknown layout": (
        lambda: attention(_t(1, 5, 2, 8), _t(1, 5, 2, 8), _t(1, 5, 2, 8), layout="sbhd"),
        ["layout"],
    ),
    "unknown backend": (
        lambda: attention(_t(1, 5, 2, 8), _t(1, 5, 2, 8), _t(1, 5, 2, 8), backend="tensorrt"),
        ["backend"],
    ),
    "triton off CUDA without the interpreter": (
        lambda: _no_interpreter(
            lambda: attention(_t(1, 5, 2, 8), _t(1, 5, 2, 8), _t(1, 5, 2, 8), backend="triton")
        ),
        ["backend", "TRITON_INTERPRET"],
    ),
    "q rank": (lambda: attention(_t(5, 2, 8), _t(1, 5, 2, 8), _t(1, 5, 2, 8)), ["q"]),
    "k rank": (lambda: attention(_t(1, 5, 2, 8), _t(1, 1, 5, 2, 8), _t(1, 5, 2, 8)), ["k"]),
    "thd rank": (
        lambda: attention(_t(1, 5, 2, 8), _t(1, 5, 2, 8), _t(1, 5, 2, 8), layout="thd"),
        ["q", "thd"],
    ),
    "heads not divisible": (
        lambda: attention(_t(1, 5, 6, 8), _t(1, 5, 4, 8), _t(1, 5, 4, 8)),
        ["k", "heads"],
    ),
    "dtype mismatch": (
        lambda: attention(_t(1, 5, 2, 8), _t(1, 5, 2, 8, dtype=torch.bfloat16), _t(1, 5, 2, 8)),
        ["dtype"],
    ),
    "integer inputs": (lambda: attention(*(torch.ones(1, 5, 2, 8, dtype=torch.int64),) * 3), ["q"]),
    "head dim mismatch": (
        lambda: attention(_t(1, 5, 2, 8), _t(1, 5, 2, 16), _t(1, 5, 2, 16)),
        ["k"],
    ),
    "batch mismatch": (
        lambda: attention(_t(2, 5, 2, 8), _t(1, 5, 2, 8), _t(1, 5, 2, 8)),
        ["k", "batch"],
    ),
    "k v lengths differ": (
        lambda: attention(_t(1, 5, 2, 8), _t(1, 5, 2, 8), _t(1, 6, 2, 8)),
        ["k, v"],
    ),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_errors_name_the_argument(name):
    fn, words = ERRORS[name]
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{name}: {msg!r} does not mention {w!r}"
