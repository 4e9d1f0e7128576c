"""Would persistent kernels lift short documents? (one H100 / H200, repository root)::

    python benchmarks/gpu_triton_persist.py [--out-dir DIR] [--name NAME] [--quick]

On 64-512-token documents the ``triton`` kernel's programs are short (a query tile meets
about 8 key tiles of 64 x 32; a key tile about 8 row tiles), so each program's start (the
dependent loads of its lists, its Q tile, its pipeline's fill) and end weigh on every
pass: Nsight Compute shows the dK/dV pass at 30% issue with 70% of cycles waiting
(results/triton_profile_H200_2026-12-03_s6.md). A persistent kernel launches a few
programs per SM, each walking one contiguous range of (tile, entry) pairs of every head
as ONE pipelined loop: the next tile's loads are in flight while this tile ends. This
probe writes that loop for plain softmax on row-interval masks (forward, dQ pass, dK/dV
pass; per-entry tile / column / first-last flags on the host; a tile's own operands
loaded only at its first entry, through a predicated load the pipeliner can issue early;
results stored at its last), checks each against the library's pass on the same lists,
and times both side by side (bf16, B = 1, 32 heads, head dim 128) with 1-4 programs per
SM. Writes ``<out-dir>/<name>.md`` and ``.json``. Before building it into the kernels.

``TRITON_INTERPRET=1 python benchmarks/gpu_triton_persist.py --interpret`` runs the
checks on tiny shapes through Triton's interpreter (CPU, float32).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from gpu_triton import docs_mask, uniform_docs  # noqa: E402  (this folder's benchmark)

from hamilton_attn.kernels.triton import tiles  # noqa: E402

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
_ADD = tl.standard._sum_combine
_MAX = tl.standard._elementwise_max


@triton.jit
def _bound(x, INTERP: tl.constexpr):
    if INTERP:  # as jit._bound: Triton 3.6's interpreter and NumPy >= 2.3
        x.handle.data = x.handle.data.reshape(())
    return x


@triton.jit
def _entry(vv, E, ETILE, ECOL, EFLAG):
    """Virtual entry ``vv`` (heads x entries): its head, tile, other-axis element, flags
    and whether it is its tile's first entry."""
    h = vv // E
    e = vv - h * E
    flag = tl.load(EFLAG + e)
    return h, tl.load(ETILE + e), tl.load(ECOL + e), flag, (flag & 1) != 0


@triton.jit
def _at_first(ptr, first, m, cur):
    """The tile at ``ptr`` (rows masked by ``m``) at its tile's first entry, else ``cur``:
    a predicated load the pipeliner can issue early."""
    return tl.where(first, tl.load(ptr, mask=first & m, other=0.0), cur)


