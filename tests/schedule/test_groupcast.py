"""Work-balanced dispatch and zero-redundancy ``groupcast`` transfers.

Pure checks (placements, the verifier's zero-redundancy proof, transfer counts) run on
paper with :class:`SimulatedGroup`; the distributed checks run a zoo of masks (packed
documents, windows, block-causal, prefix-LM, shared question, overlapping and random
rectangles, cross-attention with Sq != Sk) through ``plan(schedule="groupcast",
dispatch="minheap") -> dispatch -> calc_attn -> undispatch`` on one 8-process gloo
pool, forward AND backward, against the one-process float64 reference.

Legend: B batch, S tokens, Sq/Sk query/key tokens, Hq/Hk heads, D head dim, W ranks.
"""

from __future__ import annotations

import itertools
import random
import zlib

import pytest
import torch

import hamilton_attn as ha
from hamilton_attn.placement import balanced, chunk_grid
from hamilton_attn.placement.layouts import _assign_exact, _assign_minheap
from hamilton_attn.schedule import PieceId, ScheduleError, Transfer, verify

F64_TOL = 1e-9


# -- the mask zoo ----------------------------------------------------------------------


def docs(s: int, seed: int = 0) -> list[int]:
    """cu_seqlens of uneven documents (one of a single token) covering ``s`` tokens."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(2, s - 1), 4))
    return [0, 1] + cuts + [s]


def block_causal_docs(cu: list[int], block: int) -> ha.Mask:
    """Inside each document, queries of block b see every key of blocks 0..b."""
    qr, kr = [], []
    for a, b in zip(cu, cu[1:]):
        for x in range(a, b, block):
            qr.append((x, min(x + block, b)))
            kr.append((a, min(x + block, b)))
    return ha.Mask.from_ranges(qr, kr, "full", cu[-1], cu[-1])


def random_rects(sq: int, sk: int, n: int, seed: int) -> ha.Mask:
    rng = random.Random(seed)
    kinds = ["full", "causal", "inv_causal", "bi_causal"]
    qr, kr, ty = [], [], []
    for _ in range(n):
        a = rng.randrange(0, sq - 1)
        c = rng.randrange(0, sk - 1)
        qr.append((a, rng.randrange(a + 1, sq + 1)))
        kr.append((c, rng.randrange(c + 1, sk + 1)))
        ty.append(rng.choice(kinds))
    return ha.Mask.from_ranges(qr, kr, ty, sq, sk)


def zoo_mask(name: str, s: int) -> ha.Mask:
    if name == "varlen_full":
        return ha.Mask.varlen(docs(s))
    if name == "varlen_causal":
        return ha.Mask.varlen(docs(s, 1), causal=True)
    if name == "sliding_window":
        return ha.Mask.sliding_window(s, (9, 0))
    if name == "varlen_block_causal":
        return block_causal_docs(docs(s, 2), 7)
    if name == "prefix_lm":
        return ha.Mask.prefix_lm(s, s // 3)
    if name == "shared_question":
        q = s // 4
        return ha.Mask.shared_question(q, [s // 4, s // 3, s - q - s // 4 - s // 3])
    if name == "overlapping":
        return ha.Mask.from_ranges(
            [(0, s // 2), (s // 4, s), (s // 3, s)],
            [(0, s // 2), (0, s // 2), (s // 4, s)],
            ["causal", "full", "bi_causal"],
            s,
            s,
        )
    if name == "random_rects":
        return random_rects(s, s, 6, 3)
    if name == "cross_rects":  # cross-attention, Sq != Sk
        return random_rects(s // 2 + 3, s + 11, 5, 4)
    if name == "cross_varlen":
        cu_q = [0, 5, s // 3, s // 2]
        cu_k = [0, 20, s // 2, s + 7]
        return ha.Mask.varlen(cu_q, cu_k, causal=True)
    raise KeyError(name)


SELF_MASKS = (
    "varlen_full",
    "varlen_causal",
    "sliding_window",
    "varlen_block_causal",
    "prefix_lm",
    "shared_question",
    "overlapping",
    "random_rects",
)
CROSS_MASKS = ("cross_rects", "cross_varlen")


# -- on paper ---------------------------------------------------------------------------


def test_minheap_gives_equal_counts_and_balances_packed_documents():
    m = ha.Mask.varlen(docs(4096, 5), causal=True)
    p = ha.plan(
        m,
        ha.SimulatedGroup(8),
        schedule="groupcast",
        dispatch="minheap",
        chunk_size=32,
        call_cost=0,  # balance pairs alone
    )
    counts = {sum(b - a for a, b in rr) for rr in p.placement.rank_ranges}
    assert counts == {p.local_len}
    assert p.local_len == 16 * 32
    assert p.imbalance <= 1.02, p.imbalance
    assert sum(p.work) == m.area()
    seq = ha.plan(
        m, ha.SimulatedGroup(8), schedule="groupcast", dispatch="sequential", chunk_size=32
    )
    assert seq.imbalance > p.imbalance
    assert seq.placement.rank_ranges[0] == ((0, 512),)


def _calls_and_pairs(m, w, call_cost):
    """Per rank of ring/balanced_zigzag: (dense pieces over all its blocks, which are its
    cuDNN calls, and its visible pairs)."""
    out = []
    for r in range(w):
        p = ha.plan(
            m,
            ha.SimulatedGroup(w, r),
            schedule="ring",
            dispatch="balanced_zigzag",
            call_cost=call_cost,
        )
        calls = pairs = 0
        for step in p.schedule.forward_steps():
            if step.compute[r]:
                bm = p.fused_block(r, step.compute[r])[0]
                calls += len(bm.dense_pieces())
                pairs += bm.area()
        out.append((calls, pairs))
    return out


@pytest.mark.parametrize("w", [2, 4])
def test_call_cost_evens_out_kernel_calls(w):
    """Packed documents: counting a fixed cost per kernel call (per document piece) in
    the balance gives the rank with more calls fewer pairs, so the modelled time
    (pairs + cost x calls) of the slowest rank drops; call_cost=0 balances pairs alone.
    Bad values are refused."""
    from hamilton_attn.cli.bench import bench_masks
    from hamilton_attn.planner.plans import CALL_COST_PAIRS

    m = bench_masks(32768, ["docs"])["docs"]
    per_call = min(CALL_COST_PAIRS, m.area() / (w * 64))
    worst = {}
    for cost in (0, None):
        ranks = _calls_and_pairs(m, w, cost)
        assert sum(pairs for _, pairs in ranks) == m.area()
        worst[cost] = max(pairs + per_call * calls for calls, pairs in ranks)
    assert worst[None] <= worst[0], worst
    if w == 2:  # the bench's case: rank 1 had 12 calls to rank 0's 9
        assert worst[None] < 0.99 * worst[0], worst
    for bad in (-1, "x", True):
        with pytest.raises(ValueError, match="call_cost"):
            ha.plan(m, ha.SimulatedGroup(w), dispatch="balanced_zigzag", call_cost=bad)


@pytest.mark.parametrize("w", [2, 3, 4, 8])
def test_balanced_zigzag_keeps_two_runs_and_balances(w):
    """Each rank holds at most two runs of consecutive tokens (the last rank one), all
    ranks the same count; on packed documents it balances far better than zigzag, and
    on a causal mask it is zigzag's own layout."""
    m = ha.Mask.varlen(docs(4096, 3), causal=True)
    p = ha.plan(m, ha.SimulatedGroup(w), schedule="ring", dispatch="balanced_zigzag")
    zz = ha.plan(m, ha.SimulatedGroup(w), schedule="ring", dispatch="zigzag")
    rr = p.placement.rank_ranges
    assert {sum(b - a for a, b in x) for x in rr} == {p.local_len}
    assert all(len(x) <= 2 for x in rr) and len(rr[-1]) == 1
    assert sorted(r for x in rr for r in x)[0][0] == 0
    assert sum(p.work) == m.area()
    assert p.imbalance <= 1.05, p.imbalance
    assert p.imbalance < zz.imbalance
    causal = ha.plan(
        ha.Mask.causal(64 * w), ha.SimulatedGroup(w), schedule="ring", dispatch="balanced_zigzag"
    )
    zig = ha.plan(ha.Mask.causal(64 * w), ha.SimulatedGroup(w), schedule="ring", dispatch="zigzag")
    assert causal.placement.rank_ranges == zig.placement.rank_ranges
    assert causal.imbalance == 1.0


