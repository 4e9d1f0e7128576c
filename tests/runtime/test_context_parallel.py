"""Context-parallel attention on a pool of gloo CPU processes vs the one-process reference.

Every check runs ``dispatch -> calc_attn -> undispatch`` on ranks 0..W-1 of the shared
``pool`` (tests/conftest.py, started once per run) and compares, on every rank,
the undispatched output and the gradients of the full q, k, v (through dispatch's
backward, with a random upstream gradient) with ``attention(..., backend="reference")``
on the full tensors. float64 runs must agree to ~1e-9; float32 runs may be at most
twice as far from the float64 oracle as a float32 reference is (flash-attention's rule).

Worker functions (``_w_*``) run on the ranks; they catch nothing unless the test is
about errors, and return plain numbers so that the assertions live in the tests.

Legend: B batch, S tokens (global, unpadded), Hq/Hk heads, D head dim, W world size.
Tensors are ``bshd`` unless named otherwise; ``*_l`` are a rank's local shards.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import random
import re
import socket
import subprocess
import sys
import zlib

import pytest
import torch

import hamilton_attn as ha
from hamilton_attn.testing import GlooPool
from hamilton_attn.testing.oracle import max_err

SCHEDULES = ("ring", "bidi_ring", "line", "allgather")
DISPATCHES = ("contiguous", "zigzag", "stripe")
MASKS = ("full", "causal", "docs", "window")
F64_TOL = 1e-9
F32_FACTOR = 2.0  # float32 error may be this many times the float32 reference's


# -- shared by the workers -----------------------------------------------------------------


def doc_bounds(s: int) -> list[int]:
    """Packed documents of uneven lengths (one of a single token)."""
    return [0, s // 5, s // 2, s // 2 + 1, s]


def make_mask(name: str, s: int) -> ha.Mask:
    if name == "full":
        return ha.Mask.full(s)
    if name == "causal":
        return ha.Mask.causal(s)
    if name == "docs":
        return ha.Mask.varlen(doc_bounds(s), causal=True)
    if name == "window":
        return ha.Mask.sliding_window(s, (7, 0))
    raise KeyError(name)


def case(
    schedule,
    dispatch,
    mask,
    *,
    S=61,
    B=1,
    Hq=4,
    Hk=2,
    D=8,
    dtype="float64",
    scale=None,
    check="first",
) -> dict:
    c = dict(locals())  # the arguments, in their order
    c["seed"] = zlib.crc32(repr(sorted(c.items())).encode())
    return c


def make_inputs(c: dict):
    """Fresh seeded q, k, v and upstream gradient, drawn in float64 then rounded."""
    gen = torch.Generator().manual_seed(c["seed"])
    dt = getattr(torch, c["dtype"])

    def draw(h):
        return torch.randn(c["B"], c["S"], h, c["D"], dtype=torch.float64, generator=gen).to(dt)

    return draw(c["Hq"]), draw(c["Hk"]), draw(c["Hk"]), draw(c["Hq"])


def reference(q, k, v, g, mask, scale):
    """Out, lse and (dq, dk, dv) of the one-process reference in q's own dtype."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = ha.attention(*leaves, mask, backend="reference", scale=scale, return_lse=True)
    grads = torch.autograd.grad((out * g).sum(), leaves)
    return out.detach(), lse, grads


err = max_err  # float64 max |a - b|


def cp_run(c: dict, group, q, k, v, g):
    """Undispatched out and full-tensor grads through the context-parallel path."""
    p = ha.plan(
        make_mask(c["mask"], c["S"]),
        group,
        schedule=c["schedule"],
        dispatch=c["dispatch"],
        backend="reference",
        check=c["check"],
    )
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    q_l, k_l, v_l = (ha.dispatch(t, p) for t in leaves)
    out = ha.undispatch(ha.calc_attn(q_l, k_l, v_l, p, scale=c["scale"]), p)
    grads = torch.autograd.grad((out * g).sum(), leaves)
    return p, out.detach(), grads


def _w_cases(ctx, cases):
    """Per case: errors of the CP result vs the float64 oracle, and for float32 the
    error of a float32 reference (the bound's baseline)."""
    results = []
    for c in cases:
        q, k, v, g = make_inputs(c)
        mask = make_mask(c["mask"], c["S"])
        ref_out, _, ref_grads = reference(*(t.double() for t in (q, k, v, g)), mask, c["scale"])
        p, out, grads = cp_run(c, ctx.group, q, k, v, g)
        names = ("out", "dq", "dk", "dv")
        got = (out, *grads)
        want = (ref_out, *ref_grads)
        res = {
            "W": p.world_size,
            "pad": p.placement.pad,
            "shapes": [list(t.shape) == list(r.shape) for t, r in zip(got, want)],
            "dtypes": [str(t.dtype) for t in got],
            "finite": all(bool(torch.isfinite(t).all()) for t in got),
            "err": {n: err(a, b) for n, a, b in zip(names, got, want)},
            "mag": {n: b.abs().max().item() for n, b in zip(names, want)},
        }
        if c["dtype"] != "float64":
            same_out, _, same_grads = reference(q, k, v, g, mask, c["scale"])
            res["base"] = {n: err(a, b) for n, a, b in zip(names, (same_out, *same_grads), want)}
        results.append(res)
    return results


