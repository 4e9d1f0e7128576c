"""CPU tests of the ``sdpa`` (CPU flash op) and ``flex`` (eager) backends against the
``reference`` oracle: every mask builder, odd lengths, GQA / MQA, forward, backward,
backward fed a merged out / lse, op choice, BlockMask classification, and the
``--smoke`` run of ``benchmarks/gpu_kernels.py``."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hamilton_attn import attention, merge
from hamilton_attn.kernels import sdpa as sdpa_mod
from hamilton_attn.kernels import select_kernel
from hamilton_attn.kernels.base import lse_dtype
from hamilton_attn.kernels.flex import FlexKernel, classify_blocks, flex_mask
from hamilton_attn.kernels.reference import ReferenceKernel
from hamilton_attn.kernels.sdpa import SdpaKernel, choose_op, plan_calls
from hamilton_attn.masks import Mask

REF = ReferenceKernel()
SDPA = SdpaKernel()
FLEX = FlexKernel(block_size=16)  # small blocks: several blocks even at these sizes
KERNELS = {"sdpa": SDPA, "flex": FLEX}
ROOT = Path(__file__).resolve().parents[2]

TOL = {torch.float64: 1e-10, torch.float32: 2e-4}

MASKS = {
    "full_59x97": lambda: Mask.full(59, 97),
    "full_97x59": lambda: Mask.full(97, 59),
    "causal_97": lambda: Mask.causal(97),
    "causal_59x97": lambda: Mask.causal(59, 97),  # Sq < Sk: bottom-right
    "causal_97x59": lambda: Mask.causal(97, 59),  # Sq > Sk: first 38 rows see nothing
    "causal_1x59": lambda: Mask.causal(1, 59),
    "full_1x1": lambda: Mask.full(1, 1),
    "varlen_causal": lambda: Mask.varlen([0, 1, 20, 59, 97], causal=True),
    "varlen_full_qk": lambda: Mask.varlen([0, 10, 30, 59], [0, 40, 50, 97]),
    "varlen_causal_qk": lambda: Mask.varlen([0, 10, 30, 59], [0, 40, 50, 97], causal=True),
    "sliding_window": lambda: Mask.sliding_window(97, (8, 0)),
    "sliding_window_2side": lambda: Mask.sliding_window(59, (5, 3), 97),
    "block_causal": lambda: Mask.block_causal(97, 16),
    "prefix_lm": lambda: Mask.prefix_lm(97, 20),
    "shared_question": lambda: Mask.shared_question(20, [10, 30, 7]),
    "overlapping_rects": lambda: Mask.from_ranges(
        [(0, 30), (10, 50), (5, 59)],
        [(0, 40), (20, 59), (50, 59)],
        ["full", "causal", "inv_causal"],
        59,
        59,
    ),
    "rows_see_nothing": lambda: Mask.from_ranges(
        [(5, 20), (40, 59)], [(0, 30), (10, 59)], ["causal", "full"], 59, 59
    ),
}
SDPA_REFUSES = {"sliding_window", "sliding_window_2side", "overlapping_rects"}


def _randn(shape, dtype, gen, layout="bhsd"):
    b, h, s, d = shape
    if layout == "bshd":  # a bhsd view of bshd memory, as attention(layout="bshd") passes
        return torch.randn(b, s, h, d, generator=gen, dtype=dtype).transpose(1, 2)
    return torch.randn(b, h, s, d, generator=gen, dtype=dtype)


def _inputs(mask, hq=4, hk=2, d=16, dtype=torch.float64, seed=0, layout="bhsd", b=2):
    gen = torch.Generator().manual_seed(seed)
    sq, sk = mask.shape
    q = _randn((b, hq, sq, d), dtype, gen, layout)
    k = _randn((b, hk, sk, d), dtype, gen, layout)
    v = _randn((b, hk, sk, d), dtype, gen, layout)
    dout = _randn((b, hq, sq, d), dtype, gen, layout)
    return q, k, v, dout


def _assert_close(got, want, tol, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


def _assert_lse(got, want, tol):
    assert got.dtype == lse_dtype(want.dtype if want.dtype == torch.float64 else torch.float32)
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), "lse: -inf rows differ"
    assert torch.isfinite(got[~torch.isneginf(got)]).all()
    fin = ~torch.isneginf(want)
    _assert_close(got[fin], want[fin], tol, "lse")


def _check_against_reference(kernel, mask, q, k, v, dout, scale=0.3):
    tol = TOL[q.dtype]
    out, lse = kernel.forward(q, k, v, mask, scale)
    out_r, lse_r = REF.forward(q, k, v, mask, scale)
    _assert_close(out, out_r, tol, "out")
    _assert_lse(lse, lse_r, tol)
    empty = torch.isneginf(lse_r)
    assert (out.masked_select(empty.unsqueeze(-1)) == 0).all(), "rows that see nothing: out != 0"
    grads = kernel.backward(dout, q, k, v, out, lse, mask, scale)
    grads_r = REF.backward(dout, q, k, v, out_r, lse_r, mask, scale)
    for g, gr, name in zip(grads, grads_r, ("dq", "dk", "dv")):
        _assert_close(g, gr, tol * 4, name)
    assert (grads[0].masked_select(empty[..., None]) == 0).all(), "dq of rows that see nothing"


# ---------------------------------------------------------------------------------------
# Every mask builder, both backends, float64, GQA 4/2
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_masks_forward_backward(backend, mask_name):
    mask = MASKS[mask_name]()
    kernel = KERNELS[backend]
    q, k, v, dout = _inputs(mask, seed=list(MASKS).index(mask_name))
    if backend == "sdpa" and mask_name in SDPA_REFUSES:
        reason = kernel.unsupported_reason(q, k, v, mask)
        assert isinstance(reason, str) and reason
        with pytest.raises(ValueError, match="cannot run"):
            kernel.forward(q, k, v, mask, 0.3)
        return
    assert kernel.unsupported_reason(q, k, v, mask) is None
    _check_against_reference(kernel, mask, q, k, v, dout)


# ---------------------------------------------------------------------------------------
# GQA ratios, MQA, float32, bshd strides
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 2), (8, 2), (4, 1)])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_gqa_ratios(backend, hq, hk):
    mask = Mask.causal(59, 97)
    q, k, v, dout = _inputs(mask, hq=hq, hk=hk, seed=hq * 10 + hk)
    _check_against_reference(KERNELS[backend], mask, q, k, v, dout)


@pytest.mark.parametrize("mask_name", ["causal_97", "prefix_lm", "causal_97x59"])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_float32_bshd(backend, mask_name):
    mask = MASKS[mask_name]()
    q, k, v, dout = _inputs(mask, dtype=torch.float32, layout="bshd", seed=7)
    assert not q.is_contiguous()
    _check_against_reference(KERNELS[backend], mask, q, k, v, dout)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_through_attention_autograd(backend):
    """The public entry point: autograd over the kernel equals autograd over reference."""
    mask = Mask.varlen([0, 30, 59], causal=True)
    q, k, v, dout = _inputs(mask, dtype=torch.float64, layout="bhsd", seed=3)
    results = []
    for name in (backend, "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = attention(*leaves, mask, layout="bhsd", backend=name, return_lse=True)
        out.backward(dout)
        results.append((out.detach(), lse, *(t.grad for t in leaves)))
    for got, want, what in zip(results[0], results[1], ("out", "lse", "dq", "dk", "dv")):
        _assert_close(got, want, 1e-4, what)


# ---------------------------------------------------------------------------------------
# Backward fed a MERGED out / lse (what a context-parallel executor does)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask_name",
    ["causal_59x97", "prefix_lm", "varlen_causal", "sliding_window", "rows_see_nothing"],
)
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_backward_with_merged_out_lse(backend, mask_name):
    mask = MASKS[mask_name]()
    sq, sk = mask.shape
    q, k, v, dout = _inputs(mask, seed=11)
    split = sk // 2 + 3
    blocks = [(0, split), (split, sk)]
    # Per key block: the backend if it can run the slice, else reference (sliding window
    # on sdpa); the merged result must not care which kernel made each part.
    kernel = KERNELS[backend]
    parts = []
    for k0, k1 in blocks:
        m = mask.slice((0, sq), (k0, k1))
        kb, vb = k[:, :, k0:k1], v[:, :, k0:k1]
        use = kernel if kernel.unsupported_reason(q, kb, vb, m) is None else REF
        parts.append((m, kb, vb, use, *use.forward(q, kb, vb, m, 0.3)))
    out, lse = merge(parts[0][4], parts[0][5], parts[1][4], parts[1][5])
    out_r, lse_r = REF.forward(q, k, v, mask, 0.3)
    _assert_close(out, out_r, 1e-10, "merged out")
    _assert_lse(lse, lse_r, 1e-10)
    dq = torch.zeros_like(q)
    dks, dvs = [], []
    for m, kb, vb, use, _, _ in parts:
        g = use.backward(dout, q, kb, vb, out, lse, m, 0.3)
        dq += g[0]
        dks.append(g[1])
        dvs.append(g[2])
    grads_r = REF.backward(dout, q, k, v, out_r, lse_r, mask, 0.3)
    for got, want, name in zip(
        (dq, torch.cat(dks, 2), torch.cat(dvs, 2)), grads_r, ("dq", "dk", "dv")
    ):
        _assert_close(got, want, 1e-9, name)


def test_auto_choice_cost_model():
    """Few large pieces go to cuDNN calls, many small ones to one flex call; the
    estimates reproduce the H200 measurements' ordering (block_choice_H200_2026-11-30.md)."""
    from hamilton_attn.kernels import choice
    from hamilton_attn.kernels.sdpa import Call

    per_pair = 4.0 * 32 * 128
    one = (Call(0, 16384, 0, 16384, True, "cudnn"),)
    causal = Mask.causal(16384)
    assert choice.prefer_sdpa(causal, one, per_pair)
    assert choice.sdpa_seconds(one, per_pair) < choice.flex_seconds(causal, per_pair) / 1.5
    # 40 documents of 128 tokens: 40 calls cost the host more than one flex call.
    bounds = list(range(0, 5121, 128))
    docs = Mask.varlen(bounds, causal=True)
    calls = tuple(Call(a, b, a, b, True, "cudnn") for a, b in zip(bounds, bounds[1:]))
    assert not choice.prefer_sdpa(docs, calls, per_pair)
    # Calls that share rows pay a merge each on the host.
    shared = (Call(0, 512, 0, 512, False, "cudnn"), Call(0, 512, 512, 1024, True, "cudnn"))
    disjoint = (Call(0, 512, 0, 512, False, "cudnn"), Call(512, 1024, 0, 512, True, "cudnn"))
    assert choice.sdpa_seconds(shared, 1.0) > choice.sdpa_seconds(disjoint, 1.0)


