"""``hamilton_attn.compat.magi`` (MagiAttention's API) against float64 oracles.

Single-device tests check :func:`flex_flash_attn_func` forward and backward against the
textbook oracle of ``hamilton_attn.testing.oracle`` (rectangles as a union, built
without our mask code), the range and mask helpers against dense masks written from
their definitions, and the configs and argument errors. Distributed tests run ``dispatch
-> calc_attn -> undispatch`` (and MagiAttention's two documented examples, moved to gloo
/ float32 / small sizes) on one 4-process :class:`GlooPool` and compare every rank's
undispatched output, lse and input gradients with the one-process oracle. Workers
(``_w_*``) return plain numbers; the assertions live in the tests.

Legend: T tokens (Tq queries, Tk keys), B batch, Hq/Hk heads, D head dim, W world size.
Tensors are token-major ``(T, H, D)`` (MagiAttention's layout) unless named ``*_BTHD``.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import hamilton_attn as ha
from hamilton_attn.compat import magi
from hamilton_attn.compat.magi import (
    AttnMaskType,
    AttnOverlapMode,
    AttnRange,
    AttnRanges,
    DispatchConfig,
    DistAttnConfig,
    MinHeapDispatchAlg,
    OverlapConfig,
    RandomDispatchAlg,
    SequentialDispatchAlg,
    UniformOverlapAlg,
    calc_attn,
    compute_pad_size,
    dispatch,
    flex_flash_attn_func,
    full_attention_to_varlen_attention,
    get_most_recent_key,
    get_position_ids,
    infer_attn_mask_from_cu_seqlens,
    infer_attn_mask_from_sliding_window,
    init_hierarchical_mesh,
    magi_attn_flex_dispatch,
    magi_attn_flex_key,
    magi_attn_varlen_dispatch,
    magi_attn_varlen_key,
    squash_batch_dim,
    undispatch,
)
from hamilton_attn.runtime.comm import SimulatedGroup
from hamilton_attn.testing import GlooPool
from hamilton_attn.testing.oracle import attention_oracle, dense_from_rects, dense_window, max_err

POOL_SIZE = 4
F64_TOL = 1e-9


@pytest.fixture(scope="module")
def pool():
    """A pool of its own, not the shared one: meshes (``DeviceMesh``,
    ``init_hierarchical_mesh``) span the whole world, which must be these 4 ranks."""
    with GlooPool(POOL_SIZE, timeout_s=60) as p:
        yield p


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _oracle_thd(q, k, v, dense, scale=None):
    """Float64 oracle on token-major tensors: ``(out (T, Hq, D), lse (T, Hq))``."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out, lse = attention_oracle(*(t.transpose(0, 1)[None] for t in (q, k, v)), dense, scale)
    return out[0].transpose(0, 1), lse[0].transpose(0, 1)