def assert_cases_ok(cases, per_rank, w):
    assert len(per_rank) == w
    for rank, results in enumerate(per_rank):
        for c, res in zip(cases, results, strict=True):
            tag = (
                f"rank {rank}: {c['schedule']}/{c['dispatch']}/{c['mask']} W={w} S={c['S']} "
                f"B={c['B']} Hq={c['Hq']} Hk={c['Hk']} {c['dtype']}"
            )
            assert res["W"] == w, tag
            assert all(res["shapes"]), f"{tag}: undispatched shapes differ from the input's"
            assert res["dtypes"] == [f"torch.{c['dtype']}"] * 4, tag
            assert res["finite"], f"{tag}: non-finite values"
            for name, e in res["err"].items():
                if c["dtype"] == "float64":
                    bound = F64_TOL
                else:
                    eps = torch.finfo(getattr(torch, c["dtype"])).eps
                    bound = F32_FACTOR * res["base"][name] + 4 * eps * max(1.0, res["mag"][name])
                assert e <= bound, f"{tag}: {name} error {e:.3e} > {bound:.3e}"


# -- the matrix: every schedule x dispatch x mask at W in {2, 3, 8} --------------------------


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("w", [2, 3, 8])
def test_matrix_forward_backward(pool, w, schedule, dispatch):
    cases = [case(schedule, dispatch, m) for m in MASKS]
    assert_cases_ok(cases, pool.run(_w_cases, w, cases), w)


# -- the rest of the matrix, rotating: W 1/4/5, MQA, batch 2, odd lengths, float32 ----------


def rotating_cases() -> list[tuple[int, dict]]:
    """Every schedule x dispatch x mask once; the other axes dealt round-robin then
    shuffled (fixed seed), so each of their values appears many times."""
    combos = list(itertools.product(SCHEDULES, DISPATCHES, MASKS))
    rng = random.Random(1729)

    def deal(values):
        out = [values[i % len(values)] for i in range(len(combos))]
        rng.shuffle(out)
        return out

    ws, heads, batches = deal([1, 4, 5]), deal([(4, 2), (4, 1)]), deal([1, 2])
    lengths, dtypes = deal([59, 97, 64]), deal(["float64", "float64", "float32"])
    scales, checks = deal([None, None, 0.3]), deal(["first", "always"])
    out = []
    for (sch, disp, m), w, (hq, hk), b, s, dt, sc, ck in zip(
        combos, ws, heads, batches, lengths, dtypes, scales, checks
    ):
        out.append((w, case(sch, disp, m, S=s, B=b, Hq=hq, Hk=hk, dtype=dt, scale=sc, check=ck)))
    return out


ROTATING = rotating_cases()
ROTATING_GROUPS = [
    (w, [c for ww, c in ROTATING if ww == w][i : i + 4]) for w in (1, 4, 5) for i in range(0, 16, 4)
]


def test_rotating_selection_covers_each_value_several_times():
    cases = [c for _, c in ROTATING]
    assert sorted(
        itertools.chain.from_iterable(c for _, c in ROTATING_GROUPS), key=lambda c: c["seed"]
    ) == sorted(cases, key=lambda c: c["seed"])
    axes = {
        "W": [w for w, _ in ROTATING],
        "heads": [(c["Hq"], c["Hk"]) for c in cases],
        "B": [c["B"] for c in cases],
        "S": [c["S"] for c in cases],
        "dtype": [c["dtype"] for c in cases],
        "schedule": [c["schedule"] for c in cases],
        "dispatch": [c["dispatch"] for c in cases],
        "mask": [c["mask"] for c in cases],
    }
    for axis, values in axes.items():
        for v in set(values):
            assert values.count(v) >= 3, f"{axis}={v} appears {values.count(v)} times"
    assert {1, 4, 5} == set(axes["W"]) and (4, 1) in axes["heads"] and 2 in axes["B"]
    assert {59, 97} <= set(axes["S"]) and "float32" in axes["dtype"]


@pytest.mark.parametrize(
    ("w", "cases"), ROTATING_GROUPS, ids=[f"W{w}-{i}" for i, (w, _) in enumerate(ROTATING_GROUPS)]
)
def test_rotating_forward_backward(pool, w, cases):
    per_rank = pool.run(_w_cases, w, cases)
    assert_cases_ok(cases, per_rank, w)
    if w > 1:
        assert any(res["pad"] for res in per_rank[0]) or all(c["S"] == 64 for c in cases)


def test_more_ranks_than_tokens(pool):
    """S=5 on 8 ranks: some ranks hold only padding (their queries see nothing)."""
    cases = [
        case(sch, disp, m, S=5)
        for (sch, disp), m in zip(
            itertools.product(SCHEDULES, DISPATCHES), itertools.cycle(["causal", "docs"])
        )
    ]
    assert_cases_ok(cases, pool.run(_w_cases, 8, cases), 8)


# -- invariants ---------------------------------------------------------------------------


