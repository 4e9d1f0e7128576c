"""Check and time the ``triton`` kernel beside cuDNN, compiled FlexAttention and ``auto``.

Run on one H100 / H200 from the repository root (a few minutes, most of it compiling)::

    python benchmarks/gpu_triton.py [--quick] [--sweep]

(a) Correctness, small shapes: the Triton kernel's out / lse / dq / dk / dv (and d
slopes) against the float64 reference, per tensor ``max|err| <= 2 * max|err of the
reference kernel run in the same dtype| + atol`` (flash-attention's rule), for masks
(causal, bottom-right causal, packed documents, a fused zigzag step), GQA, head dims
64 / 128 / 256, bf16 / fp16 / fp32 and every variant.

(b) Speed, bf16, B = 1, 32 heads, head dim 128, CUDA events (median of 5 after warm-up,
2 calls per repeat, the host queueing ahead: :func:`bench_ms`; before 2026-12-03's s6
runs every repeat began from an idle GPU, charging one launch's host latency per 2 calls,
up to a third of a 0.5 ms kernel's time). Only visible pairs count: forward
``4 * pairs * D * H`` flops, forward+backward 3.5x that (backward 2.5x, as ``gpu_kernels.py``). Columns: ``triton``
(this kernel), ``cudnn`` (one cuDNN SDPA call for dense masks; the ``sdpa`` backend's
per-piece cuDNN calls otherwise), ``flex`` (the ``flex`` backend: compiled
FlexAttention; forward+backward through its own autograd graph, as one-device calls
run it), ``auto`` (``select_kernel("auto")``'s pick now, and before this kernel
existed). Fused steps: the block of one multi-piece step of ``hamilton`` / ``direct`` /
``groupcast`` at W = 8 (``SimulatedGroup(8)`` plans), beside one dense causal cuDNN
call with the same number of visible pairs.

(c) Writes ``benchmarks/results/triton_<GPU>_<date>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gpu_kernels import doc_lengths  # noqa: E402  (this folder's kernel benchmark)

import hamilton_attn as ha  # noqa: E402
from hamilton_attn.kernels import choice, get_kernel, select_kernel  # noqa: E402
from hamilton_attn.kernels import sdpa as sdpa_mod  # noqa: E402
from hamilton_attn.kernels import triton as tk  # noqa: E402
from hamilton_attn.masks import Mask  # noqa: E402
from hamilton_attn.variants import BlockVariant  # noqa: E402

DEV = torch.device("cuda")
ONLY_TRITON = False
#: The sdpa+triton kernel's small-piece limit where it is timed (its default is off).
MIX_TIMED = 1 << 21


def bench_ms(fn, warmup=1, reps=5, inner=2) -> float:
    """Median GPU ms per call over ``reps`` groups of ``inner`` back-to-back calls, the host
    running ahead (one synchronisation at the end, one untimed call queued before the
    first event, as ``triton.testing.do_bench`` times): each launch's host latency
    overlaps the previous call's kernels instead of being charged once per group, for
    every implementation alike. A host slower than its kernels still shows as time."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
    fn()  # keeps the GPU busy while the timed calls are queued
    events[0].record()
    for i in range(reps):
        for _ in range(inner):
            fn()
        events[i + 1].record()
    torch.cuda.synchronize()
    times = [events[i].elapsed_time(events[i + 1]) / inner for i in range(reps)]
    return statistics.median(times)


def docs_mask(lens) -> Mask:
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return Mask.varlen(cu, causal=True)