def _lse_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference of two lse tensors; inf unless their -inf entries agree."""
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(fa, fb):
        return math.inf
    return max_err(a[fa], b[fb])


# -- flex_flash_attn_func on one device ------------------------------------------------------

# Overlapping rectangles (union), all four kinds, rows 14..15 of Tq=24 covered by nothing.
FLEX_RECTS = (
    ((0, 14), (0, 20), 1),  # causal, bottom-right
    ((4, 10), (2, 9), 2),  # inv_causal, top-left; overlaps the first
    ((16, 24), (3, 17), 3),  # bi_causal
    ((18, 22), (10, 13), 0),  # full, overlaps the bi_causal one
    ((16, 17), (19, 20), 0),  # a single pair
)


def _flex_case(dtype, hq, hk, d, rects=FLEX_RECTS, tq=24, tk=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(tq, hq, d, dtype=torch.float64, generator=gen) * 1.5
    k = torch.randn(tk, hk, d, dtype=torch.float64, generator=gen) * 1.5
    v = torch.randn(tk, hk, d, dtype=torch.float64, generator=gen)
    g = torch.randn(tq, hq, d, dtype=torch.float64, generator=gen)
    q_ranges = torch.tensor([r[0] for r in rects], dtype=torch.int32)
    k_ranges = torch.tensor([r[1] for r in rects], dtype=torch.int32)
    types = torch.tensor([r[2] for r in rects], dtype=torch.int32)
    dense = dense_from_rects([r[0] for r in rects], [r[1] for r in rects], types.tolist(), tq, tk)
    return [t.to(dtype) for t in (q, k, v, g)], (q_ranges, k_ranges, types), dense


def _flex_run(q, k, v, g, ranges, *args, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = flex_flash_attn_func(*leaves, *ranges[:2], *args, **kwargs)
    grads = torch.autograd.grad((out * g).sum(), leaves)
    return out.detach(), lse, grads


def _oracle_run(q, k, v, g, dense, dtype=torch.float64):
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v)]
    scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = attention_oracle(
        *(t.transpose(0, 1)[None] for t in leaves), dense, scale, dtype=dtype
    )
    out = out[0].transpose(0, 1)
    grads = torch.autograd.grad((out * g.to(dtype)).sum(), leaves)
    return out.detach(), lse[0].transpose(0, 1).detach(), grads


@pytest.mark.parametrize("hq, hk, d", [(4, 2, 16), (3, 3, 8), (4, 1, 256)])
def test_flex_flash_attn_float64_forward_backward(hq, hk, d):
    (q, k, v, g), ranges, dense = _flex_case(torch.float64, hq, hk, d, seed=_seed(hq, hk, d))
    assert not dense[14:16].any() and dense.sum() > 0  # empty rows and overlaps are present
    out, lse, grads = _flex_run(q, k, v, g, ranges, ranges[2], 24, 20)
    ref_out, ref_lse, ref_grads = _oracle_run(q, k, v, g, dense)
    assert out.shape == (24, hq, d) and lse.shape == (24, hq) and lse.dtype == torch.float64
    assert max_err(out, ref_out) <= F64_TOL
    assert _lse_err(lse, ref_lse) <= F64_TOL
    assert torch.isneginf(lse[14:16]).all() and (out[14:16] == 0).all()
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert a.shape == b.shape and a.dtype == torch.float64, name
        assert max_err(a, b) <= F64_TOL, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_flash_attn_low_precision_head_dim_256(dtype):
    """Error against the float64 oracle at most twice that of the textbook formula in
    the same precision (flash-attention's bound), lse float32."""
    (q, k, v, g), ranges, dense = _flex_case(dtype, 4, 2, 256, seed=_seed(str(dtype)))
    out, lse, grads = _flex_run(q, k, v, g, ranges, attn_type_map=ranges[2])
    ref = _oracle_run(q, k, v, g, dense)
    same = _oracle_run(q, k, v, g, dense, dtype=dtype)
    eps = torch.finfo(dtype).eps
    assert out.dtype == dtype and lse.dtype == torch.float32
    for name, a, r, s in zip(
        ("out", "dq", "dk", "dv"), (out, *grads), (ref[0], *ref[2]), (same[0], *same[2])
    ):
        bound = 2 * max_err(s, r) + 4 * eps * max(1.0, r.abs().max().item())
        assert max_err(a, r) <= bound, name
    assert _lse_err(lse, ref[1]) <= 1e-3


def test_flex_flash_attn_argument_forms_agree():
    """Pair lists / AttnRanges / strings instead of tensors, the default all-full map,
    and MagiAttention's older positional order (max_seqlen_q, max_seqlen_k, map)."""
    (q, k, v, g), (qr, kr, types), _ = _flex_case(torch.float64, 2, 1, 8)
    base, base_lse, _ = _flex_run(q, k, v, g, (qr, kr), types)
    as_lists = flex_flash_attn_func(
        q,
        k,
        v,
        AttnRanges.from_ranges(qr.tolist()),
        kr.tolist(),
        [AttnMaskType.parse(int(t)) for t in types],
    )
    old_order = flex_flash_attn_func(q, k, v, qr, kr, 14, 17, types, softmax_scale=None)
    for out, lse in (as_lists, old_order):
        assert max_err(out, base) == 0 and _lse_err(lse, base_lse) == 0
    full, _ = flex_flash_attn_func(q, k, v, qr, kr)
    dense = dense_from_rects(qr.tolist(), kr.tolist(), "full", 24, 20)
    assert max_err(full, _oracle_thd(q, k, v, dense)[0]) <= F64_TOL
    scaled, _ = flex_flash_attn_func(q, k, v, qr, kr, softmax_scale=0.3)
    assert max_err(scaled, _oracle_thd(q, k, v, dense, scale=0.3)[0]) <= F64_TOL


def test_flex_flash_attn_argument_errors():
    (q, k, v, _), (qr, kr, types), _ = _flex_case(torch.float64, 2, 1, 8)
    with pytest.raises(ValueError, match="q: expected a \\(T, H, D\\)"):
        flex_flash_attn_func(q[None], k, v, qr, kr, types)
    with pytest.raises(ValueError, match="k_ranges: expected 5 ranges"):
        flex_flash_attn_func(q, k, v, qr, kr[:3], types)
    with pytest.raises(ValueError, match="attn_type_map: expected 5 entries"):
        flex_flash_attn_func(q, k, v, qr, kr, types[:2])
    with pytest.raises(ValueError, match="attn_type_map\\[0\\]"):
        flex_flash_attn_func(q, k, v, qr, kr, torch.full((5,), 7))
    with pytest.raises(ValueError, match="q_ranges"):
        flex_flash_attn_func(q, k, v, torch.tensor([[5, 2]]), kr[:1], types[:1])
    with pytest.raises(ValueError, match="k_ranges\\[0\\]"):
        flex_flash_attn_func(q, k, v, qr[:1], torch.tensor([[0, 99]]), types[:1])
    with pytest.raises(ValueError, match="softcap"):
        flex_flash_attn_func(q, k, v, qr, kr, types, softcap=5.0)
    with pytest.raises(ValueError, match="sink"):
        flex_flash_attn_func(q, k, v, qr, kr, types, sink=torch.zeros(1, 2))


# -- ranges and mask helpers ---------------------------------------------------------------


def test_attn_ranges():
    r = AttnRanges.from_ranges([[0, 4], (4, 9), AttnRange(2, 3)])
    assert len(r) == 3 and r.size == 3 and r.total_seqlen == 10 and r.max_seqlen == 5
    assert r.to_naive_ranges() == [(0, 4), (4, 9), (2, 3)]
    assert [x.seqlen for x in r] == [4, 5, 1] and r[1] == AttnRange(4, 9)
    assert r.start == 0 and r.end == 9 and not r.is_empty() and not r.is_non_overlap()
    assert r[:2].is_cu_seqlens(9) and r[:2].to_cu_seqlens(9) == [0, 4, 9]
    assert r.merge().to_naive_ranges() == [(0, 9)]
    assert torch.equal(r.to_tensor(), torch.tensor([[0, 4], [4, 9], [2, 3]], dtype=torch.int32))
    assert AttnRanges.from_ranges(r.to_tensor()) == r and hash(r.clone()) == hash(r)
    assert AttnRanges.from_cu_seqlens(torch.tensor([0, 3, 7]), 7).to_naive_ranges() == [
        (0, 3),
        (3, 7),
    ]
    start, end = AttnRange.from_range([2, 6])
    assert (start, end) == (2, 6) and AttnRange(2, 6).intersect(AttnRange(7, 9)).is_empty()
    empty = AttnRanges()
    empty.append((1, 2))
    empty.extend([[3, 5]])
    assert empty.to_naive_ranges() == [(1, 2), (3, 5)] and AttnRanges().to_tensor().shape == (0, 2)
    with pytest.raises(ValueError, match="start <= end"):
        AttnRange(5, 2)
    with pytest.raises(ValueError, match="\\(start, end\\) pair"):
        AttnRanges.from_ranges([[1, 2, 3]])
    with pytest.raises(ValueError, match="cu_seqlens"):
        AttnRanges.from_cu_seqlens([0, 5, 3])


def _dense_of(q_ranges, k_ranges, types, sq, sk):
    return dense_from_rects(q_ranges.to_naive_ranges(), k_ranges.to_naive_ranges(), types, sq, sk)


def _rects_disjoint(q_ranges, k_ranges, types, sq, sk) -> bool:
    total = sum(
        int(_dense_of(AttnRanges.from_ranges([a]), AttnRanges.from_ranges([b]), [t], sq, sk).sum())
        for a, b, t in zip(q_ranges, k_ranges, types)
    )
    return total == int(_dense_of(q_ranges, k_ranges, types, sq, sk).sum())


@pytest.mark.parametrize(
    "q_range, k_range, window",
    [
        ((5, 15), (5, 15), (2, 3)),
        ((0, 12), (3, 20), (4, 0)),  # Tq < Tk
        ((2, 20), (0, 9), (3, 2)),  # Tq > Tk: MagiAttention keeps the last Tk rows only
        ((0, 10), (0, 10), (-1, 1)),
        ((0, 10), (0, 10), (0, -1)),
        ((0, 8), (0, 8), (-1, -1)),
        ((3, 9), (0, 30), (1, 1)),
    ],
)
def test_infer_attn_mask_from_sliding_window(q_range, k_range, window):
    qs, ks, types = infer_attn_mask_from_sliding_window(
        AttnRange(*q_range), AttnRange(*k_range), window
    )
    sq, sk = 24, 32
    want = torch.zeros(sq, sk, dtype=torch.bool)
    lq = min(q_range[1] - q_range[0], k_range[1] - k_range[0])
    want[q_range[1] - lq : q_range[1], slice(*k_range)] = dense_window(
        lq, k_range[1] - k_range[0], *window
    )
    assert all(isinstance(t, AttnMaskType) for t in types) and len(qs) == len(ks) == len(types)
    assert torch.equal(_dense_of(qs, ks, types, sq, sk), want)
    assert _rects_disjoint(qs, ks, types, sq, sk)


def test_infer_attn_mask_from_cu_seqlens():
    cu_q, cu_k = torch.tensor([0, 6, 6, 17], dtype=torch.int32), [0, 9, 12, 19]
    for causal in (False, True):
        qs, ks, types, tq, tk = infer_attn_mask_from_cu_seqlens(cu_q, cu_k, causal=causal)
        assert (tq, tk) == (17, 19) and len(qs) == 3
        want = torch.zeros(tq, tk, dtype=torch.bool)
        for a, b, c, d in ((0, 6, 0, 9), (6, 6, 9, 12), (6, 17, 12, 19)):
            want[a:b, c:d] = dense_window(b - a, d - c, -1, 0 if causal else -1)
        assert torch.equal(_dense_of(qs, ks, types, tq, tk), want)

    cu = [0, 10, 25]
    for window, g in (((3, 1), 0), ((3, 1), 4), ((2, -1), 3), ((-1, 0), 2), ((4, 0), 30)):
        qs, ks, types, tq, tk = infer_attn_mask_from_cu_seqlens(
            cu, cu, window_size=window, global_window_size=g
        )
        want = torch.zeros(25, 25, dtype=torch.bool)
        for a, b in ((0, 10), (10, 25)):
            n = b - a
            i = torch.arange(n).view(-1, 1)
            j = torch.arange(n).view(1, -1)
            glob = (j < g) & ((j <= i + window[1]) if window[1] >= 0 else True)
            want[a:b, a:b] = dense_window(n, n, *window) | glob
        assert torch.equal(_dense_of(qs, ks, types, tq, tk), want), (window, g)
        assert _rects_disjoint(qs, ks, types, tq, tk)
    with pytest.raises(ValueError, match="causal: must be False"):
        infer_attn_mask_from_cu_seqlens(cu, cu, causal=True, window_size=(2, 0))
    with pytest.raises(ValueError, match="cu_seqlens_k: expected 3 entries"):
        infer_attn_mask_from_cu_seqlens(cu, [0, 25])
    with pytest.raises(ValueError, match="window_size"):
        infer_attn_mask_from_cu_seqlens(cu, cu, window_size=(-2, 0))


def test_compute_pad_size_and_batch_helpers():
    assert compute_pad_size(125, 2, 128, 512) == 899  # the varlen example: 1024 = 2 x 512
    assert compute_pad_size(960, 2, 128, 512) == 64
    assert compute_pad_size(1024, 2, 128, 512) == 0 and compute_pad_size(0, 4, 64, 8) == 0
    assert compute_pad_size(125, 2, 512) == 899  # MagiAttention >= 1.0: (seqlen, cp, chunk)
    assert compute_pad_size(30, 4, chunk_size=4) == 2
    for args, name in (((-1, 2, 8, 4), "total_seqlen_q"), ((9, 0, 8, 4), "cp_size")):
        with pytest.raises(ValueError, match=name):
            compute_pad_size(*args)
    with pytest.raises(ValueError, match="chunk_size"):
        compute_pad_size(9, 2, 8, 0)
    with pytest.raises(ValueError, match="chunk_size: required"):
        compute_pad_size(9, 2)

    x = torch.randn(3, 5, 4)
    assert torch.equal(squash_batch_dim(x), x.reshape(15, 4))
    cu_q, cu_k = full_attention_to_varlen_attention(3, 5)
    assert cu_q.tolist() == [0, 5, 10, 15] and cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k)
    with pytest.raises(ValueError, match="x: expected at least 2 dims"):
        squash_batch_dim(torch.randn(4))