def _w_schedule_independence(ctx, mask, dtype, s):
    """Max difference of every schedule x dispatch from ring/contiguous, and the error
    of a same-precision reference (the rounding scale)."""
    c0 = case("ring", "contiguous", mask, S=s, dtype=dtype)
    q, k, v, g = make_inputs(c0)
    m = make_mask(mask, s)
    ref64 = reference(*(t.double() for t in (q, k, v, g)), m, None)
    same = reference(q, k, v, g, m, None)
    rounding = max(err(a, b) for a, b in zip((same[0], *same[2]), (ref64[0], *ref64[2])))
    first = None
    diffs = {}
    for sch, disp in itertools.product(SCHEDULES, DISPATCHES):
        c = dict(c0, schedule=sch, dispatch=disp)
        _, out, grads = cp_run(c, ctx.group, q, k, v, g)
        got = (out, *grads)
        if first is None:
            first = got
        diffs[f"{sch}/{disp}"] = max(err(a, b) for a, b in zip(got, first))
    return diffs, rounding


@pytest.mark.parametrize(
    ("w", "mask", "dtype", "s"),
    [
        (4, "docs", "float64", 59),
        (5, "window", "float64", 97),
        (4, "causal", "float32", 97),
        (3, "docs", "float32", 64),
    ],
)
def test_result_independent_of_schedule_and_dispatch(pool, w, mask, dtype, s):
    for diffs, rounding in pool.run(_w_schedule_independence, w, mask, dtype, s):
        assert len(diffs) == len(SCHEDULES) * len(DISPATCHES)
        # Two results each within 2 x rounding of the oracle differ by at most twice that.
        bound = F64_TOL if dtype == "float64" else 2 * F32_FACTOR * rounding + 1e-6
        assert dtype == "float64" or rounding > 0
        bad = {k: d for k, d in diffs.items() if d > bound}
        assert not bad, f"results differ beyond rounding ({bound:.2e}): {bad}"


@pytest.mark.parametrize("w", [2, 3, 4])
def test_balanced_zigzag_forward_backward(pool, w):
    cases = [
        case(sch, "balanced_zigzag", m, S=s)
        for sch in ("ring", "bidi_ring")
        for m, s in (("causal", 61), ("docs", 64), ("window", 50))
    ]
    assert_cases_ok(cases, pool.run(_w_cases, w, cases), w)


def _w_low_precision_sums_are_exact(ctx, schedule, dispatch, mask, s, opts):
    """bfloat16 gradients with the executor's low-precision sums and messages, and with
    every sum forced to float32: they must be the same bits."""
    from hamilton_attn.runtime import executor

    c = case(schedule, dispatch, mask, S=s, dtype="bfloat16")
    q, k, v, g = make_inputs(c)
    p = ha.plan(
        make_mask(mask, s),
        ctx.group,
        schedule=schedule,
        dispatch=dispatch,
        backend="reference",
        **opts,
    )
    steps = p.schedule.backward_steps or p.schedule.steps
    acc_low, msg_low, n_dq = executor.grad_precision(p, steps)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        loc = [ha.dispatch(t, p) for t in leaves]
        out = ha.undispatch(ha.calc_attn(*loc, p), p)
        return (out.detach(), *torch.autograd.grad((out * g).sum(), leaves))

    got = run()
    real = executor.grad_precision
    executor.grad_precision = lambda plan, st: (
        {},
        dict.fromkeys(real(plan, st)[1], False),
        1 << 30,
    )
    try:
        want = run()
    finally:
        executor.grad_precision = real
    return {
        "same": [bool(torch.equal(a, b)) for a, b in zip(got, want)],
        "dtypes": [str(t.dtype) for t in got],
        "low_accs": sum(acc_low.values()),
        "low_msgs": sum(msg_low.values()),
        "msgs": len(msg_low),
        "dq_low": n_dq <= 2,
    }


@pytest.mark.parametrize(
    ("w", "schedule", "dispatch", "mask", "opts"),
    [
        (2, "ring", "zigzag", "causal", {}),
        (2, "ring", "zigzag", "causal", {"backward": "reverse"}),
        (3, "ring", "contiguous", "docs", {}),
        (4, "groupcast", "minheap", "docs", {"node_size": 2}),
        (4, "bidi_ring", "stripe", "full", {}),
    ],
)
def test_low_precision_gradient_sums_are_bit_exact(pool, w, schedule, dispatch, mask, opts):
    per_rank = pool.run(_w_low_precision_sums_are_exact, w, schedule, dispatch, mask, 48, opts)
    for rank, res in enumerate(per_rank):
        assert res["dtypes"] == ["torch.bfloat16"] * 4, f"rank {rank}"
        assert all(res["same"]), f"rank {rank}: out, dq, dk, dv bitwise equal? {res['same']}"
    if w == 2:  # every sum may stay in bfloat16, every dK/dV message travels in it
        assert all(r["dq_low"] and r["low_accs"] > 0 for r in per_rank)
        assert all(r["low_msgs"] == r["msgs"] > 0 for r in per_rank)


