"""Hamilton Attention compat API and the ``hamilton`` / ``direct`` / ``hamilton_2level``
schedules on a pool of gloo CPU processes vs the one-process reference.

The shared 16-rank ``pool`` (tests/conftest.py) serves; every test sends all its cases for
one world size in a single ``pool.run`` call. Workers (``_w_*``) return plain numbers and
strings; the assertions live in the tests. Everything is float64 (agreement ~1e-9).

Legend: B batch, S tokens (global), W world size, m devices per node, u nodes.
Tensors are ``bshd`` unless named otherwise; ``*_l`` are a rank's local shards.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import hamilton_attn as ha
from hamilton_attn.compat import hamilton as hc
from hamilton_attn.testing.oracle import max_err

TOL = 1e-9
HAMILTON_WS = (2, 3, 5, 7, 8, 9, 12, 16)
TWO_LEVEL = ((2, 2), (2, 4), (3, 4), (4, 4))  # (u nodes, m devices per node)


# -- shared by the workers -----------------------------------------------------------------


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _inputs(seed: int, s: int, hq: int = 2, hk: int = 1, d: int = 4):
    gen = torch.Generator().manual_seed(seed)
    q, g = (torch.randn(1, s, hq, d, dtype=torch.float64, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, s, hk, d, dtype=torch.float64, generator=gen) for _ in range(2))
    return q, k, v, g


def _reference(q, k, v, g, mask, scale):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = ha.attention(*leaves, mask, backend="reference", scale=scale, return_lse=True)
    grads = torch.autograd.grad((out * g).sum(), leaves)
    return out.detach(), lse.detach(), grads


_err = max_err  # float64 max |a - b|


def _local_index(kind: str, w: int, r: int, s_local: int) -> torch.Tensor:
    """Global positions of rank r's tokens: contiguous slice, or zigzag chunks r, 2W-1-r."""
    if kind == "contiguous":
        return torch.arange(r * s_local, (r + 1) * s_local)
    h = s_local // 2
    return torch.cat(
        [torch.arange(r * h, (r + 1) * h), torch.arange((2 * w - 1 - r) * h, (2 * w - r) * h)]
    )


# -- compat functions vs the reference -----------------------------------------------------

COMPAT = {
    # name: (function, dispatch, causal)
    "full": (hc.hamilton_attention_forward_full_flash_attn, "contiguous", False),
    "causal": (hc.hamilton_attention_forward_causal_flash_attn, "zigzag", True),
    "two_nodes": (hc.hamilton_attention_forward_full_flash_attn_two_nodes, "contiguous", False),
    "ring": (hc.ring_attention_forward_flash_attn, "contiguous", False),
    "zigzag": (hc.zigzag_ring_attention_forward_flash_attn, "zigzag", True),
}


def _compat_case(fn, s_local, *, scale=None, layout="BSND", kv_list=False, profile=False):
    return dict(
        fn=fn, s_local=s_local, scale=scale, layout=layout, kv_list=kv_list, profile=profile
    )