# fmt: off
@triton.jit
def persist_fwd(Q, K, V, O, LSE, ETILE, ECOL, EFLAG, START, RLO, RWID,
                s_qh, s_qm, s_kh, s_kn, s_oh, s_om, E, SQ, SK, sc,
                D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                STAGES: tl.constexpr, INTERP: tl.constexpr, RELOAD: tl.constexpr):
    """Out and lse of the (head, query tile) pairs of program ``pid``'s range, one loop."""
    p = tl.program_id(0)
    dd = tl.arange(0, D)
    am = tl.arange(0, BM)
    an = tl.arange(0, BN)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.full([BM], 0.0, tl.float32)
    acc = tl.full([BM, D], 0.0, tl.float32)
    q = tl.full([BM, D], 0.0, Q.dtype.element_ty)
    lo = tl.full([BM], 0, tl.int32)
    wid = lo
    for vv in tl.range(_bound(tl.load(START + p), INTERP),
                       _bound(tl.load(START + p + 1), INTERP), num_stages=STAGES):
        h, t, c, flag, first = _entry(vv, E, ETILE, ECOL, EFLAG)
        rows = t * BM + am
        if RELOAD:  # every entry: the tile's Q comes through the pipeliner's buffers
            q = tl.load(Q + h.to(tl.int64) * s_qh + rows[:, None] * s_qm + dd[None, :],
                        mask=rows[:, None] < SQ, other=0.0)
            lo = tl.load(RLO + rows, mask=rows < SQ, other=0)
            wid = tl.load(RWID + rows, mask=rows < SQ, other=0)
        else:  # at the tile's first entry only (predicated loads), kept in registers
            qn = tl.load(Q + h.to(tl.int64) * s_qh + rows[:, None] * s_qm + dd[None, :],
                         mask=first & (rows[:, None] < SQ), other=0.0)
            lon = tl.load(RLO + rows, mask=first & (rows < SQ), other=0)
            widn = tl.load(RWID + rows, mask=first & (rows < SQ), other=0)
            q = tl.where(first, qn, q)
            lo = tl.where(first, lon, lo)
            wid = tl.where(first, widn, wid)
        cols = c + an
        kv = h.to(tl.int64) * s_kh + cols[:, None] * s_kn + dd[None, :]
        k = tl.load(K + kv, mask=cols[:, None] < SK, other=0.0)
        qk = tl.dot(q, tl.trans(k))
        vis = (cols[None, :] - lo[:, None]).to(tl.uint32, bitcast=True) <= wid[:, None].to(
            tl.uint32, bitcast=True)
        qk = tl.where(vis, qk, float("-inf"))
        m_old = tl.where(first, float("-inf"), m_i)
        m_new = tl.maximum(m_old, tl.reduce(qk, 1, _MAX) * sc)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        pp = tl.exp2(qk * sc - m_safe[:, None])
        alpha = tl.exp2(m_old - m_safe)  # 0 at a tile's first entry: acc and l restart
        l_i = tl.where(first, 0.0, l_i) * alpha + tl.reduce(pp, 1, _ADD)
        acc = acc * alpha[:, None]
        vt = tl.load(V + kv, mask=cols[:, None] < SK, other=0.0)
        acc = tl.dot(pp.to(vt.dtype), vt, acc)
        m_i = m_new
        if (flag & 2) != 0:
            seen = l_i > 0.0
            o = acc / tl.where(seen, l_i, 1.0)[:, None]
            lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2,
                           float("-inf"))
            tl.store(LSE + h.to(tl.int64) * SQ + rows, lse, mask=rows < SQ)
            tl.store(O + h.to(tl.int64) * s_oh + rows[:, None] * s_om + dd[None, :],
                     o.to(O.dtype.element_ty), mask=rows[:, None] < SQ)


@triton.jit
def persist_dq(Q, K, V, DO, DQ, LSE, DELTA, ETILE, ECOL, EFLAG, START, RLO, RWID,
               s_qh, s_qm, s_kh, s_kn, E, SQ, SK, sc, scale,
               D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               STAGES: tl.constexpr, INTERP: tl.constexpr):
    """dQ of the (head, query tile) pairs of program ``pid``'s range (Q, dO, dQ share
    strides), one loop."""
    p = tl.program_id(0)
    dd = tl.arange(0, D)
    am = tl.arange(0, BM)
    an = tl.arange(0, BN)
    dq = tl.full([BM, D], 0.0, tl.float32)
    q = tl.full([BM, D], 0.0, Q.dtype.element_ty)
    do = q
    lse2 = tl.full([BM], 0.0, tl.float32)
    delta = lse2
    lo = tl.full([BM], 0, tl.int32)
    wid = lo
    for vv in tl.range(_bound(tl.load(START + p), INTERP),
                       _bound(tl.load(START + p + 1), INTERP), num_stages=STAGES):
        h, t, c, flag, first = _entry(vv, E, ETILE, ECOL, EFLAG)
        rows = t * BM + am
        rm = first & (rows < SQ)
        off = h.to(tl.int64) * s_qh + rows[:, None] * s_qm + dd[None, :]
        q = _at_first(Q + off, first, rm[:, None], q)
        do = _at_first(DO + off, first, rm[:, None], do)
        ln = tl.load(LSE + h.to(tl.int64) * SQ + rows, mask=rm, other=float("inf"))
        ln = tl.where(ln == float("-inf"), float("inf"), ln * LOG2E)
        lse2 = tl.where(first, ln, lse2)
        delta = tl.where(first, tl.load(DELTA + h.to(tl.int64) * SQ + rows, mask=rm,
                                        other=0.0), delta)
        lo = tl.where(first, tl.load(RLO + rows, mask=rm, other=0), lo)
        wid = tl.where(first, tl.load(RWID + rows, mask=rm, other=0), wid)
        dq = tl.where(first, 0.0, dq)
        cols = c + an
        kv = h.to(tl.int64) * s_kh + cols[:, None] * s_kn + dd[None, :]
        k = tl.load(K + kv, mask=cols[:, None] < SK, other=0.0)
        v = tl.load(V + kv, mask=cols[:, None] < SK, other=0.0)
        qk = tl.dot(q, tl.trans(k))
        vis = (cols[None, :] - lo[:, None]).to(tl.uint32, bitcast=True) <= wid[:, None].to(
            tl.uint32, bitcast=True)
        s = tl.where(vis, qk * sc, float("-inf"))
        pp = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = pp * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
        if (flag & 2) != 0:
            tl.store(DQ + off, (dq * scale).to(DQ.dtype.element_ty),
                     mask=rows[:, None] < SQ)