def test_configs():
    cfg = DistAttnConfig()
    assert isinstance(cfg.dispatch_config.alg, MinHeapDispatchAlg)
    assert cfg.overlap_config.stages == 1 and cfg.high_bandwith_domain_size == 1
    assert OverlapConfig(degree=3).stages == 3 and OverlapConfig(degree=0).stages == 1
    assert OverlapConfig(mode=AttnOverlapMode.DYNAMIC, degree=None).stages is None
    assert OverlapConfig(mode="dynamic", degree=None).mode is AttnOverlapMode.DYNAMIC
    assert OverlapConfig(enable=False, degree=5).stages == 1
    seed_cfg = _seed_overlap()  # the documented examples' overlap config
    assert seed_cfg.stages == 2 and hash(seed_cfg) == hash(
        OverlapConfig(degree=2, alg=UniformOverlapAlg(random_costs=True, random_seed=42))
    )
    assert RandomDispatchAlg(7).seed == 7 and RandomDispatchAlg(7).kind == "random"
    assert SequentialDispatchAlg().kind == "sequential" and MinHeapDispatchAlg().kind == "minheap"
    bad = (
        (lambda: OverlapConfig(mode=AttnOverlapMode.DYNAMIC, degree=2), "degree: must be None"),
        (lambda: OverlapConfig(degree=None), "degree: required"),
        (lambda: OverlapConfig(degree=80), "max_num_chunks"),
        (lambda: OverlapConfig(mode="sometimes"), "mode"),
        (lambda: OverlapConfig(min_chunk_size=0), "min_chunk_size"),
        (lambda: OverlapConfig(alg="uniform"), "alg"),
        (lambda: DispatchConfig(alg="minheap"), "alg"),
        (lambda: RandomDispatchAlg(-1), "seed"),
        (lambda: DistAttnConfig(high_bandwith_domain_size=0), "high_bandwith_domain_size"),
        (lambda: DistAttnConfig(dispatch_config=MinHeapDispatchAlg()), "dispatch_config"),
        (lambda: DistAttnConfig(overlap_config=None), "overlap_config"),
    )
    for make, match in bad:
        with pytest.raises(ValueError, match=match):
            make()


