"""Attention variants under context parallelism (gloo ranks) against the float64 oracle.

Every case runs ``dispatch -> calc_attn(variant=, score_mod=) -> undispatch`` on ranks
0..W-1 of the shared ``pool`` (tests/conftest.py) with inputs drawn identically on every
rank, and compares on every rank the undispatched out, lse and full-tensor gradients of
q, k, v (dispatch's backward gathers them) and the gradients of ``sink`` /
``alibi_slopes`` (each rank holds its rows' share: summed over the group here, as the
documented convention says) with ``variant_attention_oracle`` on the whole sequence
(written from the formulas; ALiBi distances and score_mod's indices are GLOBAL
positions, so a schedule that fed local indices would fail). Causal packed documents of
odd lengths; W in {1, 2, 3, 5, 8} for ring/zigzag, groupcast/minheap, allgather/
contiguous and hamilton/zigzag; one Ulysses hybrid (degree 2 at W = 4) and one
cross-attention plan; the compiled score_mods on the triton backend (Triton's
interpreter) at W = 3. float64 must agree to ``F64_TOL``; one float32 W
checks flash-attention's bound. Bad input raises ValueError on EVERY rank.

Legend: B batch, S tokens, Hq/Hk heads, D head dim, W world size; tensors bshd, the
oracle's bhsd.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.distributed as dist

import hamilton_attn as ha
from hamilton_attn.testing.oracle import dense_varlen, max_err, variant_attention_oracle
from hamilton_attn.variants import ReLU, Sigmoid, Softmax

F64_TOL = 1e-9
F32_FACTOR = 3.0
EPS32 = torch.finfo(torch.float32).eps
S = 53
D = 8
SCHEDULES = {  # W: (schedule, dispatch) pairs
    w: [("ring", "zigzag"), ("groupcast", "minheap"), ("allgather", "contiguous")]
    + [("hamilton", "zigzag")]
    for w in (1, 2, 3, 5, 8)
}
VARIANTS = ("softcap", "alibi", "sink", "sigmoid", "sigmoid_plain", "relu", "score_mod",
            "table_mod", "all")  # fmt: skip
GRADS = ("dq", "dk", "dv", "sink", "alibi_slopes")


# -- shared by the workers ----------------------------------------------------------------


def _cu(s: int) -> list[int]:
    """Causal packed documents of odd lengths (one of a single token)."""
    return [0, 7, 20, 21, 38, s]


def _smod(s, b, h, q_idx, kv_idx):
    """Uses h, q_idx and kv_idx (global): a local index or a wrong head offset changes it."""
    return s + 0.4 * torch.sin(0.9 * h + 0.13 * q_idx - 0.07 * kv_idx) - 0.01 * (q_idx - kv_idx)


_TABLE = torch.linspace(-1.0, 1.0, S + 6, dtype=torch.float64).cos()


def _table_mod(s, b, h, q_idx, kv_idx):
    """Indexes tables of the real lengths with q_idx / kv_idx, as FlexAttention score_mods
    do (document ids, per-token biases): a padded slot's index (>= S) would raise."""
    return s + _TABLE.to(s.dtype)[q_idx] - 0.5 * _TABLE.to(s.dtype)[kv_idx] * (h + 1)


