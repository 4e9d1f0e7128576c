"""The Triton kernels of the ``triton`` backend: forward, delta, dQ and dK/dV.

Not imported as a normal module: :func:`hamilton_attn.kernels.triton.load` executes this
file once per mode (compiled, or Triton's interpreter when ``config.triton_interpret``),
because ``@triton.jit`` fixes the mode when it decorates, and a jit helper of one mode
cannot be called from a kernel of the other.

Every kernel walks CSR work lists (:mod:`.tiles`): a program owns one row tile (a query
tile, or a key tile for dK/dV) of one head and loops over the tiles of the other axis
that its mask meets; a tile with bands to test ("partial") gets each element checked
against them (``q0 <= i < q1``, ``k0 <= j < k1``, ``lo <= j - i <= hi``), a full one
none. Scores: ``s = scale * q.k``, softcap ``c * tanh(s / c)``, ALiBi ``s -= slope *
|i_pos + shift - j_pos|``; softmax works in base 2 (``log2 e`` folded into the scale),
sigmoid ``sigmoid(s + bias)`` and relu ``max(s, 0)`` in natural units. Masked scores are
-inf, which every weighting maps to 0.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Reductions through the standard library's combine functions, not tl.sum / tl.max /
# tl.zeros: those are jit functions decorated when triton.language was imported, in
# whichever mode that was, while the interpreter recognises these combiners (and runs
# them as numpy reductions).
_ADD = tl.standard._sum_combine
_MAX = tl.standard._elementwise_max


@triton.jit
def _bound(x, INTERP: tl.constexpr):
    """A loaded scalar as a loop bound. Triton 3.6's interpreter takes ``int()`` of a
    1-element array there, which NumPy >= 2.3 refuses: make the array 0-d (compiled
    code never generates this constexpr branch)."""
    if INTERP:
        x.handle.data = x.handle.data.reshape(())
    return x


@triton.jit
def _tanh(x, FAST: tl.constexpr):
    """tanh: the GPU's ``tanh.approx.f32`` (relative error about 2^-11, one special-function
    op) when ``FAST`` (bfloat16 inputs, compiled), else through exp (the interpreter has no
    libdevice; 1 - 2/(e^2x + 1) saturates cleanly at both ends) with an odd Taylor series
    below |x| = 1/4, where the difference from 1 would lose the small result's digits (a
    softcap of 2000 on scores of order 1)."""
    if FAST:
        # b32 registers (PTX accepts bit-size operands for f32 instructions).
        y = tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;",
            "=r,r",
            [x.to(tl.float32).to(tl.int32, bitcast=True)],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
        return y.to(tl.float32, bitcast=True)
    else:
        x2 = x * x  # the series' next term, 1382/155925 x^11, is below 2^-27 x there
        series = x * (
            1.0 + x2 * (-1.0 / 3 + x2 * (2.0 / 15 + x2 * (-17.0 / 315 + x2 * (62.0 / 2835))))
        )
        return tl.where(tl.abs(x) < 0.25, series, 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))


@triton.jit
def _sigmoid(x, FAST: tl.constexpr):
    """sigmoid; ``FAST``: ``0.5 tanh(x / 2) + 0.5`` with the approximate tanh (one
    special-function op instead of exp and a division)."""
    if FAST:
        return 0.5 * _tanh(0.5 * x, True) + 0.5
    else:
        return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _score(
    qk,
    qp,
    kp,
    slope,
    scale,
    softcap,
    UNIT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    FAST: tl.constexpr,
    b,
    h,
    shift,
    MODF,
    MODI,
    MOD: tl.constexpr,
    GRAD: tl.constexpr,
):
    """Transformed scores (times ``UNIT``) of raw dots ``qk``, tanh for softcap's
    derivative, and (``MOD`` and ``GRAD``) the score_mod's derivative (else unused). ``qp`` /
    ``kp`` broadcast against ``qk`` (either orientation). ``MOD``: the call's compiled
    score_mod (:mod:`.score_mod`) on the natural-unit score, global head ``h`` and
    positions ``qp - shift`` / ``kp``, before softcap and ALiBi."""
    # ``dm`` is always a tensor (where it is unused, one already computed), so the
    # returned tuple has one type in every specialisation
    if MOD:
        s0 = qk * scale
        if GRAD:
            s0, dm = _mod_bwd(s0, b, h, qp - shift, kp, MODF, MODI, FAST)
        else:
            s0 = _mod_fwd(s0, b, h, qp - shift, kp, MODF, MODI, FAST)
            dm = s0
        if SOFTCAP:
            th = _tanh(s0 / softcap, FAST)
            s = th * (softcap * UNIT)
        else:
            th = s0
            s = s0 * UNIT
    elif SOFTCAP:
        th = _tanh(qk * (scale / softcap), FAST)
        s = th * (softcap * UNIT)
        dm = th
    else:
        th = qk
        s = qk * (scale * UNIT)
        dm = qk
    if ALIBI:
        s = s - (slope * UNIT) * tl.abs(qp - kp).to(tl.float32)
    return s, th, dm


@triton.jit
def _mod_fwd(s, b, h, qi, kj, MODF, MODI, FAST: tl.constexpr):
    """The identity: a call's compiled score_mod replaces it (:mod:`.score_mod`)."""
    return s