# -- keys on paper (SimulatedGroup: planned, never run) --------------------------------------

CAUSAL_60 = dict(q_ranges=[[0, 60]], k_ranges=[[0, 60]], attn_mask_type="causal")


def _key(group, **kw):
    args = dict(CAUSAL_60, total_seqlen_q=60, total_seqlen_k=60, head_dim=8, cp_group=group)
    args.update(kw)
    return magi_attn_flex_key(None, **args)[1]


def test_key_mapping_on_paper():
    g = SimulatedGroup(4, 1)
    key = _key(g, chunk_size=4)
    plan = key.plan
    assert key.pad_size == 4 and plan.placement.padded_len == 64 and plan.placement.pad == 0
    assert plan.placement.kind == "minheap" and plan.schedule.name.startswith("groupcast")
    assert plan.local_len == 16 and plan.placement.chunk_size == 4
    assert key.degree == 1 and key.node_size is None and get_most_recent_key() is key
    assert _key(g, chunk_size=4, pad_size=4) == key and hash(_key(g, chunk_size=4)) == hash(key)
    assert _key(g, chunk_size=4, pad_size=20).plan.placement.padded_len == 80

    cfg = DistAttnConfig(
        dispatch_config=DispatchConfig(alg=RandomDispatchAlg(3)),
        overlap_config=OverlapConfig(mode=AttnOverlapMode.DYNAMIC, degree=None),
        high_bandwith_domain_size=2,
    )
    key = _key(g, chunk_size=4, dist_attn_config=cfg)
    assert key.plan.placement.kind == "random" and key.degree is None and key.node_size == 2
    assert _key(g, chunk_size=4, is_k_permutable=False).plan.placement.kind == "sequential"

    cross = _key(
        g,
        q_ranges=[[0, 60]],
        k_ranges=[[0, 33]],
        total_seqlen_k=33,
        chunk_size=4,
        is_same_source=False,
        is_q_permutable=False,
    )
    assert cross.plan.placement.kind == "sequential" and cross.plan.kv_placement.kind == "minheap"
    assert cross.kv_pad_size == 15 and cross.plan.kv_placement.padded_len == 48


def test_most_recent_key_follows_use():
    """The key last built or handed to dispatch / calc_attn / undispatch /
    get_position_ids, held by the package's one RecentKey."""
    from hamilton_attn.compat.magi.dist_attn_runtime_mgr import RECENT_KEY

    g = SimulatedGroup(2, 0)
    a, b = _key(g, chunk_size=4), _key(g, chunk_size=2)
    assert get_most_recent_key() is b and a != b
    get_position_ids(a)
    assert get_most_recent_key() is a
    dispatch(torch.randn(60, 3), b)
    assert get_most_recent_key() is b and RECENT_KEY.get() is b
    RECENT_KEY.clear()
    assert get_most_recent_key() is None
    with pytest.raises(ValueError, match="key: expected a DistAttnRuntimeKey"):
        undispatch(torch.randn(32, 3), None)
    assert get_most_recent_key() is None  # a rejected key is not recorded


def test_dispatch_functions_are_key_then_dispatch():
    """``magi_attn_*_dispatch`` take their key function's arguments (one signature) and
    hand ``seq_dim`` on to dispatch: x of 60 x 60 tokens, dispatched along either dim."""
    import inspect

    for dispatch_fn, key_fn in (
        (magi_attn_flex_dispatch, magi_attn_flex_key),
        (magi_attn_varlen_dispatch, magi_attn_varlen_key),
    ):
        assert dispatch_fn.__name__.endswith("_dispatch") and dispatch_fn.__doc__
        params = [inspect.signature(f).parameters.values() for f in (dispatch_fn, key_fn)]
        assert [(p.name, p.kind, p.default) for p in params[0]] == [
            (p.name, p.kind, p.default) for p in params[1]
        ]
    g = SimulatedGroup(1)
    x = torch.randn(60, 60, 2)
    for seq_dim, shape in ((None, (63, 60, 2)), (1, (60, 63, 2))):
        local, key = magi_attn_flex_dispatch(
            x, [[0, 60]], [[0, 60]], "causal", 60, 60, None, None, 7, g, seq_dim=seq_dim
        )
        assert local.shape == shape and key.pad_size == 3
        assert torch.equal(undispatch(local, key, seq_dim=seq_dim), x)
    local, key = magi_attn_varlen_dispatch(x, [0, 30, 60], [0, 30, 60], None, None, 4, g, seq_dim=1)
    assert local.shape == (60, 60, 2) and torch.equal(undispatch(local, key, seq_dim=1), x)