def test_auto_choice_reproduces_the_three_kernel_run(monkeypatch):
    """The H200 run with cuDNN, flex and triton side by side (triton_H200_2026-12-02_s2.md,
    bf16, 32 heads, D 128): dense causal 32K sdpa 591 > triton 503 > flex 411 TF/s;
    long-tailed documents sdpa 481 > triton 438 > flex 363; 64-512-token documents triton
    142 > flex 96 (the model before this fit sent those to flex). On GPU the softmax
    variants go to triton first (softcap 419 against flex's 201), and so do compiled
    score_mods (a relative bias on causal 32K 446 / 415 against flex's 356 / 259, H100,
    triton_score_mod_H100_2026-12-07_s13.md); one that does not compile falls to flex."""
    from types import SimpleNamespace

    from hamilton_attn.kernels import _variant_order, choice
    from hamilton_attn.kernels.sdpa import Call
    from hamilton_attn.kernels.triton import score_mod as score_mod_module

    per_pair = 4.0 * 32 * 128
    gen = np.random.default_rng(0)

    def docs(lens):
        bounds = np.concatenate([[0], np.cumsum(lens)]).tolist()
        calls = tuple(Call(a, b, a, b, True, "cudnn") for a, b in zip(bounds, bounds[1:]))
        return Mask.varlen(bounds, causal=True), calls

    def pick(mask, calls):
        return choice.choose(mask, calls, per_pair, 128, True, True)

    s = 32768
    assert pick(Mask.causal(s), (Call(0, s, 0, s, True, "cudnn"),)) == "sdpa"
    # benchmarks/gpu_triton.py's lognormal documents (seed 1)
    long_tail = [2425, 1510, 1180, 2311, 637, 898, 176, 1733, 319, 557, 375]
    long_tail += [1022, 867, 344, 1820, 1511, 661, 594, 166, 945, 12717]
    assert pick(*docs(long_tail)) == "sdpa"
    short = gen.integers(64, 513, 200)
    short = short[: np.searchsorted(np.cumsum(short), s)]
    assert pick(*docs(short)) == "triton"
    gpu_q = SimpleNamespace(is_cuda=True)
    assert _variant_order(gpu_q, SimpleNamespace(kind="softmax", score_mod=None))[:2] == (
        "triton",
        "flex",
    )
    assert _variant_order(gpu_q, SimpleNamespace(kind="sigmoid", score_mod=None))[0] == "triton"
    # compiled score_mods lead on GPU (score_mod.AUTO, timed against flex); with AUTO off,
    # flex (softmax) or the reference (sigmoid / relu) lead
    smod = SimpleNamespace(kind="softmax", score_mod=lambda s, b, h, q, k: s)
    relu = SimpleNamespace(kind="relu", score_mod=smod.score_mod)
    assert _variant_order(gpu_q, smod) == ("triton", "flex", "reference")
    assert _variant_order(gpu_q, relu) == ("triton", "reference")
    monkeypatch.setattr(score_mod_module, "AUTO", False)
    assert _variant_order(gpu_q, smod)[0] == "flex"
    assert _variant_order(gpu_q, relu) == ("reference",)


