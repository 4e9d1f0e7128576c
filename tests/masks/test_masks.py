"""Mask builders and queries against brute-force dense masks built from the spec."""

from __future__ import annotations

import random
import time

import pytest
import torch

from hamilton_attn.masks import AttnMaskType, Mask
from hamilton_attn.testing.oracle import (
    dense_block_causal,
    dense_from_band,
    dense_from_rects,
    dense_prefix_lm,
    dense_shared_question,
    dense_varlen,
    dense_window,
    rect_dense,
)

SIZES = [(1, 1), (1, 97), (97, 1), (59, 59), (97, 97), (59, 97), (97, 59), (7, 3), (3, 7)]
TYPE_NAMES = ["full", "causal", "inv_causal", "bi_causal"]


def _size_id(s):
    return f"{s[0]}x{s[1]}"


def check_structure(mask: Mask, dense: torch.Tensor, tag: str = "") -> None:
    """Every invariant a Mask promises, checked against the expected dense matrix."""
    sq, sk = mask.shape
    assert tuple(dense.shape) == (sq, sk), tag
    got = mask.to_dense()
    assert got.dtype == torch.bool and tuple(got.shape) == (sq, sk), tag
    assert torch.equal(got, dense), (
        f"{tag}: to_dense differs at {(got ^ dense).nonzero()[:5].tolist()}"
    )
    assert mask.area() == int(dense.sum()), tag
    assert mask.is_empty() == (not dense.any()), tag
    # Bands: normalised (no empty row or column in their box), disjoint, sorted.
    cover = torch.zeros(sq, sk, dtype=torch.int64)
    for b in mask.bands:
        assert 0 <= b.q0 < b.q1 <= sq and 0 <= b.k0 < b.k1 <= sk, f"{tag}: {b} outside the grid"
        bd = dense_from_band(b.q0, b.q1, b.k0, b.k1, b.lo, b.hi, sq, sk)
        box = bd[b.q0 : b.q1, b.k0 : b.k1]
        assert box.any(dim=1).all() and box.any(dim=0).all(), f"{tag}: {b} not normalised"
        assert b.area() == int(box.sum()), f"{tag}: {b}.area()"
        cover[b.q0 : b.q1, b.k0 : b.k1] += box
    assert cover.max() <= 1 if cover.numel() else True, f"{tag}: bands overlap"
    assert torch.equal(cover.bool(), dense), f"{tag}: bands do not cover the mask"
    keys = [(b.q0, b.k0) for b in mask.bands]
    assert keys == sorted(keys), f"{tag}: bands unsorted"
    # Typed ranges: disjoint rectangles that reproduce the mask under the spec.
    ranges = mask.ranges
    rebuilt = torch.zeros(sq, sk, dtype=torch.int64)
    for (q0, q1), (k0, k1), t in ranges:
        assert isinstance(t, AttnMaskType), tag
        assert 0 <= q0 < q1 <= sq and 0 <= k0 < k1 <= sk, f"{tag}: range {(q0, q1, k0, k1)}"
        rebuilt[q0:q1, k0:k1] += rect_dense(q1 - q0, k1 - k0, t).long()
    assert rebuilt.max() <= 1 if rebuilt.numel() else True, f"{tag}: typed ranges overlap"
    assert torch.equal(rebuilt.bool(), dense), f"{tag}: typed ranges do not reproduce the mask"


# -- builders vs spec ---------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES, ids=_size_id)
def test_full(size):
    sq, sk = size
    m = Mask.full(sq, sk)
    check_structure(m, torch.ones(sq, sk, dtype=torch.bool), "full")
    assert m.is_full() and m.kind() == AttnMaskType.FULL


@pytest.mark.parametrize("size", SIZES, ids=_size_id)
def test_causal(size):
    sq, sk = size
    m = Mask.causal(sq, sk)
    i = torch.arange(sq).view(-1, 1)
    j = torch.arange(sk).view(1, -1)
    dense = j <= i + (sk - sq)
    check_structure(m, dense, "causal")
    if dense.all():  # 1 x N, or N x 1 with N <= 1: the causal set is the full grid
        assert m.kind() == AttnMaskType.FULL
    else:
        assert m.kind() == AttnMaskType.CAUSAL