def _expected_positions(kind, s, w, r):
    """Global positions rank r holds, from the placement definitions alone."""
    chunks = {"contiguous": 1, "zigzag": 2, "stripe": 4}[kind] * w
    p = -(-s // chunks) * chunks
    size = p // chunks
    if kind == "contiguous":
        mine = [r]
    elif kind == "zigzag":
        mine = [r, 2 * w - 1 - r]
    else:
        mine = list(range(r, chunks, w))
    return sorted(i for c in mine for i in range(c * size, (c + 1) * size)), p


def _w_dispatch_roundtrip(ctx, s):
    """Per dispatch: (roundtrip exact, shard = x at the positions, positions as expected,
    local length, padded length) over several layouts and seq_dims."""
    gen = torch.Generator().manual_seed(1000 + s * 10 + ctx.world_size)
    out = {}
    for kind in DISPATCHES:
        p = ha.plan(ha.Mask.causal(s), ctx.group, dispatch=kind, schedule="ring")
        pos = ha.get_position_ids(p)
        want, padded = _expected_positions(kind, s, ctx.world_size, ctx.rank)
        checks = {
            "positions": pos.tolist() == want and pos.dtype == torch.long,
            "padded_len": p.placement.padded_len == padded,
            "local_len": pos.numel() == p.local_len == padded // ctx.world_size,
        }
        real = pos[pos < s]
        layouts = {  # name: (tensor, seq_dim)
            "bshd": (torch.randn(2, s, 3, 4, generator=gen, dtype=torch.float64), 1),
            "sbh": (torch.randn(s, 2, 3, generator=gen, dtype=torch.float64), 0),
            "bhsd": (torch.randn(2, 3, s, 4, generator=gen, dtype=torch.float64), 2),
            "bhds_neg": (torch.randn(2, 3, 4, s, generator=gen, dtype=torch.float64), -1),
            "thd": (torch.randn(s, 3, 4, generator=gen, dtype=torch.float32), 0),
        }
        for name, (x, dim) in layouts.items():
            x_l = ha.dispatch(x, p, seq_dim=dim)
            back = ha.undispatch(x_l, p, seq_dim=dim)
            d = dim % x.dim()
            checks[f"{name}_roundtrip"] = back.shape == x.shape and torch.equal(back, x)
            checks[f"{name}_local_len"] = x_l.shape[d] == p.local_len
            checks[f"{name}_content"] = torch.equal(
                x_l.narrow(d, 0, real.numel()), x.index_select(d, real)
            )
        out[kind] = checks
    return out


@pytest.mark.parametrize(("w", "s"), [(1, 59), (3, 59), (4, 97), (5, 64), (8, 97), (8, 5)])
def test_dispatch_undispatch_identity_and_positions(pool, w, s):
    per_rank = pool.run(_w_dispatch_roundtrip, w, s)
    for rank, by_kind in enumerate(per_rank):
        for kind, checks in by_kind.items():
            bad = [k for k, ok in checks.items() if not ok]
            assert not bad, f"rank {rank}, {kind}, W={w}, S={s}: {bad}"


def _w_positions_partition(ctx, s, chunk_size):
    res = {}
    for kind in DISPATCHES:
        p = ha.plan(ha.Mask.full(s), ctx.group, dispatch=kind, chunk_size=chunk_size)
        res[kind] = (ha.get_position_ids(p).tolist(), p.placement.chunk_size, p.local_len)
    return res


@pytest.mark.parametrize(("w", "s", "chunk_size"), [(3, 59, None), (5, 97, 4), (8, 61, 3)])
def test_position_ids_partition_the_padded_sequence(pool, w, s, chunk_size):
    per_rank = pool.run(_w_positions_partition, w, s, chunk_size)
    for kind in DISPATCHES:
        ids = [per_rank[r][kind][0] for r in range(w)]
        allpos = sorted(i for rr in ids for i in rr)
        assert allpos == list(range(len(allpos))) and len(allpos) >= s, kind
        assert all(rr == sorted(rr) for rr in ids), f"{kind}: local order is not global order"
        assert len({len(rr) for rr in ids}) == 1, kind
        if chunk_size:
            assert per_rank[0][kind][1] % chunk_size == 0, kind
            assert per_rank[0][kind][2] % chunk_size == 0, kind


def _w_padding_never_leaks(ctx, schedule, dispatch, mask, s):
    """Shards built by hand with garbage in the padding slots; the upstream gradient is
    garbage there too. Padding must not change real outputs or gradients, its own
    outputs and gradients must be exactly zero, and undispatch must trim it."""
    c = case(schedule, dispatch, mask, S=s, B=2, Hq=4, Hk=1)
    q, k, v, g = make_inputs(c)
    m = make_mask(mask, s)
    ref_out, ref_lse, ref_grads = reference(q, k, v, g, m, None)
    p = ha.plan(m, ctx.group, schedule=schedule, dispatch=dispatch, backend="reference")
    pad = p.placement.pad
    gen = torch.Generator().manual_seed(77 + ctx.rank)
    pos = ha.get_position_ids(p)
    is_pad = pos >= s

    def local(x):
        junk = 1e3 * torch.randn(x.shape[0], pad, *x.shape[2:], generator=gen, dtype=x.dtype)
        return torch.cat([x, junk], dim=1)[:, pos].clone()

    q_l, k_l, v_l = (local(t).requires_grad_() for t in (q, k, v))
    g_l = local(g)
    out_l, lse_l = ha.calc_attn(q_l, k_l, v_l, p, return_lse=True)
    grads_l = torch.autograd.grad((out_l * g_l).sum(), (q_l, k_l, v_l))
    real = pos[~is_pad]
    full_out = ha.undispatch(out_l.detach(), p)
    return {
        "pad": pad,
        "pad_here": int(is_pad.sum()),
        "pad_out_zero": bool((out_l[:, is_pad] == 0).all()),
        "pad_lse_neginf": bool(torch.isneginf(lse_l[:, :, is_pad]).all()),
        "pad_grads_zero": [bool((gr[:, is_pad] == 0).all()) for gr in grads_l],
        "out_err": err(out_l[:, ~is_pad], ref_out[:, real]),
        "grad_err": [err(a[:, ~is_pad], b[:, real]) for a, b in zip(grads_l, ref_grads)],
        "undispatch_shape": list(full_out.shape) == list(q.shape),
        "undispatch_err": err(full_out, ref_out),
    }


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize(
    ("w", "dispatch", "mask", "s"),
    [(3, "zigzag", "docs", 59), (4, "stripe", "causal", 97), (5, "contiguous", "full", 59)],
)
def test_padding_never_leaks(pool, schedule, w, dispatch, mask, s):
    per_rank = pool.run(_w_padding_never_leaks, w, schedule, dispatch, mask, s)
    assert per_rank[0]["pad"] > 0
    assert sum(r["pad_here"] for r in per_rank) == per_rank[0]["pad"]
    for rank, r in enumerate(per_rank):
        tag = f"rank {rank}"
        assert r["pad_out_zero"] and r["pad_lse_neginf"], tag
        assert r["pad_grads_zero"] == [True] * 3, f"{tag}: padding got gradients (q, k, v)"
        assert r["out_err"] <= F64_TOL and max(r["grad_err"]) <= F64_TOL, (tag, r)
        assert r["undispatch_shape"] and r["undispatch_err"] <= F64_TOL, tag


def _w_module_and_lse(ctx, schedule, dispatch, mask, s, dtype):
    c = case(schedule, dispatch, mask, S=s, dtype=dtype, B=2)
    q, k, v, g = make_inputs(c)
    m = make_mask(mask, s)
    opts = dict(schedule=schedule, dispatch=dispatch, backend="reference")
    p = ha.plan(m, ctx.group, **opts)
    results = {}
    for scale in (None, 0.25):
        mod_from_plan = ha.ContextParallelAttention(p, scale=scale)
        mod_from_mask = ha.ContextParallelAttention(m, ctx.group, scale=scale, **opts)
        runs = []
        for fn in (
            functools.partial(ha.calc_attn, plan=p, scale=scale, return_lse=True),
            functools.partial(mod_from_plan, return_lse=True),
            functools.partial(mod_from_mask, return_lse=True),
        ):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out_l, lse_l = fn(*(ha.dispatch(t, p) for t in leaves))
            grads = torch.autograd.grad((ha.undispatch(out_l, p) * g).sum(), leaves)
            runs.append((out_l.detach(), lse_l, *grads))
        same = all(torch.equal(a, b) for run in runs[1:] for a, b in zip(run, runs[0]))
        # lse against the reference's, dispatched (padding slots excluded).
        _, ref_lse, _ = reference(q.double(), k.double(), v.double(), g.double(), m, scale)
        _, same_lse, _ = reference(q, k, v, g, m, scale)
        lse_l = runs[0][1]
        real = ha.get_position_ids(p) < s
        ref_lse_l = ha.dispatch(ref_lse, p, seq_dim=2)
        results[str(scale)] = {
            "modules_equal_calc_attn": same,
            "module_plan_is_cached_plan": mod_from_mask.plan is p,
            "lse_shape": list(lse_l.shape) == [q.shape[0], q.shape[2], p.local_len],
            "lse_dtype": str(lse_l.dtype),
            "lse_err": err(lse_l[:, :, real], ref_lse_l[:, :, real]),
            "lse_pad_neginf": bool(torch.isneginf(lse_l[:, :, ~real]).all()),
            "lse_undispatch_err": err(ha.undispatch(lse_l, p, seq_dim=2), ref_lse),
            "lse_base": err(same_lse, ref_lse),
            "lse_mag": ref_lse.abs().max().item(),
        }
    return results


@pytest.mark.parametrize(
    ("w", "schedule", "dispatch", "mask", "s", "dtype"),
    [
        (3, "bidi_ring", "zigzag", "docs", 59, "float64"),
        (4, "line", "stripe", "window", 97, "float64"),
        (5, "allgather", "contiguous", "causal", 61, "float32"),
        (2, "ring", "zigzag", "full", 97, "float32"),
    ],
)
def test_module_matches_calc_attn_and_lse_matches_reference(
    pool, w, schedule, dispatch, mask, s, dtype
):
    for rank, by_scale in enumerate(
        pool.run(_w_module_and_lse, w, schedule, dispatch, mask, s, dtype)
    ):
        for scale, r in by_scale.items():
            tag = f"rank {rank}, scale {scale}"
            assert r["modules_equal_calc_attn"], tag
            assert r["module_plan_is_cached_plan"], tag
            assert r["lse_shape"] and r["lse_pad_neginf"], tag
            assert r["lse_dtype"] == f"torch.{dtype}", tag
            if dtype == "float64":
                tol = F64_TOL
            else:  # float32 lse: bounded by a float32 reference's error, plus a few ulps
                eps = torch.finfo(torch.float32).eps
                tol = F32_FACTOR * r["lse_base"] + 4 * eps * max(1.0, r["lse_mag"])
            assert r["lse_err"] <= tol and r["lse_undispatch_err"] <= tol, (tag, r)


# -- bad inputs: a clear ValueError on every rank, never a hang -----------------------------

BAD_INPUT_KINDS = {
    # kind: (pattern on rank 1, pattern on the other ranks)
    "rank1_tokens": (r"expected \d+ local tokens", r"rank\(s\) \[1\] of the group got invalid"),
    "rank1_heads": (r"3 heads must divide q's 4 heads", r"rank\(s\) \[1\] .*invalid inputs"),
    "all_heads": (r"3 heads must divide q's 4 heads", r"3 heads must divide q's 4 heads"),
    "rank1_layout": (r"expected 4-d bshd", r"rank\(s\) \[1\] .*invalid inputs"),
    "rank1_head_dim": (r"shapes, dtypes or scale differ", r"shapes, dtypes or scale differ"),
    "rank1_num_heads": (r"shapes, dtypes or scale differ", r"shapes, dtypes or scale differ"),
    "rank1_dtype": (r"shapes, dtypes or scale differ", r"shapes, dtypes or scale differ"),
    "rank1_scale": (r"shapes, dtypes or scale differ", r"shapes, dtypes or scale differ"),
    "rank1_mask": (r"ranks of the group hold different plans",) * 2,
    "rank1_schedule": (r"ranks of the group hold different plans",) * 2,
    "rank1_dispatch": (r"ranks of the group hold different plans",) * 2,
}
PLAN_KINDS = ("rank1_mask", "rank1_schedule", "rank1_dispatch")  # every call fails


def _w_bad_inputs(ctx, kind, check, s):
    """Run one bad call; return (exception type, message, whether a good call with the
    same plan works afterwards) on this rank."""
    one = ctx.rank == 1
    c = case("ring", "contiguous", "full", S=s)
    mask = make_mask("causal" if kind == "rank1_mask" and one else "full", s)
    sched = "bidi_ring" if kind == "rank1_schedule" and one else "ring"
    disp = "zigzag" if kind == "rank1_dispatch" and one else "contiguous"
    p = ha.plan(mask, ctx.group, schedule=sched, dispatch=disp, backend="reference", check=check)
    good = [ha.dispatch(t, p) for t in make_inputs(c)[:3]]
    if check == "always" and kind not in PLAN_KINDS:
        ha.calc_attn(*good, p)  # the signature is known: only "always" re-checks it
    q_l, k_l, v_l = good
    scale = None
    if one or kind == "all_heads":
        if kind == "rank1_tokens":
            q_l, k_l, v_l = (t[:, :-1] for t in good)
        elif kind in ("rank1_heads", "all_heads"):
            k_l, v_l = (torch.randn(1, p.local_len, 3, 8, dtype=torch.float64) for _ in "kv")
        elif kind == "rank1_layout":
            q_l = q_l[0]
        elif kind == "rank1_head_dim":
            q_l, k_l, v_l = (torch.cat([t, t], dim=-1) for t in good)
        elif kind == "rank1_num_heads":
            q_l = torch.cat([q_l, q_l], dim=2)
        elif kind == "rank1_dtype":
            q_l, k_l, v_l = (t.float() for t in good)
        elif kind == "rank1_scale":
            scale = 0.5
    try:
        ha.calc_attn(q_l, k_l, v_l, p, scale=scale)
        outcome = ("ok", "")
    except Exception as e:  # noqa: BLE001 - reported to the test
        outcome = (type(e).__name__, str(e))
    recovered = None
    if kind not in PLAN_KINDS:
        out = ha.calc_attn(*good, p)  # the group still works: nothing was half-sent
        recovered = out.shape == good[0].shape
    return (*outcome, recovered)


@pytest.mark.parametrize("check", ["always", "first"])
@pytest.mark.parametrize("kind", list(BAD_INPUT_KINDS))
def test_bad_inputs_raise_value_error_on_every_rank(pool, kind, check):
    # A length not used elsewhere in this module, so that with check="first" the plan is
    # fresh in every worker and the bad call is its first (see api._check).
    s = 30 + 2 * list(BAD_INPUT_KINDS).index(kind) + (check == "first")
    w = 3
    per_rank = pool.run(_w_bad_inputs, w, kind, check, s)
    on_rank1, elsewhere = BAD_INPUT_KINDS[kind]
    for rank, (typ, msg, recovered) in enumerate(per_rank):
        assert typ == "ValueError", f"rank {rank}: {typ}: {msg}"
        pattern = on_rank1 if rank == 1 else elsewhere
        assert re.search(pattern, msg), f"rank {rank}: {msg!r} !~ {pattern!r}"
        assert recovered in (None, True), f"rank {rank}: a good call failed afterwards"


def _w_bad_plan_args(ctx, args):
    out = []
    for kw in args:
        mask = (
            ha.Mask.causal(16, 20)
            if kw.get("mask") == "nonsquare"
            else ("causal" if kw.get("mask") == "str" else ha.Mask.causal(16))
        )
        kw = {k: v for k, v in kw.items() if k != "mask"}
        try:
            ha.plan(mask, ctx.group, **kw)
            out.append(("ok", ""))
        except Exception as e:  # noqa: BLE001 - reported to the test
            out.append((type(e).__name__, str(e)))
    return out


BAD_PLAN_ARGS = [
    ({"schedule": "rign"}, r"schedule: expected one of .*'ring'.* got 'rign'"),
    ({"dispatch": "zigzg"}, r"dispatch: expected one of .*'zigzag'.* got 'zigzg'"),
    ({"backend": "cuda"}, r"backend: expected one of .* got 'cuda'"),
    ({"check": "sometimes"}, r"check: expected .* got 'sometimes'"),
    ({"chunk_size": 0}, r"chunk_size: expected a positive int"),
    ({"mask": "nonsquare"}, r"mask: .*square mask"),
    ({"mask": "str"}, r"mask: expected a hamilton_attn.Mask, got str"),
]


def test_bad_plan_arguments_raise_value_error_on_every_rank(pool):
    per_rank = pool.run(_w_bad_plan_args, 4, [kw for kw, _ in BAD_PLAN_ARGS])
    for rank, outcomes in enumerate(per_rank):
        for (kw, pattern), (typ, msg) in zip(BAD_PLAN_ARGS, outcomes, strict=True):
            assert typ == "ValueError", f"rank {rank}, {kw}: {typ}: {msg}"
            assert re.search(pattern, msg), f"rank {rank}, {kw}: {msg!r} !~ {pattern!r}"


def _w_bad_dispatch_args(ctx):
    p = ha.plan(ha.Mask.causal(59), ctx.group, dispatch="zigzag")
    out = []
    for fn, x, dim in (
        (ha.dispatch, torch.randn(1, 58, 2, 4), 1),
        (ha.dispatch, torch.randn(1, 59, 2, 4), 4),
        (ha.undispatch, torch.randn(1, p.local_len + 1, 2, 4), 1),
    ):
        try:
            fn(x, p, seq_dim=dim)
            out.append("ok")
        except ValueError as e:
            out.append(str(e))
    return out


def test_bad_dispatch_arguments(pool):
    for msgs in pool.run(_w_bad_dispatch_args, 3):
        assert re.search(r"x: expected 59 tokens along seq_dim=1, got 58", msgs[0]), msgs[0]
        assert re.search(r"seq_dim: 4 is out of range", msgs[1]), msgs[1]
        assert re.search(r"x_local: expected \d+ tokens .* got \d+", msgs[2]), msgs[2]


def _w_first_check_after_a_good_call(ctx, check="first"):
    p = ha.plan(ha.Mask.causal(24), ctx.group, dispatch="zigzag", backend="reference", check=check)
    gen = torch.Generator().manual_seed(5)
    good = [
        ha.dispatch(torch.randn(1, 24, 2, 8, generator=gen, dtype=torch.float64), p)
        for _ in range(3)
    ]
    ha.calc_attn(*good, p)
    bad = [t[:, :-1] for t in good] if ctx.rank == 1 else good
    try:
        ha.calc_attn(*bad, p)
        return "ok"
    except Exception as e:  # noqa: BLE001 - reported to the test
        return f"{type(e).__name__}: {e}"


def test_first_check_after_a_good_call_fails_fast_without_a_hang():
    # check="first" exchanges nothing once a signature was checked (no host sync per
    # call): the rank with the bad shape raises ValueError at once, without entering a
    # collective its peers skip, and its peers stop at the transfer timeout.
    with GlooPool(2, timeout_s=4) as small:
        outcomes = small.run(_w_first_check_after_a_good_call, 2)
    assert outcomes[1].startswith("ValueError") and "local tokens" in outcomes[1], outcomes
    assert outcomes[0].startswith("TimeoutError"), outcomes


def test_always_check_raises_value_error_on_every_rank():
    with GlooPool(2, timeout_s=20) as small:
        outcomes = small.run(_w_first_check_after_a_good_call, 2, "always")
    assert all(o.startswith("ValueError") for o in outcomes), outcomes


# -- ranks as separate interpreters (as torchrun starts them) -------------------------------

_RANK_SCRIPT = r"""
import json, sys
from datetime import timedelta
import torch, torch.distributed as dist
import hamilton_attn as ha
rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                        world_size=2, timeout=timedelta(seconds=60))
gen = torch.Generator().manual_seed(3)
q, k, v = (torch.randn(1, 37, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
mask = ha.Mask.causal(37)
p = ha.plan(mask, schedule="ring", dispatch="zigzag", backend="reference")
try:
    out = ha.undispatch(ha.calc_attn(*(ha.dispatch(t, p) for t in (q, k, v)), p), p)
    ref = ha.attention(q, k, v, mask, backend="reference")
    res = {"ok": True, "err": (out - ref).abs().max().item()}
except ValueError as e:
    res = {"ok": False, "err": str(e)}
dist.destroy_process_group()
print(json.dumps(res))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    "hash_seeds",
    [
        (11, 11),
        (11, 12),
    ],
    ids=["same-hash-seed", "different-hash-seeds"],
)
def test_separate_interpreters_agree_on_the_plan(hash_seeds):
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK_SCRIPT, str(r), port],
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r, seed in enumerate(hash_seeds)
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-2000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    for rank, res in enumerate(results):
        assert res["ok"], f"rank {rank}: {res['err']}"
        assert res["err"] <= F64_TOL


# -- backward="reverse": the time-reversed backward keeps the last KV from the forward ----


def _w_reverse_backward(ctx, cases):
    errs = []
    for schedule, disp, mask_name in cases:
        s = 61
        gen = torch.Generator().manual_seed(11)
        q, k, v = (
            torch.randn(2, s, h, 8, generator=gen, dtype=torch.float64).requires_grad_()
            for h in (4, 2, 2)
        )
        g = torch.randn(2, s, 4, 8, generator=gen, dtype=torch.float64)
        mask = {
            "causal": ha.Mask.causal(s),
            "full": ha.Mask.full(s),
            "docs": ha.Mask.varlen([0, 12, 30, 31, s], causal=True),
        }[mask_name]
        ref = ha.attention(q, k, v, mask, backend="reference")
        ref_g = torch.autograd.grad((ref * g).sum(), (q, k, v))
        try:
            p = ha.plan(
                mask,
                ctx.group,
                schedule=schedule,
                dispatch=disp,
                backend="reference",
                backward="reverse",
            )
        except ValueError as err:  # a rank only forwards some piece: refused by design
            assert "does not apply" in str(err)
            errs.append(None)
            continue
        assert p.schedule.backward_steps is not None
        out = ha.undispatch(ha.calc_attn(*(ha.dispatch(t, p) for t in (q, k, v)), p), p)
        got = torch.autograd.grad((out * g).sum(), (q, k, v))
        errs.append(
            max(
                [(out - ref).abs().max().item()]
                + [(a - b).abs().max().item() for a, b in zip(got, ref_g)]
            )
        )
    return errs


@pytest.mark.parametrize("w", [2, 3, 5, 8])
def test_reverse_backward_matches_reference(pool, w):
    cases = [
        (s, d, m)
        for s in ("ring", "bidi_ring", "hamilton")
        for d in ("zigzag", "contiguous")
        for m in ("causal", "full")
    ]
    if w == 8:
        cases = [c for c in cases if c[0] != "bidi_ring"] + [("direct", "zigzag", "docs")]
    for errs in pool.run(_w_reverse_backward, w, cases):
        ran = [e for e in errs if e is not None]
        assert len(ran) >= len(errs) // 2 and max(ran) < 1e-10, errs


def test_reverse_backward_refused_where_a_rank_only_forwards():
    # Rank 1's queries see only their own document, rank 2's see everything before them:
    # on a contiguous ring rank 1 forwards rank 0's KV without attending to it, so a
    # reversed backward would have to send KV to a rank that never uses it.
    from hamilton_attn.placement import make_placement
    from hamilton_attn.schedule import build_routing, finalize, reverse_backward

    pl = make_placement("contiguous", 30, 3)
    mask = ha.Mask.from_ranges(
        [(0, 10), (10, 20), (20, 30)], [(0, 10), (10, 20), (0, 30)], "causal", 30
    )
    r = build_routing("ring", 3, pl.local_len)

    def needs(rank, piece):
        kr = pl.local_to_global(piece.owner, r.parts[piece.part])
        return not mask.gather(pl.rank_ranges[rank], kr).is_empty()

    assert reverse_backward(finalize(r, needs)) is None
    with pytest.raises(ValueError, match="backward: expected"):
        ha.plan(mask, backward="sideways")


def _w_auto_schedule(ctx, topology):
    s = 48
    mask = ha.Mask.varlen([0, 7, 30, s], causal=True)
    p = ha.plan(mask, ctx.group, schedule="auto", backend="reference", topology=topology)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (
        torch.randn(1, s, 2, 8, generator=gen, dtype=torch.float64).requires_grad_()
        for _ in range(3)
    )
    out = ha.undispatch(ha.calc_attn(*(ha.dispatch(t, p) for t in (q, k, v)), p), p)
    ref = ha.attention(q, k, v, mask, backend="reference")
    return p.schedule.name, (out - ref).abs().max().item()


@pytest.mark.parametrize("w,topology", [(2, None), (4, "full_mesh:4"), (8, "nodes:2x4")])
def test_auto_schedule_runs_the_planners_choice(pool, w, topology):
    results = pool.run(_w_auto_schedule, w, topology)
    assert len({name for name, _ in results}) == 1  # every rank picked the same
    assert all(err < 1e-10 for _, err in results), results


def test_auto_schedule_rejects_a_topology_of_another_size():
    with pytest.raises(ValueError, match="topology"):
        ha.plan(ha.Mask.causal(16), schedule="auto", topology="nvswitch:3")