def make_variant(name: str, b: int, hq: int, gen: torch.Generator, dtype):
    """``(variant, score_mod, params)``; ``params`` the tensors that require grad."""
    slopes = (0.05 + 0.3 * torch.rand(b, hq, generator=gen, dtype=torch.float64)).to(dtype)
    sink = (torch.randn(hq, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    if name == "softcap":
        return Softmax(softcap=1.6), None, {}
    if name == "alibi":  # [Hq] slopes
        sl = slopes[0].clone().requires_grad_()
        return Softmax(alibi_slopes=sl), None, {"alibi_slopes": sl}
    if name in ("sink", "big_sink"):
        # big_sink: e^sink well above any row's sum (rows see 1..17 keys): a sink counted
        # once per block instead of once per row would be far off.
        sk = (sink + 4.0 if name == "big_sink" else sink).requires_grad_()
        return Softmax(sink=sk), None, {"sink": sk}
    if name == "sigmoid":
        return Sigmoid(bias=-0.7), _smod, {}
    if name == "sigmoid_plain":
        return Sigmoid(bias=0.4), None, {}
    if name == "relu":
        return ReLU(), None, {}
    if name == "score_mod":
        return Softmax(), _smod, {}
    if name == "table_mod":
        return Softmax(), _table_mod, {}
    if name == "all":  # softcap + ALiBi [B, Hq] + sink + score_mod
        sl, sk = slopes.requires_grad_(), sink.requires_grad_()
        return Softmax(softcap=2.2, alibi_slopes=sl, sink=sk), _smod, {"alibi_slopes": sl,
                                                                     "sink": sk}  # fmt: skip
    raise KeyError(name)


def case(w, schedule, dispatch, variant, *, B=1, Hq=4, Hk=2, dtype="float64", **opts) -> dict:
    c = dict(w=w, schedule=schedule, dispatch=dispatch, variant=variant, B=B, Hq=Hq, Hk=Hk,
             dtype=dtype, opts=opts)  # fmt: skip
    c["seed"] = zlib.crc32(repr(sorted((k, str(v)) for k, v in c.items())).encode())
    return c


def _oracle(q, k, v, g, dense, variant, score_mod, params, dtype):
    """Out, lse and gradients (by name) of the oracle in ``dtype`` on full bshd tensors."""
    leaves = {n: t.detach().to(dtype).requires_grad_() for n, t in params.items()}
    if isinstance(variant, Softmax):
        variant = Softmax(variant.softcap, leaves.get("alibi_slopes"), leaves.get("sink"))
    qkv = [t.detach().to(dtype).transpose(1, 2).requires_grad_() for t in (q, k, v)]
    out, lse = variant_attention_oracle(*qkv, dense, scale=None, variant=variant,
                                        score_mod=score_mod, dtype=dtype)  # fmt: skip
    out = out.transpose(1, 2)
    grads = torch.autograd.grad((out * g.to(dtype)).sum(), [*qkv, *leaves.values()])
    names = ["dq", "dk", "dv", *leaves]
    grads = dict(zip(names, grads, strict=True))
    for n in ("dq", "dk", "dv"):
        grads[n] = grads[n].transpose(1, 2)
    return out.detach(), lse, grads


_OTHER_MASKS = {  # self-attention masks beside the causal documents
    "window": lambda s: ha.Mask.sliding_window(s, (9, 0)),
    "magi": lambda s: ha.Mask.from_ranges(  # overlapping ranges of all four kinds
        [(0, 30), (10, s - 9), (5, 25), (s - 6, s)],  # rows s-9 .. s-7 see nothing
        [(0, 40), (15, s), (30, 50), (0, 20)],
        ["causal", "inv_causal", "bi_causal", "full"],
        s,
        s,
    ),
}


def _one(ctx, c):
    """Errors (and magnitudes, baselines for float32) of one case on this rank."""
    from hamilton_attn import config

    backend = c["opts"].get("backend", "reference")
    with config.override(triton_interpret=backend == "triton"):
        return _one_on(ctx, c, backend)


def _one_on(ctx, c, backend):
    cross = c["opts"].get("cross", False)
    sq, sk = S, S + 6 if cross else S
    cu_k = [0, 7, 22, 23, 42, sk] if cross else None
    mask = ha.Mask.varlen(_cu(sq), cu_k, causal=True)
    if "mask" in c["opts"]:
        mask = _OTHER_MASKS[c["opts"]["mask"]](sq)
    dense = mask.to_dense() if "mask" in c["opts"] else dense_varlen(_cu(sq), cu_k, causal=True)
    dt = getattr(torch, c["dtype"])
    gen = torch.Generator().manual_seed(c["seed"])

    def draw(n, h):
        return torch.randn(c["B"], n, h, D, generator=gen, dtype=torch.float64).to(dt)

    q, k, v, g = draw(sq, c["Hq"]), draw(sk, c["Hk"]), draw(sk, c["Hk"]), draw(sq, c["Hq"])
    variant, smod, params = make_variant(c["variant"], c["B"], c["Hq"], gen, dt)
    kw = {"kv_dispatch": "contiguous"} if cross else {}
    if "ulysses_degree" in c["opts"]:
        kw["ulysses_degree"] = c["opts"]["ulysses_degree"]
    p = ha.plan(mask, ctx.group, schedule=c["schedule"], dispatch=c["dispatch"],
                backend=backend, **kw)  # fmt: skip
    role = "kv" if cross else "q"
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ql = ha.dispatch(leaves[0], p)
    kl, vl = (ha.dispatch(t, p, role=role) for t in leaves[1:])
    normalised = isinstance(variant, Softmax)
    res = ha.calc_attn(ql, kl, vl, p, variant=variant, score_mod=smod, return_lse=normalised)
    out_l, lse_l = res if normalised else (res, None)
    out = ha.undispatch(out_l, p)
    got = torch.autograd.grad((out * g).sum(), [*leaves, *params.values()], allow_unused=True)
    got = dict(zip(["dq", "dk", "dv", *params], got, strict=True))
    for n in params:  # this rank's rows' share: the total is the sum over the group
        share = torch.zeros_like(params[n]) if got[n] is None else got[n].clone()
        dist.all_reduce(share, group=ctx.group)
        got[n] = share
    got["out"] = out.detach()
    ref, lse64, grads64 = _oracle(q, k, v, g, dense, variant, smod, params, torch.float64)
    want = {"out": ref, **grads64}
    r = {"err": {n: max_err(got[n], want[n]) for n in want},
         "mag": {n: want[n].abs().max().item() for n in want},
         "shape": all(got[n].shape == want[n].shape for n in want),
         "finite": all(bool(torch.isfinite(got[n]).all()) for n in want)}  # fmt: skip
    if normalised:
        lse = ha.undispatch(lse_l, p, seq_dim=2)
        fin = torch.isfinite(lse64)
        r["lse_inf_agree"] = torch.equal(torch.isfinite(lse), fin)
        r["err"]["lse"] = max_err(lse[fin], lse64[fin])
        r["mag"]["lse"] = lse64[fin].abs().max().item()
    if c["dtype"] != "float64":
        ref32, lse32, grads32 = _oracle(q, k, v, g, dense, variant, smod, params, dt)
        same = {"out": ref32, **grads32}
        r["base"] = {n: max_err(same[n], want[n]) for n in want}
        if normalised:
            r["base"]["lse"] = max_err(lse32[fin], lse64[fin])
    if c["variant"] == "big_sink":
        # The test's own sensitivity: an oracle with the sink counted twice (sink + log 2)
        # is far from the once-counted one, so a double count cannot pass F64_TOL.
        twice = Softmax(sink=(params["sink"].detach() + math.log(2)))
        ref2, _, _ = _oracle(q, k, v, g, dense, twice, None, {}, torch.float64)
        r["twice_gap"] = max_err(ref2, ref)
        r["sink_weight"] = torch.exp(params["sink"].detach().view(1, -1, 1) - lse64).min().item()
    return r


def _w_cases(ctx, cases):
    return [_one(ctx, c) for c in cases]


def assert_cases_ok(cases, per_rank, w):
    assert len(per_rank) == w
    for rank, results in enumerate(per_rank):
        for c, r in zip(cases, results, strict=True):
            tag = f"rank {rank}: W={w} {c['schedule']}/{c['dispatch']} {c['variant']} {c['opts']}"
            assert r["shape"] and r["finite"], tag
            assert r.get("lse_inf_agree", True), f"{tag}: lse -inf rows differ"
            names = [n for n in ("out", "lse", *GRADS) if n in r["err"]]
            for n in names:
                e = r["err"][n]
                if c["dtype"] == "float64":
                    bound = F64_TOL * max(1.0, r["mag"][n])
                else:  # flash-attention's rule; sums over rows (sink, slopes) get more ulps
                    ulps = 4 if n in ("out", "lse", "dq", "dk", "dv") else 16
                    bound = F32_FACTOR * r["base"][n] + ulps * EPS32 * max(1.0, r["mag"][n])
                assert e <= bound, f"{tag}: {n} error {e:.3e} > {bound:.3e}"


# -- the matrix -------------------------------------------------------------------------


@pytest.mark.parametrize("w", [1, 2, 3, 5, 8])
def test_variants_every_schedule_float64(pool, w):
    """Each variant under each schedule at W (one pool.run per W)."""
    cases = [case(w, sch, disp, var) for sch, disp in SCHEDULES[w] for var in VARIANTS]
    # B = 2 with [B, Hq] slopes, and MQA, once per W
    cases.append(case(w, "ring", "zigzag", "all", B=2, Hq=3, Hk=1))
    assert_cases_ok(cases, pool.run(_w_cases, w, cases), w)


def test_ulysses_hybrid_and_cross_attention(pool):
    """Head parallelism (score_mod's h and ALiBi's slopes must be the GLOBAL head's, and
    the sink the head's own) and a cross-attention plan (Sq != Sk: ALiBi's shift)."""
    w = 4
    cases = [case(w, "ring", "zigzag", var, ulysses_degree=2) for var in VARIANTS]
    cases += [case(w, "ring", "zigzag", var, cross=True) for var in ("all", "sigmoid", "relu")]
    assert_cases_ok(cases, pool.run(_w_cases, w, cases), w)


def test_sink_counted_once_per_row(pool):
    """A large sink on many-block rows (W = 8, ring and hamilton, every rank's queries
    against up to 8 blocks): a sink counted once per block would be off by at least
    ``twice_gap`` (asserted far above the tolerance), so agreement proves once per row."""
    w = 8
    cases = [case(w, sch, disp, "big_sink") for sch, disp in SCHEDULES[w]]
    per_rank = pool.run(_w_cases, w, cases)
    assert_cases_ok(cases, per_rank, w)
    for r in per_rank[0]:
        assert r["twice_gap"] > 1e-2, r["twice_gap"]
        assert r["sink_weight"] > 0.05  # the sink dominates rows' denominators enough


def test_variants_float32_bound(pool):
    w = 3
    cases = [case(w, sch, disp, var, dtype="float32") for sch, disp in SCHEDULES[w]
             for var in ("all", "sigmoid", "relu")]  # fmt: skip
    assert_cases_ok(cases, pool.run(_w_cases, w, cases), w)


def test_variants_under_windows_and_overlapping_ranges(pool):
    """The variants beyond causal documents: a sliding window and overlapping ranges of
    all four MagiAttention kinds (rows that see nothing included), float64."""
    w = 3
    cases = [case(w, sch, disp, var, mask=m)
             for sch, disp in (("ring", "zigzag"), ("hamilton", "zigzag"),
                               ("groupcast", "minheap"))
             for var in ("all", "sigmoid_plain", "table_mod")
             for m in ("window", "magi")]  # fmt: skip
    assert_cases_ok(cases, pool.run(_w_cases, w, cases), w)


def test_softmax_variants_on_the_flex_backend(pool):
    """flex's own score_mod path (softcap, ALiBi with its slopes' gradient, score_mods on
    global positions, all together) under context parallelism."""
    w = 2
    cases = [case(w, sch, disp, var, backend="flex")
             for sch, disp in (("ring", "zigzag"), ("groupcast", "minheap"))
             for var in ("softcap", "alibi", "table_mod", "all")]  # fmt: skip
    assert_cases_ok(cases, pool.run(_w_cases, w, cases), w)


def test_compiled_score_mods_on_the_triton_kernel(pool):
    """The triton backend (Triton's interpreter) runs the score_mods compiled
    (``kernels.triton.score_mod``) on global positions and heads under each schedule,
    with softcap, ALiBi and sink, and the sigmoid weights."""
    w = 3
    cases = [case(w, sch, disp, var, dtype="float32", backend="triton")
             for sch, disp in (("ring", "zigzag"), ("hamilton", "zigzag"),
                               ("groupcast", "minheap"))
             for var in ("score_mod", "table_mod", "all", "sigmoid")]  # fmt: skip
    assert_cases_ok(cases, pool.run(_w_cases, w, cases), w)


# -- bad input: a ValueError on every rank, none hangs --------------------------------------


def _bad_args(kind, rank, hq):
    """``(variant, score_mod, return_lse)`` that rank ``rank`` passes for ``kind``."""
    good = Softmax(softcap=2.0)
    if kind == "sink_shape_one_rank":
        return Softmax(sink=torch.zeros(hq + (rank == 1))), None, False
    if kind == "slopes_int_one_rank":
        dt = torch.int64 if rank == 0 else torch.float64
        return Softmax(alibi_slopes=torch.ones(hq, dtype=dt)), None, False
    if kind == "softcap_zero_all":
        return Softmax(softcap=0.0), None, False
    if kind == "unknown_variant_one_rank":
        return ("tanh" if rank == 1 else good), None, False
    if kind == "score_mod_raises_one_rank":
        return good, ((lambda s, b, h, i, j: s[99]) if rank == 1 else _smod), False
    if kind == "return_lse_sigmoid_one_rank":
        return Sigmoid(), None, rank == 1
    if kind == "variants_differ":  # valid on each rank, but not the same
        return (Sigmoid() if rank % 2 else good), None, False
    if kind == "softcap_differs":
        return Softmax(softcap=2.0 + rank), None, False
    if kind == "sink_meta_one_rank":  # a sink on another device than q's
        return Softmax(sink=torch.zeros(hq, device="meta" if rank == 0 else "cpu")), None, False
    if kind == "sink_on_one_rank":
        return Softmax(sink=torch.zeros(hq)) if rank == 0 else Softmax(), None, False
    raise KeyError(kind)


BAD = {  # kind: the argument the offending rank's error names
    "sink_shape_one_rank": "sink",
    "slopes_int_one_rank": "alibi_slopes",
    "softcap_zero_all": "softcap",
    "unknown_variant_one_rank": "variant",
    "score_mod_raises_one_rank": "score_mod",
    "return_lse_sigmoid_one_rank": "return_lse",
    "variants_differ": "variant",
    "softcap_differs": "variant",
    "sink_on_one_rank": "variant",
    "sink_meta_one_rank": "sink",
}


def _w_bad(ctx, check, degree, s):
    """Each bad kind on a fresh plan's first call (check="first") or on an "always" plan
    after a good call; then a good call (the group must still work). Returns per kind
    (exception type, message) on this rank."""
    hq = 4
    m = ha.Mask.varlen(_cu(s), causal=True)
    p = ha.plan(m, ctx.group, schedule="ring", check=check, backend="reference",
                ulysses_degree=degree)  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, s, h, D, generator=gen, dtype=torch.float64) for h in (hq, 2, 2))
    ql, kl, vl = (ha.dispatch(t, p) for t in (q, k, v))
    out = {}
    for kind in BAD:
        variant, smod, lse = _bad_args(kind, ctx.rank, hq)
        try:
            ha.calc_attn(ql, kl, vl, p, variant=variant, score_mod=smod, return_lse=lse)
            out[kind] = ("no error", "")
        except Exception as err:  # noqa: BLE001 - the test is about which error
            out[kind] = (type(err).__name__, str(err))
    good = ha.calc_attn(ql, kl, vl, p, variant=Softmax(softcap=2.0))
    out["good_after"] = ("ok" if torch.isfinite(good).all() else "bad", "")
    return out