@triton.jit
def _mod_bwd(s, b, h, qi, kj, MODF, MODI, FAST: tl.constexpr):
    """The identity and its derivative (replaced like :func:`_mod_fwd`)."""
    return s, tl.full(s.shape, 1.0, tl.float32)


@triton.jit
def _rows_vis(rows_lo, rows_hi, kj):
    """Per-row interval visibility (``lo[i] <= j <= hi[i]``, broadcast)."""
    return (kj >= rows_lo) & (kj <= rows_hi)


@triton.jit
def _rows_vis_u(rows_lo, rows_width, kj):
    """:func:`_rows_vis` as one subtraction and one unsigned comparison per element:
    ``0 <= j - lo[i] <= width[i]``, rows that see nothing given ``lo`` past every key
    and width 0 (:func:`_widths`)."""
    d = (kj - rows_lo).to(tl.uint32, bitcast=True)
    return d <= rows_width.to(tl.uint32, bitcast=True)


@triton.jit
def _widths(rlo, rhi):
    """Per-row ``(lo, width)`` for :func:`_rows_vis_u` from key intervals ``[lo, hi]``."""
    wid = rhi - rlo
    return tl.where(wid < 0, 1 << 30, rlo), tl.maximum(wid, 0)


@triton.jit
def _visible(qi, kj, BANDS, BAND_IDX, j0, j1, INTERP: tl.constexpr):
    """Whether pair (qi, kj) lies in any of bands ``BAND_IDX[j0:j1]`` (broadcast)."""
    vis = (qi < 0) & (kj < 0)
    d = kj - qi
    for j in range(_bound(j0, INTERP), _bound(j1, INTERP)):
        row = BANDS + tl.load(BAND_IDX + j) * 6
        q0 = tl.load(row)
        q1 = tl.load(row + 1)
        k0 = tl.load(row + 2)
        k1 = tl.load(row + 3)
        lo = tl.load(row + 4)
        hi = tl.load(row + 5)
        vis = vis | ((qi >= q0) & (qi < q1) & (kj >= k0) & (kj < k1) & (d >= lo) & (d <= hi))
    return vis


@triton.jit
def _entry(COL, B0, B1, e, c0, RANGE: tl.constexpr, STEP: tl.constexpr):
    """Work-list entry ``e``: its first element on the other axis (tiles of ``STEP``) and
    its band range; ``RANGE`` (consecutive tiles, row intervals): element ``c0 + e STEP``,
    no loads (K / V addresses affine in ``e``, which the software pipeliner prefetches)."""
    if RANGE:
        return c0 + e * STEP, 0, 0
    else:
        return tl.load(COL + e) * STEP, tl.load(B0 + e), tl.load(B1 + e)