def test_causal_more_queries_than_keys_top_rows_empty():
    sq, sk = 97, 59
    dense = Mask.causal(sq, sk).to_dense()
    empty = sq - sk  # rows 0 .. sq-sk-1 see nothing, row sq-sk sees key 0
    assert not dense[:empty].any()
    assert dense[empty].tolist() == [True] + [False] * (sk - 1)
    assert dense[-1].all()
    assert Mask.causal(sq, sk).area() == sk * (sk + 1) // 2


def test_square_default_seqlen_k():
    assert Mask.causal(59) == Mask.causal(59, 59)
    assert Mask.full(59).shape == (59, 59)


WINDOWS = [(-1, 0), (0, 0), (3, -1), (-1, -1), (0, -1), (2, 5), (5, 2), (0, 3), (200, 0)]


@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("size", SIZES, ids=_size_id)
def test_sliding_window(size, window):
    sq, sk = size
    m = Mask.sliding_window(sq, window, sk)
    check_structure(m, dense_window(sq, sk, *window), f"window{window}")
    assert m.row_intervals()[0].shape[0] == 1


def test_sliding_window_special_cases():
    assert torch.equal(
        Mask.sliding_window(59, (-1, 0), 97).to_dense(), Mask.causal(59, 97).to_dense()
    )
    assert Mask.sliding_window(59, (-1, -1), 97).is_full()
    diag = Mask.sliding_window(97, (0, 0)).to_dense()
    assert torch.equal(diag, torch.eye(97, dtype=torch.bool))


VARLEN_CASES = [
    # (cu_q, cu_k)
    ([0, 5, 5, 17, 18, 40], None),
    ([0, 0, 0, 1], None),
    ([0, 3, 10, 10, 29], [0, 7, 9, 14, 14]),  # Lq > Lk and Lq < Lk, empty key doc
    ([0, 4, 4, 9], [0, 0, 6, 20]),  # empty key doc first, empty query doc in the middle
    ([0, 59], [0, 97]),
    ([0, 97], [0, 59]),
    ([0], None),
]
VARLEN_MODES = [
    dict(causal=False),
    dict(causal=True),
    dict(window=(2, 1)),
    dict(window=(-1, 3)),
    dict(window=(3, -1)),
    dict(causal=True, window=(2, 4)),  # causal caps the right side at 0
    dict(causal=True, window=(0, -1)),
]


@pytest.mark.parametrize("mode", VARLEN_MODES, ids=str)
@pytest.mark.parametrize("cu", VARLEN_CASES, ids=str)
def test_varlen(cu, mode):
    cu_q, cu_k = cu
    m = Mask.varlen(cu_q, cu_k, **mode)
    expect = dense_varlen(
        cu_q, cu_k, causal=mode.get("causal", False), window=mode.get("window", (-1, -1))
    )
    check_structure(m, expect, f"varlen {cu} {mode}")
    assert m.shape == (cu_q[-1], (cu_k or cu_q)[-1])
    lo, hi = m.row_intervals()
    assert lo.shape[0] == 1  # one interval per row for packed documents


def test_varlen_accepts_tensors():
    cu = torch.tensor([0, 3, 3, 11], dtype=torch.int32)
    assert Mask.varlen(cu, causal=True) == Mask.varlen([0, 3, 3, 11], causal=True)


def test_varlen_random_documents():
    rng = random.Random(1234)
    for trial in range(40):
        n_docs = rng.randint(1, 8)
        lq = [rng.choice([0, 1, rng.randint(0, 13)]) for _ in range(n_docs)]
        lk = [rng.choice([0, 1, rng.randint(0, 13)]) for _ in range(n_docs)]
        cu_q, cu_k = [0], [0]
        for a, b in zip(lq, lk):
            cu_q.append(cu_q[-1] + a)
            cu_k.append(cu_k[-1] + b)
        causal = rng.random() < 0.5
        window = (rng.randint(-1, 4), rng.randint(-1, 4))
        m = Mask.varlen(cu_q, cu_k, causal=causal, window=window)
        expect = dense_varlen(cu_q, cu_k, causal=causal, window=window)
        check_structure(m, expect, f"trial {trial}: {cu_q} {cu_k} causal={causal} {window}")


