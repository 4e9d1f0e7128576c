"""The backward kernels of the ``triton`` backend: delta, dQ and dK/dV (:mod:`.jit` has
the forward and the helpers).

Executed after :mod:`.jit`, into the same per-mode module, by
:func:`hamilton_attn.kernels.triton.load` (a jit function of one mode cannot call a helper
of the other), so the helpers below are that module's; the import under
``TYPE_CHECKING`` only names them for readers and linters.
"""

from typing import TYPE_CHECKING

import triton
import triton.language as tl

if TYPE_CHECKING:
    from .jit import (  # noqa: F401
        _ADD,
        LOG2E,
        _bound,
        _entry,
        _head,
        _load,
        _load_kv,
        _positions,
        _program,
        _row_tile,
        _rows_vis,
        _score,
        _sigmoid,
        _store,
        _visible,
    )


# fmt: off
@triton.jit
def delta_kernel(
    O, DO, DELTA, s_ob, s_oh, s_om, s_db, s_dh, s_dm, HQ, SQ,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
):
    """``delta[b, h, i] = dout_i . out_i`` in float32 (the softmax backward's row term)."""
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    dd = tl.arange(0, BD)
    m = (rows[:, None] < SQ) & (dd[None, :] < D)
    o = tl.load(
        O + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + rows[:, None] * s_om + dd[None, :],
        mask=m,
        other=0.0,
    ).to(tl.float32)
    do = tl.load(
        DO + b.to(tl.int64) * s_db + h.to(tl.int64) * s_dh + rows[:, None] * s_dm + dd[None, :],
        mask=m,
        other=0.0,
    ).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * SQ + rows, tl.reduce(o * do, 1, _ADD), mask=rows < SQ)


@triton.jit
def _ds(s, dp, th, lse2, delta, bias, KIND: tl.constexpr, FAST: tl.constexpr):
    """``(weights, d(loss)/d(final score))`` from masked scores ``s``, ``dp = dO . v``
    (``lse2`` / ``delta`` broadcast like ``s``); the softcap factor is applied by the
    caller after the ALiBi slope's use of the final-score gradient."""
    if KIND == 0:
        p = tl.exp2(s - lse2)
        ds = p * (dp - delta)
    elif KIND == 1:
        p = _sigmoid(s + bias, FAST)
        ds = dp * p * (1.0 - p)
    else:
        p = tl.maximum(s, 0.0)
        ds = tl.where(s > 0.0, dp, 0.0)
    return p, ds


@triton.jit
def _chain(ds, p, th, dm, SOFTCAP: tl.constexpr, MOD: tl.constexpr):
    """``ds`` times softcap's factor ``1 - th^2`` and the score_mod's derivative ``dm``.
    With a score_mod, 0 where the weight ``p`` is 0 (keys a row cannot see, padding past
    the ends: a row made NaN by the mod keeps its NaN to itself), where ``ds`` is (a NaN or
    infinite slope there stays out) and where ``dm`` is (a mod that ignores the score
    passes no gradient, as torch's backward gives none)."""
    if MOD:
        keep = (p != 0.0) & (ds != 0.0) & (dm != 0.0)
        if SOFTCAP:
            return tl.where(keep, ds * ((1.0 - th * th) * dm), 0.0)
        else:
            return tl.where(keep, ds * dm, 0.0)
    elif SOFTCAP:
        return ds * (1.0 - th * th)
    else:
        return ds