def test_key_argument_errors():
    g = SimulatedGroup(2, 0)
    bad = (
        (dict(pad_size=3, chunk_size=4), "pad_size: total_seqlen_q \\+ pad_size = 63"),
        (dict(total_seqlen_k=50), "total_seqlen_k: is_same_source=True"),
        (dict(attn_mask_type="sideways"), "attn_mask_type\\[0\\]"),
        (dict(attn_mask_type=["full", "causal"]), "attn_mask_type: expected 1 entries"),
        (dict(k_ranges=[[0, 60], [0, 1]]), "k_ranges: expected 1 ranges"),
        (dict(q_ranges=[[0, 61]]), "q_ranges\\[0\\]"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(pad_size=-1), "pad_size"),
        (dict(head_dim=0), "head_dim"),
        (dict(is_same_source=1), "is_same_source: expected a bool"),
        (dict(cp_mesh=object()), "cp_group, cp_mesh: give one"),
        (dict(cp_group=None, cp_mesh=object()), "cp_mesh: expected a DeviceMesh"),
        (dict(dist_attn_config=OverlapConfig()), "dist_attn_config"),
        (
            dict(dist_attn_config=DistAttnConfig(high_bandwith_domain_size=3)),
            "high_bandwith_domain_size: 3 must divide",
        ),
    )
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            _key(g, **kw)
    key = _key(g, chunk_size=4)
    x = torch.randn(60, 3)
    with pytest.raises(ValueError, match="x: expected 60 or 64 tokens along dim 0"):
        dispatch(x[:50], key)
    with pytest.raises(ValueError, match="seq_dim"):
        dispatch(x, key, seq_dim=2)
    with pytest.raises(ValueError, match="role"):
        dispatch(x, key, role="k")
    with pytest.raises(ValueError, match="key: expected a DistAttnRuntimeKey"):
        dispatch(x, "key")
    with pytest.raises(ValueError, match="q, k, v: expected all"):
        calc_attn(torch.randn(32, 2, 4), torch.randn(1, 32, 2, 4), torch.randn(32, 2, 4), key)
    with pytest.raises(ValueError, match="softcap"):
        calc_attn(*(torch.randn(32, 2, 4) for _ in range(3)), key, softcap=1.0)
    with pytest.raises(ValueError, match="init_hierarchical_mesh|sizes"):
        init_hierarchical_mesh(1, 2, 3, 4)


# -- distributed: shared by the workers ----------------------------------------------------

# A self-attention mask of all four kinds with overlaps; rows 17..19 see nothing.
SELF_RECTS = (
    ((0, 17), (0, 17), "causal"),
    ((5, 15), (12, 30), "inv_causal"),
    ((20, 45), (0, 45), "bi_causal"),
    ((30, 40), (10, 20), "full"),
    ((42, 45), (40, 45), "causal"),
)
# Cross-attention, Tq=37 x Tk=23: bottom-right causal leaves rows 0..13 to the others.
CROSS_RECTS = (
    ((0, 37), (0, 23), "causal"),
    ((0, 10), (5, 15), "full"),
    ((20, 30), (0, 23), "inv_causal"),
)


def dcase(
    w, rects=SELF_RECTS, tq=45, tk=45, *, same=True, q_perm=True, k_perm=True, alg="minheap",
    mode="static", degree=1, chunk=4, pad=None, batch=None, mesh=None, domain=1, hq=4, hk=2, d=8,
) -> dict:  # fmt: skip
    c = dict(locals())  # the arguments, in their order
    c["seed"] = _seed(sorted(c.items()))
    return c


def _config(c) -> DistAttnConfig:
    alg = {
        "minheap": MinHeapDispatchAlg(),
        "sequential": SequentialDispatchAlg(),
        "random": RandomDispatchAlg(5),
    }[c["alg"]]
    if c["mode"] == "off":
        overlap = OverlapConfig(enable=False)
    elif c["mode"] == "dynamic":
        overlap = OverlapConfig(mode=AttnOverlapMode.DYNAMIC, degree=None)
    else:
        overlap = OverlapConfig(degree=c["degree"])
    return DistAttnConfig(
        dispatch_config=DispatchConfig(alg=alg),
        overlap_config=overlap,
        high_bandwith_domain_size=c["domain"],
    )