@pytest.mark.parametrize(
    "seqlen,block",
    [
        (59, 7),
        (97, 1),
        (97, 97),
        (97, 200),
        (1, 1),
        (60, [3, 0, 10, 46, 1]),
        (12, [12]),
        (9, [0, 9, 0]),
    ],
    ids=str,
)
def test_block_causal(seqlen, block):
    sizes = (
        block
        if isinstance(block, list)
        else [min(block, seqlen - s) for s in range(0, seqlen, block)]
    )
    m = Mask.block_causal(seqlen, block)
    check_structure(m, dense_block_causal(sizes), f"block_causal({seqlen}, {block})")
    assert m.row_intervals()[0].shape[0] == 1


@pytest.mark.parametrize("seqlen,prefix", [(59, 0), (59, 13), (59, 59), (1, 1), (97, 96)], ids=str)
def test_prefix_lm(seqlen, prefix):
    check_structure(Mask.prefix_lm(seqlen, prefix), dense_prefix_lm(seqlen, prefix), "prefix_lm")


@pytest.mark.parametrize(
    "question,answers",
    [(5, [3, 0, 7]), (0, [4, 4]), (10, []), (1, [1]), (13, [31, 1, 17])],
    ids=str,
)
def test_shared_question(question, answers):
    m = Mask.shared_question(question, answers)
    check_structure(m, dense_shared_question(question, answers), "shared_question")


def test_from_ranges_type_spellings():
    q, k = [(0, 5), (3, 9)], [(2, 8), (0, 4)]
    expect = dense_from_rects(q, k, ["causal", "bi_causal"], 9, 8)
    for types in (
        ["causal", "bi_causal"],
        [1, 3],
        [AttnMaskType.CAUSAL, AttnMaskType.BI_CAUSAL],
        ["CAUSAL", " Bi_Causal "],
    ):
        m = Mask.from_ranges(q, k, types, 9, 8)
        check_structure(m, expect, str(types))
    single = Mask.from_ranges(q, k, "inv_causal", 9, 8)
    check_structure(single, dense_from_rects(q, k, "inv_causal", 9, 8), "one type for all")


def _random_rects(rng: random.Random, sq: int, sk: int, n: int):
    qr, kr, ty = [], [], []
    for _ in range(n):
        a, b = sorted(rng.randint(0, sq) for _ in range(2))
        c, d = sorted(rng.randint(0, sk) for _ in range(2))
        if rng.random() < 0.2 and sq == sk:  # diagonal-aligned blocks overlap more often
            c, d = a, b
        qr.append((a, b))
        kr.append((c, d))
        ty.append(
            rng.choice(
                [rng.choice(TYPE_NAMES), rng.randrange(4), AttnMaskType(rng.choice(TYPE_NAMES))]
            )
        )
    return qr, kr, ty


def random_mask(rng: random.Random, max_len: int = 40):
    sq, sk = rng.randint(1, max_len), rng.randint(1, max_len)
    if rng.random() < 0.3:
        sk = sq
    qr, kr, ty = _random_rects(rng, sq, sk, rng.randint(1, 6))
    return Mask.from_ranges(qr, kr, ty, sq, sk), dense_from_rects(qr, kr, ty, sq, sk), (qr, kr, ty)


@pytest.mark.parametrize("chunk", range(8))
def test_from_ranges_random_overlapping(chunk):
    for seed in range(chunk * 50, chunk * 50 + 50):
        rng = random.Random(seed)
        m, dense, spec = random_mask(rng)
        check_structure(m, dense, f"seed {seed}: {spec} {m.shape}")
        # Rebuilding from the disjoint typed ranges gives the same set again.
        qr = [r[0] for r in m.ranges]
        kr = [r[1] for r in m.ranges]
        ty = [r[2] for r in m.ranges]
        again = Mask.from_ranges(qr, kr, ty, *m.shape)
        assert torch.equal(again.to_dense(), dense), f"seed {seed}"


def test_from_ranges_random_larger():
    rng = random.Random(99)
    for trial in range(30):
        m, dense, spec = random_mask(rng, max_len=300)
        check_structure(m, dense, f"trial {trial}: {spec}")


def test_from_ranges_many_rectangles():
    rng = random.Random(7)
    for trial in range(10):
        sq = sk = rng.randint(20, 60)
        qr, kr, ty = _random_rects(rng, sq, sk, 25)
        m = Mask.from_ranges(qr, kr, ty, sq, sk)
        check_structure(m, dense_from_rects(qr, kr, ty, sq, sk), f"trial {trial}")


