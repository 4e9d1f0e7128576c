"""Edge cases of the compat layers found by outside tests (issue #14).

* The Hamilton causal function fed k / v lists in the reference implementation's
  layout, forward and backward against a float64 oracle over the global sequence.
* MagiAttention's sliding-window inference with more queries than keys, and
  ``AttnRanges.from_cu_seqlens`` edge inputs.

Legend: B batch, S tokens (global), W world size (n), m = W - 1 cycles, c tokens per
reference chunk. Tensors are ``bshd``; ``*_l`` are a rank's local shards.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from hamilton_attn.compat import hamilton as hc
from hamilton_attn.compat.magi import (
    AttnMaskType,
    AttnRange,
    AttnRanges,
    infer_attn_mask_from_cu_seqlens,
    infer_attn_mask_from_sliding_window,
)
from hamilton_attn.testing.oracle import attention_oracle, dense_from_rects, dense_window

TOL = 1e-9


# -- Hamilton causal: the reference's k / v lists ----------------------------------------


def _ref_chunks(w: int, r: int, c: int):
    """Global token positions of rank r's q shard and of each k / v list entry, as the
    reference's test harness lays them out: the sequence is cut into 2*m*n chunks of c
    tokens; q holds chunks r*m .. r*m+m-1 then (2n-1-r)*m .. (2n-1-r)*m+m-1 (zigzag
    blocks r and 2n-1-r); k / v entry j holds chunk r*m+j followed by chunk
    2*m*n - m - r*m + j (piece j of each zigzag half)."""
    n, m = w, w - 1

    def chunk(i):
        return torch.arange(i * c, (i + 1) * c)

    first = [chunk(r * m + j) for j in range(m)]
    second = [chunk(2 * m * n - m - r * m + j) for j in range(m)]
    q_idx = torch.cat(first + second)
    kv_idx = [torch.cat([chunk(r * m + j), chunk(2 * m * n - m - r * m + j)]) for j in range(m)]
    return q_idx, kv_idx


def _w_reference_lists(ctx, c, layout, scale):
    w, r = ctx.world_size, ctx.rank
    s = 2 * (w - 1) * w * c
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("ref_lists", w, c, layout)).encode()))
    q, g = (torch.randn(1, s, 2, 4, dtype=torch.float64, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, s, 1, 4, dtype=torch.float64, generator=gen) for _ in range(2))

    # float64 oracle from the definition: causal attention over the global sequence
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    sc = scale if scale is not None else 4**-0.5
    ref_out, ref_lse = attention_oracle(*(t.transpose(1, 2) for t in leaves), causal, sc)
    ref_out = ref_out.transpose(1, 2)
    ref_dq, ref_dk, ref_dv = torch.autograd.grad((ref_out * g).sum(), leaves)

    q_idx, kv_idx = _ref_chunks(w, r, c)

    def prep(t):
        return t.transpose(1, 2).clone() if layout == "BNSD" else t.clone()

    q_l = prep(q[:, q_idx]).requires_grad_()
    k_l = [prep(k[:, i]).requires_grad_() for i in kv_idx]
    v_l = [prep(v[:, i]).requires_grad_() for i in kv_idx]
    out, lse = hc.hamilton_attention_forward_causal_flash_attn(
        ctx.group, q_l, k_l, v_l, scale, world_size=w, layout=layout
    )
    gl = prep(g[:, q_idx])
    dq, *dkv = torch.autograd.grad((out * gl).sum(), [q_l, *k_l, *v_l])
    dk, dv = dkv[: w - 1], dkv[w - 1 :]

    def err(a, b):
        return (prep(b) - a.detach()).abs().max().item()

    return {
        "out": err(out, ref_out[:, q_idx]),
        "lse": (lse - ref_lse[:, :, q_idx]).abs().max().item(),
        "dq": err(dq, ref_dq[:, q_idx]),
        "dk": max(err(a, ref_dk[:, i]) for a, i in zip(dk, kv_idx, strict=True)),
        "dv": max(err(a, ref_dv[:, i]) for a, i in zip(dv, kv_idx, strict=True)),
    }


@pytest.mark.parametrize(
    "w, c, layout, scale", [(3, 2, "BSND", None), (5, 1, "BNSD", 0.3), (8, 1, "BSND", None)]
)
def test_hamilton_causal_reference_kv_lists_forward_backward(pool, w, c, layout, scale):
    per_rank = pool.run(_w_reference_lists, w, c, layout, scale)
    assert len(per_rank) == w
    for rank, errs in enumerate(per_rank):
        for name, e in errs.items():
            assert e <= TOL, f"rank {rank} W={w}: {name} error {e:.3e}"


def _w_odd_entries(ctx):
    """k / v entries of odd length cannot hold one equal piece of each zigzag half."""
    w, r = ctx.world_size, ctx.rank
    gen = torch.Generator().manual_seed(1234 + r)
    q_l = torch.randn(1, 6, 2, 4, dtype=torch.float64, generator=gen)
    k_l, v_l = (torch.randn(1, 6, 1, 4, dtype=torch.float64, generator=gen) for _ in range(2))
    try:
        hc.hamilton_attention_forward_causal_flash_attn(
            ctx.group,
            q_l,
            list(k_l.split([3, 3], 1)),
            list(v_l.split([3, 3], 1)),
            None,
            world_size=w,
        )
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return type(e).__name__, str(e)
    return "ok", ""


def test_hamilton_causal_odd_kv_entries_raise(pool):
    for kind, msg in pool.run(_w_odd_entries, 3):
        assert kind == "ValueError" and "k[0]" in msg and "even" in msg, (kind, msg)


# -- MagiAttention: sliding windows with more queries than keys -------------------------


def _magi_window_dense(q_range, k_range, window, sq, sk):
    """MagiAttention's rule (its tests' reference): only the last ``min(Lq, Lk)`` query
    rows of the rectangle take part; among them flash-attn's bottom-right window. With
    Lq > Lk the first Lq - Lk rows see nothing, even where the right window reaches."""
    (q0, q1), (k0, k1) = q_range, k_range
    lq = min(q1 - q0, k1 - k0)
    dense = torch.zeros(sq, sk, dtype=torch.bool)
    dense[q1 - lq : q1, k0:k1] = dense_window(lq, k1 - k0, *window)
    return dense


def _dense_of(qs, ks, types, sq, sk):
    return dense_from_rects(qs.to_naive_ranges(), ks.to_naive_ranges(), types, sq, sk)


def _area(q_range, k_range, kind, size) -> int:
    q, k = [q_range.to_naive_range()], [k_range.to_naive_range()]
    return int(dense_from_rects(q, k, [kind], size, size).sum())


# MagiAttention's test_infer_attn_mask_from_sliding_window cases: (q, k, square size)
MAGI_WINDOW_CASES = {
    "testcase1": ((5, 25), (5, 25), 30),
    "testcase2": ((5, 15), (7, 30), 35),
    "testcase3": ((5, 30), (10, 20), 30),
    "testcase4": ((10, 20), (5, 45), 50),
    "testcase5": ((3, 25), (20, 24), 40),
    "q_longer_right_reaches": ((2, 20), (0, 9), 24),
}


@pytest.mark.parametrize("name", list(MAGI_WINDOW_CASES))
def test_magi_sliding_window_follows_magiattention(name):
    q_range, k_range, size = MAGI_WINDOW_CASES[name]
    lk = k_range[1] - k_range[0]
    wrong = []
    # every window its test tries: each side -1 (unbounded) .. Lk - 1
    for left in range(-1, lk):
        for right in range(-1, lk):
            qs, ks, types = infer_attn_mask_from_sliding_window(
                AttnRange(*q_range), AttnRange(*k_range), (left, right)
            )
            assert all(isinstance(t, AttnMaskType) for t in types)
            got = _dense_of(qs, ks, types, size, size)
            want = _magi_window_dense(q_range, k_range, (left, right), size, size)
            # disjoint rectangles: their areas add up to the union's
            area = sum(_area(a, b, t, size) for a, b, t in zip(qs, ks, types, strict=True))
            if not torch.equal(got, want) or area != int(got.sum()):
                wrong.append((left, right))
    assert not wrong, f"{name}: {len(wrong)} of {(lk + 1) ** 2} windows differ, first {wrong[:5]}"


def test_magi_cu_seqlens_window_drops_rows_like_sliding_window():
    """Without global tokens MagiAttention's varlen window is the sliding-window
    inference per document, so a document with more queries than keys drops rows too."""
    cu_q, cu_k = [0, 12, 15, 27], [0, 5, 11, 20]
    for window in ((2, 3), (-1, 1), (0, -1), (1, 0), (-1, -1)):
        qs, ks, types, tq, tk = infer_attn_mask_from_cu_seqlens(cu_q, cu_k, window_size=window)
        want = torch.zeros(tq, tk, dtype=torch.bool)
        for i in range(3):
            want |= _magi_window_dense(
                (cu_q[i], cu_q[i + 1]), (cu_k[i], cu_k[i + 1]), window, tq, tk
            )
        if window == (-1, -1):
            # MagiAttention's full-window varlen mask is one FULL rectangle per document
            docs_q, docs_k = list(zip(cu_q, cu_q[1:])), list(zip(cu_k, cu_k[1:]))
            want = dense_from_rects(docs_q, docs_k, "full", tq, tk)
        assert torch.equal(_dense_of(qs, ks, types, tq, tk), want), window


def test_magi_attn_ranges_from_cu_seqlens_edges():
    empty = AttnRanges.from_cu_seqlens([], 0)
    assert isinstance(empty, AttnRanges) and len(empty) == 0 and empty.to_naive_ranges() == []
    assert AttnRanges.from_cu_seqlens([0, 49, 58, 89], 89).to_naive_ranges() == [
        (0, 49),
        (49, 58),
        (58, 89),
    ]
    for bad in ([0, 49, 49, 58, 89], [0, 49, 30, 89], [3, 49, 89]):
        with pytest.raises(ValueError, match="cu_seqlens.*strictly increasing"):
            AttnRanges.from_cu_seqlens(bad, 89)
    with pytest.raises(ValueError, match="cu_seqlens.*seq_len=90"):
        AttnRanges.from_cu_seqlens([0, 49, 89], 90)