def _call_compat(c, group, w, r, q_l, k_l, v_l):
    """Run the compat function of case ``c`` on local BSND leaves; returns
    ``(out_BSND, lse, timings or None, expected number of forward steps)``."""
    fn, dispatch, causal = COMPAT[c["fn"]]
    name = c["fn"]
    if name in ("full", "causal"):
        chunks = max(1, w - 1)
        extra = dict(world_size=w)
        if w > 1:
            cycles = hc.gen_hamilton_circle(w)
            extra.update(
                looping=cycles,
                out_mapping=hc.calculate_out_mapping_circle(cycles),
                in_mapping=hc.calculate_in_mapping_circle(cycles)[r],
            )
            if causal:
                extra["source_rank_per_iter"] = hc.calculate_source_rank_per_iter(cycles)
        schedule, opts = "hamilton", {}
    elif name == "two_nodes":
        m = w // 2
        chunks, extra = m, {}
        cycles = hc.gen_hamilton_circle_two_nodes(w, m)
        paths = hc.gen_hamilton_path_local(m)
        extra.update(
            inter_in_mapping=hc.calculate_inter_node_mapping(cycles, m, "in"),
            inter_out_mapping=hc.calculate_inter_node_mapping(cycles, m, "out")[r],
            out_mapping=hc.calculate_intra_node_out_mapping_two_nodes(paths),
            in_mapping=hc.calculate_intra_node_in_mapping_two_nodes(paths, r // m),
        )
        schedule, opts = "hamilton_2level", {"node_size": m}
    else:
        chunks, extra, schedule, opts = None, {}, "ring", {}
        if name == "ring":
            extra["causal"] = False

    def prep(t):
        return t.transpose(1, 2) if c["layout"] == "BNSD" else t

    q_in, k_in, v_in = prep(q_l), prep(k_l), prep(v_l)
    if c["kv_list"]:
        seq_dim = 2 if c["layout"] == "BNSD" else 1
        if causal:
            # the reference's lists: entry j = cat(piece j of each zigzag half)
            def split(t):
                halves = [torch.tensor_split(h, chunks, dim=seq_dim) for h in t.chunk(2, seq_dim)]
                return [torch.cat(p, dim=seq_dim) for p in zip(*halves)]

            k_in, v_in = split(k_in), split(v_in)
        else:
            k_in = list(torch.tensor_split(k_in, chunks, dim=seq_dim))
            v_in = list(torch.tensor_split(v_in, chunks, dim=seq_dim))
    if chunks is not None:
        extra["layout"] = c["layout"]
    if c["profile"]:
        fn = getattr(hc, fn.__name__ + "_profile")
        out, lse, timings = fn(group, q_in, k_in, v_in, c["scale"], 0, **extra)
    else:
        (out, lse), timings = fn(group, q_in, k_in, v_in, c["scale"], 0, **extra), None
    s = c["s_local"] * w
    mask = ha.Mask.causal(s) if causal else ha.Mask.full(s)
    p = ha.plan(mask, group, schedule=schedule, dispatch=dispatch, **opts)
    return prep(out), lse, timings, len(p.schedule.forward_steps())


def _w_compat(ctx, cases):
    w, r = ctx.world_size, ctx.rank
    results = []
    for c in cases:
        _, dispatch, causal = COMPAT[c["fn"]]
        s = c["s_local"] * w
        q, k, v, g = _inputs(_seed(c["fn"], w, c["s_local"]), s)
        mask = ha.Mask.causal(s) if causal else ha.Mask.full(s)
        ref_out, ref_lse, ref_grads = _reference(q, k, v, g, mask, c["scale"])
        idx = _local_index(dispatch, w, r, c["s_local"])
        leaves = [t[:, idx].clone().requires_grad_() for t in (q, k, v)]
        out, lse, timings, n_steps = _call_compat(c, ctx.group, w, r, *leaves)
        grads = torch.autograd.grad((out * g[:, idx]).sum(), leaves)
        res = {
            "shape": list(out.shape) == list(leaves[0].shape),
            "err": {
                "out": _err(out, ref_out[:, idx]),
                "lse": _err(lse, ref_lse[:, :, idx]),
                **{n: _err(a, b[:, idx]) for n, a, b in zip(("dq", "dk", "dv"), grads, ref_grads)},
            },
        }
        if timings is not None:
            res["steps"] = [t["step"] for t in timings]
            res["n_steps"] = n_steps
            res["times_ok"] = all(
                t["compute_ms"] >= 0 and t["comm_ms"] >= 0 and t["exposed_ms"] >= 0 for t in timings
            )
        results.append(res)
    return results


def _assert_compat(cases, per_rank, w):
    assert len(per_rank) == w
    for rank, results in enumerate(per_rank):
        for c, res in zip(cases, results, strict=True):
            tag = f"rank {rank} W={w} {c}"
            assert res["shape"], tag
            for name, e in res["err"].items():
                assert e <= TOL, f"{tag}: {name} error {e:.3e}"
            if c["profile"]:
                assert res["steps"] == list(range(res["n_steps"])), tag
                assert res["n_steps"] >= 1 and res["times_ok"], tag


def compat_cases(w: int) -> list[dict]:
    """Odd local lengths for the contiguous variants (so the global length is not a
    multiple of n(n-1) nor of the per-rank piece count); even ones for zigzag."""
    cases = [
        _compat_case("full", 5, scale=0.3),
        _compat_case("full", 7, layout="BNSD", kv_list=True, profile=True),
        _compat_case("causal", 6, scale=0.3, kv_list=True),
        _compat_case("causal", 10, layout="BNSD", profile=True),
        _compat_case("ring", 5, scale=0.3, profile=True),
        _compat_case("zigzag", 6, scale=0.3, profile=True),
    ]
    if w in (4, 8):
        cases += [
            _compat_case("two_nodes", 5, scale=0.3, kv_list=True),
            _compat_case("two_nodes", 7, layout="BNSD", profile=True),
        ]
    return cases


@pytest.mark.parametrize("w", [2, 3, 4, 5, 8])
def test_compat_forward_backward_match_reference(pool, w):
    if w in (4, 6):  # K*_4 and K*_6 have no Hamiltonian decomposition: two-level only
        cases = [c for c in compat_cases(w) if c["fn"] not in ("full", "causal")]
    else:
        cases = compat_cases(w)
    _assert_compat(cases, pool.run(_w_compat, w, cases), w)


# -- the schedules through plan() ----------------------------------------------------------


def _mask(name: str, s: int) -> ha.Mask:
    if name == "full":
        return ha.Mask.full(s)
    if name == "causal":
        return ha.Mask.causal(s)
    return ha.Mask.varlen([0, s // 5, s // 2, s // 2 + 1, s], causal=True)  # packed docs


def _w_schedules(ctx, cases):
    results = []
    for c in cases:
        q, k, v, g = _inputs(_seed(sorted(c.items())), c["S"])
        mask = _mask(c["mask"], c["S"])
        ref_out, _, ref_grads = _reference(q, k, v, g, mask, c["scale"])
        p = ha.plan(
            mask,
            ctx.group,
            schedule=c["schedule"],
            dispatch=c["dispatch"],
            backend="reference",
            **c["opts"],
        )
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        q_l, k_l, v_l = (ha.dispatch(t, p) for t in leaves)
        out = ha.undispatch(ha.calc_attn(q_l, k_l, v_l, p, scale=c["scale"]), p)
        grads = torch.autograd.grad((out * g).sum(), leaves)
        names = ("out", "dq", "dk", "dv")
        results.append(
            {
                "schedule": p.schedule.name,
                "pad": p.placement.pad,
                "err": {
                    n: _err(a, b) for n, a, b in zip(names, (out, *grads), (ref_out, *ref_grads))
                },
            }
        )
    return results


def _schedule_case(schedule, mask, s, scale=None, **opts) -> dict:
    dispatch = "contiguous" if mask == "full" else "zigzag"
    return dict(schedule=schedule, mask=mask, dispatch=dispatch, S=s, scale=scale, opts=opts)


def _assert_schedules(cases, per_rank, w):
    assert len(per_rank) == w
    for rank, results in enumerate(per_rank):
        for c, res in zip(cases, results, strict=True):
            tag = f"rank {rank} W={w} {c}"
            assert res["schedule"] == c["schedule"], tag
            for name, e in res["err"].items():
                assert e <= TOL, f"{tag}: {name} error {e:.3e}"


@pytest.mark.parametrize("w", HAMILTON_WS)
def test_hamilton_and_direct_schedules(pool, w):
    s = 2 * w * 3
    cases = [
        _schedule_case(sched, mask, size, scale)
        for sched in ("hamilton", "direct")
        for mask, size, scale in (("full", s + 1, 0.3), ("causal", s, None), ("docs", s - 1, 0.3))
    ]
    per_rank = pool.run(_w_schedules, w, cases)
    _assert_schedules(cases, per_rank, w)
    # uneven lengths were really padded (placement handles any global length)
    assert per_rank[0][0]["pad"] > 0 or (s + 1) % w == 0


@pytest.mark.parametrize("u, m", TWO_LEVEL)
def test_two_level_schedule(pool, u, m):
    w = u * m
    s = 2 * w * 3
    cases = [
        _schedule_case("hamilton_2level", mask, size, scale, node_size=m)
        for mask, size, scale in (("full", s + 1, 0.3), ("causal", s, None), ("docs", s - 1, 0.3))
    ]
    _assert_schedules(cases, pool.run(_w_schedules, w, cases), w)


# -- bad arguments -------------------------------------------------------------------------


def _w_bad_args(ctx, s_local=4):
    """Each bad call on every rank: the exception type name and message (or 'ok')."""
    w, r = ctx.world_size, ctx.rank
    q, k, v, _ = _inputs(_seed("bad", w), s_local * w)
    q_l, k_l, v_l = (t[:, r * s_local : (r + 1) * s_local] for t in (q, k, v))
    cycles = hc.gen_hamilton_circle(w)
    wrong = [list(reversed(c)) for c in cycles]
    outs = hc.calculate_out_mapping_circle(cycles)
    full, causal = (
        hc.hamilton_attention_forward_full_flash_attn,
        hc.hamilton_attention_forward_causal_flash_attn,
    )
    calls = {
        "world_size": lambda: full(ctx.group, q_l, k_l, v_l, None, world_size=w + 1),
        "default_world_size": lambda: full(ctx.group, q_l, k_l, v_l, None),
        "looping": lambda: full(ctx.group, q_l, k_l, v_l, None, world_size=w, looping=wrong),
        "out_mapping": lambda: full(
            ctx.group, q_l, k_l, v_l, None, world_size=w, out_mapping=outs[::-1]
        ),
        "source_rank_per_iter": lambda: causal(
            ctx.group, q_l, k_l, v_l, None, world_size=w, source_rank_per_iter=[[[True]]]
        ),
        "kv_chunks": lambda: full(ctx.group, q_l, [k_l], [v_l], None, world_size=w),
        "layout": lambda: full(ctx.group, q_l, k_l, v_l, None, world_size=w, layout="SBND"),
        "dropout": lambda: full(ctx.group, q_l, k_l, v_l, None, 0.1, world_size=w),
        "dropout_causal": lambda: causal(ctx.group, q_l, k_l, v_l, None, 0.1, world_size=w),
        "dropout_two_nodes": lambda: hc.hamilton_attention_forward_full_flash_attn_two_nodes(
            ctx.group, q_l, k_l, v_l, None, 0.1
        ),
        "inter_out_mapping": lambda: hc.hamilton_attention_forward_full_flash_attn_two_nodes(
            ctx.group, q_l, k_l, v_l, None, inter_out_mapping=[(0, 0)] * w, node_size=w // 2
        ),
        "good": lambda: full(ctx.group, q_l, k_l, v_l, None, world_size=w, looping=cycles),
    }
    res = {}
    for name, call in calls.items():
        try:
            call()
            res[name] = ("ok", "")
        except Exception as e:  # noqa: BLE001 - the test inspects it
            res[name] = (type(e).__name__, str(e))
    return res


def test_bad_arguments_raise_on_every_rank(pool):
    per_rank = pool.run(_w_bad_args, 5)  # not 8, the reference API's default world_size
    expect = {
        "world_size": ("ValueError", "world_size"),
        "default_world_size": ("ValueError", "world_size"),
        "looping": ("ValueError", "looping"),
        "out_mapping": ("ValueError", "out_mapping"),
        "source_rank_per_iter": ("ValueError", "source_rank_per_iter"),
        "kv_chunks": ("ValueError", "per-cycle chunks"),
        "layout": ("ValueError", "layout"),
        "dropout": ("NotImplementedError", "dropout"),
        "dropout_causal": ("NotImplementedError", "dropout"),
        "dropout_two_nodes": ("NotImplementedError", "dropout"),
        "good": ("ok", ""),
    }
    assert len(per_rank) == 5
    for rank, res in enumerate(per_rank):
        for name, (kind, word) in expect.items():
            assert res[name][0] == kind and word in res[name][1], (rank, name, res[name])
        # W=5 has no two-level split into nodes of 2: node_size is rejected first
        assert res["inter_out_mapping"][0] == "ValueError", (rank, res["inter_out_mapping"])


def test_bad_two_level_mapping_raises_on_every_rank(pool):
    def expect_value_error(res):
        return res[0] == "ValueError" and "inter_out_mapping" in res[1]

    per_rank = pool.run(_w_bad_args, 4 * 2)
    for rank, res in enumerate(per_rank):
        assert expect_value_error(res["inter_out_mapping"]), (rank, res["inter_out_mapping"])
        assert res["good"] == ("ok", ""), rank


# -- pure Python: the re-exported tables describe the library's cycles ----------------------


@pytest.mark.parametrize("u, m", TWO_LEVEL)
def test_two_level_tables_agree_with_cycles(u, m):
    n = u * m
    cycles = hc.gen_hamilton_circle_two_nodes(n, m)
    paths = hc.gen_hamilton_path_local(m)
    inter_out = hc.calculate_inter_node_mapping(cycles, m, "out")
    inter_in = hc.calculate_inter_node_mapping(cycles, m, "in")
    succ = hc.calculate_out_mapping_circle(cycles)
    pred = hc.calculate_in_mapping_circle(cycles)
    for node in range(u):
        outs = hc.calculate_intra_node_out_mapping_two_nodes(paths, node)
        ins = hc.calculate_intra_node_in_mapping_two_nodes(paths, node)
        for local in range(m):
            rank = node * m + local
            for c in range(m):
                want_out = outs[local][c] if outs[local][c] >= 0 else None
                if want_out is None:
                    assert inter_out[rank] == (succ[rank][c], c)
                else:
                    assert succ[rank][c] == want_out
                if ins[local][c] >= 0:
                    assert pred[rank][c] == ins[local][c]
                else:
                    assert inter_in[rank] == (pred[rank][c], c)


def test_hamilton_tables_match_schedule_routing():
    from hamilton_attn.schedule import build_routing

    for w in HAMILTON_WS:
        cycles = hc.gen_hamilton_circle(w)
        succ = hc.calculate_out_mapping_circle(cycles)
        first = build_routing("hamilton", w, 3 * (w - 1)).steps[0]
        for t in first:
            assert t.src == t.piece.owner and t.dst == succ[t.src][t.piece.part]
