"""The ``triton`` backend under Triton's interpreter on CPU: tiny shapes, 16 x 16 tiles,
so a few dozen tokens cross many tiles (full, partial, skipped) and the kernels'
indexing is tested without a GPU.

Oracle: float64 attention written from :mod:`hamilton_attn.variants`' formulas (the
variant's own score pipeline ``BlockVariant.transform`` / ``weights``) over the mask's
dense form, differentiated by autograd; bound: flash-attention's rule, the kernel's error
at most twice that of the same oracle run in the kernel's dtype, plus a small slack.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hamilton_attn import config
from hamilton_attn.kernels import get_kernel, select_kernel
from hamilton_attn.masks import Mask
from hamilton_attn.variants import BlockVariant

pytest.importorskip("triton")

from hamilton_attn.kernels.triton import TritonKernel  # noqa: E402
from hamilton_attn.kernels.triton.tiles import dense_of, tile_lists  # noqa: E402


@pytest.fixture(autouse=True)
def interpreter():
    with config.override(triton_interpret=True):
        yield


def _docs_with_gap() -> Mask:
    # Rows 20..24 see nothing; three causal documents and one full one.
    return Mask.from_ranges(
        [(0, 11), (11, 20), (25, 40), (40, 53)],
        [(0, 11), (11, 20), (25, 40), (40, 53)],
        ["causal", "causal", "full", "causal"],
        53,
        53,
    )


def _magi() -> Mask:
    # Overlapping ranges of all four MagiAttention types.
    return Mask.from_ranges(
        [(0, 30), (10, 37), (5, 25), (20, 37)],
        [(0, 40), (15, 53), (30, 50), (0, 20)],
        ["causal", "inv_causal", "bi_causal", "full"],
        37,
        53,
    )


MASKS = {
    "full": Mask.full(37, 53),
    "causal": Mask.causal(53),
    "bottom_right": Mask.causal(37, 53),
    "window": Mask.sliding_window(53, (7, 3)),
    "docs_gap": _docs_with_gap(),
    "magi": _magi(),
}


def oracle(q, k, v, do, mask, scale, var: BlockVariant, ct=torch.float64):
    """``[out, lse, dq, dk, dv, dslopes]`` of the variant in dtype ``ct``."""
    hq, hk = q.shape[1], k.shape[1]
    qf, kf, vf = (t.detach().to(ct).requires_grad_() for t in (q, k, v))
    ke, ve = kf.repeat_interleave(hq // hk, 1), vf.repeat_interleave(hq // hk, 1)
    al = var.alibi.to(ct).clone().requires_grad_() if var.alibi is not None else None
    vis = mask.to_dense(q.device)
    s = var.transform(qf @ ke.transpose(-1, -2) * scale, slice(0, q.shape[2]), alibi=al)
    s = s.to(ct)
    if var.kind == "softmax":
        s = s.masked_fill(~vis, float("-inf"))
        lse = torch.logsumexp(s, -1)
        safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
        out = torch.exp(s - safe.unsqueeze(-1)) @ ve
    else:
        lse = None
        out = torch.where(vis, var.weights(s), torch.zeros_like(s)) @ ve
    leaves = [qf, kf, vf] + ([al] if al is not None else [])
    grads = torch.autograd.grad(out, leaves, do.to(ct), allow_unused=True)  # a score_mod
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]  # may ignore s
    return [out.detach(), None if lse is None else lse.detach(), *grads]


def run_triton(q, k, v, do, mask, scale, var):
    kern = get_kernel("triton")
    if var is not None and var.alibi is not None:
        var = dataclasses.replace(var, alibi_grad=torch.zeros_like(var.alibi))
    out, lse = kern.forward(q, k, v, mask, scale, variant=var)
    grads = kern.backward(do, q, k, v, out, lse, mask, scale, variant=var)
    extra = [var.alibi_grad] if var is not None and var.alibi is not None else []
    return [out, lse, *grads, *extra]


def assert_close(got, exact, same, names=("out", "lse", "dq", "dk", "dv", "dslopes")):
    for name, a, b, c in zip(names, got, exact, same, strict=False):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape, name
        if name == "lse":
            assert torch.equal(torch.isneginf(a), torch.isneginf(b)), "rows that see nothing"
        fin = torch.isfinite(b)
        err = (a.double() - b)[fin].abs().max().item() if fin.any() else 0.0
        base = (c.double() - b)[fin].abs().max().item() if fin.any() else 0.0
        atol = 1e-5 * max(1.0, b[fin].abs().max().item() if fin.any() else 1.0)
        assert err <= 2 * base + atol, f"{name}: error {err:.3g} > 2 x {base:.3g} + {atol:.1g}"


def _inputs(mask, hq, hk, d, dtype, layout, seed=0):
    sq, sk = mask.shape
    g = torch.Generator().manual_seed(seed)

    def make(s, h):
        x = torch.randn(s, h, d, generator=g).to(dtype)
        if layout == "thd":  # [T, H, D] memory, a bhsd view
            return x.unsqueeze(0).transpose(1, 2)
        if layout == "bshd":
            return x.unsqueeze(0).contiguous().transpose(1, 2)
        return x.transpose(0, 1).unsqueeze(0).contiguous()

    q, k, v = make(sq, hq), make(sk, hk), make(sk, hk)
    do = torch.randn(1, hq, sq, d, generator=g).to(dtype)
    return q, k, v, do


def check(mask, var=None, hq=2, hk=1, d=16, dtype=torch.float32, layout="bshd"):
    q, k, v, do = _inputs(mask, hq, hk, d, dtype, layout)
    spec = BlockVariant(kind="softmax") if var is None else var
    got = run_triton(q, k, v, do, mask, 0.3, var)
    exact = oracle(q, k, v, do, mask, 0.3, spec)
    same = oracle(q, k, v, do, mask, 0.3, spec, ct=dtype)
    assert got[0].dtype == dtype and got[2].dtype == dtype and got[3].dtype == dtype
    assert_close(got, exact, same)


@pytest.mark.parametrize(
    "name,hq,hk,d,dtype,layout",
    [
        ("full", 2, 2, 16, torch.float32, "bshd"),
        ("causal", 4, 1, 32, torch.float16, "thd"),
        ("bottom_right", 4, 2, 16, torch.bfloat16, "bhsd"),
        ("window", 2, 1, 16, torch.float32, "thd"),
        ("docs_gap", 2, 2, 24, torch.float32, "bshd"),
        ("magi", 3, 1, 16, torch.float16, "bshd"),
    ],
)
def test_masks_forward_backward(name, hq, hk, d, dtype, layout):
    check(MASKS[name], hq=hq, hk=hk, d=d, dtype=dtype, layout=layout)


def _alibi(hq, q_pos=None, k_pos=None, shift=0):
    slopes = torch.tensor([[0.5, 0.25, 0.125, 0.0625][:hq]], dtype=torch.float32)
    return BlockVariant(kind="softmax", alibi=slopes, q_pos=q_pos, k_pos=k_pos, shift=shift)


@pytest.mark.parametrize(
    "label,var,mask",
    [
        ("softcap", BlockVariant(kind="softmax", softcap=2.0), "magi"),
        ("alibi", _alibi(2, shift=16), "bottom_right"),
        (
            "alibi_pos",
            _alibi(
                2,
                q_pos=torch.arange(37, dtype=torch.int64) * 2 + 5,
                k_pos=torch.arange(53, dtype=torch.int64) + 3,
                shift=-4,
            ),
            "full",
        ),
        (
            "softcap_alibi",
            dataclasses.replace(_alibi(2, shift=0), softcap=3.0),
            "docs_gap",
        ),
        ("sigmoid", BlockVariant(kind="sigmoid", bias=-1.5), "docs_gap"),
        ("relu", BlockVariant(kind="relu"), "magi"),
    ],
)
def test_variants_forward_backward(label, var, mask):
    check(MASKS[mask], var=var, hq=2, hk=1, layout="thd" if label == "relu" else "bshd")


@pytest.mark.parametrize("cap", [40.0, 50.0])
def test_softcap_rows_far_below_the_cap(cap):
    """Softcap up to 43 runs the forward with c as its running max (no row max): a row
    whose scores all sit near -c (p about 2^-114 at c = 40) must stay exact; c = 50 takes
    the online max."""
    mask = MASKS["causal"]
    q, k, v, do = _inputs(mask, 2, 1, 16, torch.float32, "bshd", seed=3)
    k = (k.abs() + 1.0).contiguous()
    q = q.clone()
    q[:, 0, :5] = -10.0  # head 0's first rows: every dot about -300, s about -c
    var = BlockVariant(kind="softmax", softcap=cap)
    got = run_triton(q, k, v, do, mask, 0.3, var)
    exact = oracle(q, k, v, do, mask, 0.3, var)
    same = oracle(q, k, v, do, mask, 0.3, var, ct=torch.float32)
    assert_close(got, exact, same)


def test_merged_lse_backward_is_the_blocks_share():
    """Two key blocks, forward each, merge, backward each with the merged out / lse:
    the shares sum to the gradient of the whole."""
    mask = MASKS["magi"]
    q, k, v, do = _inputs(mask, 2, 1, 16, torch.float32, "bshd", seed=3)
    kern = get_kernel("triton")
    cut = 29
    parts = [(0, cut), (cut, 53)]
    res = []
    for a, b in parts:
        m = mask.slice((0, 37), (a, b))
        res.append((m, *kern.forward(q, k[:, :, a:b], v[:, :, a:b], m, 0.3)))
    lse = torch.logaddexp(res[0][2], res[1][2])
    w = [torch.exp(r[2] - lse).nan_to_num(0.0).unsqueeze(-1) for r in res]
    out = (w[0] * res[0][1] + w[1] * res[1][1]).to(q.dtype)
    lse = torch.where(torch.isnan(lse), torch.full_like(lse, float("-inf")), lse)
    dq = torch.zeros_like(q)
    dks, dvs = [], []
    for (a, b), (m, _, _) in zip(parts, res, strict=True):
        g = kern.backward(do, q, k[:, :, a:b], v[:, :, a:b], out, lse, m, 0.3)
        dq += g[0]
        dks.append(g[1])
        dvs.append(g[2])
    whole = oracle(q, k, v, do, mask, 0.3, BlockVariant(kind="softmax"))
    for got, want in ((out, whole[0]), (dq, whole[2])):
        assert (got.double() - want).abs().max() < 1e-4
    assert (torch.cat(dks, 2).double() - whole[3]).abs().max() < 1e-4
    assert (torch.cat(dvs, 2).double() - whole[4]).abs().max() < 1e-4


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize("transpose", [False, True])
def test_tile_lists_cover_the_mask_exactly(name, transpose):
    mask = MASKS[name]
    for bm, bn in ((16, 16), (16, 8), (32, 16)):
        lists = tile_lists(mask, bm, bn, transpose, torch.device("cpu"))
        got = dense_of(lists, mask, bm, bn, transpose)
        assert np.array_equal(got, mask.to_dense("cpu").numpy())
        ptr, mid = lists.ptr.numpy(), lists.mid.numpy()
        b0, b1 = lists.b0.numpy(), lists.b1.numpy()
        for r in range(len(mid)):  # full entries first, then partial ones
            assert (b0[ptr[r] : mid[r]] == b1[ptr[r] : mid[r]]).all()
            assert (b0[mid[r] : ptr[r + 1]] < b1[mid[r] : ptr[r + 1]]).all()
        assert sorted(lists.order.tolist()) == list(range(len(mid)))


def test_empty_mask_and_unsupported_inputs():
    kern = TritonKernel()
    q = torch.randn(1, 2, 8, 16)
    empty = Mask([], 8, 8)
    out, lse = kern.forward(q, q, q, empty, 0.3)
    assert (out == 0).all() and torch.isneginf(lse).all()
    out, lse = kern.forward(q, q, q, empty, 0.3, variant=BlockVariant(kind="relu"))
    assert lse is None and (out == 0).all()
    reason = kern.unsupported_reason(q.double(), q.double(), q.double(), Mask.causal(8))
    assert reason is not None and "float64" in reason
    with pytest.raises(ValueError, match="backend"):
        select_kernel("triton", q.double(), q.double(), q.double(), Mask.causal(8))
    sm = BlockVariant(kind="softmax", score_mod=lambda s, b, h, i, j: s)
    assert kern.variant_problem(sm) is not None
    assert kern.variant_problem(BlockVariant(kind="sigmoid")) is None


def test_backend_off_cuda_without_interpreter_names_backend():
    q = torch.randn(1, 2, 8, 16)
    with config.override(triton_interpret=False):
        assert not get_kernel("triton").available(q.device)
        with pytest.raises(ValueError, match="backend"):
            select_kernel("triton", q, q, q, Mask.causal(8))


@pytest.mark.parametrize("name", sorted(MASKS))
def test_row_intervals_and_runs_describe_the_mask(name):
    """Per-row key intervals (when given) are the mask exactly; the runs of full tiles are
    exactly the full entries of each row tile."""
    from hamilton_attn.kernels.triton.tiles import row_intervals

    mask = MASKS[name]
    rows = row_intervals(mask, torch.device("cpu"))
    dense = mask.to_dense("cpu").numpy()
    if rows is not None:
        lo, hi = (x.numpy()[:, None] for x in rows)
        j = np.arange(mask.shape[1])[None, :]
        assert np.array_equal((j >= lo) & (j <= hi), dense)
    else:  # only where some row's keys have a gap
        assert any(np.diff(np.flatnonzero(r)).max(initial=1) > 1 for r in dense)
    for transpose in (False, True):
        lists = tile_lists(mask, 16, 8, transpose, torch.device("cpu"))
        ptr, mid, col = lists.ptr.numpy(), lists.mid.numpy(), lists.col.numpy()
        rp, rs, rl = (x.numpy() for x in (lists.run_ptr, lists.run_start, lists.run_len))
        for r in range(len(mid)):
            got = [c for i in range(rp[r], rp[r + 1]) for c in range(rs[i], rs[i] + rl[i])]
            assert got == list(col[ptr[r] : mid[r]])
        # RANGE's data: each row tile's lowest column (as its first element), and
        # whether its columns are consecutive (all of them, for the flag to be set)
        first, step = lists.first.numpy(), 16 if transpose else 8
        spans = [sorted(col[ptr[r] : ptr[r + 1]]) for r in range(len(mid))]
        assert all(first[r] == c[0] * step for r, c in enumerate(spans) if c)
        consecutive = all(c == list(range(c[0], c[0] + len(c))) for c in spans if c)
        assert lists.contiguous is consecutive


@pytest.mark.parametrize("name", ["causal", "docs_gap", "window"])
def test_band_test_path_without_row_intervals(name, monkeypatch):
    """The partial tiles' band test (used where rows' keys are not one interval), forced
    on masks that have row intervals."""
    from hamilton_attn.kernels import triton as tk

    monkeypatch.setattr(tk, "USE_ROW_INTERVALS", False)
    check(MASKS[name], hq=2, hk=1, d=16, dtype=torch.float32)
    check(MASKS[name], var=BlockVariant(kind="sigmoid", bias=0.5), hq=2, hk=1)


@pytest.mark.parametrize("loop", ["runs", "flat", "range"])
@pytest.mark.parametrize("name", ["causal", "docs_gap", "bottom_right", "window"])
def test_flat_range_and_run_loops_agree_with_the_oracle(name, loop, monkeypatch):
    """The three ways of walking a work list, forced on every mask with row intervals: a
    loop per run of full tiles then the partial ones; one loop over every entry testing
    full tiles too (``FLAT``, what short documents take); the same as a counted loop
    over each row tile's consecutive columns (``RANGE``, no per-entry load); softmax,
    softcap with ALiBi, and relu, GQA."""
    from hamilton_attn.kernels import triton as tk

    monkeypatch.setattr(tk, "FLAT_LOOP", loop != "runs")
    monkeypatch.setattr(tk, "RANGE_LOOP", loop == "range")
    rows = tk.row_intervals(MASKS[name], torch.device("cpu"))
    for transpose in (False, True):  # these masks' work lists are consecutive columns
        lists = tile_lists(MASKS[name], 16, 16, transpose, torch.device("cpu"))
        assert tk._range(lists, rows) is (loop == "range")
    check(MASKS[name], hq=4, hk=2, d=16, dtype=torch.float32)
    check(MASKS[name], var=dataclasses.replace(_alibi(2, shift=3), softcap=2.5), hq=2, hk=1)
    check(MASKS[name], var=BlockVariant(kind="relu"), hq=2, hk=1)


@pytest.mark.parametrize("name", ["causal", "docs_gap"])
def test_float16_softcap_keeps_p_a_normal_float16(name):
    """float16 softcap 12: c as the running max would put p near 2^-35, below float16's
    range, where the PV product reads it (before: out errors of 0.016-0.095, 7-20x the
    budget); the online max runs instead."""
    from hamilton_attn.kernels import triton as tk

    var = BlockVariant(kind="softmax", softcap=12.0)
    q = _inputs(MASKS[name], 2, 1, 16, torch.float16, "bshd")[0]
    assert tk.TritonKernel._variant_args(q, var)["CAPMAX"] is False
    assert tk.TritonKernel._variant_args(q.float(), var)["CAPMAX"] is True
    check(MASKS[name], var=var, hq=2, hk=1, dtype=torch.float16)


@pytest.mark.parametrize(
    "name,layout,hq,hk,d",
    [
        ("causal", "bshd", 4, 2, 16),
        ("docs_gap", "thd", 2, 1, 24),  # D 24 in 32-wide boxes: zeros past D
        ("magi", "bhsd", 2, 2, 16),  # band tests, keys past Sk
        ("bottom_right", "bshd", 3, 1, 32),
    ],
)
def test_tma_descriptor_loads_agree_with_the_oracle(name, layout, hq, hk, d, monkeypatch):
    """The forward's K / V tiles through 4-d tensor descriptors (what Hopper runs), forced
    on under the interpreter: strided bshd / thd / bhsd views, GQA, head dims that are not
    a power of two, tiles reaching past the keys; softmax and ALiBi with softcap."""
    from hamilton_attn.kernels import triton as tk

    monkeypatch.setattr(tk, "TMA", True)
    q, k, _, _ = _inputs(MASKS[name], hq, hk, d, torch.float32, layout)
    assert tk._descriptor(k, 16, tk._pow2(d)) is not None
    check(MASKS[name], hq=hq, hk=hk, d=d, layout=layout)
    var = dataclasses.replace(_alibi(min(hq, 4), shift=2), softcap=2.5)
    check(MASKS[name], var=var, hq=hq, hk=hk, d=d, layout=layout)


def test_descriptor_refuses_what_tma_cannot_address():
    from hamilton_attn.kernels import triton as tk

    x = torch.randn(1, 40, 3, 16)
    assert tk._descriptor(x.transpose(1, 2), 16, 16) is not None
    odd = torch.randn(1, 40, 3, 17)[..., :16]  # row stride 17 elements: not 16-byte aligned
    assert tk._descriptor(odd.transpose(1, 2), 16, 16) is None
    assert tk._descriptor(x.transpose(1, 2).expand(2, 3, 40, 16), 16, 16) is None  # stride 0


@pytest.mark.parametrize("how", ["split", "split+mma", "dist"])
@pytest.mark.parametrize("name", ["full", "causal", "bottom_right", "window", "docs_gap", "magi"])
def test_alibi_split_scores_agree_with_the_oracle(name, how, monkeypatch):
    """ALiBi's shifted scores (a per-key term on tiles whose keys precede their queries,
    the row term taken out of the lse; ``mma``: that term as the dot's initial
    accumulator, where no visible key follows its query) and the per-pair distance, on
    masks with tiles on both sides of the diagonal, shifts that keep every key behind
    (5) or not (-7), and slopes whose row terms differ per head."""
    from hamilton_attn.kernels import triton as tk

    monkeypatch.setattr(tk, "ALIBI_SPLIT", how != "dist")
    monkeypatch.setattr(tk, "ALIBI_MMA", how == "split+mma")
    check(MASKS[name], var=_alibi(4, shift=5), hq=4, hk=2)
    check(MASKS[name], var=_alibi(2, shift=-7), hq=2, hk=1, dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", [Mask.full(16, 80), Mask.causal(40, 80)])
def test_alibi_split_far_keys(mask, dtype):
    """Queries 3,000 positions after their keys: scores of -190 to -1,500 (slopes 1/16 to
    1/2), every weight far below 2^-126 unless the running max tracks them (the split
    scores carry each tile's per-key term); causal 40 x 80 adds tiles across the diagonal. bfloat16 forward and
    backward; float32 forward only: its backward's dQ / dV errors there are up to 2.6x a
    float32 torch reference's (p = exp2(s - lse) of two numbers near -2,000 in log2 units:
    docs/DESIGN.md)."""
    var = _alibi(4, shift=3_000)
    if dtype == torch.bfloat16:
        check(mask, var=var, hq=4, hk=2, dtype=dtype)
        return
    q, k, v, _ = _inputs(mask, 4, 2, 16, dtype, "bshd")
    out, lse = get_kernel("triton").forward(q, k, v, mask, 0.3, variant=var)
    exact = oracle(q, k, v, torch.randn_like(q), mask, 0.3, var)
    same = oracle(q, k, v, torch.randn_like(q), mask, 0.3, var, ct=dtype)
    assert_close([out, lse], exact[:2], same[:2])


def test_forward_tile_pick_follows_the_h200_measurements():
    """The compiled forward's tile choice (``SPEED``): 128 x 128 for dense causal and
    long-tailed documents, 64 x 32 for 64-512-token documents, 64 x 64 for the fused
    step of packed documents at 8K tokens per rank, W = 8 (the H200 A/B's winners)."""
    import hamilton_attn as ha
    from hamilton_attn.kernels.triton import _pick

    def pick(mask):
        return _pick(mask, "fwd", 128, False, torch.device("cpu"))[0][:2]

    g = torch.Generator().manual_seed(0)
    short = torch.randint(64, 513, (150,), generator=g).tolist()
    cu = np.concatenate([[0], np.cumsum(short)]).tolist()
    assert pick(Mask.varlen(cu, causal=True)) == (64, 32)
    assert pick(Mask.causal(32768)) == (128, 128)
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "benchmarks" / "gpu_kernels.py"
    spec = importlib.util.spec_from_file_location("_gpu_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    import sys

    sys.modules.setdefault("_gpu_kernels", bench)
    spec.loader.exec_module(bench)  # the benchmark's own long-tailed lengths (CPU only)
    lens = bench.doc_lengths(65536)
    docs = Mask.varlen(np.concatenate([[0], np.cumsum(lens)]).tolist(), causal=True)
    p = ha.plan(docs, ha.SimulatedGroup(8, 3), schedule="hamilton", dispatch="zigzag")
    pieces = max((s.compute[3] for s in p.schedule.forward_steps() if s.compute[3]), key=len)
    assert pick(p.fused_block(3, pieces)[0]) == (64, 64)


def test_softcap_ranks_the_forward_tiles_by_its_own_speeds():
    """Softcap's forward takes 64 x 64 tiles on a dense causal mask where plain softmax
    takes 128 x 128 (``SPEED_VARIANT``, measured on an H200); packed short documents
    keep the smallest tiles either way."""
    from hamilton_attn.kernels import triton as tk

    cpu = torch.device("cpu")
    causal = Mask.causal(8192)
    assert tk._pick(causal, "fwd", 128, False, cpu)[0] == (128, 128, 8, 3)
    assert tk._pick(causal, "fwd", 128, False, cpu, flavour="softcap")[0] == (64, 64, 4, 3)
    cu = [0]
    while cu[-1] < 8192:
        cu.append(min(8192, cu[-1] + 64 + (len(cu) * 97) % 449))
    docs = Mask.varlen(cu, causal=True)
    for flavour in ("softmax", "softcap"):
        assert tk._pick(docs, "fwd", 128, False, cpu, flavour=flavour)[0] == (64, 32, 4, 3)


def test_partial_tiles_weigh_in_the_tile_pick():
    """``PARTIAL_COST``: a partial tile costs about two full ones (fitted on an H200), so
    long-tailed documents take 64 x 64 forward and dQ tiles (489 against 441-452 TF/s
    forward measured at 32K), while dense causal keeps 128 x 128 (510 against 482);
    counting tiles alone picked 128 x 128 for both."""
    from hamilton_attn.kernels import triton as tk

    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(1)
    cu = [0]
    while cu[-1] < 32768:  # lognormal lengths, median ~1.1K, as benchmarks/gpu_kernels.py
        n = max(16, int(torch.empty(1).log_normal_(7.0, 1.2, generator=gen).item()))
        cu.append(min(32768, cu[-1] + n))
    docs = Mask.varlen(cu, causal=True)
    causal = Mask.causal(32768)
    assert tk._pick(docs, "fwd", 128, False, cpu)[0] == (64, 64, 4, 3)
    assert tk._pick(docs, "dq", 128, False, cpu)[0] == (64, 64, 4, 3)
    assert tk._pick(causal, "fwd", 128, False, cpu)[0] == (128, 128, 8, 3)
    assert tk._pick(causal, "dq", 128, False, cpu)[0] == (128, 128, 8, 2)
    tiles, partial, _ = tk.forward_work(docs, 128)
    assert (tiles, partial) == tk.tile_counts(docs, 64, 64)


SHORT_DOCS = Mask.varlen([0, 7, 30, 33, 61, 64, 90, 91, 120], causal=True)
RAGGED_MASKS = {"short_docs": SHORT_DOCS, **{n: MASKS[n] for n in ("causal", "docs_gap")}}
RAGGED_MASKS.update({n: MASKS[n] for n in ("bottom_right", "window", "full")})


@pytest.mark.parametrize("name", sorted(RAGGED_MASKS))
@pytest.mark.parametrize("transpose", [False, True])
def test_ragged_lists_cover_every_visible_pair_once(name, transpose):
    """Ragged row tiles partition their axis (at most a tile each, starting where
    documents start), and each row tile's consecutive entries from its first element
    cover every pair its rows (keys) see exactly once."""
    from hamilton_attn.kernels.triton.tiles import ragged_lists

    mask = RAGGED_MASKS[name]
    dense = mask.to_dense("cpu").numpy()
    if transpose:
        dense = dense.T
    n_rows, n_other = dense.shape
    for bm, bn in ((16, 16), (16, 8), (8, 16)):
        lists = ragged_lists(mask, bm, bn, transpose, torch.device("cpu"))
        rows, step = (bn, bm) if transpose else (bm, bn)
        r0, r1, ptr, first = (x.numpy() for x in (lists.r0, lists.r1, lists.ptr, lists.first))
        assert r0[0] == 0 and r1[-1] == n_rows and (r0[1:] == r1[:-1]).all()
        assert ((r1 - r0 >= 1) & (r1 - r0 <= rows)).all()
        assert sorted(lists.order.tolist()) == list(range(len(r0)))
        assert (lists.mid.numpy() == ptr[:-1]).all() and lists.contiguous
        count = np.zeros_like(dense, dtype=np.int64)
        for t in range(len(r0)):
            for e in range(ptr[t + 1] - ptr[t]):
                c = first[t] + e * step
                assert 0 <= c < n_other
                count[r0[t] : r1[t], c : c + step] += 1
        assert (count[dense] == 1).all(), "a visible pair missed or counted twice"
        assert lists.n_entries == ptr[-1] and 0 <= lists.n_partial <= lists.n_entries


def test_ragged_lists_refuse_rows_that_see_two_intervals():
    from hamilton_attn.kernels.triton.tiles import ragged_counts, ragged_lists

    assert ragged_lists(MASKS["magi"], 16, 16, False, torch.device("cpu")) is None
    assert ragged_counts(MASKS["magi"], 16, 16, False) is None


@pytest.mark.parametrize("name", sorted(RAGGED_MASKS))
def test_ragged_tiles_agree_with_the_oracle(name, monkeypatch):
    """Every pass on ragged lists (forced): softmax GQA in float16, softcap with ALiBi
    (split and not), sigmoid, relu; rows past a ragged tile's end belong to the next
    tile and must be neither stored nor summed into dK / dV."""
    from hamilton_attn.kernels import triton as tk

    monkeypatch.setattr(tk, "RAGGED", True)
    mask = RAGGED_MASKS[name]
    assert tk._pick(mask, "fwd", 16, True, torch.device("cpu"))[1].ragged
    assert tk._pick(mask, "dkdv", 16, True, torch.device("cpu"))[1].ragged
    check(mask, hq=4, hk=2, d=16, dtype=torch.float16)
    check(mask, var=dataclasses.replace(_alibi(2, shift=3), softcap=2.5), hq=2, hk=1)
    pos = torch.arange(mask.shape[1], dtype=torch.int64) * 3
    qpos = pos[mask.shape[1] - mask.shape[0] :]
    check(mask, var=_alibi(2, q_pos=qpos, k_pos=pos), hq=2, hk=2, layout="thd")
    check(mask, var=BlockVariant(kind="sigmoid", bias=-0.5), hq=2, hk=1)
    check(mask, var=BlockVariant(kind="relu"), hq=2, hk=1, d=24)


def test_ragged_tiles_are_picked_for_short_documents_only(monkeypatch):
    """``RAGGED = None``: the compiled pick (host side, any device) takes ragged lists
    where the grid's would run the one-loop walk and the ragged ones visit fewer tiles:
    64-512-token documents, not dense causal or long documents (off by default: no
    faster on an H200)."""
    from hamilton_attn.kernels import triton as tk

    assert tk.RAGGED is False
    monkeypatch.setattr(tk, "RAGGED", None)

    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(64, 513, (70,), generator=g).tolist()
    short = Mask.varlen(np.concatenate([[0], np.cumsum(lens)]).tolist(), causal=True)
    long = Mask.varlen([0, 3000, 4100, 9000, 16384], causal=True)
    for p in ("fwd", "dq", "dkdv"):
        assert tk._pick(short, p, 128, False, cpu)[1].ragged, p
        assert not tk._pick(Mask.causal(8192), p, 128, False, cpu)[1].ragged, p
        assert not tk._pick(long, p, 128, False, cpu)[1].ragged, p
    tiles, _, area = tk.forward_work(short, 128)
    cfg, lists = tk._pick(short, "fwd", 128, False, cpu)
    assert tiles == lists.n_entries and area == tiles * cfg[0] * cfg[1]


@pytest.mark.parametrize("name", ["causal", "docs_gap", "magi", "window", "full"])
def test_dq_added_in_the_dkdv_pass_agrees_with_the_oracle(name, monkeypatch):
    """``DQ_ADD``: dQ summed by atomic adds in the dK/dV pass (no dQ pass), GQA heads
    each into their own rows; softcap, sigmoid, relu, float16 and head dims off a power
    of two; with ALiBi slopes wanting their gradient the dQ pass runs instead."""
    from hamilton_attn.kernels import triton as tk

    monkeypatch.setattr(tk, "DQ_ADD", 1)
    from hamilton_attn.kernels.triton import passes as launches

    passes = []
    dq_pass = launches.dq_pass
    monkeypatch.setattr(launches, "dq_pass", lambda *a: passes.append(1) or dq_pass(*a))
    mask = MASKS[name]
    check(mask, hq=4, hk=2, d=16, dtype=torch.float32)
    check(mask, hq=2, hk=1, d=24, dtype=torch.float16, layout="thd")
    check(mask, var=BlockVariant(kind="softmax", softcap=2.5), hq=2, hk=2)
    check(mask, var=BlockVariant(kind="sigmoid", bias=-0.5), hq=2, hk=1)
    check(mask, var=BlockVariant(kind="relu"), hq=2, hk=1)
    assert not passes
    check(mask, var=dataclasses.replace(_alibi(2, shift=3), softcap=2.5), hq=2, hk=1)
    assert passes == [1]


def test_dq_is_added_in_dkdv_on_hopper_except_for_short_documents(monkeypatch):
    """``DQ_ADD = None``: TMA reduce-adds on a GPU with TMA unless the dK/dV lists are
    short documents' (measured on an H200); the interpreter and older GPUs run a dQ
    pass; a forced value holds (the interpreter has atomics, not TMA)."""
    from hamilton_attn.kernels import triton as tk

    kern, q = tk.TritonKernel(), torch.zeros(1, 1, 1, 128, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(64, 513, (70,), generator=g).tolist()
    short = Mask.varlen(np.concatenate([[0], np.cumsum(lens)]).tolist(), causal=True)
    assert tk.DQ_ADD is None
    assert kern._dq_add(q, Mask.causal(4096), True) == 0
    for cc, causal, docs in (((9, 0), 2, 0), ((8, 0), 0, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, cc=cc: cc)
        assert kern._dq_add(q, Mask.causal(4096), False) == causal
        assert kern._dq_add(q, short, False) == docs
    monkeypatch.setattr(tk, "DQ_ADD", 2)
    assert kern._dq_add(q, short, True) == 1 and kern._dq_add(q, short, False) == 2


def test_forward_work_counts_the_grid_where_rows_see_two_intervals(monkeypatch):
    """``RAGGED = None`` on short documents whose rows also see a few keys just before
    their document (two key intervals a row: no ragged lists, yet the grid's columns
    are consecutive): ``forward_work`` counts the grid's tiles, partial ones included
    (it once took ``(tiles, 0)`` there), and its cache follows the switch."""
    from hamilton_attn.kernels import triton as tk

    g = torch.Generator().manual_seed(0)
    lens = torch.randint(64, 300, (20,), generator=g).tolist()
    cu = np.concatenate([[0], np.cumsum(lens)]).tolist()
    docs = list(zip(cu[:-1], cu[1:]))
    mask = Mask.from_ranges(
        docs[1:] + docs,
        [(a - 20, a - 10) for a, _ in docs[1:]] + docs,
        ["full"] * (len(docs) - 1) + ["causal"] * len(docs),
        cu[-1],
        cu[-1],
    )
    monkeypatch.setattr(tk, "RAGGED", None)
    assert tk._short(mask, tk.CONFIGS["fwd"][128][0])  # the path that miscounted
    tiles, partial, _ = tk.forward_work(mask, 128)
    assert partial > 0
    monkeypatch.setattr(tk, "RAGGED", False)
    assert tk.forward_work(mask, 128) == (tiles, partial, _)


@pytest.mark.parametrize("shift", [-7, -1, 0, 3, 40])
@pytest.mark.parametrize("name", ["full", "causal", "bottom_right", "window", "docs_gap", "magi"])
def test_keys_behind_matches_the_dense_mask(name, shift):
    """``BEHIND`` drops ALiBi's test for keys after queries: the host's claim must hold for
    every visible pair (``j <= i + shift``), and be made where it holds."""
    from hamilton_attn.kernels import triton as tk

    mask = MASKS[name]
    vis = mask.to_dense(torch.device("cpu"))
    i = torch.arange(mask.shape[0])[:, None]
    j = torch.arange(mask.shape[1])[None, :]
    assert tk._keys_behind(mask, shift) == bool((~vis | (j <= i + shift)).all())


@pytest.mark.parametrize("loop", ["flat", "runs"])
@pytest.mark.parametrize("name", ["causal", "bottom_right", "window", "docs_gap"])
def test_unsigned_row_interval_test_agrees_with_the_oracle(name, loop, monkeypatch):
    """``UNSIGNED_ROWS``: the forward's partial tiles tested as ``0 <= j - lo <= width``
    in one unsigned comparison; rows that see nothing (docs_gap's 20..24, padded rows of
    the last tile) must stay empty, keys before ``lo`` (negative differences) unseen."""
    from hamilton_attn.kernels import triton as tk

    monkeypatch.setattr(tk, "UNSIGNED_ROWS", True)
    monkeypatch.setattr(tk, "FLAT_LOOP", loop == "flat")
    check(MASKS[name], hq=4, hk=2)
    check(MASKS[name], var=_alibi(2, shift=2), dtype=torch.bfloat16)


def test_unsigned_row_test_is_picked_where_every_tile_is_tested():
    """``UNSIGNED_ROWS = None``: on where the forward walks one loop testing every tile
    (64-512-token documents: faster on an H200), off for dense causal and long documents
    (their partial tiles sit on the diagonal; dense causal measured slower with it)."""
    from hamilton_attn.kernels import triton as tk

    assert tk.UNSIGNED_ROWS is None
    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(64, 513, (70,), generator=g).tolist()
    short = Mask.varlen(np.concatenate([[0], np.cumsum(lens)]).tolist(), causal=True)
    long = Mask.varlen([0, 3000, 4100, 9000, 16384], causal=True)
    for mask, want in ((short, True), (Mask.causal(8192), False), (long, False)):
        lists = tk._pick(mask, "fwd", 128, False, cpu)[1]
        assert tk._unsigned_rows(lists, tk.row_intervals(mask, cpu)) is want


@pytest.mark.parametrize("cap", [2000.0, 1e5])
def test_softcap_far_above_the_scores_keeps_their_digits(cap):
    """A cap far above the scores: tanh(s / c) is small, and 1 - 2 / (e^2x + 1) would keep
    only its absolute error (2^-24), c times the score's own."""
    check(MASKS["magi"], var=BlockVariant(kind="softmax", softcap=cap), hq=2, hk=1)


@pytest.mark.parametrize("name", ["docs_gap", "magi", "bottom_right"])
def test_dq_pass_makes_delta_for_the_dkdv_pass(name, monkeypatch):
    """``FUSED_DELTA``: where a dQ pass runs (softmax, no ``DQ_ADD``), it makes each row's
    ``delta`` itself and no delta kernel is launched; rows that see nothing, GQA, float16
    and ALiBi slopes' gradient agree with the oracle. With dQ added in the dK/dV pass,
    or the switch off, the delta kernel runs."""
    from hamilton_attn.kernels import triton as tk
    from hamilton_attn.testing.triton_compile import recording

    seen = []
    real = tk.load
    monkeypatch.setattr(tk, "load", lambda interp, src=None: recording(real(interp, src), seen))

    def launched():
        return [fn.__name__ for fn, _, _ in seen]

    mask = MASKS[name]
    monkeypatch.setattr(tk, "FUSED_DELTA", True)
    check(mask, hq=4, hk=2, d=16, dtype=torch.float32)
    check(mask, hq=2, hk=1, d=24, dtype=torch.float16, layout="thd")
    check(mask, var=dataclasses.replace(_alibi(2, shift=3), softcap=2.5), hq=2, hk=1)
    assert "dq_kernel" in launched() and "delta_kernel" not in launched()
    for switch, value in (("DQ_ADD", 1), ("FUSED_DELTA", False)):
        seen.clear()
        with monkeypatch.context() as m:
            m.setattr(tk, switch, value)
            check(mask, hq=2, hk=2, d=16, dtype=torch.float32)
        assert "delta_kernel" in launched(), switch


@pytest.mark.parametrize("name", ["docs_gap", "magi"])
def test_head_groups_launch_every_tile_of_every_head_once(name, monkeypatch):
    """``HEAD_GROUP`` (:func:`.jit._program`): programs of ``n`` heads interleaved per
    row tile, the last group short (B x H = 12 query heads, 6 KV heads, in groups of 5
    and 8) compute what one head after another does, bit for bit, and what the oracle
    does; with dQ added in the dK/dV pass too."""
    from hamilton_attn.kernels import triton as tk

    mask = MASKS[name]
    sq, sk = mask.shape
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 6, sq, 16, generator=g)
    k, v = (torch.randn(2, 3, sk, 16, generator=g) for _ in range(2))
    do = torch.randn(2, 6, sq, 16, generator=g)
    var = dataclasses.replace(_alibi(2, shift=2), alibi=torch.rand(2, 6) * 0.3)
    monkeypatch.setattr(tk, "HEAD_GROUP", 1)
    base = run_triton(q, k, v, do, mask, 0.3, var)
    assert_close(
        base,
        oracle(q, k, v, do, mask, 0.3, var),
        oracle(q, k, v, do, mask, 0.3, var, torch.float32),
    )
    for hg in (5, 8):
        monkeypatch.setattr(tk, "HEAD_GROUP", hg)
        got = run_triton(q, k, v, do, mask, 0.3, var)
        for a, b_ in zip(got[:5], base[:5], strict=True):
            assert torch.equal(a, b_), hg
        # d slopes: row tiles' shares added atomically, in the launch's order
        torch.testing.assert_close(got[5], base[5], rtol=1e-6, atol=1e-6)
    plain = BlockVariant(kind="softmax")
    exact = oracle(q, k, v, do, mask, 0.3, plain)
    same = oracle(q, k, v, do, mask, 0.3, plain, torch.float32)
    with monkeypatch.context() as m:
        m.setattr(tk, "DQ_ADD", 1)
        m.setattr(tk, "HEAD_GROUP", 5)
        assert_close(run_triton(q, k, v, do, mask, 0.3, None), exact, same)