@pytest.mark.parametrize(("check", "degree", "w"), [("always", None, 3), ("first", None, 2),
                                                    ("always", 2, 4)])  # fmt: skip
def test_bad_variant_raises_value_error_on_every_rank(pool, check, degree, w):
    """check="first": a fresh plan (S unique to this case) has agreed nothing yet, so its
    first calls exchange status and every rank raises; the rest of the kinds run after
    a failed first call (nothing agreed yet either). With Ulysses the check precedes the
    head all-to-all."""
    s = {("always", None): 43, ("first", None): 45, ("always", 2): 47}[(check, degree)]
    per_rank = pool.run(_w_bad, w, check, degree, s)
    for kind, arg in BAD.items():
        for rank, res in enumerate(per_rank):
            typ, msg = res[kind]
            assert typ == "ValueError", f"{kind}, rank {rank}: {typ}: {msg}"
        # the offending rank (or every rank, for a mismatch) names the argument
        msgs = [res[kind][1] for res in per_rank]
        assert any(arg in mm for mm in msgs), f"{kind}: no rank names {arg!r}: {msgs}"
    assert all(res["good_after"][0] == "ok" for res in per_rank)


def _w_backend(ctx, check):
    """A named backend that cannot run the call (triton off CUDA without the interpreter;
    sdpa asked for softcap; triton with a score_mod it cannot compile), then a good call
    on the same group. Returns per case (exception type, message) on this rank."""
    from hamilton_attn import config

    s, hq = 41, 4
    m = ha.Mask.varlen(_cu(s), causal=True)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, s, h, D, generator=gen) for h in (hq, 2, 2))
    window = ha.Mask.sliding_window(s, (5, 0))  # sdpa runs full / causal pieces only
    cases = {
        "triton_off_cuda": ("triton", False, Softmax(), None, m),
        "sdpa_softcap": ("sdpa", False, Softmax(softcap=2.0), None, m),
        "triton_refused_score_mod": ("triton", True, Softmax(), lambda s, b, h, i, j: s.erf(), m),
        "sdpa_window_mask": ("sdpa", False, Softmax(), None, window),
    }
    out = {}
    for name, (backend, interp, variant, smod, mask) in cases.items():
        with config.override(triton_interpret=interp):
            p = ha.plan(mask, ctx.group, schedule="ring", check=check, backend=backend)
            ql, kl, vl = (ha.dispatch(t, p) for t in (q, k, v))
            try:
                ha.calc_attn(ql, kl, vl, p, variant=variant, score_mod=smod)
                out[name] = ("no error", "")
            except Exception as err:  # noqa: BLE001 - the test is about which error
                out[name] = (type(err).__name__, str(err))
    p = ha.plan(m, ctx.group, schedule="ring", check=check, backend="reference")
    ql, kl, vl = (ha.dispatch(t, p) for t in (q, k, v))
    good = ha.calc_attn(ql, kl, vl, p, variant=Softmax(softcap=2.0))
    out["good_after"] = ("ok" if torch.isfinite(good).all() else "bad", "")
    return out


