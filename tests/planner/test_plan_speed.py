"""Planning time at scale (issue #14, item 16): packed-document training builds a new
plan every batch. Bounds are generous (about 5x the targets, and CPU time, not wall
time) so a shared 2-core CI machine does not flake; benchmarks/plan_time.py records
the real numbers. Also checks that the fast paths the planner now takes (interval
tests for needed blocks, areas without block masks, the rows' dense pieces from a
vectorised scan) give what the block masks themselves say."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import pytest

import hamilton_attn as ha
from hamilton_attn.masks import Mask
from hamilton_attn.planner import plans as _plans

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from plan_time import docs_mask  # noqa: E402

M = 1 << 20


def _plan_seconds(mask, w, schedule, dispatch, **kw) -> float:
    mask.digest()  # the user's mask is hashed by the plan cache either way
    mask._dense = None  # a new batch's mask: its dense pieces are not known yet
    _plans._cached_plan.cache_clear()
    t0 = time.process_time()
    p = ha.plan(mask, ha.SimulatedGroup(w), schedule=schedule, dispatch=dispatch, **kw)
    secs = time.process_time() - t0
    assert p.report.blocks > 0
    return secs


@pytest.fixture(scope="module")
def docs_1m():
    return docs_mask(M)


@pytest.mark.parametrize(
    "schedule,dispatch", [("groupcast", "minheap"), ("ring", "balanced_zigzag")]
)
@pytest.mark.parametrize("w,target", [(8, 0.1), (64, 1.0)])
def test_packed_documents_1m_plan_time(docs_1m, schedule, dispatch, w, target):
    assert len(docs_1m.bands) > 400  # long-tailed: hundreds of documents
    secs = _plan_seconds(docs_1m, w, schedule, dispatch)
    assert secs < 5 * target + 0.5, f"{schedule}/{dispatch} W={w}: {secs:.2f} s"


@pytest.mark.parametrize(
    "schedule,dispatch,bound",
    [
        # About 5x + 1 s of the CPU time on one shared core (benchmarks/results/
        # plan_time_cpu_2026-12-01.md): hamilton 1.8 s, direct 1.2 s, groupcast/minheap 0.9 s,
        # groupcast/balanced_zigzag 0.8 s, ring 0.1 s; the 2 s target is met by each.
        ("hamilton", "zigzag", 10.0),
        ("groupcast", "minheap", 6.0),
        ("direct", "zigzag", 7.0),
        ("groupcast", "balanced_zigzag", 5.0),
        ("ring", "zigzag", 2.0),
    ],
)
def test_causal_1m_w64_plan_time(schedule, dispatch, bound):
    secs = _plan_seconds(Mask.causal(M), 64, schedule, dispatch)
    assert secs < bound, f"{schedule}/{dispatch}: {secs:.2f} s"


@pytest.mark.parametrize("schedule", ["ring", "groupcast", "hamilton"])
def test_one_token_stripes_plan_time(schedule):
    w = 5 if schedule == "hamilton" else 4  # no Hamiltonian decomposition at W = 4
    secs = _plan_seconds(Mask.causal(944), w, schedule, "stripe", chunk_size=1)
    assert secs < 10.0, f"{schedule}/stripe(1): {secs:.2f} s"


def _random_mask(rng: random.Random, n: int) -> Mask:
    qr, kr, ty = [], [], []
    for _ in range(rng.randint(1, 5)):
        a = rng.randint(0, n - 1)
        c = rng.randint(0, n - 1)
        qr.append((a, rng.randint(a + 1, n)))
        kr.append((c, rng.randint(c + 1, n)))
        ty.append(rng.choice(["full", "causal", "inv_causal", "bi_causal"]))
    return Mask.from_ranges(qr, kr, ty, n, n)


def test_area_in_and_slices_match_block_masks():
    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(1, 48)
        m = _random_mask(rng, n)
        dense = m.to_dense()
        for _ in range(8):
            qa = rng.randint(0, n)
            qb = rng.randint(qa, n)
            ka = rng.randint(0, n)
            kb = rng.randint(ka, n)
            want = int(dense[qa:qb, ka:kb].sum())
            assert m.area_in(qa, qb, ka, kb) == want
            assert m.slice((qa, qb), (ka, kb)).area() == want


def test_dense_pieces_from_rows_cover_the_rows():
    rng = random.Random(3)
    for _ in range(200):
        n = rng.randint(1, 48)
        m = _random_mask(rng, n)
        if any(b.lo_is_bound for b in m.bands):
            continue
        dense = m.to_dense()
        got = dense.clone().zero_()
        pieces = m._pieces_from_rows()
        for q0, q1, k0, k1, causal in pieces:
            piece = Mask.causal(q1 - q0, k1 - k0) if causal else Mask.full(q1 - q0, k1 - k0)
            block = piece.to_dense()
            assert not (got[q0:q1, k0:k1] & block).any()  # disjoint
            got[q0:q1, k0:k1] |= block
        assert bool((got == dense).all())


@pytest.mark.parametrize(
    "schedule,dispatch",
    [
        ("groupcast", "minheap"),
        ("ring", "balanced_zigzag"),
        ("hamilton", "stripe"),
        ("direct", "zigzag"),
        ("line", "minheap"),
    ],
)
def test_needs_matches_block_masks(schedule, dispatch):
    """The plan's needed blocks (from interval tests) are exactly the non-empty block
    masks, and groupcast's costs are the block masks' areas."""
    mask = docs_mask(6000, seed=2)
    w = 5 if schedule == "hamilton" else 4
    _plans._cached_plan.cache_clear()
    p = ha.plan(mask, ha.SimulatedGroup(w), schedule=schedule, dispatch=dispatch)
    computed = {
        (r, piece) for step in p.schedule.steps for r, ps in enumerate(step.compute) for piece in ps
    }
    for r in range(w):
        for piece in p.schedule.pieces:
            assert ((r, piece) in computed) == (not p.block_mask(r, piece).is_empty())
    assert p.report.empty_blocks == 0
    assert p.work == tuple(
        p.mask.gather(p.placement.rank_ranges[r], [(0, p.kv_placement.padded_len)]).area()
        for r in range(w)
    )