def test_auto_runs_a_compiled_score_mod_on_triton_and_a_refused_one_on_flex(monkeypatch):
    """On a GPU ``auto`` gives a score_mod block to the triton kernel where the score_mod
    compiles and to flex where it does not (a data-dependent branch), each decided by the
    kernels' own checks (here on a pretend GPU whose kernels all run)."""
    from types import SimpleNamespace

    from hamilton_attn.kernels import _first_able, _variant_order, get_kernel
    from hamilton_attn.variants import BlockVariant

    for name in ("triton", "flex"):
        cls = type(get_kernel(name))
        monkeypatch.setattr(cls, "available", lambda self, device: True)
        monkeypatch.setattr(cls, "unsupported_reason", lambda self, q, k, v, mask: None)
    q = SimpleNamespace(is_cuda=True, device=torch.device("cpu"))

    def branchy(s, b, h, qi, kj):
        return s if bool((qi > kj).any()) else -s

    picks = {}
    for name, mod in (("bias", lambda s, b, h, qi, kj: s - 0.1 * (qi - kj)), ("branch", branchy)):
        for kind in ("softmax", "sigmoid"):
            var = BlockVariant(kind=kind, score_mod=mod)
            picks[name, kind] = _first_able(_variant_order(q, var), q, q, q, None, var).name
    assert picks == {
        ("bias", "softmax"): "triton",
        ("bias", "sigmoid"): "triton",
        ("branch", "softmax"): "flex",
        ("branch", "sigmoid"): "reference",
    }