def test_exact_matches_brute_force_and_beats_or_ties_minheap():
    rng = random.Random(0)
    for trial in range(30):
        w, per = rng.choice([(2, 3), (3, 2), (2, 4), (4, 2), (3, 3)])
        costs = [rng.randrange(0, 50) for _ in range(w * per)]
        best = min(
            max(sum(costs[c] for c in range(len(costs)) if owner[c] == r) for r in range(w))
            for owner in itertools.product(range(w), repeat=len(costs))
            if all(owner.count(r) == per for r in range(w))
        )

        def peak(owner, costs=costs, w=w):
            return max(sum(c for c, o in zip(costs, owner) if o == r) for r in range(w))

        exact = _assign_exact(costs, w, per)
        assert [exact.count(r) for r in range(w)] == [per] * w
        assert peak(exact) == best, (trial, costs)
        assert peak(_assign_minheap(costs, w, per)) >= best


def test_exact_refuses_large_cases_and_random_is_seeded():
    with pytest.raises(ValueError, match="exact"):
        _assign_exact([1.0] * 40, 4, 10)
    a = balanced("random", 64, 4, lambda x, y: y - x, chunk_size=4, seed=1)
    b = balanced("random", 64, 4, lambda x, y: y - x, chunk_size=4, seed=1)
    c = balanced("random", 64, 4, lambda x, y: y - x, chunk_size=4, seed=2)
    assert a.rank_ranges == b.rank_ranges != c.rank_ranges
    assert chunk_grid(1000, 8, None) == (8, 16)
    assert chunk_grid(1000, 8, 100) == (100, 2)