@triton.jit
def _dq_tile(
    dq, dsl, q, do, lse2, delta, k_ptr, v_ptr, s_kn, s_vn, c, j0, j1, rows, rlo, rhi, qp,
    KPOS, slope, scale, softcap, bias, SK, BANDS, BAND_IDX, b, hk, hm, shift, MODF, MODI,
    KIND: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI_ON: tl.constexpr,
    KPOS_ON: tl.constexpr, AGRAD_ON: tl.constexpr, MASKED: tl.constexpr,
    ROWS: tl.constexpr, FAST: tl.constexpr, TMA: tl.constexpr, D: tl.constexpr,
    BD: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, UNIT: tl.constexpr,
    INTERP: tl.constexpr, MOD: tl.constexpr,
):
    cols = c + tl.arange(0, BN)
    k = _load_kv(k_ptr, b, hk, c, cols, s_kn, SK, D, BD, BN, MASKED, TMA)
    v = _load_kv(v_ptr, b, hk, c, cols, s_vn, SK, D, BD, BN, MASKED, TMA)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC)
    kp = _positions(KPOS, cols, SK, 0, KPOS_ON)
    s, th, dm = _score(qk, qp[:, None], kp[None, :], slope, scale, softcap, UNIT, SOFTCAP,
                       ALIBI_ON, FAST, b, hm, shift, MODF, MODI, MOD, True)
    if MASKED:
        if ROWS:
            vis = _rows_vis(rlo[:, None], rhi[:, None], cols[None, :])
        else:
            vis = _visible(rows[:, None], cols[None, :], BANDS, BAND_IDX, j0, j1, INTERP)
        s = tl.where(vis, s, float("-inf"))
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    p, ds = _ds(s, dp, th, lse2[:, None], delta[:, None], bias, KIND, FAST)
    if AGRAD_ON:
        dsl += tl.reduce(ds * tl.abs(qp[:, None] - kp[None, :]).to(tl.float32), 1, _ADD)
    ds = _chain(ds, p, th, dm, SOFTCAP, MOD)
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    return dq, dsl