# ---------------------------------------------------------------------------------------
# unsupported_reason, op choice, call planning
# ---------------------------------------------------------------------------------------


def test_sdpa_unsupported_reasons():
    causal = Mask.causal(59)
    q, k, v, _ = _inputs(causal)
    assert SDPA.unsupported_reason(q, k, v, causal) is None
    window = Mask.sliding_window(59, (4, 0))
    assert "lower diagonal" in SDPA.unsupported_reason(q, k, v, window)
    many_docs = Mask.varlen(list(range(0, 60, 5)) + [59], causal=True)  # 12 documents
    assert SDPA.unsupported_reason(q, k, v, many_docs) is None
    assert "pieces" in SdpaKernel(max_pieces=11).unsupported_reason(q, k, v, many_docs)
    assert SdpaKernel(max_pieces=12).unsupported_reason(q, k, v, many_docs) is None
    v_wide = torch.randn(2, 2, 59, 24, dtype=torch.float64)
    assert "head dim" in SDPA.unsupported_reason(q, k, v_wide, causal)
    assert "'cudnn'" in SdpaKernel(force_op="cudnn").unsupported_reason(q, k, v, causal)
    with pytest.raises(ValueError, match="force_op"):
        SdpaKernel(force_op="bogus")
    # An empty mask is trivially supported: out 0, lse -inf, zero gradients.
    empty = Mask([], 59, 59)
    assert SDPA.unsupported_reason(q, k, v, empty) is None
    out, lse = SDPA.forward(q, k, v, empty, 0.3)
    assert (out == 0).all() and torch.isneginf(lse).all()
    assert all((g == 0).all() for g in SDPA.backward(q, q, k, v, out, lse, empty, 0.3))


def test_flex_unsupported_reasons():
    mask = Mask.sliding_window(59, (4, 0))
    q, k, v, _ = _inputs(mask)
    assert FLEX.unsupported_reason(q, k, v, mask) is None
    qi = torch.zeros(2, 4, 59, 16, dtype=torch.int32)
    assert "dtype" in FLEX.unsupported_reason(qi, qi[:, :2], qi[:, :2], mask)
    # Many key intervals in one row (a comb) exceed the unrolled mask_mod.
    comb = Mask.from_ranges([(0, 8)] * 20, [(4 * i, 4 * i + 2) for i in range(20)], "full", 8, 80)
    qc, kc, vc, _ = _inputs(comb)
    assert "intervals" in FLEX.unsupported_reason(qc, kc, vc, comb)
    with pytest.raises(ValueError, match="cannot run"):
        FLEX.forward(qc, kc, vc, comb, 0.3)