def test_duplicate_and_nested_rectangles():
    qr = [(0, 20), (0, 20), (5, 10), (0, 20)]
    kr = [(0, 20), (0, 20), (5, 10), (0, 20)]
    ty = ["causal", "causal", "full", "inv_causal"]
    m = Mask.from_ranges(qr, kr, ty, 20, 20)
    check_structure(m, dense_from_rects(qr, kr, ty, 20, 20), "nested")
    assert m.is_full()


# -- queries ------------------------------------------------------------------------------


def _builder_masks():
    rng = random.Random(5)
    masks = [
        Mask.full(59, 97),
        Mask.causal(97, 59),
        Mask.causal(59, 97),
        Mask.sliding_window(97, (5, 3)),
        Mask.sliding_window(59, (3, -1), 97),
        Mask.varlen([0, 5, 5, 17, 40], [0, 9, 12, 12, 30], causal=True),
        Mask.block_causal(59, [7, 0, 20, 32]),
        Mask.prefix_lm(59, 11),
        Mask.shared_question(9, [12, 0, 7]),
    ]
    masks += [random_mask(rng)[0] for _ in range(40)]
    return masks


def test_slice_matches_dense_slicing():
    rng = random.Random(11)
    for n, m in enumerate(_builder_masks()):
        dense = m.to_dense()
        sq, sk = m.shape
        for _ in range(15):
            qa, qb = sorted(rng.randint(0, sq) for _ in range(2))
            ka, kb = sorted(rng.randint(0, sk) for _ in range(2))
            s = m.slice((qa, qb), (ka, kb))
            tag = f"mask {n} {m!r} slice {(qa, qb, ka, kb)}"
            assert s.shape == (qb - qa, kb - ka), tag
            check_structure(s, dense[qa:qb, ka:kb], tag)
            # A slice of a slice is the slice of the composed window.
            if qb - qa >= 2 and kb - ka >= 2:
                inner = s.slice((1, qb - qa), (0, kb - ka - 1))
                assert torch.equal(inner.to_dense(), dense[qa + 1 : qb, ka : kb - 1]), tag


def _random_chunks(rng: random.Random, n: int) -> list[tuple[int, int]]:
    """Up to 4 disjoint ranges of [0, n), in shuffled order (zigzag-like)."""
    cuts = sorted({0, n, *(rng.randint(0, n) for _ in range(rng.randint(1, 4)))})
    chunks = [(a, b) for a, b in zip(cuts, cuts[1:])]
    rng.shuffle(chunks)
    return chunks[: rng.randint(1, len(chunks))]


@pytest.mark.skipif(not hasattr(Mask, "gather"), reason="Mask.gather not present")
def test_gather_matches_dense_indexing():
    rng = random.Random(17)
    for n, m in enumerate(_builder_masks()):
        dense = m.to_dense()
        for _ in range(6):
            qr, kr = _random_chunks(rng, m.seqlen_q), _random_chunks(rng, m.seqlen_k)
            rows = [i for a, b in qr for i in range(a, b)]
            cols = [j for a, b in kr for j in range(a, b)]
            g = m.gather(qr, kr)
            want = (
                dense[rows][:, cols]
                if rows and cols
                else torch.zeros(len(rows), len(cols), dtype=torch.bool)
            )
            assert g.shape == (len(rows), len(cols))
            check_structure(g, want, f"mask {n} {m!r} gather {qr} {kr}")


def test_row_intervals_match_dense():
    for n, m in enumerate(_builder_masks()):
        dense = m.to_dense()
        sq, sk = m.shape
        lo, hi = m.row_intervals()
        assert lo.dtype == hi.dtype == torch.int32 and lo.shape == hi.shape
        r = lo.shape[0]
        assert lo.shape == (r, sq) and r >= 1
        rebuilt = torch.zeros(sq, sk, dtype=torch.int64)
        k = torch.arange(sk).view(1, -1)
        for slot in range(r):
            unused = (lo[slot] == 0) & (hi[slot] == -1)
            rebuilt += (
                (k >= lo[slot].view(-1, 1).long()) & (k <= hi[slot].view(-1, 1).long())
            ).long()
            assert ((hi[slot] >= lo[slot]) | unused).all(), f"mask {n}"
        assert rebuilt.max() <= 1 if rebuilt.numel() else True, f"mask {n}: intervals overlap"
        assert torch.equal(rebuilt.bool(), dense), f"mask {n} {m!r}"
        # R is at least the largest number of separate runs in any row.
        runs = dense[:, :1].long() + (dense[:, 1:] & ~dense[:, :-1]).long().sum(1, keepdim=True)
        assert r >= int(runs.max()), f"mask {n}"


