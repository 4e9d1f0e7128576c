"""Head parallelism (Ulysses) and hybrids of heads x context against the float64 oracle.

Every case runs ``dispatch -> calc_attn -> undispatch`` on ranks 0..W-1 of the shared
``pool`` with float64 inputs and compares, on every rank, the output, lse and the
gradients of the full q, k, v (dispatch's backward gathers: every rank holds the whole
input gradient) with ``attention_oracle`` on the full tensors, written from the
definition. Bad inputs must raise a ValueError on every rank before any transfer.
"""

from __future__ import annotations

import pytest
import torch

import hamilton_attn as ha
from hamilton_attn.planner.heads import group_placement, head_layout, kv_repeat
from hamilton_attn.testing.oracle import attention_oracle, max_err

TOL = 1e-9
HEADS = ((8, 8), (8, 2), (6, 1), (12, 4))
MASKS = ("full", "causal", "docs", "window", "cross")


def _mask(name: str, s: int) -> ha.Mask:
    if name == "full":
        return ha.Mask.full(s)
    if name == "causal":
        return ha.Mask.causal(s)
    if name == "docs":  # packed documents, one of a single token
        return ha.Mask.varlen([0, s // 5, s // 2, s // 2 + 1, s], causal=True)
    if name == "window":
        return ha.Mask.sliding_window(s, (5, 0))
    if name == "cross":  # Sq != Sk: every query sees a prefix of the keys that grows
        return ha.Mask.from_ranges([(0, s)], [(0, s + 9)], ["causal"], s, s + 9)
    raise KeyError(name)


def _case(ctx, schedule, degree, hq, hk, mask_name, dispatch, s, batch, seed, backward="replay"):
    m = _mask(mask_name, s)
    kw = dict(kv_dispatch="contiguous") if mask_name == "cross" else {}
    p = ha.plan(m, ctx.group, schedule=schedule, ulysses_degree=degree, dispatch=dispatch,
                backward=backward, **kw)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    sk = m.seqlen_k
    q = torch.randn(batch, s, hq, 8, generator=g, dtype=torch.float64)
    k = torch.randn(batch, sk, hk, 8, generator=g, dtype=torch.float64)
    v = torch.randn(batch, sk, hk, 8, generator=g, dtype=torch.float64)
    do = torch.randn(batch, s, hq, 8, generator=g, dtype=torch.float64)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    bhsd = [t.transpose(1, 2) for t in (qr, kr, vr)]
    ref, ref_lse = attention_oracle(*bhsd, m.to_dense(), 8**-0.5)
    ref.transpose(1, 2).backward(do)
    kv_role = "kv" if mask_name == "cross" else "q"
    ql = ha.dispatch(q, p).requires_grad_()
    kl, vl = (ha.dispatch(t, p, role=kv_role).requires_grad_() for t in (k, v))
    out, lse = ha.calc_attn(ql, kl, vl, p, return_lse=True)
    out.backward(ha.dispatch(do, p))
    got = dict(
        out=ha.undispatch(out.detach(), p),
        lse=ha.undispatch(lse, p, seq_dim=2),
        dq=ha.undispatch(ql.grad, p),
        dk=ha.undispatch(kl.grad, p, role=kv_role),
        dv=ha.undispatch(vl.grad, p, role=kv_role),
    )
    want = dict(
        out=ref.transpose(1, 2).detach(), lse=ref_lse.detach(), dq=qr.grad, dk=kr.grad, dv=vr.grad
    )
    return {key: max_err(got[key], want[key]) for key in got}


def _c(schedule, degree, hq, hk, mask_name, dispatch, **kw):
    """One case for :func:`_case` (s, batch, seed, backward as keywords)."""
    return dict(schedule=schedule, degree=degree, hq=hq, hk=hk, mask_name=mask_name,
                dispatch=dispatch, **{"s": 41, "batch": 1, "seed": 7, **kw})  # fmt: skip


def _run(ctx, cases):
    out = []
    for c in cases:
        try:
            out.append(("ok", _case(ctx, **c)))
        except ValueError as err:
            out.append(("error", str(err)))
    return out


def _check(per_rank, cases, w):
    assert len(per_rank) == w
    for results in per_rank:
        for c, (kind, res) in zip(cases, results, strict=True):
            tag = f"{c['schedule']} u={c['degree']} H={c['hq']}/{c['hk']} {c['mask_name']}"
            if c["hq"] % (c["degree"] or w):
                assert kind == "error", tag
                assert "ulysses_degree" in res and str(c["hq"]) in res, (tag, res)
                continue
            assert kind == "ok", (tag, res)
            assert max(res.values()) < TOL, (tag, res)


@pytest.mark.parametrize("w", [1, 2, 3, 4, 8])
def test_ulysses_matches_the_oracle(pool, w):
    cases = [
        _c("ulysses", None, hq, hk, mn, d, s=29 + w, batch=2 if mn == "causal" else 1, seed=i)
        for i, ((hq, hk), mn, d) in enumerate(
            (h, mn, d) for h in HEADS for mn in MASKS for d in ("zigzag", "minheap")
        )
        if not (mn == "cross" and d == "minheap")
    ]
    _check(pool.run(_run, w, cases), cases, w)


@pytest.mark.parametrize(
    "w,degree,schedules",
    [
        (4, 2, ("ring", "groupcast", "allgather")),
        (8, 2, ("ring", "groupcast")),
        (8, 4, ("ring", "groupcast", "bidi_ring")),
        (6, 2, ("hamilton", "ring")),  # 3 head groups: a Hamiltonian decomposition exists
    ],
)
def test_hybrids_match_the_oracle(pool, w, degree, schedules):
    cases = [
        _c(sc, degree, hq, hk, mn, d)
        for sc in schedules
        for hq, hk in ((8, 2), (12, 4))
        for mn in ("causal", "docs", "cross")
        for d in (("zigzag", "minheap") if mn != "cross" else ("zigzag",))
    ]
    _check(pool.run(_run, w, cases), cases, w)


def test_reversed_backward_inside_a_hybrid_matches_the_oracle(pool):
    cases = [
        _c(sc, 2, 8, 2, mn, "zigzag", s=33, batch=1, seed=3, backward="reverse")
        for sc in ("ring", "bidi_ring")
        for mn in ("causal", "full")
    ]
    _check(pool.run(_run, 4, cases), cases, 4)


def _bad_inputs(ctx):
    out = []
    m = ha.Mask.causal(24)
    for degree in (3, 5, 0, True):
        try:
            ha.plan(m, ctx.group, schedule="ring", ulysses_degree=degree)
            out.append("planned")
        except ValueError as err:
            out.append(str(err))
    p = ha.plan(m, ctx.group, schedule="ring", ulysses_degree=2)
    heads = (3, 1) if ctx.rank == 0 else (8, 2)  # rank 0: 3 query heads over 2 members
    q = torch.randn(1, p.local_len, heads[0], 8)
    k = torch.randn(1, p.local_len, heads[1], 8)
    try:
        ha.calc_attn(q, k, k.clone(), p)
        out.append("ran")
    except ValueError as err:
        out.append(str(err))
    try:
        ha.plan(m, ctx.group, schedule="ulysses", ulysses_degree=2)
        out.append("planned")
    except ValueError as err:
        out.append(str(err))
    return out


def test_bad_degrees_and_heads_raise_on_every_rank(pool):
    per_rank = pool.run(_bad_inputs, 4)
    for r, res in enumerate(per_rank):
        assert "must divide the group's 4 ranks" in res[0] and "ulysses_degree: 3" in res[0]
        assert "must divide the group's 4 ranks" in res[1]
        assert "positive int" in res[2] and "positive int" in res[3]
        if r == 0:  # 3 query heads are not split over 2 members: this rank's own error
            assert "ulysses_degree 2 must divide the 3 query heads" in res[4], res[4]
        else:  # every other rank hears of it through the status exchange
            assert "calc_attn: rank(s) [0] of the group got invalid inputs" in res[4], res[4]
        assert "schedule='ulysses'" in res[5]


def test_kv_heads_are_repeated_to_the_lcm():
    assert kv_repeat(8, 4) == 1 and kv_repeat(2, 4) == 2 and kv_repeat(1, 8) == 8
    assert kv_repeat(4, 3) == 3 and kv_repeat(4, 6) == 3


def test_head_groups_are_consecutive_ranks_and_context_groups_stride():
    j, head, ctx_, g = head_layout(5, tuple(range(100, 108)), 2)
    assert (j, head, ctx_, g) == (1, (104, 105), (101, 103, 105, 107), 2)
    p = ha.plan(ha.Mask.causal(64), ha.SimulatedGroup(8, 5), schedule="ring", ulysses_degree=2)
    gp = group_placement(p.placement, 2)
    assert gp.world_size == 4 and gp.local_len == 2 * p.local_len
    assert gp.rank_ranges[2] == p.placement.rank_ranges[4] + p.placement.rank_ranges[5]
    assert p.heads.inner.world_size == 4 and p.heads.inner.rank == 2
    assert p.heads.group_ranks == (4, 5) and p.heads.member == 1
    assert p.heads.inner.group_ranks == (1, 3, 5, 7)
    # The fingerprint is the same on every rank (it names the degree, not the member).
    q = ha.plan(ha.Mask.causal(64), ha.SimulatedGroup(8, 2), schedule="ring", ulysses_degree=2)
    plain = ha.plan(ha.Mask.causal(64), ha.SimulatedGroup(8, 2), schedule="ring")
    assert p.fingerprint == q.fingerprint != plain.fingerprint


def _mesh_cases(ctx, names, shape, cases):
    from torch.distributed.device_mesh import DeviceMesh

    mesh = DeviceMesh("cpu", torch.arange(ctx.world_size).reshape(shape), mesh_dim_names=names)
    real_group = ctx.group
    ctx.group = mesh  # _case plans on ctx.group
    try:
        out = _run(ctx, cases)
        p = ha.plan(ha.Mask.causal(40), mesh, schedule="ring")
        out.append(("layout", (p.heads.degree, p.heads.group_ranks, p.heads.inner.group_ranks)))
    finally:
        ctx.group = real_group
    return out


@pytest.mark.parametrize("names,shape", [(("cp", "ulysses"), (8, 2)), (("ulysses", "cp"), (4, 4))])
def test_a_2d_mesh_splits_heads_over_its_ulysses_dim(pool, names, shape):
    w = 16  # the mesh covers the shared pool's whole world
    cases = [
        _c(sc, None, 8, 2, mn, "zigzag", s=53, batch=1, seed=5)
        for sc in ("ring", "groupcast")
        for mn in ("causal", "docs")
    ]
    per_rank = pool.run(_mesh_cases, w, names, shape, cases)
    _check(
        [r[:-1] for r in per_rank],
        [dict(c, degree=shape[names.index("ulysses")]) for c in cases],
        w,
    )
    u = shape[names.index("ulysses")]
    mesh = torch.arange(w).reshape(shape)
    for r, res in enumerate(per_rank):
        degree, head_ranks, context_ranks = res[-1][1]
        assert degree == u
        # The head group is r's row along the ulysses dim of the mesh; the context group
        # its line along the other dim.
        where = (mesh == r).nonzero()[0].tolist()
        h = names.index("ulysses")
        along = mesh.select(1 - h, where[1 - h]).tolist()
        across = mesh.select(h, where[h]).tolist()
        assert list(head_ranks) == along and list(context_ranks) == across


def _bad_mesh(ctx):
    from torch.distributed.device_mesh import DeviceMesh

    out = []
    cases = ((("a", "b"), {}), (("cp", "ulysses"), {"ulysses_degree": 2}),
             (("cp", "ulysses"), {"schedule": "ulysses"}))  # fmt: skip
    for names, kw in cases:
        mesh = DeviceMesh("cpu", torch.arange(ctx.world_size).reshape(4, 4), mesh_dim_names=names)
        try:
            ha.plan(ha.Mask.causal(32), mesh, **kw)
            out.append("planned")
        except ValueError as err:
            out.append(str(err))
    return out


def test_a_mesh_without_a_head_dim_is_refused_on_every_rank(pool):
    for no_head_dim, wrong_degree, all_ranks in pool.run(_bad_mesh, 16):
        assert "dim named ulysses or heads" in no_head_dim and "('a', 'b')" in no_head_dim
        assert "the mesh's head dim has 4 ranks, got 2" in wrong_degree
        assert "splits heads over all ranks, but the mesh" in all_ranks


def test_auto_keeps_the_degree_the_user_gave():
    # auto used to pick "ulysses" (all ranks) and then refuse the user's degree.
    m = ha.Mask.full(8192)
    p = ha.plan(m, ha.SimulatedGroup(8), ulysses_degree=2, heads=(32, 8))
    assert p.heads.degree == 2
    assert ha.plan(m, ha.SimulatedGroup(8), ulysses_degree=8).heads.degree == 8


def test_the_inner_plan_gets_the_node_size_of_a_context_group():
    # 2 nodes of 8, heads over pairs: each context group has 4 ranks per node.
    p = ha.plan(ha.Mask.causal(4096), ha.SimulatedGroup(16), schedule="hamilton_2level",
                ulysses_degree=2, node_size=8)  # fmt: skip
    assert p.heads.inner.world_size == 8 and p.heads.inner.schedule.name == "hamilton_2level"
    with pytest.raises(ValueError, match="whole head groups"):
        ha.plan(ha.Mask.causal(4096), ha.SimulatedGroup(16), schedule="groupcast",
                ulysses_degree=4, node_size=2)  # fmt: skip


def _lse_mismatch(ctx):
    p = ha.plan(ha.Mask.causal(32), ctx.group, schedule="ring", ulysses_degree=2,
                check="always")  # fmt: skip
    q = torch.randn(1, p.local_len, 4, 8)
    try:
        ha.calc_attn(q, q[:, :, :2].clone(), q[:, :, :2].clone(), p, return_lse=ctx.rank == 0)
        return "ran"
    except ValueError as err:
        return str(err)


def test_return_lse_on_one_rank_only_raises_on_every_rank(pool):
    # With head parallelism return_lse adds an exchange: a mismatch used to hang.
    for msg in pool.run(_lse_mismatch, 4):
        assert "return_lse differ across the ranks" in msg, msg