@pytest.mark.parametrize("name", SELF_MASKS + CROSS_MASKS)
@pytest.mark.parametrize("w", [2, 3, 8])
def test_groupcast_sends_each_chunk_only_where_it_is_needed(name, w):
    m = zoo_mask(name, 96)
    cross = name in CROSS_MASKS
    p = ha.plan(
        m,
        ha.SimulatedGroup(w),
        schedule="groupcast",
        dispatch="minheap",
        chunk_size=4,
        kv_dispatch="minheap" if cross else None,
    )
    assert p.schedule.meta["zero_redundancy"]
    assert p.report.redundant_transfers == 0
    sent = 0
    for step in p.schedule.steps:
        for t in step.transfers:
            assert t.src == t.piece.owner  # one hop
            assert not p.block_mask(t.dst, t.piece).is_empty()
            sent += p.schedule.part_len(t.piece.part)
    wanted = sum(
        p.schedule.part_len(piece.part)
        for r in range(w)
        for piece in p.schedule.pieces
        if piece.owner != r and not p.block_mask(r, piece).is_empty()
    )
    assert sent == wanted == sum(p.report.sent_tokens)


@pytest.mark.parametrize("w,node", [(4, 2), (8, 4), (8, 2)])
def test_hierarchical_groupcast_crosses_each_node_once(w, node):
    m = ha.Mask.varlen(docs(256, 7), causal=True)
    p = ha.plan(
        m,
        ha.SimulatedGroup(w),
        schedule="groupcast",
        dispatch="minheap",
        chunk_size=4,
        node_size=node,
    )
    flat = ha.plan(m, ha.SimulatedGroup(w), schedule="groupcast", dispatch="minheap", chunk_size=4)
    entered: dict = {}
    for step in p.schedule.steps:
        for t in step.transfers:
            if t.src // node != t.dst // node:
                key = (t.dst // node, t.piece)
                entered[key] = entered.get(key, 0) + 1
    assert entered and set(entered.values()) == {1}

    def cross(plan):
        return sum(
            plan.schedule.part_len(t.piece.part)
            for s in plan.schedule.steps
            for t in s.transfers
            if t.src // node != t.dst // node
        )

    assert cross(p) <= cross(flat)
    # dK/dV come back along the same tree: also once per node.
    back: dict = {}
    for step in p.schedule.steps:
        for t in step.grad_transfers:
            if t.src // node != t.dst // node:
                back[(t.src // node, t.piece)] = back.get((t.src // node, t.piece), 0) + 1
    assert set(back.values()) == {1}


def test_verifier_rejects_a_redundant_transfer():
    m = ha.Mask.varlen([0, 32, 64], causal=True)  # rank 0's keys are useless to rank 1
    p = ha.plan(m, ha.SimulatedGroup(2), schedule="groupcast", dispatch="sequential", chunk_size=8)
    s = p.schedule
    needs = lambda r, piece: not p.block_mask(r, piece).is_empty()  # noqa: E731
    verify(s, needs, local_len=p.kv_local_len)  # the real one passes
    extra = Transfer(PieceId(0, 0), 0, 1)
    step0 = s.steps[0]
    bad_step = type(step0)(step0.compute, step0.transfers + (extra,), step0.grad_transfers)
    bad = type(s)(
        s.name, s.world_size, s.parts, (bad_step,) + s.steps[1:], 4.0, s.comm, s.grad_route, s.meta
    )
    with pytest.raises(ScheduleError, match="zero-redundancy"):
        verify(bad, needs, local_len=p.kv_local_len)


def test_degree_picks_stages_and_fewer_bytes_than_ring():
    m = ha.Mask.varlen(docs(2048, 9), causal=True)
    g = ha.SimulatedGroup(8)
    auto = ha.plan(m, g, schedule="groupcast", dispatch="minheap", chunk_size=16)
    assert 1 <= auto.schedule.meta["degree"] <= 8
    two = ha.plan(m, g, schedule="groupcast", dispatch="minheap", chunk_size=16, degree=2)
    assert two.schedule.meta["degree"] == 2
    assert sum(1 for st in two.schedule.steps if any(st.compute)) == 3  # local + 2 stages
    ring = ha.plan(m, g, schedule="ring", dispatch="zigzag")
    assert sum(two.report.sent_tokens) < sum(ring.report.sent_tokens)


def test_bad_arguments_name_what_was_expected():
    m = ha.Mask.causal(64)
    g = ha.SimulatedGroup(4)
    with pytest.raises(ValueError, match="kv_dispatch"):
        ha.plan(m, g, kv_dispatch="diagonal")
    with pytest.raises(ValueError, match="square mask"):
        ha.plan(ha.Mask.full(32, 48), g, schedule="groupcast")
    with pytest.raises(ValueError, match="node_size"):
        ha.plan(m, g, schedule="groupcast", dispatch="minheap", node_size=3)
    with pytest.raises(ValueError, match="degree"):
        ha.plan(m, g, schedule="groupcast", dispatch="minheap", degree=0)
    with pytest.raises(ValueError, match="world_size"):
        ha.SimulatedGroup(0)
    p = ha.plan(m, g, schedule="groupcast", dispatch="minheap")
    x = torch.randn(1, p.local_len, 2, 8)
    with pytest.raises(ValueError, match="SimulatedGroup"):
        ha.calc_attn(x, x, x, p)
    with pytest.raises(ValueError, match="role"):
        ha.dispatch(torch.randn(1, 64, 2, 8), ha.plan(m, None), role="k")


# -- on a gloo pool ---------------------------------------------------------------------


def _case(mask, *, S=96, B=1, Hq=4, Hk=2, D=8, dispatch="minheap", kv_dispatch=None, **opts):
    c = dict(locals())  # the arguments, in their order (opts last)
    if mask in CROSS_MASKS and kv_dispatch is None:
        c["kv_dispatch"] = "minheap"
    c["seed"] = zlib.crc32(repr(sorted((k, str(v)) for k, v in c.items())).encode())
    return c


def _w_zoo(ctx, cases):
    """Per case: max error of out, dq, dk, dv against the float64 reference, and the
    plan's imbalance and redundant transfers."""
    results = []
    for c in cases:
        m = zoo_mask(c["mask"], c["S"])
        gen = torch.Generator().manual_seed(c["seed"])
        sq, sk = m.shape

        def draw(n, h, c=c, gen=gen):
            return torch.randn(c["B"], n, h, c["D"], dtype=torch.float64, generator=gen)

        q, k, v, g = draw(sq, c["Hq"]), draw(sk, c["Hk"]), draw(sk, c["Hk"]), draw(sq, c["Hq"])
        p = ha.plan(
            m,
            ctx.group,
            schedule="groupcast",
            dispatch=c["dispatch"],
            chunk_size=4,
            kv_dispatch=c["kv_dispatch"],
            backend="reference",
            **c["opts"],
        )
        role = "q" if c["kv_dispatch"] is None else "kv"
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out_l, lse_l = ha.calc_attn(
            ha.dispatch(leaves[0], p),
            ha.dispatch(leaves[1], p, role=role),
            ha.dispatch(leaves[2], p, role=role),
            p,
            return_lse=True,
        )
        out = ha.undispatch(out_l, p)
        grads = torch.autograd.grad((out * g).sum(), leaves)
        ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref, ref_lse = ha.attention(*ref_leaves, m, backend="reference", return_lse=True)
        ref_grads = torch.autograd.grad((ref * g).sum(), ref_leaves)
        lse = ha.undispatch(lse_l.transpose(1, 2).contiguous(), p).transpose(1, 2)
        seen = torch.isfinite(ref_lse)
        errs = [(out - ref).abs().max().item()]
        errs += [(a - b).abs().max().item() for a, b in zip(grads, ref_grads)]
        errs.append((lse[seen] - ref_lse[seen]).abs().max().item() if seen.any() else 0.0)
        errs.append(float(bool((torch.isfinite(lse) != seen).any())))
        results.append((errs, p.imbalance, p.report.redundant_transfers))
    return results


def _assert_zoo(cases, per_rank, w):
    assert len(per_rank) == w
    for rank, results in enumerate(per_rank):
        for c, (errs, imbalance, redundant) in zip(cases, results, strict=True):
            tag = f"rank {rank} W={w} {c['mask']} {c['dispatch']}/{c['kv_dispatch']} {c['opts']}"
            assert max(errs[:5]) <= F64_TOL, f"{tag}: out/dq/dk/dv/lse errors {errs}"
            assert errs[5] == 0.0, f"{tag}: rows that see nothing disagree"
            assert redundant == 0, tag
            assert imbalance >= 1.0


@pytest.mark.parametrize("w", [1, 2, 3, 4, 8])
def test_zoo_minheap_groupcast_matches_reference(pool, w):
    cases = [_case(m) for m in SELF_MASKS + CROSS_MASKS]
    cases.append(_case("varlen_causal", B=2, Hq=6, Hk=1))
    cases.append(_case("cross_varlen", B=2, Hq=3, Hk=3, kv_dispatch="sequential"))
    _assert_zoo(cases, pool.run(_w_zoo, w, cases), w)


@pytest.mark.parametrize("w,node", [(4, 2), (8, 4)])
def test_zoo_hierarchical_and_baselines_match_reference(pool, w, node):
    cases = [
        _case("varlen_causal", node_size=node, degree=2),
        _case("varlen_block_causal", node_size=node),
        _case("cross_rects", node_size=node, degree=1),
        _case("random_rects", dispatch="random", degree=3),
        _case("prefix_lm", dispatch="sequential"),
        _case("varlen_block_causal", dispatch="balanced_zigzag"),
        _case("shared_question", dispatch="exact", S=24) if w <= 4 else _case("overlapping"),
    ]
    _assert_zoo(cases, pool.run(_w_zoo, w, cases), w)