@triton.jit
def dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, O, ORDER, PTR, MID, COL, B0, B1, BAND_IDX, BANDS,
    RPTR, RSTART, RLEN, FIRST, RLO, RHI, R0, R1, ALIBI, QPOS, KPOS, AGRAD, MODF, MODI,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_db, s_dh, s_dm,
    s_gb, s_gh, s_gm, s_ob, s_oh, s_om, HQ, GROUP, SQ, SK, scale, softcap, bias, shift,
    head0,
    KIND: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI_ON: tl.constexpr,
    QPOS_ON: tl.constexpr, KPOS_ON: tl.constexpr, AGRAD_ON: tl.constexpr,
    OWN_DELTA: tl.constexpr,
    ROWS: tl.constexpr, FLAT: tl.constexpr, RANGE: tl.constexpr, RAGGED: tl.constexpr,
    FAST: tl.constexpr,
    TMA: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, PREC: tl.constexpr, UNIT: tl.constexpr, INTERP: tl.constexpr,
    MOD: tl.constexpr, HG: tl.constexpr,
):
    """dQ of one query tile of one head (and its rows' share of d slope for ALiBi).
    ``TMA``: K and V are tensor descriptors. ``RAGGED``: as in the forward.
    ``OWN_DELTA`` (softmax): the tile's ``delta = dO . out`` made here from ``O`` and
    stored into ``DELTA`` for the dK/dV pass after it (no delta kernel: one read of dO
    fewer, one launch fewer)."""
    t, bh = _program(ORDER, HG)
    b = bh // HQ
    h = bh % HQ
    hk = h // GROUP
    row0, nq = _row_tile(R0, R1, t, SQ, BM, RAGGED)
    rows = row0 + tl.arange(0, BM)
    q = _load(Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh, rows, s_qm, nq, D, BD, True)
    do = _load(DO + b.to(tl.int64) * s_db + h.to(tl.int64) * s_dh, rows, s_dm, nq, D, BD,
               True)
    k_ptr = _head(K, b, hk, s_kb, s_kh, TMA)
    v_ptr = _head(V, b, hk, s_vb, s_vh, TMA)
    if KIND == 0:
        lse = tl.load(LSE + bh.to(tl.int64) * SQ + rows, mask=rows < nq, other=float("inf"))
        # A row that sees nothing anywhere (lse -inf) has p = 0 everywhere.
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
        if OWN_DELTA:
            o = _load(O + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh, rows, s_om, nq, D,
                      BD, True)
            delta = tl.reduce(o.to(tl.float32) * do.to(tl.float32), 1, _ADD)
            tl.store(DELTA + bh.to(tl.int64) * SQ + rows, delta, mask=rows < nq)
        else:
            delta = tl.load(DELTA + bh.to(tl.int64) * SQ + rows, mask=rows < nq, other=0.0)
    else:
        lse2 = tl.full([BM], 0.0, tl.float32)
        delta = lse2
    slope = tl.load(ALIBI + bh) if ALIBI_ON else 0.0
    qp = _positions(QPOS, rows, SQ, shift, QPOS_ON)
    if ROWS:
        rlo = tl.load(RLO + rows, mask=rows < nq, other=1)
        rhi = tl.load(RHI + rows, mask=rows < nq, other=0)
    else:
        rlo = rows
        rhi = rows
    dq = tl.full([BM, BD], 0.0, tl.float32)
    dsl = tl.full([BM], 0.0, tl.float32)
    if FLAT:  # as in the forward
        em = tl.load(PTR + t)
    else:
        r0 = tl.load(RPTR + t)
        r1 = tl.load(RPTR + t + 1)
        for r in range(_bound(r0, INTERP), _bound(r1, INTERP)):
            u0 = tl.load(RSTART + r) * BN  # the run's first key, walked a tile a step
            u1 = u0 + tl.load(RLEN + r) * BN
            for u in range(_bound(u0, INTERP), _bound(u1, INTERP), BN):
                dq, dsl = _dq_tile(
                    dq, dsl, q, do, lse2, delta, k_ptr, v_ptr, s_kn, s_vn, u, 0, 0, rows, rlo,
                    rhi, qp, KPOS, slope, scale, softcap, bias, SK, BANDS, BAND_IDX, b, hk,
                    h + head0, shift, MODF, MODI, KIND, SOFTCAP, ALIBI_ON, KPOS_ON, AGRAD_ON,
                    False, ROWS, FAST, TMA, D, BD, BN, PREC, UNIT, INTERP, MOD)
        em = tl.load(MID + t)
    e1 = tl.load(PTR + t + 1)
    c0 = tl.load(FIRST + t) - em * BN if RANGE else 0  # as in the forward
    for e in range(_bound(em, INTERP), _bound(e1, INTERP)):
        c, j0, j1 = _entry(COL, B0, B1, e, c0, RANGE, BN)
        dq, dsl = _dq_tile(
            dq, dsl, q, do, lse2, delta, k_ptr, v_ptr, s_kn, s_vn, c,
            j0, j1, rows, rlo, rhi, qp, KPOS, slope, scale, softcap,
            bias, SK, BANDS, BAND_IDX, b, hk, h + head0, shift, MODF, MODI, KIND, SOFTCAP,
            ALIBI_ON, KPOS_ON, AGRAD_ON, True, ROWS, FAST, TMA, D, BD, BN, PREC, UNIT, INTERP,
            MOD)
    _store(DQ + b.to(tl.int64) * s_gb + h.to(tl.int64) * s_gh, rows, s_gm, nq, dq * scale, D,
           BD)
    if AGRAD_ON:
        tl.atomic_add(AGRAD + bh, -tl.reduce(dsl, 0, _ADD))


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, q_ptr, do_ptr, s_qm, s_dm, LSE, DELTA, bh, r, j0, j1, cols, kp, QPOS,
    RLO, RHI, slope, scale, softcap, bias, shift, SQ, BANDS, BAND_IDX, b, h, dqa, s_am,
    hm, MODF, MODI,
    KIND: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI_ON: tl.constexpr,
    QPOS_ON: tl.constexpr, MASKED: tl.constexpr, ROWS: tl.constexpr, FAST: tl.constexpr,
    TMA: tl.constexpr, DQ_ADD: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BM: tl.constexpr, PREC: tl.constexpr, UNIT: tl.constexpr, INTERP: tl.constexpr,
    MOD: tl.constexpr,
):
    """The share of the query tile from row ``r`` in a key tile's dK / dV (scores
    transposed: keys x rows). ``DQ_ADD`` (1: atomics, 2: TMA reduce-adds into the
    descriptor ``dqa``): its dQ share, unscaled, added into float32 ``dqa`` as well."""
    rows = r + tl.arange(0, BM)
    q = _load_kv(q_ptr, b, h, r, rows, s_qm, SQ, D, BD, BM, MASKED, TMA)
    do = _load_kv(do_ptr, b, h, r, rows, s_dm, SQ, D, BD, BM, MASKED, TMA)
    qkT = tl.dot(k, tl.trans(q), input_precision=PREC)
    qp = _positions(QPOS, rows, SQ, shift, QPOS_ON)
    s, th, dm = _score(qkT, qp[None, :], kp[:, None], slope, scale, softcap, UNIT, SOFTCAP,
                       ALIBI_ON, FAST, b, hm, shift, MODF, MODI, MOD, True)
    if MASKED:
        if ROWS:
            rlo = tl.load(RLO + rows, mask=rows < SQ, other=1)
            rhi = tl.load(RHI + rows, mask=rows < SQ, other=0)
            vis = _rows_vis(rlo[None, :], rhi[None, :], cols[:, None])
        else:
            vis = _visible(rows[None, :], cols[:, None], BANDS, BAND_IDX, j0, j1, INTERP)
        s = tl.where(vis, s, float("-inf"))
    dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
    if KIND == 0:
        if MASKED:
            lse = tl.load(LSE + bh.to(tl.int64) * SQ + rows, mask=rows < SQ, other=float("inf"))
            delta = tl.load(DELTA + bh.to(tl.int64) * SQ + rows, mask=rows < SQ, other=0.0)
        else:
            lse = tl.load(LSE + bh.to(tl.int64) * SQ + rows)
            delta = tl.load(DELTA + bh.to(tl.int64) * SQ + rows)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    else:
        lse2 = tl.full([BM], 0.0, tl.float32)
        delta = lse2
    pT, dsT = _ds(s, dpT, th, lse2[None, :], delta[None, :], bias, KIND, FAST)
    dsT = _chain(dsT, pT, th, dm, SOFTCAP, MOD)
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
    dsT = dsT.to(q.dtype)
    dk = tl.dot(dsT, q, dk, input_precision=PREC)
    if DQ_ADD == 1:
        dq = tl.dot(tl.trans(dsT), k, input_precision=PREC)
        dd = tl.arange(0, BD)
        tl.atomic_add(dqa + rows[:, None] * s_am + dd[None, :], dq,
                      mask=(rows[:, None] < SQ) & (dd[None, :] < D), sem="relaxed")
    elif DQ_ADD == 2:
        dq = tl.dot(tl.trans(dsT), k, input_precision=PREC)
        dqa.atomic_add([b, h, r, 0], dq.reshape(1, 1, BM, BD))
    return dk, dv