@pytest.mark.parametrize("check", ["always", "first"])
def test_backend_that_cannot_run_raises_before_any_transfer(pool, check):
    """Found before the first transfer (the executor refused the first block after the
    step's messages had started, and the group's next call timed out)."""
    per_rank = pool.run(_w_backend, 2, check)
    for res in per_rank:
        for name in ("triton_off_cuda", "sdpa_softcap", "triton_refused_score_mod",
                     "sdpa_window_mask"):  # fmt: skip
            typ, msg = res[name]
            assert typ == "ValueError" and "backend:" in msg, f"{name}: {typ}: {msg}"
        assert "TRITON_INTERPRET" in res["triton_off_cuda"][1]
        assert "erf" in res["triton_refused_score_mod"][1]
        assert res["good_after"][0] == "ok"


def _w_padding(ctx, schedule):
    """score_mods indexing tables of exactly the real lengths under a zigzag placement
    that pads (29 tokens on 3 ranks): the executor must not pass padding positions."""
    s = 29
    table = torch.linspace(-1, 1, s, dtype=torch.float64).cos()
    seen = []

    def mod(sc, b, h, q_idx, kv_idx):
        seen.append((int(q_idx.max()), int(kv_idx.max())))
        return sc + table[q_idx] - 0.5 * table[kv_idx]

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, s, 2, D, generator=g, dtype=torch.float64) for _ in range(3))
    p = ha.plan(ha.Mask.full(s), ctx.group, schedule=schedule, dispatch="zigzag",
                backend="reference")  # fmt: skip
    out = ha.undispatch(ha.calc_attn(*(ha.dispatch(t, p) for t in (q, k, v)), p, score_mod=mod), p)
    ref = ha.attention(q, k, v, ha.Mask.full(s), backend="reference", score_mod=mod)
    return max_err(out, ref), max(max(a, b) for a, b in seen)


@pytest.mark.parametrize("schedule", ["allgather", "ring", "groupcast"])
def test_score_mod_never_sees_padding_positions(pool, schedule):
    for err, top in pool.run(_w_padding, 3, schedule):
        assert top <= 28 and err <= 1e-12, (err, top)