@triton.jit
def _program(ORDER, HG: tl.constexpr):
    """This program's ``(row tile, batch x head)``. The grid is ``(row tiles, B x H)``
    and launches in linear order, ``ORDER`` lists the row tiles heaviest first. ``HG``
    1: one head's row tiles, then the next head's (a head's heavy tiles start only once
    the heads before it are dispatched); ``HG`` > 1: groups of ``HG`` heads, within one
    every head's heaviest tile first, then every head's next (the last group's heavy
    tiles start early; the K / V in flight are those of ``HG`` heads)."""
    if HG == 1:
        return tl.load(ORDER + tl.program_id(0)), tl.program_id(1)
    else:
        nr = tl.num_programs(0)
        lin = tl.program_id(1) * nr + tl.program_id(0)
        g0 = (lin // (HG * nr)) * HG
        gs = tl.minimum(HG, tl.num_programs(1) - g0)
        w = lin - g0 * nr
        return tl.load(ORDER + w // gs), g0 + w % gs


@triton.jit
def _row_tile(R0, R1, t, n, BM: tl.constexpr, RAGGED: tl.constexpr):
    """Row tile ``t``'s first row and the end its rows are tested against: ``RAGGED``
    (:func:`.tiles.ragged_lists`) from the lists, else ``t BM`` and the axis' length."""
    if RAGGED:
        return tl.load(R0 + t), tl.load(R1 + t)
    else:
        return t * BM, n


@triton.jit
def _load(ptr, idx, stride, n, D: tl.constexpr, BD: tl.constexpr, CHECK: tl.constexpr):
    """Rows ``idx`` of a ``[n, D]`` matrix as ``[len(idx), BD]`` (zeros past the ends);
    bounds are tested only where they can fail (``CHECK``: rows; BD > D: columns)."""
    dd = tl.arange(0, BD)
    p = ptr + idx[:, None] * stride + dd[None, :]
    if CHECK:
        return tl.load(p, mask=(idx[:, None] < n) & (dd[None, :] < D), other=0.0)
    elif BD != D:
        return tl.load(p, mask=dd[None, :] < D, other=0.0)
    else:
        return tl.load(p)


@triton.jit
def _load_kv(
    src,
    b,
    h,
    c,
    idx,
    stride,
    n,
    D: tl.constexpr,
    BD: tl.constexpr,
    BN: tl.constexpr,
    CHECK: tl.constexpr,
    TMA: tl.constexpr,
):
    """The tile of K or V from element ``c`` (rows ``idx``): ``src`` a 4-d ``[B, H, S,
    D]`` tensor descriptor when ``TMA`` (Hopper's bulk copy: no address arithmetic, zeros
    past the ends), else this head's base pointer."""
    if TMA:
        return src.load([b, h, c, 0]).reshape(BN, BD)
    else:
        return _load(src, idx, stride, n, D, BD, CHECK)


@triton.jit
def _head(src, b, h, s_b, s_h, TMA: tl.constexpr):
    """What a tile loader streams from for one (batch, head): the descriptor itself when
    ``TMA`` (it takes the indices per load), else the head's base pointer."""
    if TMA:
        return src
    else:
        return src + b.to(tl.int64) * s_b + h.to(tl.int64) * s_h


@triton.jit
def _store(ptr, idx, stride, n, x, D: tl.constexpr, BD: tl.constexpr):
    dd = tl.arange(0, BD)
    p = ptr + idx[:, None] * stride + dd[None, :]
    tl.store(p, x.to(ptr.dtype.element_ty), mask=(idx[:, None] < n) & (dd[None, :] < D))


@triton.jit
def _positions(POS, idx, n, shift, ON: tl.constexpr):
    """ALiBi positions: the given ones (int64), else ``idx + shift`` in int32 (int64 only
    when ``shift`` needs it)."""
    if ON:
        return tl.load(POS + idx, mask=idx < n, other=0) + shift
    else:
        return idx + shift


# fmt: off
@triton.jit
def _fwd_tile(
    acc, m_i, l_i, q, k_ptr, v_ptr, s_kn, s_vn, c, j0, j1, rows, rlo, rhi, qp, KPOS, slope,
    scale, softcap, bias, SK, BANDS, BAND_IDX, b, hk, qbase, hm, shift, MODF, MODI,
    KIND: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI_ON: tl.constexpr,
    KPOS_ON: tl.constexpr, MASKED: tl.constexpr, ROWS: tl.constexpr, FUSE: tl.constexpr,
    FAST: tl.constexpr, CAPMAX: tl.constexpr, SPLIT: tl.constexpr, BEHIND: tl.constexpr,
    TMA: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
    PREC: tl.constexpr, UNIT: tl.constexpr, INTERP: tl.constexpr, UVIS: tl.constexpr,
    MOD: tl.constexpr,
):
    """The key tile from element ``c`` of the forward: the online softmax update (or the
    plain sum).
    ``FUSE`` (plain softmax, scale > 0): the row max is taken on raw dots and the scale
    folded into one multiply-add per score, as FlashAttention does. ``SPLIT`` (ALiBi on
    implicit positions): scores are kept shifted by the row term ``slope (i_pos - qbase)``
    (``qbase`` the tile's first query position; the caller takes it out of the lse), so a
    tile whose keys all lie at or before its queries adds one per-key term to the dots
    (``slope (j - qbase)``) instead of an absolute distance per pair; ``BEHIND`` (the host
    knows every visible key lies at or before its query) drops the test for the others.
    ``FUSE`` with ``SPLIT`` (``BEHIND``, scale > 0): the per-key term, divided by the
    scale, is the dot's initial accumulator, so ALiBi runs plain softmax's update."""
    cols = c + tl.arange(0, BN)
    k = _load_kv(k_ptr, b, hk, c, cols, s_kn, SK, D, BD, BN, MASKED, TMA)
    if FUSE and SPLIT:
        term = ((slope / scale) * (cols - qbase).to(tl.float32))[None, :]
        init = tl.full([q.shape[0], BN], 0.0, tl.float32) + term
        qk = tl.dot(q, tl.trans(k), init, input_precision=PREC)
    else:
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
    if MASKED:
        if ROWS and UVIS:  # rhi holds the rows' widths (fwd_kernel)
            vis = _rows_vis_u(rlo[:, None], rhi[:, None], cols[None, :])
        elif ROWS:
            vis = _rows_vis(rlo[:, None], rhi[:, None], cols[None, :])
        else:
            vis = _visible(rows[:, None], cols[None, :], BANDS, BAND_IDX, j0, j1, INTERP)
    if FUSE:
        sc = scale * UNIT
        if MASKED:
            qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(qk, 1, _MAX) * sc)
        if MASKED:
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_safe = m_new
        p = tl.exp2(qk * sc - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.reduce(p, 1, _ADD)
        acc = acc * alpha[:, None]
        m_i = m_new
    else:
        if SPLIT:
            s, th, dm = _score(qk, 0, 0, slope, scale, softcap, UNIT, SOFTCAP, False, FAST,
                               b, hm, shift, MODF, MODI, False, False)
            su = slope * UNIT
            s = s + (su * (cols - qbase).to(tl.float32))[None, :]
            if not BEHIND:
                if c + BN - 1 > qbase:  # a key after some query: |d| = d + 2 max(-d, 0)
                    s = s - (2.0 * su) * tl.maximum(cols[None, :] - qp[:, None], 0).to(
                        tl.float32
                    )
        else:
            kp = _positions(KPOS, cols, SK, 0, KPOS_ON)
            s, th, dm = _score(qk, qp[:, None], kp[None, :], slope, scale, softcap, UNIT,
                               SOFTCAP, ALIBI_ON, FAST, b, hm, shift, MODF, MODI, MOD, False)
        if MASKED:
            s = tl.where(vis, s, float("-inf"))
        if KIND == 0 and CAPMAX:
            # softcap bounds every score by c: with c as the running max, no row max,
            # no rescale (p >= 2^(-2c log2 e): the host takes this path only where p
            # stays normal in the PV product's dtype, c log2 e <= 60, 7 for float16)
            p = tl.exp2(s - softcap * UNIT)
            l_i = l_i + tl.reduce(p, 1, _ADD)
        elif KIND == 0:
            m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.reduce(p, 1, _ADD)
            acc = acc * alpha[:, None]
            m_i = m_new
        elif KIND == 1:
            p = _sigmoid(s + bias, FAST)  # 0 at s = -inf (tanh.approx(-inf) is -1)
        else:
            p = tl.maximum(s, 0.0)
    v = _load_kv(v_ptr, b, hk, c, cols, s_vn, SK, D, BD, BN, MASKED, TMA)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, m_i, l_i


@triton.jit
def fwd_kernel(
    Q, K, V, O, LSE, ORDER, PTR, MID, COL, B0, B1, BAND_IDX, BANDS, RPTR, RSTART, RLEN,
    FIRST, RLO, RHI, R0, R1, ALIBI, QPOS, KPOS, MODF, MODI,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om,
    HQ, GROUP, SQ, SK, scale, softcap, bias, shift, head0,
    KIND: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI_ON: tl.constexpr,
    QPOS_ON: tl.constexpr, KPOS_ON: tl.constexpr, ROWS: tl.constexpr, FUSE: tl.constexpr,
    FLAT: tl.constexpr, RANGE: tl.constexpr, RAGGED: tl.constexpr, FAST: tl.constexpr,
    CAPMAX: tl.constexpr, SPLIT: tl.constexpr, BEHIND: tl.constexpr,
    TMA: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
    PREC: tl.constexpr, UNIT: tl.constexpr, INTERP: tl.constexpr, UVIS: tl.constexpr,
    MOD: tl.constexpr, HG: tl.constexpr,
):
    """Out (and lse) of one query tile of one head. ``TMA``: K and V are 4-d tensor
    descriptors, not pointers. ``RAGGED``: the tile's rows and first key from the lists
    (rows up to ``nq`` are this tile's)."""
    t, bh = _program(ORDER, HG)
    b = bh // HQ
    h = bh % HQ
    hk = h // GROUP
    row0, nq = _row_tile(R0, R1, t, SQ, BM, RAGGED)
    rows = row0 + tl.arange(0, BM)
    q = _load(Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh, rows, s_qm, nq, D, BD, True)
    k_ptr = _head(K, b, hk, s_kb, s_kh, TMA)
    v_ptr = _head(V, b, hk, s_vb, s_vh, TMA)
    slope = tl.load(ALIBI + bh) if ALIBI_ON else 0.0
    qp = _positions(QPOS, rows, SQ, shift, QPOS_ON)
    qbase = row0 + shift
    if ROWS:
        rlo = tl.load(RLO + rows, mask=rows < nq, other=1)
        rhi = tl.load(RHI + rows, mask=rows < nq, other=0)
        if UVIS:
            rlo, rhi = _widths(rlo, rhi)
    else:
        rlo = rows
        rhi = rows
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.full([BM], 0.0, tl.float32)
    acc = tl.full([BM, BD], 0.0, tl.float32)
    if FLAT:
        # one pipelined loop over every entry, full ones tested too (row intervals)
        em = tl.load(PTR + t)
    else:
        r0 = tl.load(RPTR + t)
        r1 = tl.load(RPTR + t + 1)
        for r in range(_bound(r0, INTERP), _bound(r1, INTERP)):
            u0 = tl.load(RSTART + r) * BN  # the run's first key, walked a tile a step
            u1 = u0 + tl.load(RLEN + r) * BN
            for u in range(_bound(u0, INTERP), _bound(u1, INTERP), BN):
                acc, m_i, l_i = _fwd_tile(
                    acc, m_i, l_i, q, k_ptr, v_ptr, s_kn, s_vn, u, 0, 0, rows, rlo, rhi, qp,
                    KPOS, slope, scale, softcap, bias, SK, BANDS, BAND_IDX, b, hk, qbase,
                    h + head0, shift, MODF, MODI, KIND, SOFTCAP, ALIBI_ON, KPOS_ON, False, ROWS,
                    FUSE, FAST, CAPMAX, SPLIT, BEHIND, TMA, D, BD, BN, PREC, UNIT, INTERP, UVIS,
                    MOD)
        em = tl.load(MID + t)
    e1 = tl.load(PTR + t + 1)
    c0 = tl.load(FIRST + t) - em * BN if RANGE else 0
    for e in range(_bound(em, INTERP), _bound(e1, INTERP)):
        c, j0, j1 = _entry(COL, B0, B1, e, c0, RANGE, BN)
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, k_ptr, v_ptr, s_kn, s_vn, c, j0,
            j1, rows, rlo, rhi, qp, KPOS, slope, scale, softcap, bias, SK, BANDS,
            BAND_IDX, b, hk, qbase, h + head0, shift, MODF, MODI, KIND, SOFTCAP, ALIBI_ON,
            KPOS_ON, True, ROWS, FUSE, FAST, CAPMAX, SPLIT, BEHIND, TMA, D, BD, BN, PREC, UNIT,
            INTERP, UVIS, MOD)
    if KIND == 0:
        if CAPMAX:
            m_i = tl.full([BM], 0.0, tl.float32) + softcap * UNIT
        if SPLIT:  # the row term the shifted scores carry
            m_i = m_i - (slope * UNIT) * (qp - qbase).to(tl.float32)
        seen = l_i > 0.0
        acc = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
        tl.store(LSE + bh.to(tl.int64) * SQ + rows, lse, mask=rows < nq)
    _store(O + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh, rows, s_om, nq, acc, D, BD)
# fmt: on