def test_row_intervals_single_slot_for_simple_builders():
    for m in (
        Mask.causal(97, 59),
        Mask.sliding_window(59, (4, 2)),
        Mask.block_causal(97, 10),
        Mask.varlen([0, 4, 4, 30], causal=True),
        Mask.full(3, 5),
    ):
        lo, hi = m.row_intervals()
        assert lo.shape == (1, m.seqlen_q), repr(m)


def _check_dense_pieces(m: Mask, tag: str, pieces=None):
    pieces = m.dense_pieces() if pieces is None else pieces
    assert pieces is not None, tag
    sq, sk = m.shape
    rebuilt = torch.zeros(sq, sk, dtype=torch.int64)
    for q0, q1, k0, k1, causal in pieces:
        assert 0 <= q0 < q1 <= sq and 0 <= k0 < k1 <= sk, f"{tag}: piece {(q0, q1, k0, k1)}"
        if causal:
            assert k1 - k0 >= q1 - q0, f"{tag}: causal piece with Lk < Lq"
        kind = "causal" if causal else "full"
        rebuilt[q0:q1, k0:k1] += rect_dense(q1 - q0, k1 - k0, kind).long()
    assert rebuilt.max() <= 1 if rebuilt.numel() else True, f"{tag}: pieces overlap"
    assert torch.equal(rebuilt.bool(), m.to_dense()), f"{tag}: pieces do not reproduce the mask"


def test_dense_pieces_builders():
    masks = [
        Mask.full(59, 97),
        Mask.causal(97, 59),
        Mask.causal(59, 97),
        Mask.causal(1, 1),
        Mask.sliding_window(59, (-1, 0), 97),
        Mask.sliding_window(59, (-1, 4)),
        Mask.varlen([0, 5, 5, 17, 40], [0, 9, 12, 12, 30], causal=True),
        Mask.varlen([0, 9, 30], [0, 3, 40], causal=True),
        Mask.varlen([0, 9, 30]),
        Mask.block_causal(59, [7, 0, 20, 32]),
        Mask.prefix_lm(59, 11),
        Mask.shared_question(9, [12, 0, 7]),
    ]
    for m in masks:
        _check_dense_pieces(m, repr(m))


def test_dense_pieces_random_full_causal_rectangles():
    rng = random.Random(3)
    checked = 0
    for seed in range(150):
        sq, sk = rng.randint(1, 40), rng.randint(1, 40)
        qr, kr, _ = _random_rects(rng, sq, sk, rng.randint(1, 5))
        ty = [rng.choice(["full", "causal"]) for _ in qr]
        m = Mask.from_ranges(qr, kr, ty, sq, sk)
        pieces = m.dense_pieces()
        if pieces is None:
            # Only allowed when some band really has a lower diagonal bound.
            assert any(b.lo_is_bound for b in m.bands), f"seed {seed}"
            continue
        _check_dense_pieces(m, f"seed {seed}: {qr} {kr} {ty}")
        # The row-interval cut (joins pieces side by side) covers the mask exactly too,
        # and dense_pieces never keeps more pieces than it.
        rows = m._pieces_from_rows()
        _check_dense_pieces(m, f"seed {seed} (rows): {qr} {kr} {ty}", rows)
        assert len(pieces) <= len(rows)
        checked += 1
    assert checked > 100