def test_auto_selection_on_cpu():
    q, k, v, _ = _inputs(Mask.causal(59))
    assert select_kernel("auto", q, k, v, Mask.causal(59)).name == "sdpa"
    assert select_kernel("auto", q, k, v, Mask.sliding_window(59, (4, 0))).name == "reference"
    assert select_kernel("flex", q, k, v, Mask.sliding_window(59, (4, 0))).name == "flex"


def test_cpu_plan_splits_rectangular_causal():
    """The CPU op is top-left aligned: a bottom-right causal piece with Lk > Lq becomes
    FULL over its first Lk - Lq keys plus a square causal call."""
    mask = Mask.causal(59, 97)
    calls = plan_calls(mask, torch.device("cpu"), torch.float32, 16, None, (False, False, False))
    assert all(c.op == "cpu_flash" for c in calls)
    assert [(c.k0, c.k1, c.causal) for c in calls] == [(0, 38, False), (38, 97, True)]
    for c in calls:
        if c.causal:
            assert c.k1 - c.k0 == c.q1 - c.q0, c
    area = sum(
        (c.q1 - c.q0) * (c.k1 - c.k0) - (c.causal and (c.q1 - c.q0) * (c.q1 - c.q0 - 1) // 2)
        for c in calls
    )
    assert area == mask.area()


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend to be an sm90 GPU with cuDNN 9.19 and flash built, to test the op rule."""
    cc = {"value": (9, 0)}
    monkeypatch.setattr(sdpa_mod, "_capability", lambda index: cc["value"])
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91900)
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    plan_calls.cache_clear()
    yield cc
    plan_calls.cache_clear()


def test_gpu_op_choice_rule(fake_gpu):
    gpu, on = torch.device("cuda", 0), (True, True, True)
    assert choose_op(gpu, torch.bfloat16, 128, 4096, switches=on) == "cudnn"
    assert choose_op(gpu, torch.float16, 256, 4096, switches=on) == "cudnn"
    assert choose_op(gpu, torch.bfloat16, 128, 1, switches=on) == "flash"  # cuDNN: Lk > 1
    assert choose_op(gpu, torch.float32, 128, 4096, switches=on) == "efficient"
    assert choose_op(gpu, torch.float64, 128, 4096, switches=on) is None
    assert choose_op(gpu, torch.bfloat16, 100, 4096, switches=on) is None  # D % 8
    assert choose_op(gpu, torch.bfloat16, 128, 4096, switches=(False, True, True)) == "flash"
    assert choose_op(gpu, torch.bfloat16, 128, 4096, switches=(False, False, True)) == "efficient"
    assert choose_op(gpu, torch.bfloat16, 128, 4096, "flash", on) == "flash"
    assert choose_op(gpu, torch.float32, 128, 4096, "flash", on) is None
    fake_gpu["value"] = (8, 0)
    assert choose_op(gpu, torch.bfloat16, 128, 4096, switches=on) == "flash"
    assert choose_op(gpu, torch.bfloat16, 256, 4096, "cudnn", on) is None  # 128 off sm90


def test_gpu_plan_alignment(fake_gpu):
    """cuDNN (top-left) gets the rectangular causal piece split; flash (bottom-right)
    takes it in one call."""
    gpu, on = torch.device("cuda", 0), (True, True, True)
    mask = Mask.causal(1024, 3072)
    cudnn = plan_calls(mask, gpu, torch.bfloat16, 128, None, on)
    assert [(c.k0, c.k1, c.causal, c.op) for c in cudnn] == [
        (0, 2048, False, "cudnn"),
        (2048, 3072, True, "cudnn"),
    ]
    flash = plan_calls(mask, gpu, torch.bfloat16, 128, "flash", on)
    assert [(c.q0, c.q1, c.k0, c.k1, c.causal, c.op) for c in flash] == [
        (0, 1024, 0, 3072, True, "flash")
    ]
    square = plan_calls(Mask.causal(4096), gpu, torch.bfloat16, 128, None, on)
    assert len(square) == 1 and square[0].causal and square[0].op == "cudnn"
    assert isinstance(plan_calls(mask, gpu, torch.float64, 128, None, on), str)


# ---------------------------------------------------------------------------------------
# Flex BlockMask classification vs a dense check
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("block_q,block_k", [(8, 8), (16, 8), (32, 32)])
def test_flex_block_classification(mask_name, block_q, block_k):
    mask = MASKS[mask_name]()
    sq, sk = mask.shape
    lo, hi = mask.row_intervals()
    partial, full = classify_blocks(lo, hi, sk, block_q, block_k)
    dense = mask.to_dense()
    nq, nk = -(-sq // block_q), -(-sk // block_k)
    assert partial.shape == full.shape == (nq, nk)
    assert not (partial & full).any()
    exact_full = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(nq):
        for j in range(nk):
            blk = dense[i * block_q : (i + 1) * block_q, j * block_k : (j + 1) * block_k]
            whole = blk.shape == (block_q, block_k)
            if blk.any():
                assert partial[i, j] or full[i, j], f"visible block ({i}, {j}) dropped"
            if full[i, j]:
                assert whole and blk.all(), f"block ({i}, {j}) called full but is not"
            exact_full[i, j] = whole and bool(blk.all())
    if mask_name in (
        "causal_97",
        "causal_59x97",
        "varlen_causal",
        "block_causal",
        "sliding_window",
    ):
        # One interval per row: the classification is exact.
        assert torch.equal(full, exact_full)
        touched = torch.zeros(nq, nk, dtype=torch.bool)
        for i in range(nq):
            for j in range(nk):
                touched[i, j] = bool(
                    dense[i * block_q : (i + 1) * block_q, j * block_k : (j + 1) * block_k].any()
                )
        assert torch.equal(partial | full, touched)


@pytest.mark.parametrize("mask_name", ["shared_question", "overlapping_rects", "causal_97x59"])
def test_flex_mask_mod_matches_dense(mask_name):
    from torch.nn.attention.flex_attention import create_mask

    mask = MASKS[mask_name]()
    fm = flex_mask(mask, torch.device("cpu"), 16, 16)
    sq, sk = mask.shape
    dense = create_mask(fm.block_mask.mask_mod, 1, 1, sq, sk, device="cpu")[0, 0]
    assert torch.equal(dense, mask.to_dense())
    assert torch.equal(fm.empty_rows, torch.nonzero(~mask.to_dense().any(1)).flatten())


def test_compiled_flex_keeps_a_graph_per_variant():
    """Every variant structure gets its own compiled graph: past dynamo's default limit (8
    per code object) a compiled flex ran its eager path silently (``hamilton-attn
    verify``'s variants on CUDA did). Counted through a backend that only counts; the
    limit is restored after each call."""
    from torch.nn.attention.flex_attention import flex_attention

    from hamilton_attn.kernels import flex as flex_mod

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(flex_attention, backend=counting, dynamic=None)
    mask = Mask.causal(64)
    fm = flex_mask(mask, torch.device("cpu"), 16, 16)
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))

    def mod_of(n):  # a different graph for every n
        def mod(score, b, h, q_idx, kv_idx):
            for _ in range(n):
                score = score * 0.9
            return score

        return mod

    limit = torch._dynamo.config.recompile_limit
    try:
        for n in range(12):
            out, lse = flex_mod._call_flex(fn, q, k, v, fm, 0.25, mod_of(n))
            want, want_lse = flex_mod._call_flex(flex_attention, q, k, v, fm, 0.25, mod_of(n))
            torch.testing.assert_close(out, want)
            torch.testing.assert_close(lse, want_lse)
        assert len(graphs) == 12
        assert torch._dynamo.config.recompile_limit == limit
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------
# The GPU benchmark script, in its CPU smoke mode
# ---------------------------------------------------------------------------------------


def test_gpu_kernels_script_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "gpu_kernels", ROOT / "benchmarks" / "gpu_kernels.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    rc = module.main(["--smoke", "--out-dir", str(tmp_path)])
    assert rc == 0
    md = list(tmp_path.glob("gpu_kernels_*.md"))
    js = list(tmp_path.glob("gpu_kernels_*.json"))
    assert len(md) == 1 and len(js) == 1
    data = json.loads(js[0].read_text())
    assert data["correctness"] and all(c["ok"] for c in data["correctness"])
    assert data["perf"] and all(math.isfinite(r["tflops"]) for r in data["perf"])
    assert "torch" in md[0].read_text()