@triton.jit
def dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, ORDER, PTR, MID, COL, B0, B1, BAND_IDX, BANDS,
    RPTR, RSTART, RLEN, FIRST, RLO, RHI, R0, R1, ALIBI, QPOS, KPOS, DQA, MODF, MODI,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_db, s_dh, s_dm,
    s_kgb, s_kgh, s_kgn, s_vgb, s_vgh, s_vgn, s_ab, s_ah, s_am,
    HQ, HK, GROUP, SQ, SK, scale, softcap, bias, shift, head0,
    KIND: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI_ON: tl.constexpr,
    QPOS_ON: tl.constexpr, KPOS_ON: tl.constexpr, ROWS: tl.constexpr, FLAT: tl.constexpr,
    RANGE: tl.constexpr, RAGGED: tl.constexpr, DQ_ADD: tl.constexpr, FAST: tl.constexpr, TMA: tl.constexpr, D: tl.constexpr,
    BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
    UNIT: tl.constexpr, INTERP: tl.constexpr, MOD: tl.constexpr,
    HG: tl.constexpr,
):
    """dK and dV of one key tile of one KV head, summed over the query heads sharing it
    (GQA: no atomics, no reduction pass). ``TMA``: Q and dO are tensor descriptors.
    ``DQ_ADD``: dQ too, added into float32 ``DQA`` (``[B, HQ, SQ, D]``; a TMA descriptor
    for 2), which then needs no dQ pass.
    ``RAGGED``: the key tile's keys (up to ``nk``) and first query row from the lists."""
    u, bhk = _program(ORDER, HG)
    b = bhk // HK
    hk = bhk % HK
    col0, nk = _row_tile(R0, R1, u, SK, BN, RAGGED)
    cols = col0 + tl.arange(0, BN)
    k = _load(K + b.to(tl.int64) * s_kb + hk.to(tl.int64) * s_kh, cols, s_kn, nk, D, BD, True)
    v = _load(V + b.to(tl.int64) * s_vb + hk.to(tl.int64) * s_vh, cols, s_vn, nk, D, BD, True)
    kp = _positions(KPOS, cols, SK, 0, KPOS_ON)
    dk = tl.full([BN, BD], 0.0, tl.float32)
    dv = tl.full([BN, BD], 0.0, tl.float32)
    r0 = tl.load(RPTR + u)
    r1 = tl.load(RPTR + u + 1)
    em = tl.load(PTR + u) if FLAT else tl.load(MID + u)  # FLAT: as in the forward
    e1 = tl.load(PTR + u + 1)
    c0 = tl.load(FIRST + u) - em * BM if RANGE else 0  # as in the forward
    for g in range(0, _bound(GROUP, INTERP)):
        h = hk * GROUP + g
        bh = b * HQ + h
        q_ptr = _head(Q, b, h, s_qb, s_qh, TMA)
        do_ptr = _head(DO, b, h, s_db, s_dh, TMA)
        dqa = _head(DQA, b, h, s_ab, s_ah, DQ_ADD == 2)
        slope = tl.load(ALIBI + bh) if ALIBI_ON else 0.0
        if not FLAT:
            for r in range(_bound(r0, INTERP), _bound(r1, INTERP)):
                t0 = tl.load(RSTART + r) * BM  # as in the forward, rows
                t1 = t0 + tl.load(RLEN + r) * BM
                for t in range(_bound(t0, INTERP), _bound(t1, INTERP), BM):
                    dk, dv = _dkdv_tile(
                        dk, dv, k, v, q_ptr, do_ptr, s_qm, s_dm, LSE, DELTA, bh, t, 0, 0, cols,
                        kp, QPOS, RLO, RHI, slope, scale, softcap, bias, shift, SQ, BANDS,
                        BAND_IDX, b, h, dqa, s_am, h + head0, MODF, MODI, KIND, SOFTCAP,
                        ALIBI_ON, QPOS_ON, False, ROWS, FAST, TMA, DQ_ADD, D, BD, BM, PREC, UNIT,
                        INTERP, MOD)
        for e in range(_bound(em, INTERP), _bound(e1, INTERP)):
            r, j0, j1 = _entry(COL, B0, B1, e, c0, RANGE, BM)
            dk, dv = _dkdv_tile(
                dk, dv, k, v, q_ptr, do_ptr, s_qm, s_dm, LSE, DELTA, bh, r,
                j0, j1, cols, kp, QPOS, RLO, RHI, slope, scale,
                softcap, bias, shift, SQ, BANDS, BAND_IDX, b, h, dqa, s_am, h + head0, MODF,
                MODI, KIND, SOFTCAP, ALIBI_ON, QPOS_ON, True, ROWS, FAST, TMA, DQ_ADD, D, BD, BM,
                PREC, UNIT, INTERP, MOD)
    _store(DK + b.to(tl.int64) * s_kgb + hk.to(tl.int64) * s_kgh, cols, s_kgn, nk, dk * scale,
           D, BD)
    _store(DV + b.to(tl.int64) * s_vgb + hk.to(tl.int64) * s_vgh, cols, s_vgn, nk, dv, D, BD)
# fmt: on