def _mesh(spec):
    """None, ``init_hierarchical_mesh(*spec)`` for a tuple, or a hand-built mesh: a 1-d
    one, a 2 x 2 one whose nodes are ranks {0, 2} and {1, 3} (not the world's order), or
    ``"replica"``: this rank's 1 x 2 slice of a (dp 2, inter 1, intra 2) world mesh
    (ranks {0, 1} or {2, 3}: part of the world)."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if spec is None:
        return None
    if spec == "replica":
        world_mesh = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("dp", "inter", "intra"))
        return world_mesh["inter", "intra"]
    if spec == "1d":
        return DeviceMesh("cpu", torch.arange(4), mesh_dim_names=("cp",))
    if spec == "strided":
        return DeviceMesh("cpu", torch.tensor([[0, 2], [1, 3]]), mesh_dim_names=("inter", "intra"))
    return init_hierarchical_mesh(*spec)


def _w_cases(ctx, cases):
    """Per case: errors of the undispatched out / lse and of the full-tensor gradients
    against the float64 oracle, and what the key planned."""
    results = []
    for c in cases:
        gen = torch.Generator().manual_seed(c["seed"])
        b = c["batch"]
        lead = () if b is None else (b,)
        q, k, v, g = (
            torch.randn(*lead, t, h, c["d"], dtype=torch.float64, generator=gen)
            for t, h in (
                (c["tq"], c["hq"]),
                (c["tk"], c["hk"]),
                (c["tk"], c["hk"]),
                (c["tq"], c["hq"]),
            )
        )
        rects = c["rects"]
        mesh = _mesh(c["mesh"])
        _, key = magi_attn_flex_key(
            None,
            q_ranges=AttnRanges.from_ranges([r[0] for r in rects]),
            k_ranges=AttnRanges.from_ranges([r[1] for r in rects]),
            attn_mask_type=[r[2] for r in rects],
            total_seqlen_q=c["tq"],
            total_seqlen_k=c["tk"],
            head_dim=c["d"],
            pad_size=c["pad"],
            chunk_size=c["chunk"],
            cp_group=None if mesh is not None else ctx.group,
            cp_mesh=mesh,
            dist_attn_config=_config(c),
            is_same_source=c["same"],
            is_q_permutable=c["q_perm"],
            is_k_permutable=c["k_perm"],
        )
        kv_role = "q" if c["same"] else "kv"
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        q_l = dispatch(leaves[0], key)
        k_l, v_l = (dispatch(t, key, role=kv_role) for t in leaves[1:])
        out_l, lse_l = calc_attn(q_l, k_l, v_l, key)
        out = undispatch(out_l, key)
        lse = undispatch(lse_l, key)
        grads = torch.autograd.grad((out * g).sum(), leaves)

        dense = dense_from_rects(
            [r[0] for r in rects], [r[1] for r in rects], [r[2] for r in rects], c["tq"], c["tk"]
        )
        # The oracle from fresh leaves, in either layout.
        ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        if b is None:
            o, lse_ref = attention_oracle(
                *(t.transpose(0, 1)[None] for t in ref_leaves), dense, 1.0 / math.sqrt(c["d"])
            )
            o, lse_ref = o[0].transpose(0, 1), lse_ref[0].transpose(0, 1)
        else:
            o, lse_ref = attention_oracle(
                *(t.transpose(1, 2) for t in ref_leaves), dense, 1.0 / math.sqrt(c["d"])
            )
            o, lse_ref = o.transpose(1, 2), lse_ref.transpose(1, 2)
        ref_out, ref_lse = o.detach(), lse_ref.detach()
        ref_grads = torch.autograd.grad((o * g).sum(), ref_leaves)

        pos = get_position_ids(key)
        idx = dispatch(torch.arange(c["tq"], dtype=torch.float64), key, pad_value=-1.0)
        real = pos < c["tq"]
        k_pos = get_position_ids(key, role=kv_role)
        k_back = undispatch(k_l, key, role=kv_role)
        results.append(
            {
                "shapes": [
                    list(out.shape) == list(q.shape),
                    list(lse.shape) == list(q.shape[:-1]),
                    list(q_l.shape[:-2]) == [*lead, key.plan.local_len],
                    list(k_l.shape[:-2]) == [*lead, key.plan.kv_placement.local_len],
                ],
                "lse_dtype": str(lse.dtype),
                "err": {
                    "out": max_err(out, ref_out),
                    "lse": _lse_err(lse, ref_lse),
                    **{n: max_err(a, r) for n, a, r in zip(("dq", "dk", "dv"), grads, ref_grads)},
                },
                "positions_ok": bool(torch.equal(idx[real].long(), pos[real]))
                and bool((idx[~real] == -1).all())
                and k_pos.numel() == key.plan.kv_placement.local_len,
                "kv_roundtrip": bool(torch.equal(k_back, k)),
                "kinds": (key.plan.placement.kind, key.plan.kv_placement.kind),
                "self": key.plan.self_attention,
                "node_size": key.node_size,
                "degree": key.degree,
                "world": key.cp_size,
            }
        )
    return results


def assert_cases_ok(cases, per_rank):
    for rank, results in enumerate(per_rank):
        for c, res in zip(cases, results, strict=True):
            tag = f"rank {rank}: " + ", ".join(
                f"{k}={c[k]}" for k in ("w", "same", "q_perm", "k_perm", "alg", "batch", "mesh")
            )
            assert res["world"] == c["w"], tag
            assert all(res["shapes"]), f"{tag}: shapes {res['shapes']}"
            assert res["lse_dtype"] == "torch.float64", tag
            assert res["positions_ok"], f"{tag}: get_position_ids disagrees with dispatch"
            assert res["kv_roundtrip"], f"{tag}: undispatch(dispatch(k)) != k"
            for name, e in res["err"].items():
                assert e <= F64_TOL, f"{tag}: {name} error {e:.3e}"
            assert res["self"] == c["same"], tag


def _expected_kinds(c):
    q = c["alg"] if c["q_perm"] and (c["k_perm"] or not c["same"]) else "sequential"
    if c["same"]:
        return (q, q)
    return (q, c["alg"] if c["k_perm"] else "sequential")


# -- distributed tests -------------------------------------------------------------------


@pytest.mark.parametrize("w", [1, 2, 4])
def test_self_attention_forward_backward(pool, w):
    """All four kinds with overlaps and empty rows; token-major and batched layouts; the
    padding given, computed, or left to the core."""
    cases = [
        dcase(w, chunk=4),
        dcase(w, chunk=None, batch=2, degree=2),
        dcase(w, chunk=2, pad=compute_pad_size(45, w, 8, 2) + 2 * w, mode="dynamic"),
    ]
    per_rank = pool.run(_w_cases, w, cases)
    assert_cases_ok(cases, per_rank)
    for c, res in zip(cases, per_rank[0]):
        assert res["kinds"] == ("minheap", "minheap")
        assert res["degree"] == (None if c["mode"] == "dynamic" else c["degree"])


@pytest.mark.parametrize("w", [2, 4])
def test_cross_attention_and_permutable_flags(pool, w):
    """Tq=37 != Tk=23, every combination of the permutable flags (not permutable ->
    sequential); plus self-attention with a fixed side, and the baseline algorithms."""
    cases = [
        dcase(w, CROSS_RECTS, 37, 23, same=False, q_perm=qp, k_perm=kp)
        for qp, kp in ((True, True), (True, False), (False, True), (False, False))
    ]
    cases += [
        dcase(w, same=True, q_perm=False),
        dcase(w, CROSS_RECTS, 37, 23, same=False, alg="random", batch=3, chunk=None),
        dcase(w, alg="sequential", mode="off"),
    ]
    per_rank = pool.run(_w_cases, w, cases)
    assert_cases_ok(cases, per_rank)
    for c, res in zip(cases, per_rank[0]):
        assert tuple(res["kinds"]) == _expected_kinds(c), c


def test_hierarchical_mesh_2x2(pool):
    """cp_mesh from init_hierarchical_mesh(2, 2) (and MagiAttention's 3-argument form),
    high_bandwith_domain_size=2 without a mesh, or a mesh whose nodes are not
    consecutive ranks: node_size 2, same results; a 1-d mesh plans flat."""
    cases = [
        dcase(4, mesh=(2, 2), degree=2),
        dcase(4, CROSS_RECTS, 37, 23, same=False, mesh=(4, 2, 2)),
        dcase(4, domain=2, batch=2),
        dcase(4, mesh="strided"),
        dcase(4, mesh="1d"),
    ]
    per_rank = pool.run(_w_cases, 4, cases)
    assert_cases_ok(cases, per_rank)
    assert [res["node_size"] for res in per_rank[0]] == [2, 2, 2, 2, None]


def _w_replica_groups(ctx):
    """The group of this rank's replica mesh: its ranks, made once (two keys share it)."""
    import torch.distributed as dist

    mesh = _mesh("replica")
    keys = [
        magi_attn_flex_key(None, [[0, 12]], [[0, 12]], kind, 12, 12, cp_mesh=mesh)[1]
        for kind in ("causal", "full")
    ]
    return [
        mesh.mesh.flatten().tolist(),
        dist.get_process_group_ranks(keys[0].cp_group),
        keys[0].cp_group is keys[1].cp_group,
    ]


def test_mesh_over_part_of_the_world(pool):
    """A 2-d mesh of one data-parallel replica (ranks {0, 1} or {2, 3} of 4) runs on a
    group over its own ranks, made with public calls once per rank set; every replica
    computes the whole problem on its two ranks."""
    cases = [
        dcase(2, mesh="replica"),
        dcase(2, CROSS_RECTS, 37, 23, same=False, mesh="replica", batch=2),
    ]
    per_rank = pool.run(_w_cases, 4, cases)
    assert_cases_ok(cases, per_rank)
    assert [res["node_size"] for res in per_rank[0]] == [None, None]  # one node of 2
    for rank, (mesh_ranks, group_ranks, shared) in enumerate(pool.run(_w_replica_groups, 4)):
        assert mesh_ranks == group_ranks == ([0, 1] if rank < 2 else [2, 3]), rank
        assert shared, f"rank {rank}: a second key made a second group"


def _w_mesh_facts(ctx):
    mesh = init_hierarchical_mesh(2, 2)
    return [mesh.mesh_dim_names, tuple(mesh.mesh.shape), mesh.device_type]


def test_init_hierarchical_mesh(pool):
    for facts in pool.run(_w_mesh_facts, 4):
        assert facts == [("inter", "intra"), (2, 2), "cpu"]


# -- MagiAttention's documented examples, on gloo in float32 ------------------------------


def _check32(got, ref64, same32) -> bool:
    """flash-attention's bound: float32 error <= 2 x the float32 textbook's + a few ulps."""
    eps = torch.finfo(torch.float32).eps
    bound = 2 * max_err(same32, ref64) + 8 * eps * max(1.0, ref64.abs().max().item())
    return max_err(got, ref64) <= bound


def _reference_x(x, projections, heads, head_dim, dense, g):
    """Out and x's gradient of one device in ``dtype`` of x: project, attend, backward."""
    x = x.detach().clone().requires_grad_()
    q, k, v = (p(x).view(-1, h, head_dim).transpose(0, 1)[None] for p, h in zip(projections, heads))
    out, _ = attention_oracle(q, k, v, dense, 1.0 / math.sqrt(head_dim), dtype=x.dtype)
    out = out[0].transpose(0, 1)
    (grad,) = torch.autograd.grad((out * g).sum(), [x])
    return out.detach(), grad


def _seed_overlap() -> OverlapConfig:
    """The overlap config of both documented examples: static, two stages."""
    return OverlapConfig(
        enable=True,
        mode=AttnOverlapMode.STATIC,
        degree=2,
        min_chunk_size=512,
        max_num_chunks=64,
        alg=UniformOverlapAlg(random_costs=True, random_seed=42),
    )


def _seed_config() -> DistAttnConfig:
    """The config of both documented examples: min-heap dispatch, static overlap."""
    return DistAttnConfig(
        dispatch_config=DispatchConfig(alg=MinHeapDispatchAlg()),
        overlap_config=_seed_overlap(),
        high_bandwith_domain_size=1,
    )


def _seed_attend_and_check(x, leaf, local_x, key, embed_dim, heads, head_dim, dense):
    """The documented examples' tail: q, k, v projections (``heads`` = their head
    counts) of the local x, calc_attn, undispatch and a backward with a seeded upstream
    gradient; then out and the gradient of ``leaf`` (x's leaf, seen in x's shape)
    against one device. Returns ``[local shape, out shape, out ok, grad ok]``."""
    projections = [torch.nn.Linear(embed_dim, h * head_dim, dtype=x.dtype) for h in heads]
    local_q, local_k, local_v = (
        p(local_x).view(-1, h, head_dim) for p, h in zip(projections, heads)
    )
    local_out, _ = calc_attn(local_q, local_k, local_v, key)
    total_out = undispatch(local_out, key)

    g = torch.randn(total_out.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    (total_out * g).sum().backward()
    x_grad = leaf.grad.reshape(x.shape)
    checks = _compare_with_one_device(
        x.detach(), total_out, x_grad, projections, heads, head_dim, dense, g
    )
    return [list(local_x.shape), list(total_out.shape), *checks]


def _compare_with_one_device(x, total_out, x_grad, projections, heads, head_dim, dense, g):
    doubles = [
        torch.nn.Linear(p.in_features, p.out_features, dtype=torch.float64) for p in projections
    ]
    for d, p in zip(doubles, projections):
        d.load_state_dict({n: t.double() for n, t in p.state_dict().items()})
    out64, grad64 = _reference_x(x.double(), doubles, heads, head_dim, dense, g.double())
    out32, grad32 = _reference_x(x, projections, heads, head_dim, dense, g)
    return [_check32(total_out, out64, out32), _check32(x_grad, grad64, grad32)]


def _w_seed_varlen(ctx):
    # The varlen example of MagiAttention's docs: gloo, float32, small sizes.
    embed_dim, dtype, cp_size, head_dim, chunk_size = 32, torch.float32, ctx.world_size, 8, 4
    q_heads, kv_heads, batch_size, seqlen = 4, 2, 3, 7
    dist_attn_config = _seed_config()
    torch.manual_seed(0)  # every rank draws the same x and the same layers
    x_with_batch = torch.randn(batch_size, seqlen, embed_dim, dtype=dtype, requires_grad=True)
    x = squash_batch_dim(x_with_batch)
    cu_seqlens_q, cu_seqlens_k = full_attention_to_varlen_attention(batch_size, seqlen)
    total_seqlen_q = batch_size * seqlen
    pad_size = compute_pad_size(total_seqlen_q, cp_size, head_dim, chunk_size)
    local_x, magi_attn_runtime_key = magi_attn_varlen_dispatch(
        x,
        cu_seqlens_q,
        cu_seqlens_k,
        head_dim=head_dim,
        pad_size=pad_size,
        chunk_size=chunk_size,
        cp_group=ctx.group,
        cp_mesh=None,
        causal=False,
        dist_attn_config=dist_attn_config,
    )
    cu = cu_seqlens_q.tolist()
    dense = dense_from_rects(list(zip(cu, cu[1:])), list(zip(cu, cu[1:])), "full", 21, 21)
    key, heads = magi_attn_runtime_key, (q_heads, kv_heads, kv_heads)
    return _seed_attend_and_check(x, x_with_batch, local_x, key, embed_dim, heads, head_dim, dense)


def _w_seed_flex(ctx):
    # The flexible example of MagiAttention's docs: gloo, float32, 1/16 of its sizes.
    embed_dim, dtype, cp_size, head_dim = 32, torch.float32, ctx.world_size, 8
    total_seqlen_q = total_seqlen_k = 60
    chunk_size, q_heads, kv_heads = 8, 4, 2
    dist_attn_config = _seed_config()
    torch.manual_seed(0)
    x = torch.randn(total_seqlen_q, embed_dim, dtype=dtype, requires_grad=True)
    q_ranges = AttnRanges.from_ranges(
        [[0, 8], [8, 16], [16, 24], [24, 32], [32, 40], [40, 48], [48, 60]]
    )
    k_ranges = AttnRanges.from_ranges(
        [[0, 8], [0, 16], [0, 24], [0, 32], [32, 40], [32, 48], [48, 60]]
    )
    attn_mask_type = [AttnMaskType.FULL] * 7
    pad_size = compute_pad_size(total_seqlen_q, cp_size, head_dim, chunk_size)
    local_x, magi_attn_runtime_key = magi_attn_flex_dispatch(
        x,
        q_ranges=q_ranges,
        k_ranges=k_ranges,
        attn_mask_type=attn_mask_type,
        total_seqlen_q=total_seqlen_q,
        total_seqlen_k=total_seqlen_k,
        head_dim=head_dim,
        pad_size=pad_size,
        chunk_size=chunk_size,
        cp_group=ctx.group,
        cp_mesh=None,
        dist_attn_config=dist_attn_config,
        is_same_source=True,
        is_q_permutable=True,
        is_k_permutable=True,
    )
    dense = dense_from_rects(q_ranges.to_naive_ranges(), k_ranges.to_naive_ranges(), "full", 60, 60)
    key, heads = magi_attn_runtime_key, (q_heads, kv_heads, kv_heads)
    return _seed_attend_and_check(x, x, local_x, key, embed_dim, heads, head_dim, dense)


def test_seed_varlen_example(pool):
    for local_shape, out_shape, out_ok, grad_ok in pool.run(_w_seed_varlen, 2):
        assert local_shape == [12, 32]  # (21 + pad 3) / 2 tokens of embed_dim 32
        assert out_shape == [21, 4, 8]
        assert out_ok, "out differs from one device"
        assert grad_ok, "x's gradient differs from one device"


def test_seed_flex_example(pool):
    for local_shape, out_shape, out_ok, grad_ok in pool.run(_w_seed_flex, 2):
        assert local_shape == [32, 32]  # (60 + pad 4) / 2
        assert out_shape == [60, 4, 8]
        assert out_ok and grad_ok


def test_module_exports_the_seed_names():
    for name in magi.__all__:
        assert hasattr(magi, name), name
    assert magi.AttnMaskType is ha.AttnMaskType