@pytest.mark.parametrize("w", [2, 3, 4])
def test_dense_pieces_join_cut_causal_blocks(w):
    """A rank's own zigzag block of a causal mask is one causal square, however the
    bands cut it: one piece, so one kernel call and no merge."""
    import hamilton_attn as ha

    n = 2 * w * 7
    for r in range(w):
        p = ha.plan(Mask.causal(n), ha.SimulatedGroup(w, r), schedule="ring", dispatch="zigzag")
        step = p.schedule.forward_steps()[0]
        m, (qa, qb), (ka, kb) = p.fused_block(r, step.compute[r])
        assert m.dense_pieces() == [(0, n // w, 0, n // w, True)], f"rank {r}"
        _check_dense_pieces(m, f"w {w} rank {r}")
    # Back-to-back bands of one diagonal (and of one column range) join as well.
    cut = Mask.from_ranges(
        [(0, 5), (5, 9), (9, 20), (20, 26)],
        [(0, 5), (0, 9), (0, 20), (0, 20)],
        ["causal", "causal", "causal", "full"],
        26,
        20,
    )
    assert cut.dense_pieces() == [(0, 20, 0, 20, True), (20, 26, 0, 20, False)]
    _check_dense_pieces(cut, "cut bands")


@pytest.mark.parametrize("dispatch", ["zigzag", "balanced_zigzag", "minheap"])
def test_groupcast_own_block_of_a_causal_mask_is_one_piece(dispatch):
    """groupcast cuts a rank's KV into 16 column pieces; its own block is still one
    causal square for the kernels."""
    import hamilton_attn as ha

    m = Mask.causal(2048)
    for r in range(2):
        p = ha.plan(m, ha.SimulatedGroup(2, r), schedule="groupcast", dispatch=dispatch)
        step = p.schedule.forward_steps()[0]
        fused = p.fused_block(r, step.compute[r])[0]
        assert len(step.compute[r]) > 1
        assert fused.dense_pieces() == [(0, 1024, 0, 1024, True)], f"rank {r}"


@pytest.mark.parametrize(
    "m",
    [
        Mask.sliding_window(59, (3, -1)),
        Mask.sliding_window(59, (0, 0), 97),
        Mask.from_ranges([(0, 10)], [(0, 10)], "inv_causal", 10),
        Mask.from_ranges([(0, 10)], [(0, 12)], "bi_causal", 10, 12),
        Mask.varlen([0, 20, 41], window=(4, 0)),
    ],
    ids=repr,
)
def test_dense_pieces_none_with_lower_diagonal(m):
    assert m.dense_pieces() is None


# Timings use this process's CPU time: the test machines are shared, and wall time under
# load says nothing about the algorithm.


def test_area_huge_causal_is_closed_form():
    n = 1_000_000
    m = Mask.causal(n, n)
    t0 = time.process_time()
    area = m.area()
    assert time.process_time() - t0 < 1.0
    assert area == n * (n + 1) // 2
    assert Mask.causal(n, 2 * n).area() == n * (n + 1) // 2 + n * n
    assert Mask.sliding_window(n, (127, 0)).area() == 128 * n - 127 * 128 // 2


def test_area_100k_document_varlen():
    rng = random.Random(0)
    lens = [rng.choice([0, rng.randint(1, 30)]) for _ in range(100_000)]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    t0 = time.process_time()
    m = Mask.varlen(cu, causal=True)
    build_s = time.process_time() - t0
    t0 = time.process_time()
    area = m.area()
    area_s = time.process_time() - t0
    assert area == sum(n * (n + 1) // 2 for n in lens)
    assert area_s < 1.0, f"area() took {area_s:.2f} CPU s"
    # Building 100K bands is pure Python; generous bound so a loaded CI box still passes.
    assert build_s < 15.0, f"building took {build_s:.2f} CPU s"
    w = Mask.varlen(cu, window=(3, 0))
    assert w.area() == sum(
        n * (n + 1) // 2 - (n - 4) * (n - 3) // 2 if n > 4 else n * (n + 1) // 2 for n in lens
    )


# -- equality and hashing -----------------------------------------------------------------

EQUAL_PAIRS = [
    (
        "causal == window(-1,0)",
        lambda: Mask.causal(59, 97),
        lambda: Mask.sliding_window(59, (-1, 0), 97),
    ),
    (
        "full == window(-1,-1)",
        lambda: Mask.full(59, 97),
        lambda: Mask.sliding_window(59, (-1, -1), 97),
    ),
    (
        "full == from_ranges",
        lambda: Mask.full(7, 5),
        lambda: Mask.from_ranges([(0, 7)], [(0, 5)], [0], 7, 5),
    ),
    (
        "one-doc varlen == causal",
        lambda: Mask.varlen([0, 59], causal=True),
        lambda: Mask.causal(59),
    ),
    (
        "one-doc varlen window == sliding_window",
        lambda: Mask.varlen([0, 40], [0, 59], window=(3, 2)),
        lambda: Mask.sliding_window(40, (3, 2), 59),
    ),
    ("prefix_lm(n, 0) == causal", lambda: Mask.prefix_lm(59, 0), lambda: Mask.causal(59)),
    ("block_causal one block == full", lambda: Mask.block_causal(59, 59), lambda: Mask.full(59)),
    (
        "rectangle order",
        lambda: Mask.from_ranges([(0, 4), (4, 9)], [(0, 4), (2, 9)], ["causal", "full"], 9),
        lambda: Mask.from_ranges([(4, 9), (0, 4)], [(2, 9), (0, 4)], ["full", "causal"], 9),
    ),
    (
        "zero-length docs dropped",
        lambda: Mask.varlen([0, 3, 3, 8], causal=True),
        lambda: Mask.varlen([0, 0, 3, 3, 3, 8], causal=True),
    ),
]

# The same set of pairs, represented by differently cut bands: Mask.__eq__ compares the
# band tuples, which are not canonical, so these compare unequal.
EQUAL_PAIRS_NONCANONICAL = [
    ("block_causal(block=1) == causal", lambda: Mask.block_causal(8, 1), lambda: Mask.causal(8)),
    ("prefix_lm(n, n) == full", lambda: Mask.prefix_lm(6, 6), lambda: Mask.full(6)),
    (
        "causal split in two rectangles == causal",
        lambda: Mask.from_ranges([(0, 2), (2, 4)], [(0, 2), (0, 4)], "causal", 4),
        lambda: Mask.causal(4),
    ),
    (
        "overlap duplicates",
        lambda: Mask.from_ranges([(0, 9)] * 3, [(0, 9)] * 3, "causal", 9),
        lambda: Mask.causal(9),
    ),
]


def _check_equal(make_a, make_b):
    a, b = make_a(), make_b()
    assert torch.equal(a.to_dense(), b.to_dense())  # sanity: the sets really are equal
    assert a == b and not (a != b)
    assert hash(a) == hash(b)
    assert {a: "x"}[b] == "x"


@pytest.mark.parametrize("name,make_a,make_b", EQUAL_PAIRS, ids=[p[0] for p in EQUAL_PAIRS])
def test_same_mask_two_ways_is_equal(name, make_a, make_b):
    _check_equal(make_a, make_b)


@pytest.mark.parametrize(
    "name,make_a,make_b", EQUAL_PAIRS_NONCANONICAL, ids=[p[0] for p in EQUAL_PAIRS_NONCANONICAL]
)
def test_same_mask_two_ways_is_equal_noncanonical(name, make_a, make_b):
    _check_equal(make_a, make_b)


def test_kind_detects_equivalent_masks():
    assert Mask.block_causal(8, 1).kind() == AttnMaskType.CAUSAL
    assert Mask.prefix_lm(6, 6).kind() == AttnMaskType.FULL


def test_unequal_masks():
    assert Mask.causal(9) != Mask.full(9)
    assert Mask.full(3, 4) != Mask.full(4, 3)
    assert Mask.causal(9) != Mask.sliding_window(9, (3, 0))
    assert Mask.full(0, 5) != Mask.full(5, 0)
    assert Mask.causal(9) != "causal"
    assert Mask.causal(9).kind() == AttnMaskType.CAUSAL and Mask.prefix_lm(9, 3).kind() is None


# -- invalid inputs -----------------------------------------------------------------------

INVALID = [
    ("reversed q range", lambda: Mask.from_ranges([(5, 2)], [(0, 3)], "full", 8), "q_ranges[0]"),
    (
        "reversed k range",
        lambda: Mask.from_ranges([(0, 2), (0, 1)], [(0, 3), (4, 1)], "full", 8),
        "k_ranges[1]",
    ),
    ("q range out of grid", lambda: Mask.from_ranges([(0, 9)], [(0, 3)], "full", 8), "q_ranges[0]"),
    (
        "k range out of grid",
        lambda: Mask.from_ranges([(0, 2)], [(0, 6)], "full", 8, 5),
        "k_ranges[0]",
    ),
    ("negative start", lambda: Mask.from_ranges([(-1, 2)], [(0, 3)], "full", 8), "q_ranges[0]"),
    ("range not a pair", lambda: Mask.from_ranges([(0, 1, 2)], [(0, 3)], "full", 8), "q_ranges[0]"),
    (
        "unknown type string",
        lambda: Mask.from_ranges([(0, 2)], [(0, 2)], ["causall"], 8),
        "types[0]",
    ),
    ("unknown type int", lambda: Mask.from_ranges([(0, 2)], [(0, 2)], [7], 8), "types[0]"),
    (
        "lengths disagree",
        lambda: Mask.from_ranges([(0, 2), (2, 4)], [(0, 2)], "full", 8),
        "k_ranges",
    ),
    ("types length", lambda: Mask.from_ranges([(0, 2)], [(0, 2)], ["full", "full"], 8), "types"),
    ("cu_seqlens not from 0", lambda: Mask.varlen([1, 4, 9]), "cu_seqlens_q"),
    ("cu_seqlens decreasing", lambda: Mask.varlen([0, 5, 3]), "cu_seqlens_q"),
    ("cu_seqlens empty", lambda: Mask.varlen([]), "cu_seqlens_q"),
    ("cu_seqlens not ints", lambda: Mask.varlen(["a", 2]), "cu_seqlens_q"),
    ("cu_seqlens_k bad", lambda: Mask.varlen([0, 4], [0, 5, 2]), "cu_seqlens_k"),
    ("cu_seqlens_k length", lambda: Mask.varlen([0, 4, 8], [0, 8]), "cu_seqlens_k"),
    ("window < -1", lambda: Mask.sliding_window(8, (-2, 0)), "window"),
    ("window right < -1", lambda: Mask.varlen([0, 8], window=(0, -3)), "window"),
    ("window not a pair", lambda: Mask.sliding_window(8, (1, 2, 3)), "window"),
    ("window not ints", lambda: Mask.sliding_window(8, "ab"), "window"),
    ("block size zero", lambda: Mask.block_causal(8, 0), "block_size"),
    ("block sizes wrong sum", lambda: Mask.block_causal(8, [3, 4]), "block_size"),
    ("block size negative", lambda: Mask.block_causal(8, [9, -1]), "block_size"),
    ("prefix too long", lambda: Mask.prefix_lm(8, 9), "prefix_len"),
    ("prefix negative", lambda: Mask.prefix_lm(8, -1), "prefix_len"),
    ("negative question", lambda: Mask.shared_question(-1, [2]), "question_len"),
    ("negative answer", lambda: Mask.shared_question(3, [2, -1]), "answer_lens"),
    ("negative seqlen window", lambda: Mask.sliding_window(-1, (1, 1)), "seqlen_q"),
    ("negative seqlen_k window", lambda: Mask.sliding_window(4, (1, 1), -2), "seqlen_k"),
    ("negative seqlen block_causal", lambda: Mask.block_causal(-3, 2), "seqlen"),
    ("negative seqlen from_ranges", lambda: Mask.from_ranges([], [], "full", -1), "seqlen_q"),
    ("slice out of range", lambda: Mask.causal(8).slice((0, 9), (0, 8)), "q_range"),
    ("slice reversed", lambda: Mask.causal(8).slice((0, 8), (5, 2)), "k_range"),
    ("AttnMaskType.parse", lambda: AttnMaskType.parse("diagonal"), "type"),
]

# Negative lengths given to the full/causal/prefix builders are reported against the
# derived q_ranges[0] / k_ranges[0] / prefix_len instead of the argument that is wrong.
INVALID_MISNAMED = [
    ("negative seqlen causal", lambda: Mask.causal(-5), "seqlen_q"),
    ("negative seqlen_k causal", lambda: Mask.causal(3, -1), "seqlen_k"),
    ("negative seqlen full", lambda: Mask.full(-1), "seqlen_q"),
    ("negative seqlen prefix_lm", lambda: Mask.prefix_lm(-1, 0), "seqlen"),
]


@pytest.mark.parametrize("name,fn,arg", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_inputs_raise_naming_argument(name, fn, arg):
    with pytest.raises(ValueError) as info:
        fn()
    assert arg in str(info.value), f"{name}: message {str(info.value)!r} does not name {arg!r}"


@pytest.mark.parametrize("name,fn,arg", INVALID_MISNAMED, ids=[c[0] for c in INVALID_MISNAMED])
def test_negative_seqlen_error_names_seqlen(name, fn, arg):
    with pytest.raises(ValueError) as info:
        fn()
    assert arg in str(info.value), f"{name}: message {str(info.value)!r} does not name {arg!r}"


def test_empty_masks():
    for m in (
        Mask.full(0, 0),
        Mask.full(0, 5),
        Mask.causal(5, 0),
        Mask.varlen([0]),
        Mask.from_ranges([], [], "full", 4, 6),
        Mask.block_causal(0, 3),
    ):
        assert m.is_empty() and m.area() == 0
        assert not m.to_dense().any()
        lo, hi = m.row_intervals()
        assert lo.shape == (1, m.seqlen_q)