@triton.jit
def persist_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, ETILE, ECOL, EFLAG, START, RLO, RWID,
                 s_qh, s_qm, s_kh, s_kn, E, SQ, SK, sc, scale,
                 D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 STAGES: tl.constexpr, INTERP: tl.constexpr):
    """dK and dV of the (head, key tile) pairs of program ``pid``'s range (K, V, dK, dV
    share strides; entries are query tiles of BM rows), one loop."""
    p = tl.program_id(0)
    dd = tl.arange(0, D)
    am = tl.arange(0, BM)
    an = tl.arange(0, BN)
    dk = tl.full([BN, D], 0.0, tl.float32)
    dv = dk
    k = tl.full([BN, D], 0.0, K.dtype.element_ty)
    v = k
    for vv in tl.range(_bound(tl.load(START + p), INTERP),
                       _bound(tl.load(START + p + 1), INTERP), num_stages=STAGES):
        h, u, r, flag, first = _entry(vv, E, ETILE, ECOL, EFLAG)
        cols = u * BN + an
        cm = first & (cols < SK)
        koff = h.to(tl.int64) * s_kh + cols[:, None] * s_kn + dd[None, :]
        k = _at_first(K + koff, first, cm[:, None], k)
        v = _at_first(V + koff, first, cm[:, None], v)
        dk = tl.where(first, 0.0, dk)
        dv = tl.where(first, 0.0, dv)
        rows = r + am
        qoff = h.to(tl.int64) * s_qh + rows[:, None] * s_qm + dd[None, :]
        rm = rows < SQ
        q = tl.load(Q + qoff, mask=rm[:, None], other=0.0)
        do = tl.load(DO + qoff, mask=rm[:, None], other=0.0)
        lse = tl.load(LSE + h.to(tl.int64) * SQ + rows, mask=rm, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
        delta = tl.load(DELTA + h.to(tl.int64) * SQ + rows, mask=rm, other=0.0)
        lo = tl.load(RLO + rows, mask=rm, other=1 << 30)
        wid = tl.load(RWID + rows, mask=rm, other=0)
        qkT = tl.dot(k, tl.trans(q))
        vis = (cols[:, None] - lo[None, :]).to(tl.uint32, bitcast=True) <= wid[None, :].to(
            tl.uint32, bitcast=True)
        s = tl.where(vis, qkT * sc, float("-inf"))
        pT = tl.exp2(s - lse2[None, :])
        dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dk = tl.dot(dsT.to(q.dtype), q, dk)
        if (flag & 2) != 0:
            tl.store(DK + koff, (dk * scale).to(DK.dtype.element_ty), mask=cols[:, None] < SK)
            tl.store(DV + koff, dv.to(DV.dtype.element_ty), mask=cols[:, None] < SK)
# fmt: on


def entries(L, n_heads: int, programs: int, device):
    """Per-entry ``(tile, first element of the other axis, flags)`` of lists ``L`` (flag
    1: the tile's first entry, 2: its last) and ``programs + 1`` range starts over the
    ``n_heads x n_entries`` virtual entries, cut at tile starts, balanced by entries."""
    ptr = L.ptr.cpu().numpy().astype(np.int64)
    counts = np.diff(ptr)
    if (counts == 0).any():
        raise ValueError("a row tile meets nothing (the probe writes no zeros)")
    tile = np.repeat(np.arange(L.n_rows), counts).astype(np.int32)
    flag = np.zeros(L.n_entries, np.int32)
    flag[ptr[:-1]] |= 1
    flag[ptr[1:] - 1] |= 2
    e = L.n_entries
    starts = (np.arange(n_heads)[:, None] * e + ptr[None, :-1]).ravel()
    want = np.linspace(0, n_heads * e, programs + 1)
    cut = starts[np.minimum(np.searchsorted(starts, want[1:-1]), len(starts) - 1)]
    bounds = np.unique(np.concatenate([[0], cut, [n_heads * e]])).astype(np.int32)
    t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
    return t(tile), L.col, t(flag), t(bounds), len(bounds) - 1


_PREPARED: dict = {}


def prepare(mask, cfg, transpose, n_heads, mult, interp, device):
    """The launch's lists (:func:`entries`, row widths), built once per mask and setting
    (the library caches its lists too: no host work is timed)."""
    key = (mask, cfg, transpose, n_heads, mult, interp, str(device))
    if key not in _PREPARED:
        bm, bn = cfg[:2]
        L = tiles.tile_lists(mask, bm, bn, transpose, device)
        n = mult * (1 if interp else torch.cuda.get_device_properties(device).multi_processor_count)
        tile, col, flag, start, n = entries(L, n_heads, n, device)
        step = bm if transpose else bn
        _PREPARED[key] = (tile, col * step, flag, start, n, *_widths(mask, device), L.n_entries)
    return _PREPARED[key]


def _widths(mask, device):
    lo, hi = tiles.row_intervals(mask, device)
    w = hi - lo
    return torch.where(w < 0, 1 << 30, lo).int(), w.clamp(min=0).int()


def run_fwd(q, k, v, mask, scale, cfg, mult, interp, reload=False):
    """(out, lse) of the persistent forward; q/k/v ``[H, S, D]`` contiguous."""
    bm, bn, warps, stages = cfg
    h, sq, d = q.shape
    tile, col, flag, start, n, lo, wid, ne = prepare(mask, cfg, False, h, mult, interp, q.device)
    out = torch.empty_like(q)
    lse = torch.empty((h, sq), dtype=torch.float32, device=q.device)
    extra = {} if interp else dict(num_warps=warps)
    persist_fwd[(n,)](q, k, v, out, lse, tile, col, flag, start, lo, wid,
                      q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                      out.stride(0), out.stride(1), ne, sq, k.shape[1],
                      scale * 1.4426950408889634,
                      D=d, BM=bm, BN=bn, STAGES=stages, INTERP=interp, RELOAD=reload,
                      **extra)  # fmt: skip
    return out, lse


def run_dq(q, k, v, do, lse, delta, mask, scale, cfg, mult, interp):
    bm, bn, warps, stages = cfg
    h, sq, d = q.shape
    tile, col, flag, start, n, lo, wid, ne = prepare(mask, cfg, False, h, mult, interp, q.device)
    dq = torch.empty_like(q)
    extra = {} if interp else dict(num_warps=warps)
    persist_dq[(n,)](q, k, v, do, dq, lse, delta, tile, col, flag, start, lo, wid,
                     q.stride(0), q.stride(1), k.stride(0), k.stride(1), ne, sq,
                     k.shape[1], scale * 1.4426950408889634, scale,
                     D=d, BM=bm, BN=bn, STAGES=stages, INTERP=interp, **extra)  # fmt: skip
    return dq


def run_dkdv(q, k, v, do, lse, delta, mask, scale, cfg, mult, interp):
    bm, bn, warps, stages = cfg
    h, sq, d = q.shape
    sk = k.shape[1]
    tile, col, flag, start, n, lo, wid, ne = prepare(mask, cfg, True, h, mult, interp, q.device)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    extra = {} if interp else dict(num_warps=warps)
    persist_dkdv[(n,)](q, k, v, do, dk, dv, lse, delta, tile, col, flag, start, lo, wid,
                       q.stride(0), q.stride(1), k.stride(0), k.stride(1), ne, sq, sk,
                       scale * 1.4426950408889634, scale,
                       D=d, BM=bm, BN=bn, STAGES=stages, INTERP=interp, **extra)  # fmt: skip
    return dk, dv


def library(q, k, v, do, mask, scale):
    """The library's passes on ``[1, H, S, D]`` views: (out, lse, delta, dq, dk, dv)."""
    from hamilton_attn.kernels import get_kernel

    kern = get_kernel("triton")
    out, lse = kern.forward(q[None], k[None], v[None], mask, scale)
    dq, dk, dv = kern.backward(do[None], q[None], k[None], v[None], out, lse, mask, scale)
    delta = (do.float() * out[0].float()).sum(-1)
    return out[0], lse[0], delta, dq[0], dk[0], dv[0]


def compare(mask, h, d, dtype, device, cfgs, mult, interp, scale=0.088):
    """Max |difference| of each persistent pass against the library's, over the
    library's own max |value| (both compute the same sums in other orders)."""
    g = torch.Generator(device=device).manual_seed(0)
    sq, sk = mask.shape
    q, k, v, do = (torch.randn(h, s, d, generator=g, device=device, dtype=dtype)
                   for s in (sq, sk, sk, sq))  # fmt: skip
    ref = library(q, k, v, do, mask, scale)
    out, lse = run_fwd(q, k, v, mask, scale, cfgs["fwd"], mult, interp)
    dq = run_dq(q, k, v, do, ref[1], ref[2], mask, scale, cfgs["dq"], mult, interp)
    dk, dv = run_dkdv(q, k, v, do, ref[1], ref[2], mask, scale, cfgs["dkdv"], mult, interp)
    rel = {}
    for name, a, b in (("out", out, ref[0]), ("lse", lse, ref[1]), ("dq", dq, ref[3]),
                       ("dk", dk, ref[4]), ("dv", dv, ref[5])):  # fmt: skip
        rel[name] = float((a.float() - b.float()).abs().max() / b.float().abs().max())
    return rel


def bench_ms(fn, reps=7, inner=3):
    fn()
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
    fn()
    ev[0].record()
    for i in range(reps):
        for _ in range(inner):
            fn()
        ev[i + 1].record()
    torch.cuda.synchronize()
    return statistics.median(ev[i].elapsed_time(ev[i + 1]) / inner for i in range(reps))


def time_case(case, mask, cfgs, mults, h=32, d=128, scale=0.088):
    """TF/s of each pass, the library's against the persistent one per programs/SM."""
    import hamilton_attn.kernels.triton as tk
    from hamilton_attn.kernels import get_kernel
    from hamilton_attn.kernels.triton import passes

    kern = get_kernel("triton")
    dev = torch.device("cuda")
    sq, sk = mask.shape
    g = torch.Generator(device=dev).manual_seed(1)
    q, k, v, do = (torch.randn(h, s, d, generator=g, device=dev, dtype=torch.bfloat16)
                   for s in (sq, sk, sk, sq))  # fmt: skip
    Q, K, V, DO = q[None], k[None], v[None], do[None]
    out, lse = kern.forward(Q, K, V, mask, scale)
    delta = (do.float() * out[0].float()).sum(-1)
    va = tk.variant_args(Q, None)
    jit = tk.load(False, None)
    rows = tiles.row_intervals(mask, dev)
    area = mask.area() * h
    tf = lambda ms, dots: dots * 2 * d * area / ms / 1e9  # noqa: E731
    lib_cfg = {p: tk._pick(mask, p, d, False, dev)[0] for p in ("fwd", "dq", "dkdv")}
    row = {"case": case, "pairs_M": mask.area() / 1e6, "library_cfgs": lib_cfg, "cfgs": cfgs}
    dq_add = tk.TritonKernel._dq_add(Q, mask, False)
    row["library_dq_add"] = dq_add
    ms = {
        "fwd": bench_ms(lambda: kern.forward(Q, K, V, mask, scale)),
        "dq": bench_ms(lambda: passes.dq_pass(Q, K, V, DO, lse, delta[None], mask, scale, va,
                                               lse, False, rows, False, jit)),
        "dkdv": bench_ms(lambda: passes.dkdv_pass(Q, K, V, DO, lse, delta[None], mask, scale,
                                                   va, rows, False, jit, None, 0)),
        "backward": bench_ms(lambda: kern.backward(DO, Q, K, V, out, lse, mask, scale)),
    }  # fmt: skip
    row["library_ms"] = ms
    row["library"] = {"fwd": tf(ms["fwd"], 2), "dq": tf(ms["dq"], 3), "dkdv": tf(ms["dkdv"], 4),
                      "f+b": tf(ms["fwd"] + ms["backward"], 7)}  # fmt: skip
    lse0 = lse[0].contiguous()
    row["persist"] = {}
    for m in mults:
        pm = {
            "fwd": bench_ms(lambda m=m: run_fwd(q, k, v, mask, scale, cfgs["fwd"], m, False)),
            "dq": bench_ms(lambda m=m: run_dq(q, k, v, do, lse0, delta, mask, scale, cfgs["dq"], m,
                                          False)),
            "dkdv": bench_ms(lambda m=m: run_dkdv(q, k, v, do, lse0, delta, mask, scale,
                                              cfgs["dkdv"], m, False)),
        }  # fmt: skip
        pm["fwd_reload"] = bench_ms(
            lambda m=m: run_fwd(q, k, v, mask, scale, cfgs["fwd"], m, False, reload=True)
        )
        # the library's backward with its two passes swapped for these (delta as timed)
        bwd = ms["backward"] - ms["dq"] - ms["dkdv"] + pm["dq"] + pm["dkdv"]
        row["persist"][m] = {"ms": pm, "fwd": tf(pm["fwd"], 2), "dq": tf(pm["dq"], 3),
                             "dkdv": tf(pm["dkdv"], 4), "f+b": tf(pm["fwd"] + bwd, 7),
                             "fwd_reload": tf(pm["fwd_reload"], 2)}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def ir_stats(jit) -> list:
    """Per compiled kernel of the probe and of the library's module ``jit``: registers,
    spills, shared memory, and the bf16 tile loads of its loops as the GPU's compiler left
    them (asynchronous copies: pipelined; plain loads: not)."""
    out = []
    fns = [(n, getattr(jit, n)) for n in ("fwd_kernel", "dq_kernel", "dkdv_kernel")]
    fns += [(f.__name__, f) for f in (persist_fwd, persist_dq, persist_dkdv)]
    for name, fn in fns:
        for caches in fn.device_caches.values():
            for kern in caches[0].values():
                if getattr(kern, "n_regs", None) is None:
                    kern._init_handles()
                ir = kern.asm["ttgir"]
                loops = ir[ir.find("scf.for") :].splitlines()
                out.append({
                    "kernel": name, "regs": kern.n_regs, "spills": kern.n_spills,
                    "shared": kern.metadata.shared, "stages": kern.metadata.num_stages,
                    "async_bf16": sum("async_copy_global_to_local" in x and "bf16" in x
                                      for x in loops),
                    "sync_bf16": sum("tt.load " in x and "bf16" in x for x in loops),
                    "tma": sum("async_tma_copy" in x for x in loops),
                })  # fmt: skip
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default=None)
    ap.add_argument("--interpret", action="store_true", help="checks only, tiny, on CPU")
    ap.add_argument("--quick", action="store_true", help="one case, one programs/SM")
    args = ap.parse_args(argv)
    if args.interpret:
        assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1"
        from hamilton_attn import config

        cfgs = {p: (16, 16, 1, 1) for p in ("fwd", "dq", "dkdv")}
        with config.override(triton_interpret=True):
            for lens in ([37, 64, 21, 50], [16, 16, 100]):
                rel = compare(docs_mask(lens), 3, 32, torch.float32, torch.device("cpu"),
                              cfgs, 2, True)  # fmt: skip
                print(lens, rel)
                assert max(rel.values()) < 1e-5, rel
        return
    s32 = 32768
    short = docs_mask(uniform_docs(s32, 64, 512))
    cfgs = {"fwd": (64, 32, 4, 3), "dq": (64, 32, 4, 2), "dkdv": (32, 64, 4, 2)}
    checks = {"docs 64-512 4K": compare(docs_mask(uniform_docs(4096, 64, 512)), 4, 128,
                                        torch.bfloat16, torch.device("cuda"), cfgs, 2, False)}  # fmt: skip
    print(checks, flush=True)
    mults = [2] if args.quick else [1, 2, 3, 4]
    rows = [time_case("docs 64-512, 32K", short, cfgs, mults)]
    if not args.quick:
        for st in ((64, 32, 4, 3), (64, 32, 4, 4), (64, 64, 4, 3)):
            c = dict(cfgs, fwd=st)
            rows.append(time_case(f"docs 64-512, 32K, fwd {st}", short, c, [2, 3]))
        c = dict(cfgs, dq=(64, 32, 4, 3), dkdv=(32, 64, 4, 3))
        rows.append(time_case("docs 64-512, 32K, 3 stages dq/dkdv", short, c, [2, 3]))
        rows.append(time_case("docs 64-512, 128K", docs_mask(uniform_docs(4 * s32, 64, 512)),
                              cfgs, [2, 3]))  # fmt: skip
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    full = torch.cuda.get_device_name()
    gpu = next((w for w in full.split() if w[:1] in "HAB" and w[1:].isdigit()), "GPU")
    name = args.name or f"triton_persist_{gpu}_{stamp[:10]}"
    meta = {"gpu": full, "torch": torch.__version__, "triton": triton.__version__,
            "date": stamp,
            "command": "python benchmarks/gpu_triton_persist.py " + " ".join(argv or sys.argv[1:])}  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    import hamilton_attn.kernels.triton as tk

    ir = ir_stats(tk.load(False, None))
    (args.out_dir / f"{name}.json").write_text(
        json.dumps({"meta": meta, "checks": checks, "rows": rows, "ir": ir}, indent=1, default=str)
    )
    lines = [f"# Persistent kernels on short documents: what they could gain ({full})", "",
             f"{stamp}, torch {meta['torch']}, triton {meta['triton']}, `{meta['command']}`. "
             "bf16, B = 1, 32 heads, head dim 128, TF/s over visible pairs per pass (forward 2 "
             "dots, dQ 3, dK/dV 4; f+b: 7, the library's backward with its dQ and dK/dV passes "
             "swapped for the persistent ones).", "",
             f"Checks against the library's passes (max |diff| / max |value|): {checks}", "",
             "| case | library cfgs | library fwd / dq / dkdv / f+b | programs per SM | "
             "persistent fwd / dq / dkdv / f+b | fwd, Q every entry |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lib = r["library"]
        for m, p in r["persist"].items():
            lines.append(
                f"| {r['case']} | {r['library_cfgs']} | {lib['fwd']:.0f} / {lib['dq']:.0f} / "
                f"{lib['dkdv']:.0f} / {lib['f+b']:.0f} | {m} | {p['fwd']:.0f} / {p['dq']:.0f} "
                f"/ {p['dkdv']:.0f} / {p['f+b']:.0f} | {p['fwd_reload']:.0f} |"
            )
    lines += [
        "",
        "Compiled kernels (bf16 tile loads in loops: async = pipelined copies, sync = "
        "plain loads):",
        "",
        "| kernel | regs | spills | shared | stages | async | sync | tma |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {x['kernel']} | {x['regs']} | {x['spills']} | {x['shared']} | {x['stages']} "
        f"| {x['async_bf16']} | {x['sync_bf16']} | {x['tma']} |"
        for x in ir
    ]
    (args.out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
