"""The backward's launches of the ``triton`` backend: the dQ pass over query tiles and
the dK/dV pass over key tiles (with dQ added in where ``DQ_ADD`` says), called by
:meth:`hamilton_attn.kernels.triton.TritonKernel.backward`; the switches and the tile
pick are the package's (read at call time, so tests and benchmarks can set them)."""

from __future__ import annotations

import torch

import hamilton_attn.kernels.triton as tk


def common(q, va, rows, interp):
    """The constexpr launch arguments the dQ and dK/dV passes share."""
    return dict(
        KIND=va["kind"],
        SOFTCAP=va["SOFTCAP"],
        ALIBI_ON=va["ALIBI_ON"],
        QPOS_ON=va["QPOS_ON"],
        KPOS_ON=va["KPOS_ON"],
        ROWS=rows is not None,
        FAST=q.dtype == torch.bfloat16 and not interp,
        D=q.shape[-1],
        BD=tk._pow2(q.shape[-1]),
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
        UNIT=tk.LOG2E if va["kind"] == 0 else 1.0,
        INTERP=interp,
        MOD=va["MOD"],
        HG=tk.HEAD_GROUP,
    )


def dq_pass(q, k, v, dout, lse, delta, mask, scale, va, ag, agrad_on, rows,
             interp, jit, out=None):  # fmt: skip
    """dQ; with ``out`` (softmax) the pass also makes ``delta`` (``OWN_DELTA``)."""
    b, hq, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    bd = tk._pow2(d)
    dq = tk.zeros_bhsd(q, fill=False)
    (bm, bn, warps, stages), L = tk._pick(mask, "dq", d, interp, q.device, q.dtype == torch.float32)
    extra = {} if interp else dict(num_warps=warps, num_stages=stages)
    kd = vd = None
    if tk._use_tma(q, interp):
        kd, vd = tk._descriptor(k, bn, bd), tk._descriptor(v, bn, bd)
    tma = kd is not None and vd is not None
    jit.dq_kernel[(L.n_rows, b * hq)](
        q,
        kd if tma else k,
        vd if tma else v,
        dout,
        dq,
        lse,
        delta,
        dout if out is None else out,
        *tk.TritonKernel._lists_args(L, rows),
        va["alibi"],
        va["qpos"],
        va["kpos"],
        ag,
        va["modf"],
        va["modi"],
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *dout.stride()[:3],
        *dq.stride()[:3],
        *(dout if out is None else out).stride()[:3],
        hq,
        hq // hk,
        sq,
        sk,
        *tk._scalars(scale, va),
        AGRAD_ON=agrad_on,
        OWN_DELTA=out is not None,
        TMA=tma,
        **tk._list_flags(L, rows),
        BM=bm,
        BN=bn,
        **common(q, va, rows, interp),
        **extra,
    )
    return dq


def dkdv_pass(q, k, v, dout, lse, delta, mask, scale, va, rows, interp, jit,
               dqa, dq_add):  # fmt: skip
    """``(dk, dv, dqa)``: ``dqa`` holds the unscaled dQ where ``dq_add``."""
    b, hq, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    bd = tk._pow2(d)
    dk, dv = tk.zeros_bhsd(k, fill=False), tk.zeros_bhsd(v, fill=False)
    (bm, bn, warps, stages), L = tk._pick(
        mask, "dkdv", d, interp, q.device, q.dtype == torch.float32
    )
    extra = {} if interp else dict(num_warps=warps, num_stages=stages)
    qd = dd = None
    if tk._use_tma(q, interp):
        qd, dd = tk._descriptor(q, bm, bd), tk._descriptor(dout, bm, bd)
    tma = qd is not None and dd is not None
    dqd = tk._descriptor(dqa, bm, bd) if dq_add == 2 else None
    if dq_add == 2 and dqd is None:
        dq_add = 1
    if dqa is None:
        dqa = lse  # a placeholder the kernel does not read
    jit.dkdv_kernel[(L.n_rows, b * hk)](
        qd if tma else q,
        k,
        v,
        dd if tma else dout,
        dk,
        dv,
        lse,
        delta,
        *tk.TritonKernel._lists_args(L, rows),
        va["alibi"],
        va["qpos"],
        va["kpos"],
        dqd if dq_add == 2 else dqa,
        va["modf"],
        va["modi"],
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *dout.stride()[:3],
        *dk.stride()[:3],
        *dv.stride()[:3],
        *(dqa.stride()[:3] if dq_add else (0, 0, 0)),
        hq,
        hk,
        hq // hk,
        sq,
        sk,
        *tk._scalars(scale, va),
        TMA=tma,
        **tk._list_flags(L, rows),
        DQ_ADD=dq_add,
        BM=bm,
        BN=bn,
        **common(q, va, rows, interp),
        **extra,
    )
    return dk, dv, dqa