def uniform_docs(total, lo, hi, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < total:
        lens.append(int(torch.randint(lo, hi + 1, (1,), generator=g)))
    lens[-1] -= sum(lens) - total
    return [n for n in lens if n > 0]


def lognormal_docs(total, seed=1):
    """Long-tailed document lengths: the same documents as ``gpu_kernels.py``'s."""
    return doc_lengths(total, seed)


# -- correctness -----------------------------------------------------------------------


def _switch_module(name):
    """The module a switch lives in: ``sdpa.NAME`` the sdpa kernel's, else the triton's."""
    return (sdpa_mod, name[5:]) if name.startswith("sdpa.") else (tk, name)


def check(
    name, mask, dtype, hq=4, hk=4, d=128, variant=None, merged=False, switches=None, kernel="triton"
):
    if switches:  # kernel switches forced for this check (restored after)
        saved = {n: getattr(*_switch_module(n)) for n in switches}
        try:
            for n, val in switches.items():
                setattr(*_switch_module(n), val)
            return check(name, mask, dtype, hq, hk, d, variant, merged, kernel=kernel)
        finally:
            for n, val in saved.items():
                setattr(*_switch_module(n), val)
    sq, sk = mask.shape
    g = torch.Generator(device=DEV).manual_seed(0)
    q = torch.randn(1, sq, hq, d, device=DEV, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(1, sk, hk, d, device=DEV, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(1, sk, hk, d, device=DEV, generator=g).to(dtype).transpose(1, 2)
    do = torch.randn(1, hq, sq, d, device=DEV, generator=g).to(dtype)
    tri = get_kernel(kernel)

    def run(kern, cast, var):
        qc, kc, vc, dc = (t.to(cast) for t in (q, k, v, do))
        if var is None:
            o, l_ = kern.forward(qc, kc, vc, mask, 0.1)
            grads = kern.backward(dc, qc, kc, vc, o, l_, mask, 0.1)
            return [o, l_, *grads]
        ag = torch.zeros_like(var.alibi) if var.alibi is not None else None
        vv = dataclasses.replace(var, alibi_grad=ag)
        o, l_ = kern.forward(qc, kc, vc, mask, 0.1, variant=vv)
        grads = kern.backward(dc, qc, kc, vc, o, l_, mask, 0.1, variant=vv)
        return [o, l_, *grads] + ([ag] if ag is not None else [])

    def ref_run(cast):
        var = BlockVariant(kind="softmax") if variant is None else variant
        return oracle(q.to(cast), k.to(cast), v.to(cast), do.to(cast), mask, 0.1, var)

    exact = ref_run(torch.float64)
    same = ref_run(dtype)
    got = run(tri, dtype, variant)
    names = ["out", "lse", "dq", "dk", "dv", "dslope"]
    worst, ok, which = 0.0, True, ""
    for n, a, b, c in zip(names, got, exact, same, strict=False):
        if a is None or b is None:
            continue
        fin = torch.isfinite(b)
        err = (a.double() - b.double())[fin].abs().max().item() if fin.any() else 0.0
        base = (c.double() - b.double())[fin].abs().max().item() if fin.any() else 0.0
        atol = 1e-4 * max(1.0, b[fin].abs().max().item()) if fin.any() else 1e-4
        if err > 2 * base + atol:
            ok = False
        if err / (2 * base + atol) >= worst:
            worst, which = err / (2 * base + atol), f"{n}: {err:.3g} against 2 x {base:.3g}"
        if not torch.equal(torch.isneginf(a), torch.isneginf(b)) and n == "lse":
            ok = False
    print(f"check {name:<40} {'ok' if ok else 'FAIL'} worst {worst:.2f} of budget ({which})",
          flush=True)  # fmt: skip
    return {"check": name, "ok": ok, "worst_ratio": worst, "worst": which}


def oracle(q, k, v, do, mask, scale, var):
    """Plain torch attention of a variant (the formulas of hamilton_attn.variants) in q's
    dtype: float64 for the oracle, bf16 / fp16 / fp32 for the same-precision reference."""
    ct = q.dtype
    hq, hk = q.shape[1], k.shape[1]
    q_, k_, v_ = (t.to(ct).detach() for t in (q, k, v))
    k_ = k_.repeat_interleave(hq // hk, 1).requires_grad_()
    v_ = v_.repeat_interleave(hq // hk, 1).requires_grad_()
    q_ = q_.requires_grad_()
    al = var.alibi.to(ct).clone().requires_grad_() if var.alibi is not None else None
    vis = mask.to_dense(q.device)
    s = q_ @ k_.transpose(-1, -2) * scale
    s = var.transform(s, slice(0, q.shape[2]), alibi=al)
    if al is not None:
        s = s.to(ct)
    if var.kind == "softmax":
        s = s.masked_fill(~vis, float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - torch.where(torch.isneginf(lse), 0, lse).unsqueeze(-1))
        out = p @ v_
    else:
        lse = None
        out = torch.where(vis, var.weights(s), 0) @ v_
    gs = torch.autograd.grad(out, [q_, k_, v_] + ([al] if al is not None else []), do.to(ct))
    dk = gs[1].view(1, hk, hq // hk, *gs[1].shape[2:]).sum(2)
    dv = gs[2].view(1, hk, hq // hk, *gs[2].shape[2:]).sum(2)
    return [out.detach(), lse.detach() if lse is not None else None, gs[0], dk, dv] + list(gs[3:])


def run_checks(quick, only=None):
    bf, fp16, f32 = torch.bfloat16, torch.float16, torch.float32
    res = []
    cases = [
        ("causal 1000 bf16", Mask.causal(1000), bf, {}),
        ("bottom-right causal 300x1100 fp16", Mask.causal(300, 1100), fp16, {}),
        (
            "docs 64-512 2000 GQA 8/2 bf16",
            docs_mask(uniform_docs(2000, 64, 512)),
            bf,
            dict(hq=8, hk=2),
        ),
        ("window (100,0) 999 fp32 D64", Mask.sliding_window(999, (100, 0)), f32, dict(d=64)),
        ("full 777 bf16 D256 MQA", Mask.full(777), bf, dict(d=256, hq=4, hk=1)),
        ("full 513 bf16 D80", Mask.full(513), bf, dict(d=80)),
    ]
    p = ha.plan(
        Mask.causal(8 * 512), ha.SimulatedGroup(8, 3), schedule="hamilton", dispatch="zigzag"
    )
    steps = [s.compute[3] for s in p.schedule.forward_steps() if s.compute[3]]
    fused = max(steps, key=len)
    cases.append(("fused hamilton zigzag step bf16", p.fused_block(3, fused)[0], bf, {}))
    # seeded: dslope's margin depends on the draw (benchmarks/gpu_alibi_split.py)
    slopes = torch.rand(1, 4, device=DEV, generator=torch.Generator(device=DEV).manual_seed(0))
    for kind, kw in (
        ("softcap", dict(kind="softmax", softcap=20.0)),
        ("softcap 2 (scores at the cap)", dict(kind="softmax", softcap=2.0)),
        ("alibi", dict(kind="softmax", alibi=slopes, shift=5)),
        ("sigmoid", dict(kind="sigmoid", bias=-2.0)),
        ("relu", dict(kind="relu")),
    ):
        cases.append(
            (f"{kind} causal 700 bf16", Mask.causal(700), bf, dict(variant=BlockVariant(**kw)))
        )
    ragged = {"RAGGED": True}  # ragged row tiles forced (short documents take them)
    short = docs_mask(uniform_docs(3001, 20, 300, seed=4))
    cases += [
        ("ragged docs 20-300 3001 GQA 8/2 bf16", short, bf, dict(hq=8, hk=2, switches=ragged)),
        ("ragged docs 20-300 fp16 D64", short, fp16, dict(d=64, switches=ragged)),
        ("ragged docs 20-300 fp32 D256 MQA", short, f32, dict(d=256, hk=1, switches=ragged)),
        ("ragged window (100,0) 999 bf16", Mask.sliding_window(999, (100, 0)), bf,
         dict(switches=ragged)),
        ("ragged alibi docs bf16", short, bf,
         dict(variant=BlockVariant(kind="softmax", alibi=slopes, shift=5), switches=ragged)),
        ("ragged softcap docs bf16", short, bf,
         dict(variant=BlockVariant(kind="softmax", softcap=20.0), switches=ragged)),
        ("ragged sigmoid docs bf16", short, bf,
         dict(variant=BlockVariant(kind="sigmoid", bias=-2.0), switches=ragged)),
    ]  # fmt: skip
    for how, n in (("atomics", 1), ("tma", 2)):  # dQ added in the dK/dV pass
        add = {"DQ_ADD": n}
        cases += [
            (f"dq {how} docs 64-512 2000 GQA 8/2 bf16", docs_mask(uniform_docs(2000, 64, 512)),
             bf, dict(hq=8, hk=2, switches=add)),
            (f"dq {how} causal 1000 fp16 D80", Mask.causal(1000), fp16, dict(d=80, switches=add)),
            (f"dq {how} full 777 fp32 D256 MQA", Mask.full(777), f32,
             dict(d=256, hk=1, switches=add)),
            (f"dq {how} softcap window bf16", Mask.sliding_window(999, (100, 0)), bf,
             dict(variant=BlockVariant(kind="softmax", softcap=20.0), switches=add)),
            (f"dq {how} sigmoid causal 700 bf16", Mask.causal(700), bf,
             dict(variant=BlockVariant(kind="sigmoid", bias=-2.0), switches=add)),
        ]  # fmt: skip
    mma = {"ALIBI_MMA": True}  # ALiBi's per-key term as the QK^T dot's accumulator
    real = 2.0 ** (-8.0 * torch.arange(1, 9, device=DEV, dtype=torch.float32) / 8)[None]
    cases += [
        ("mma alibi causal 700 bf16", Mask.causal(700), bf,
         dict(variant=BlockVariant(kind="softmax", alibi=slopes, shift=5), switches=mma)),
        ("mma alibi bottom-right 300x1100 fp16", Mask.causal(300, 1100), fp16,
         dict(variant=BlockVariant(kind="softmax", alibi=slopes, shift=800), switches=mma)),
        ("mma alibi docs 64-512 2000 GQA 8/2 bf16, slopes 2^-8h/8",
         docs_mask(uniform_docs(2000, 64, 512)), bf,
         dict(hq=8, hk=2, variant=BlockVariant(kind="softmax", alibi=real), switches=mma)),
        ("mma alibi window (100,0) 999 fp32 D64", Mask.sliding_window(999, (100, 0)), f32,
         dict(d=64, variant=BlockVariant(kind="softmax", alibi=slopes), switches=mma)),
        ("mma alibi causal 4000 bf16, slopes 2^-8h/8", Mask.causal(4000), bf,
         dict(hq=8, hk=8, variant=BlockVariant(kind="softmax", alibi=real), switches=mma)),
    ]  # fmt: skip
    uns = {"UNSIGNED_ROWS": True}  # row intervals tested by one unsigned comparison
    cases += [
        ("unsigned docs 64-512 2000 GQA 8/2 bf16", docs_mask(uniform_docs(2000, 64, 512)), bf,
         dict(hq=8, hk=2, switches=uns)),
        ("unsigned window (100,0) 999 fp32 D64", Mask.sliding_window(999, (100, 0)), f32,
         dict(d=64, switches=uns)),
        ("unsigned bottom-right causal 300x1100 fp16", Mask.causal(300, 1100), fp16,
         dict(switches=uns)),
        ("unsigned fused hamilton zigzag step bf16", p.fused_block(3, fused)[0], bf,
         dict(switches=uns)),
        ("unsigned alibi docs bf16", short, bf,
         dict(variant=BlockVariant(kind="softmax", alibi=slopes, shift=5), switches=uns)),
    ]  # fmt: skip
    hg = {"HEAD_GROUP": 8}  # programs of 8 heads interleaved per row tile
    cases += [
        ("heads docs 64-512 2000 GQA 12/4 bf16", docs_mask(uniform_docs(2000, 64, 512)), bf,
         dict(hq=12, hk=4, switches=hg)),
        ("heads fused hamilton zigzag step bf16", p.fused_block(3, fused)[0], bf,
         dict(switches=hg)),
        ("heads dq tma causal 1000 GQA 12/4 bf16", Mask.causal(1000), bf,
         dict(hq=12, hk=4, switches={**hg, "DQ_ADD": 2})),
        ("heads alibi docs bf16", short, bf,
         dict(variant=BlockVariant(kind="softmax", alibi=slopes, shift=5), switches=hg)),
    ]  # fmt: skip
    fdl = {"FUSED_DELTA": True}  # the dQ pass makes delta for the dK/dV pass
    cases += [
        ("fused delta docs 64-512 2000 GQA 8/2 bf16", docs_mask(uniform_docs(2000, 64, 512)),
         bf, dict(hq=8, hk=2, switches=fdl)),
        ("fused delta alibi docs fp16 D64", short, fp16,
         dict(d=64, variant=BlockVariant(kind="softmax", alibi=slopes, shift=5), switches=fdl)),
        ("fused delta, heads docs 64-512 2000 fp32 D256 MQA",
         docs_mask(uniform_docs(2000, 64, 512)), f32,
         dict(d=256, hk=1, switches={**fdl, **hg})),
    ]  # fmt: skip
    # score_mods compiled into the kernel (kernels/triton/score_mod.py)
    rel = torch.linspace(-1, 1, 4 * 65, device=DEV).sin().view(4, 65)
    bias = torch.randn(8, device=DEV)
    smods = {
        "relative bias": _relative_bias,
        "bucket table": lambda s, b, h, q, k: s + rel[h % 4, (q - k).clamp(-32, 32) + 32],
        "tanh square": lambda s, b, h, q, k: 8 * torch.tanh(s / 8) + 0.05 * s * s,
        "int ops": lambda s, b, h, q, k: s + ((q - k) // 7) * 0.01 - ((q - k) % 5) * 0.1,
        "head bias by mod": lambda s, b, h, q, k: torch.where(q >= k, s + bias[h], -1e4),
        # NaN where a visible score is negative or at the padding (s = 0), skipped by fmax
        # or a selection; torch's float rounding and bfloat16 / float16 storage
        "nan rules": lambda s, b, h, q, k: (
            torch.fmax(torch.log(s), s) + torch.sqrt(torch.relu(s)) + 0.1 * torch.sin(s) / s
        ),
        "rounding": lambda s, b, h, q, k: (
            s
            + (q.float() // 0.1) * 0.001
            + torch.remainder(k.float() * 0.3, 0.1)
            + ((q - k).float() * 0.01).to(torch.bfloat16).float()
            + ((q + k).float() * 0.0013).half()
            + torch.clamp(q * 0.0 - 0.5, min=s, max=s) * 0.5
        ),
    }
    docs = docs_mask(uniform_docs(2000, 64, 512))
    cases += [
        ("score_mod relative bias causal 1000 bf16", Mask.causal(1000), bf,
         dict(variant=BlockVariant(kind="softmax", score_mod=smods["relative bias"]))),
        ("score_mod bucket table docs GQA 8/2 bf16", docs, bf,
         dict(hq=8, hk=2, variant=BlockVariant(kind="softmax", score_mod=smods["bucket table"]))),
        ("score_mod tanh square bottom-right fp16", Mask.causal(300, 1100), fp16,
         dict(variant=BlockVariant(kind="softmax", score_mod=smods["tanh square"]))),
        ("score_mod int ops window fp32 D64", Mask.sliding_window(999, (100, 0)), f32,
         dict(d=64, variant=BlockVariant(kind="softmax", score_mod=smods["int ops"]))),
        ("score_mod head bias + softcap causal bf16 GQA", Mask.causal(1000), bf,
         dict(hq=8, hk=2, variant=BlockVariant(kind="softmax", softcap=20.0,
                                               score_mod=smods["head bias by mod"]))),
        ("score_mod sigmoid relative bias docs bf16", docs, bf,
         dict(variant=BlockVariant(kind="sigmoid", bias=-1.0,
                                   score_mod=smods["relative bias"]))),
        ("score_mod nan rules + softcap causal 999 bf16", Mask.causal(999), bf,
         dict(variant=BlockVariant(kind="softmax", softcap=5.0, score_mod=smods["nan rules"]))),
        ("score_mod rounding docs bf16", docs, bf,
         dict(variant=BlockVariant(kind="softmax", score_mod=smods["rounding"]))),
    ]  # fmt: skip
    # cuDNN for large pieces, one triton call per run of small ones
    mixed = {"kernel": "sdpa+triton", "switches": {"sdpa.MIX_PAIRS": MIX_TIMED}}
    cases += [
        ("sdpa+triton fused hamilton docs 8K/rank step bf16",
         fused_blocks("hamilton", "docs", 8192)[0], bf, dict(hq=2, hk=2, **mixed)),
        ("sdpa+triton docs 3000 + 64-512 GQA 8/2 bf16",
         docs_mask([3000, *uniform_docs(3000, 64, 512)]), bf, dict(hq=8, hk=2, **mixed)),
    ]  # fmt: skip
    if only:
        cases = [c for c in cases if any(w in c[0] for w in only.split(","))]
    for name, m, dt, kw in cases[: 4 if quick else None]:
        try:
            res.append(check(name, m, dt, **kw))
        except Exception as err:  # noqa: BLE001 - report and go on
            traceback.print_exc()
            res.append({"check": name, "ok": False, "error": repr(err)})
    return res


# -- speed -----------------------------------------------------------------------------


def rand_bhsd(s, h, d, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(1, s, h, d, device=DEV, dtype=torch.bfloat16, generator=g).transpose(1, 2)


def time_kernel(kern, q, k, v, mask, variant=None):
    """(fwd ms, fwd+bwd ms) through the kernel API."""
    kw = {} if variant is None else {"variant": variant}
    o, l_ = kern.forward(q, k, v, mask, 0.088, **kw)
    do = torch.randn_like(o)
    tf = bench_ms(lambda: kern.forward(q, k, v, mask, 0.088, **kw))

    def fb():
        o, l_ = kern.forward(q, k, v, mask, 0.088, **kw)
        kern.backward(do, q, k, v, o, l_, mask, 0.088, **kw)

    diff = None
    if variant is None:
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        diff = kern.differentiable(qg, kg, vg, mask, 0.088)
    if diff is not None:  # the backend's own autograd graph, as one-device calls use it

        def fb():  # noqa: F811 - the faster path replaces the kernel-API one
            o, _ = kern.differentiable(qg, kg, vg, mask, 0.088)
            torch.autograd.grad(o, (qg, kg, vg), do)

    return tf, bench_ms(fb)


def time_cudnn_dense(s, causal, h=32, d=128):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (rand_bhsd(s, h, d, i).contiguous().requires_grad_() for i in range(3))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        f = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
        o = f()
        g = torch.randn_like(o)
        tf = bench_ms(f)
        tfb = bench_ms(lambda: torch.autograd.grad(f(), (q, k, v), g))
    return tf, tfb


def old_auto(q, k, v, mask):
    """What ``auto`` chose before the triton backend: sdpa or flex by the old model."""
    calls = get_kernel("sdpa")._plan(q, k, v, mask)
    if isinstance(calls, str):
        return "flex"
    per_pair = 4.0 * q.shape[1] * q.shape[-1]
    return "sdpa" if choice.prefer_sdpa(mask, calls, per_pair) else "flex"


def perf_case(
    rows, case, mask, *, variant=None, impls=("triton", "cudnn", "flex"), dense=None, h=32, d=128
):
    sq, sk = mask.shape
    q, k, v = rand_bhsd(sq, h, d, 1), rand_bhsd(sk, h, d, 2), rand_bhsd(sk, h, d, 3)
    flops = 4.0 * h * d * mask.area()
    row = {"case": case, "pairs_M": mask.area() / 1e6}
    if ONLY_TRITON:
        impls = ("triton",)
    mix = sdpa_mod.MIX_PAIRS
    sdpa_mod.MIX_PAIRS = mix or MIX_TIMED  # sdpa+triton timed wherever the test allows
    for impl in impls:
        try:
            if impl == "sdpa+triton" and all(
                c.op != "triton" for c in get_kernel(impl).calls(q, k, v, mask)
            ):
                continue  # the same calls as cudnn's
            if impl == "cudnn" and dense is not None:
                tf, tfb = time_cudnn_dense(*dense, h=h, d=d)
            else:
                kern = get_kernel("sdpa" if impl == "cudnn" else impl)
                tf, tfb = time_kernel(kern, q, k, v, mask, variant)
            row[impl] = (flops / tf / 1e9, 3.5 * flops / tfb / 1e9)
        except Exception as err:  # noqa: BLE001 - a backend that cannot run the case
            row[impl] = None
            print(f"  {impl} failed: {type(err).__name__}: {str(err)[:200]}", flush=True)
    sdpa_mod.MIX_PAIRS = mix
    row["auto"] = select_kernel("auto", q, k, v, mask, variant).name
    if variant is None:
        row["auto_before"] = old_auto(q, k, v, mask)
    rows.append(row)
    cells = "  ".join(
        f"{i} {row[i][0]:6.1f}/{row[i][1]:6.1f}" for i in impls if row.get(i) is not None
    )
    print(
        f"{case:<44} {cells}  auto={row.get('auto')} (before {row.get('auto_before')})", flush=True
    )
    del q, k, v
    torch.cuda.empty_cache()
    return row


def fused_blocks(sched, mask_name, per_rank):
    w = 8
    total = w * per_rank
    if mask_name == "causal":
        m = Mask.causal(total)
    else:
        m = docs_mask(lognormal_docs(total))
    p = ha.plan(m, ha.SimulatedGroup(w, 3), schedule=sched, dispatch="zigzag")
    steps = [s.compute[3] for s in p.schedule.forward_steps() if s.compute[3]]
    pieces = max(steps, key=len)
    return p.fused_block(3, pieces)[0], len(pieces)


def _fused_case(rows, sched, mname, per_rank):
    m, n = fused_blocks(sched, mname, per_rank)
    s_eq = int(round(math.sqrt(2 * m.area())))
    case = f"{sched} {mname} {per_rank // 1024}K/rank step ({n} pieces)"
    perf_case(rows, case, m, impls=("triton", "cudnn", "sdpa+triton"))
    if ONLY_TRITON:
        return
    tf, tfb = time_cudnn_dense(s_eq, True)
    fl = 4.0 * 32 * 128 * s_eq * (s_eq + 1) / 2
    rows[-1]["dense_cudnn"] = (fl / tf / 1e9, 3.5 * fl / tfb / 1e9)
    print(f"  dense causal cuDNN S={s_eq}: {rows[-1]['dense_cudnn']}", flush=True)


def _relative_bias(score, b, h, q_idx, kv_idx):
    return score - 0.01 * (q_idx - kv_idx)


def perf_cases(fused_only=False):
    """Every case, most important first (``--budget-s`` stops the run between cases);
    ``fused_only``: the fused steps (8K-per-rank documents first, then the long-tailed
    documents, then the rest)."""
    s32, s128 = 32768, 131072
    causal = Mask.causal(s32)
    alibi = BlockVariant(kind="softmax", alibi=torch.rand(1, 32, device=DEV) * 0.01)
    cases = [
        lambda r: perf_case(r, "docs 64-512, 32K", docs_mask(uniform_docs(s32, 64, 512))),
        lambda r: perf_case(
            r,
            "lognormal docs (median ~1K), 32K",
            docs_mask(lognormal_docs(s32)),
            impls=("triton", "cudnn", "sdpa+triton", "flex"),
        ),
        lambda r: perf_case(r, "dense causal 32K", causal, dense=(s32, True)),
        lambda r: perf_case(
            r, "sigmoid causal 32K", causal, variant=BlockVariant(kind="sigmoid"), impls=("triton",)
        ),
        lambda r: perf_case(
            r,
            "softcap 30 causal 32K",
            causal,
            variant=BlockVariant(kind="softmax", softcap=30.0),
            impls=("triton", "flex"),
        ),
        lambda r: perf_case(r, "alibi causal 32K", causal, variant=alibi, impls=("triton", "flex")),
        lambda r: perf_case(
            r,
            "score_mod (relative bias) causal 32K",
            causal,
            variant=BlockVariant(kind="softmax", score_mod=_relative_bias),
            impls=("triton", "flex"),
        ),
        lambda r: perf_case(
            r,
            "score_mod (relative bias) docs 64-512, 32K",
            docs_mask(uniform_docs(s32, 64, 512)),
            variant=BlockVariant(kind="softmax", score_mod=_relative_bias),
            impls=("triton", "flex"),
        ),
        lambda r: perf_case(
            r,
            "sigmoid + score_mod (relative bias) causal 32K",
            causal,
            variant=BlockVariant(kind="sigmoid", score_mod=_relative_bias),
            impls=("triton",),
        ),
    ]
    fused = []
    for sched in ("hamilton", "direct", "groupcast"):
        fused.append(lambda r, s=sched: _fused_case(r, s, "causal", 8192))
        cases.append(fused[-1])
    cases += [
        lambda r: perf_case(r, "docs 64-512, 128K", docs_mask(uniform_docs(s128, 64, 512))),
        lambda r: perf_case(r, "dense full 32K", Mask.full(s32), dense=(s32, False)),
    ]
    for sched in ("hamilton", "direct", "groupcast"):
        fused.append(lambda r, s=sched: _fused_case(r, s, "docs", 8192))
        cases.append(fused[-1])
    for sched in ("hamilton", "direct", "groupcast"):
        for mname in ("causal", "docs"):
            fused.append(lambda r, s=sched, n=mname: _fused_case(r, s, n, 32768))
            cases.append(fused[-1])
    if fused_only:
        return fused[3:6] + [cases[1]] + fused[:3] + fused[6:]  # document steps first
    return cases


def run_perf(budget_s, save, first=None, fused_only=False):
    rows = []
    t0 = time.monotonic()
    cases = perf_cases(fused_only)[:first]
    for i, case in enumerate(cases):
        if time.monotonic() - t0 > budget_s:
            print(f"time budget spent: {len(cases) - i} cases not run", flush=True)
            break
        try:
            case(rows)
        except Exception as err:  # noqa: BLE001 - report and go on
            traceback.print_exc()
            print(f"case {i} failed: {err!r}", flush=True)
        save(rows)
    return rows


def sweep(budget_s=1e9):
    """Forward / dQ / dK-dV configs on three masks (tuning; printed, not saved): each
    pass's candidates with the other passes at their defaults."""
    t0 = time.monotonic()
    masks = {
        "causal32K": Mask.causal(32768),
        "docs64-512": docs_mask(uniform_docs(32768, 64, 512)),
        "lognormal": docs_mask(lognormal_docs(32768)),
    }
    cands = {
        "fwd": [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3),
                (64, 64, 4, 3), (64, 32, 4, 3), (32, 64, 4, 3)],
        "dq": [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 3)],
        "dkdv": [(64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 2),
                 (32, 32, 4, 3)],
    }  # fmt: skip
    kern = get_kernel("triton")
    saved = {p: {d: list(c) for d, c in v.items()} for p, v in tk.CONFIGS.items()}
    for name, m in masks.items():
        q, k, v = (rand_bhsd(32768, 32, 128, i) for i in range(3))
        fl = 4.0 * 32 * 128 * m.area()
        o, l_ = kern.forward(q, k, v, m, 0.088)
        do = torch.randn_like(o)
        for pass_, cfgs in cands.items():
            for cfg in cfgs:
                if time.monotonic() - t0 > budget_s:
                    print("sweep: budget spent", flush=True)
                    return
                tk.CONFIGS[pass_][128] = [cfg]
                tk._pick.cache_clear()
                try:
                    if pass_ == "fwd":
                        t = bench_ms(lambda: kern.forward(q, k, v, m, 0.088), reps=5)  # noqa: B023
                        rate = fl / t / 1e9
                    else:
                        t = bench_ms(lambda: kern.backward(do, q, k, v, o, l_, m, 0.088), reps=5)  # noqa: B023, E501
                        rate = 2.5 * fl / t / 1e9
                    n, part = tk.tile_counts(m, cfg[0], cfg[1]) if pass_ != "dkdv" else (0, 0)
                    print(
                        f"sweep {name} {pass_} {cfg}: {rate:.1f} TF/s  ({t:.3f} ms, tiles "
                        f"{n}, partial {part})",
                        flush=True,
                    )
                except Exception as err:  # noqa: BLE001
                    print(f"sweep {name} {pass_} {cfg}: failed {str(err)[:300]}", flush=True)
                tk.CONFIGS[pass_] = {d: list(c) for d, c in saved[pass_].items()}
            tk._pick.cache_clear()
        q = k = v = o = do = None  # noqa: F841 - free before the next mask
        torch.cuda.empty_cache()


def ab_run(budget_s, out_dir, name, checks=()):
    """Kernel switches and tile configurations side by side on the cases they aim at (one
    GPU run; printed and saved as ``name``.md / .json): programs of several heads
    interleaved per row tile against one head after another, and the dQ pass making delta
    itself against the delta kernel (s14's plan). Earlier rounds' plans (the forward's
    row-interval test as one unsigned comparison, the same in the backward, ALiBi's
    per-key term as the dot's accumulator, the backward's dO . v dots started from
    -delta, the lazy running max, ragged 128-row tiles, TMA loads, ALiBi distances, the
    packed float16 tanh, RANGE / entry / run loops, dots a tile ahead, every case's
    forward and backward tiles, the partial tile weight, dQ added in the dK/dV pass, the
    sdpa backend's calls on concurrent streams, tile sweeps on short and long-tailed
    documents) are in the results of triton_ab_H200_2026-12-03_s4 -
    triton_ab_H200_2026-12-04_s10e."""
    t0 = time.monotonic()
    kern = get_kernel("triton")
    s32 = 32768
    short = docs_mask(uniform_docs(s32, 64, 512))
    rows = []

    def timed(label, mask, variant, q, k, v, do, fb, kern=kern):
        kw = {} if variant is None else {"variant": variant}
        fl = 4.0 * 32 * 128 * mask.area()
        tf = bench_ms(lambda: kern.forward(q, k, v, mask, 0.088, **kw))
        rate = [fl / tf / 1e9, None]
        if fb:
            o, l_ = kern.forward(q, k, v, mask, 0.088, **kw)

            def f_b():
                o, l_ = kern.forward(q, k, v, mask, 0.088, **kw)
                kern.backward(do, q, k, v, o, l_, mask, 0.088, **kw)

            rate[1] = 3.5 * fl / bench_ms(f_b) / 1e9
        rows.append({"case": label, "fwd": rate[0], "fb": rate[1]})
        extra = f" / {rate[1]:.1f}" if rate[1] else ""
        print(f"ab {label}: {rate[0]:.1f}{extra} TF/s", flush=True)

    # (case, mask, variant, settings {label: switches}, fwd configs, bwd sweeps by pass);
    # fwd configs and bwd sweeps run under the first two settings.
    # s10d measured the forward's row-interval test as one unsigned comparison
    # (`UNSIGNED_ROWS`), s10e the same in the dQ and dK/dV passes (no faster, removed):
    # results/triton_ab_H200_2026-12-04_s10d.md / _s10e.md.
    # s16: programs of several heads interleaved per row tile (`HEAD_GROUP`, against
    # one head's row tiles after another's: the last head's heavy tiles form a tail),
    # and the dQ pass making delta (`FUSED_DELTA`, s14), on the cases that run a dQ pass.
    base_ = {"one head after another": {}}
    hgs = {f"heads x{n}": {"HEAD_GROUP": n} for n in (4, 8, 32)}
    fd = {"fused delta": {"FUSED_DELTA": True}, "fused delta, heads x8":
          {"FUSED_DELTA": True, "HEAD_GROUP": 8}}  # fmt: skip
    fused8k, _ = fused_blocks("hamilton", "docs", 8192)
    causal8k, _ = fused_blocks("hamilton", "causal", 8192)
    alibi = BlockVariant(kind="softmax", alibi=torch.rand(1, 32, device=DEV) * 0.01)
    plan = []
    for r in ("", " (again)"):
        plan += [
            (f"hamilton docs 8K/rank step{r}", fused8k, None, {**base_, **hgs, **fd}, [], {}),
            (f"lognormal docs 32K{r}", docs_mask(lognormal_docs(s32)), None, {**base_, **hgs},
             [], {}),
            (f"docs 64-512 32K{r}", short, None, {**base_, "heads x8": hgs["heads x8"], **fd},
             [], {}),
        ]  # fmt: skip
    plan += [
        ("hamilton causal 8K/rank step", causal8k, None, {**base_, **hgs}, [], {}),
        ("docs 64-512 128K", docs_mask(uniform_docs(4 * s32, 64, 512)), None,
         {**base_, "heads x8": hgs["heads x8"], **fd}, [], {}),
        ("alibi docs 64-512 32K", short, alibi, {**base_, **fd}, [], {}),
        ("dense causal 32K", Mask.causal(s32), None, {**base_, **hgs}, [], {}),
    ]  # fmt: skip
    saved = {p: {d: list(c) for d, c in v.items()} for p, v in tk.CONFIGS.items()}
    switches = (
        "TMA",
        "ALIBI_SPLIT",
        "ALIBI_BEHIND",
        "ALIBI_MMA",
        "UNSIGNED_ROWS",
        "FLAT_LOOP",
        "RANGE_LOOP",
        "PARTIAL_COST",
        "SPEED",
        "CONFIGS",
        "RAGGED",
        "DQ_ADD",
        "FUSED_DELTA",
        "HEAD_GROUP",
    )
    base = {n: getattr(tk, n) for n in switches}

    for case, mask, variant, settings, cfgs, bwd in plan:
        if time.monotonic() - t0 > budget_s:
            print("ab: budget spent", flush=True)
            break
        q, k, v = (rand_bhsd(mask.shape[0 if i == 0 else 1], 32, 128, i) for i in range(3))
        do = torch.randn(1, 32, mask.shape[0], 128, device=DEV, dtype=torch.bfloat16)
        runs = [(f"{case}, {lab}", sw, None) for lab, sw in settings.items()]
        runs += [(f"{case}, {lab}, fwd {c}", sw, ("fwd", c)) for c in cfgs
                 for lab, sw in list(settings.items())[:2]]  # fmt: skip
        runs += [(f"{case}, {lab}, {p} {c}", sw, (p, c)) for p, cs in bwd.items() for c in cs
                 for lab, sw in list(settings.items())[:2]]  # fmt: skip
        for label, sw, cfg in runs:
            for n, val in {**base, **sw}.items():
                setattr(tk, n, val)
            if cfg is not None:  # a copy: the settings may hold the module's own dicts
                tk.CONFIGS = {**tk.CONFIGS, cfg[0]: {**tk.CONFIGS[cfg[0]], 128: [cfg[1]]}}
            tk._pick.cache_clear()
            try:
                timed(label, mask, variant, q, k, v, do, fb=cfg is None or cfg[0] != "fwd")
            except Exception as err:  # noqa: BLE001 - a configuration that cannot run
                rows.append({"case": label, "error": str(err)[:300]})
                print(f"ab {label}: failed {str(err)[:300]}", flush=True)
            tk.CONFIGS = {p: {d: list(c) for d, c in v.items()} for p, v in saved.items()}
            tk._pick.cache_clear()
        q = k = v = do = None
        torch.cuda.empty_cache()
    for n, val in base.items():
        setattr(tk, n, val)
    env = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/gpu_triton.py " + " ".join(sys.argv[1:]),
    }
    lines = [
        f"# Triton kernel switches side by side: {env['date']}",
        "",
        f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}; command "
        f"`{env['command']}`. bf16, B=1, 32 heads, head dim 128; TF/s over visible pairs, "
        "forward / forward+backward (3.5x the forward's flops). "
        "`heads xN`: programs of N heads interleaved per row tile, each head's heaviest "
        "first (`HEAD_GROUP`), against one head's row tiles after another's; "
        "`fused delta`: the dQ pass makes each row's delta = dO . out itself "
        "(`FUSED_DELTA`) instead of a kernel of its own before the passes; "
        "`fwd` / `dq` / `dkdv` (BM, BN, warps, "
        "stages): that pass's launch configuration, the others at their defaults.",
        "",
        "| case | forward | forward+backward |",
        "|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | failed: {r['error'][:80]} | |")
        else:
            fb = f"{r['fb']:.0f}" if r["fb"] else "-"
            lines.append(f"| {r['case']} | {r['fwd']:.0f} | {fb} |")
    lines += ["", "## Checks against float64", ""] + [
        f"- {c['check']}: {'ok' if c['ok'] else 'FAIL'} "
        f"({c.get('worst_ratio', float('nan')):.2f} of the error budget)"
        for c in checks
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out_dir / f"{name}.json").write_text(
        json.dumps({"environment": env, "rows": rows, "checks": list(checks)}, indent=1)
    )
    print("\n".join(lines))


def fmt(x):
    return "-" if x is None else f"{x[0]:.0f} / {x[1]:.0f}"


def write(rows, checks, argv, out_dir, quiet=False, name=None):
    full = torch.cuda.get_device_name()  # "NVIDIA H100 80GB HBM3", "NVIDIA H200"
    gpu = next((w for w in full.split() if w[:1] in "HAB" and w[1:].isdigit()), full.split()[-1])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    name = name or f"triton_{gpu}_{date}"
    env = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/gpu_triton.py " + " ".join(argv),
        "name": name,
    }
    lines = [
        f"# Triton kernel on one {gpu}: {env['date']}",
        "",
        f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}; command "
        f"`{env['command']}`. bf16, B=1, 32 heads, head dim 128; TF/s over visible pairs, "
        "forward / forward+backward (3.5x the forward's flops). `cudnn`: one cuDNN call "
        "(dense) or the `sdpa` backend's per-piece cuDNN calls; `flex`: the `flex` backend "
        "(compiled FlexAttention); `sdpa+triton`: cuDNN for the large pieces, one triton "
        "call per run of small ones; `auto`: the pick now (before this kernel).",
        "",
        f"Checks against float64: {sum(c['ok'] for c in checks)} passed, "
        f"{sum(not c['ok'] for c in checks)} failed.",
        "",
        "| case | pairs (M) | triton | cudnn | sdpa+triton | flex | auto | dense cuDNN, same "
        "pairs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        auto = f"{r.get('auto', '-')} ({r.get('auto_before', '-')})" if "auto" in r else "-"
        lines.append(
            f"| {r['case']} | {r['pairs_M']:.0f} | {fmt(r.get('triton'))} | "
            f"{fmt(r.get('cudnn'))} | {fmt(r.get('sdpa+triton'))} | {fmt(r.get('flex'))} | "
            f"{auto} | "
            f"{fmt(r.get('dense_cudnn'))} |"
        )
    lines += ["", "## Checks", ""] + [
        f"- {c['check']}: {'ok' if c['ok'] else 'FAIL'} "
        f"({c.get('worst_ratio', float('nan')):.2f} of the error budget)"
        for c in checks
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out_dir / f"{name}.json").write_text(
        json.dumps({"environment": env, "rows": rows, "checks": checks}, indent=1)
    )
    if not quiet:
        print("\n".join(lines))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-budget-s", type=float, default=1e9)
    ap.add_argument("--checks", default=None, help="run only checks naming one of these (a,b)")
    ap.add_argument("--triton-only", action="store_true", help="time only the triton kernel")
    ap.add_argument("--no-perf", action="store_true")
    ap.add_argument("--first", type=int, default=None, help="time only the first N cases")
    ap.add_argument("--fused", action="store_true", help="time only the fused steps")
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no case after this")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default=None, help="file stem (default triton_GPU_date)")
    ap.add_argument("--ab", action="store_true", help="kernel switches side by side, only")
    ap.add_argument("--set", action="append", default=[], metavar="SWITCH=VALUE",
                    help="set a kernel switch first (e.g. HEAD_GROUP=8, sdpa.NAME=...)")  # fmt: skip
    args = ap.parse_args(argv)
    for item in args.set:
        name, eq, value = item.partition("=")
        module, attr = _switch_module(name)
        if not eq or not hasattr(module, attr):
            ap.error(f"--set: expected SWITCH=VALUE naming a kernel switch, got {item!r}")
        setattr(module, attr, ast.literal_eval(value))
    torch._dynamo.config.cache_size_limit = 256
    if args.ab:  # the checks, then the switches
        checks = run_checks(args.quick, args.checks)
        ab_run(args.budget_s, args.out_dir, args.name or "triton_ab", checks)
        return 0 if all(c["ok"] for c in checks) else 1
    checks = run_checks(args.quick, args.checks)
    if args.sweep:
        sweep(args.sweep_budget_s)
    if args.triton_only:
        global ONLY_TRITON
        ONLY_TRITON = True

    def save(rows):
        write(rows, checks, argv, args.out_dir, quiet=True, name=args.name)

    rows = [] if args.no_perf else run_perf(args.budget_s, save, args.first, args.fused)
    write(rows, checks, argv, args.out_dir, name=args.name)
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
