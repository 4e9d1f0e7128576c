"""Context parallelism in bfloat16 and float16 on CPU, against the float64 oracle.

The GPU production path runs in bfloat16 / float16, where the executor takes branches
that float32 / float64 never reach: the output accumulator starts as the first block's
own low-precision output and, at a rank's last merge, ``merge_last_`` folds the second
block in and rounds once (W = 2); with more blocks it is upcast to float32 and merged
with ``merge_``; in the backward, :func:`executor.grad_precision` keeps dQ/dK/dV sums
and dK/dV messages in the inputs' dtype where that is exact, float32 elsewhere. Here
every schedule runs those branches through the ``auto`` backend (CPU: sdpa's
``cpu_flash`` op in the inputs' dtype, as on GPU it is cuDNN / flash) and the results
(out, lse, dq, dk, dv) are compared with a float64 oracle written from the softmax
definition (``hamilton_attn.testing.oracle``), with flash-attention's bound:

    err(ours vs float64) <= FACTOR * err(same-precision reference vs float64) + slack

The same-precision error is the larger of two one-device runs on the same low-precision
inputs: ``backend="reference"`` (float32 math, each result rounded once to the dtype) and
``backend="auto"`` (the cpu_flash op CP uses, on the whole sequence: no merges, no
sums; measured, its lse is ~200x and its gradients 2-4x further from float64 than
float32 math's, and CP cannot beat its own local kernel). Slack: one ulp of the dtype at the result's
magnitude (lse, float32 whatever the inputs: four float32 ulps). Measured over this
matrix: CP's error is at most 2.8x the same-precision one, and within 2x + 0.35 ulp.

The schedule matrix runs on ranks 0..W-1 of the shared ``pool`` (tests/conftest.py),
all cases of a (W, schedule) in one call. Workers also report which low-precision
branches each case reached (merge_last_, the float32 upcast, the sdpa kernel's own
merges, low / float32 gradient sums and messages), and the tests assert them.

Legend: S tokens, Hq/Hk heads, D head dim, W world size; tensors ``bshd`` unless named.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

import hamilton_attn as ha
from hamilton_attn.runtime.comm import SimulatedGroup
from hamilton_attn.schedule import BUILDERS
from hamilton_attn.testing.oracle import attention_oracle, dense_varlen, max_err

DTYPES = ("bfloat16", "float16")
FACTOR = 2.0  # flash-attention's rule: at most this many times the reference's error
S, HQ, HK, D = 90, 4, 2, 16
DOCS = (0, 17, 40, 41, 66, 90)  # packed documents, one of a single token

# Every built-in schedule, with the options it needs. hamilton_2level needs at least two
# nodes of an even node size, so it first runs at W = 4 (node_size 2); groupcast also
# runs there with two nodes (relayed pieces, dK/dV sums sent on: float32 messages).
SCHEDULES = {
    "ring": {},
    "bidi_ring": {},
    "line": {},
    "allgather": {},
    "hamilton": {},
    "direct": {},
    "groupcast": {},
    "hamilton_2level": {"node_size": 2},
}
W4_ONLY = {"hamilton_2level"}
W4_EXTRA = {"groupcast": {"node_size": 2}}
LAYOUTS = (("causal", "zigzag"), ("docs", "minheap"), ("docs", "balanced_zigzag"))


def make_mask(name: str) -> ha.Mask:
    if name == "causal":
        return ha.Mask.causal(S)
    return ha.Mask.varlen(list(DOCS), causal=True)


def dense_mask(name: str) -> torch.Tensor:
    """The oracle's mask, from the definition (``hamilton_attn.testing.oracle``), not
    from Mask."""
    return dense_varlen([0, S] if name == "causal" else list(DOCS), causal=True)


def cases_for(w: int, schedule: str, opts: dict) -> list[dict]:
    out = []
    for dtype, (mask, dispatch), backward in itertools.product(
        DTYPES, LAYOUTS, ("replay", "reverse")
    ):
        c = dict(schedule=schedule, opts=opts, mask=mask, dispatch=dispatch)
        c.update(dtype=dtype, backward=backward)
        c["seed"] = zlib.crc32(repr((w, sorted(c.items()))).encode())
        out.append(c)
    return out


# -- on the ranks ---------------------------------------------------------------------------


def make_inputs(c: dict):
    """Fresh seeded q, k, v and upstream gradient, drawn in float64, rounded to the dtype."""
    gen = torch.Generator().manual_seed(c["seed"])
    dt = getattr(torch, c["dtype"])

    def draw(h, scale=1.0):
        return (scale * torch.randn(1, S, h, D, dtype=torch.float64, generator=gen)).to(dt)

    # q a little larger than unit: peakier softmax rows, so lse and the weights matter.
    return draw(HQ, 1.5), draw(HK), draw(HK), draw(HQ)


def oracle64(q, k, v, g, mask: str):
    """out, lse [B, Hq, S], dq, dk, dv of the textbook softmax in float64."""
    leaves = [t.double().transpose(1, 2).detach().requires_grad_() for t in (q, k, v)]
    out, lse = attention_oracle(*leaves, dense_mask(mask), 1.0 / D**0.5)
    grads = torch.autograd.grad((out * g.double().transpose(1, 2)).sum(), leaves)
    return (out.transpose(1, 2).detach(), lse.detach(), *(t.transpose(1, 2) for t in grads))


def same_precision(q, k, v, g, mask: str, backend: str = "reference"):
    """out, lse, dq, dk, dv of one-device attention on the low-precision inputs (results
    in their dtype, lse float32)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = ha.attention(*leaves, make_mask(mask), backend=backend, return_lse=True)
    grads = torch.autograd.grad((out * g).sum(), leaves)
    return (out.detach(), lse, *grads)


err = max_err  # float64 max |a - b|


class _Probe:
    """Counts the merges of the executor (and of the sdpa kernel) and the kernels it picks,
    by wrapping the names those modules call; the wrappers call the real functions and are
    removed afterwards (the library is not changed)."""

    def __init__(self):
        from hamilton_attn.kernels import sdpa
        from hamilton_attn.runtime import executor

        self.ex, self.sdpa = executor, sdpa
        self.real = (executor.merge_, executor.merge_last_, executor.memo_kernel, sdpa.merge_)
        self.reset()

    def reset(self):
        self.n = dict(merge_last=0, merge_last_not_low=0, merge_f32acc=0, kernel_merge=0)
        self.kernels = set()

    def _count(self, key, fn):
        def wrapped(*args):
            self.n[key] += 1
            return fn(*args)

        return wrapped

    def __enter__(self):
        merge_, merge_last_, memo_kernel, sdpa_merge_ = self.real

        def probe_merge_last(acc_out, acc_lse, out, lse):
            # into the low accumulator itself (counted, not asserted here: a rank that
            # raised alone would leave its peers waiting for their transfers)
            self.n["merge_last"] += 1
            self.n["merge_last_not_low"] += not (acc_out.dtype == out.dtype != acc_lse.dtype)
            return merge_last_(acc_out, acc_lse, out, lse)

        def probe_select(*args):
            kernel = memo_kernel(*args)
            self.kernels.add(kernel.name)
            return kernel

        self.ex.merge_last_, self.ex.memo_kernel = probe_merge_last, probe_select
        self.ex.merge_ = self._count("merge_f32acc", merge_)
        self.sdpa.merge_ = self._count("kernel_merge", sdpa_merge_)
        return self

    def __exit__(self, *exc):
        self.ex.merge_, self.ex.merge_last_, self.ex.memo_kernel, self.sdpa.merge_ = self.real


def _w_low_precision_cases(ctx, cases):
    """Per case: errors of the CP out / lse / dq / dk / dv against the float64 oracle, the
    errors of the two same-precision references (the bound's baseline), magnitudes, and
    which low-precision branches ran on this rank."""
    from hamilton_attn.runtime import executor

    results = []
    probe = _Probe()
    names = ("out", "lse", "dq", "dk", "dv")
    for c in cases:
        q, k, v, g = make_inputs(c)
        want = oracle64(q, k, v, g, c["mask"])
        same = [same_precision(q, k, v, g, c["mask"], b) for b in ("reference", "auto")]
        try:
            p = ha.plan(
                make_mask(c["mask"]),
                ctx.group,
                schedule=c["schedule"],
                dispatch=c["dispatch"],
                backward=c["backward"],
                **c["opts"],
            )
        except ValueError as e:  # backward="reverse" does not apply to every schedule x mask
            if c["backward"] != "reverse" or "does not apply" not in str(e):
                raise
            results.append(None)
            continue
        steps = p.schedule.backward_steps or p.schedule.steps
        acc_low, msg_low, n_dq = executor.grad_precision(p, steps)
        fwd = [st.compute[p.rank] for st in p.schedule.forward_steps() if st.compute[p.rank]]
        probe.reset()
        with probe:
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            q_l, k_l, v_l = (ha.dispatch(t, p) for t in leaves)
            out_l, lse_l = ha.calc_attn(q_l, k_l, v_l, p, return_lse=True)
            out = ha.undispatch(out_l, p)
            lse = ha.undispatch(lse_l, p, seq_dim=2)
            grads = torch.autograd.grad((out * g).sum(), leaves)
        got = (out, lse, *grads)
        results.append(
            {
                "dtypes": [str(t.dtype) for t in got],
                "shapes": [list(a.shape) == list(b.shape) for a, b in zip(got, want)],
                "finite": all(bool(torch.isfinite(t).all()) for t in got),
                "err": {n: err(a, b) for n, a, b in zip(names, got, want)},
                # the larger error of the two same-precision one-device runs
                "base": {n: max(err(r, b) for r in rs) for n, b, *rs in zip(names, want, *same)},
                "mag": {n: b.abs().max().item() for n, b in zip(names, want)},
                "fwd_blocks": len(fwd),
                "branches": dict(
                    probe.n,
                    # the first block leaves rows to fill (zeros in the low dtype)
                    first_partial=int(
                        bool(fwd) and p.fused_block(p.rank, fwd[0])[1] != (0, p.local_len)
                    ),
                    acc_low=sum(acc_low.values()),
                    acc_f32=len(acc_low) - sum(acc_low.values()),
                    msg_low=sum(msg_low.values()),
                    msg_f32=len(msg_low) - sum(msg_low.values()),
                    dq_low=int(n_dq <= 2),
                    dq_f32=int(n_dq > 2),
                ),
                "kernels": sorted(probe.kernels),
            }
        )
    return results


# -- the checks ---------------------------------------------------------------------------


def bound(dtype: str, name: str, base: float, mag: float) -> float:
    """FACTOR x the same-precision error + one ulp of the result's dtype at its magnitude
    (lse is float32: a few float32 ulps)."""
    ulp = torch.finfo(torch.float32 if name == "lse" else getattr(torch, dtype)).eps
    return FACTOR * base + (4 * ulp if name == "lse" else ulp) * max(1.0, mag)


_SEEN: dict = {}  # branch -> times reached, over every test of this module that ran


def assert_cases_ok(cases, per_rank, w) -> dict:
    """Every rank's results within the bounds; returns the branch counts summed over ranks
    and cases, and the kernels used."""
    assert len(per_rank) == w
    seen: dict = {}
    kernels: set = set()
    for rank, results in enumerate(per_rank):
        for c, res in zip(cases, results, strict=True):
            if res is None:  # backward="reverse" does not apply (every rank says so)
                i = cases.index(c)
                assert c["backward"] == "reverse" and all(r[i] is None for r in per_rank), c
                continue
            tag = (
                f"rank {rank}: {c['schedule']}{c['opts'] or ''}/{c['dispatch']}/{c['mask']} "
                f"W={w} {c['dtype']} backward={c['backward']}"
            )
            low = f"torch.{c['dtype']}"
            assert all(res["shapes"]), tag
            assert res["dtypes"] == [low, "torch.float32", low, low, low], tag
            assert res["finite"], f"{tag}: non-finite values"
            for name, e in res["err"].items():
                b = bound(c["dtype"], name, res["base"][name], res["mag"][name])
                assert e <= b, (
                    f"{tag}: {name} error {e:.3e} vs float64 oracle > {b:.3e} "
                    f"({FACTOR} x same-precision {res['base'][name]:.3e} + slack)"
                )
            # Two blocks: one merge_last_ into the low accumulator; more: the accumulator
            # goes to float32 and every later block is a merge_.
            n = res["fwd_blocks"]
            br = res["branches"]
            not_low = br.pop("merge_last_not_low")
            assert br["merge_last"] == int(n == 2) and not_low == 0, (tag, n, not_low, br)
            assert br["merge_f32acc"] == (n - 1 if n > 2 else 0), (tag, n, br)
            for key, k in br.items():
                seen[key] = seen.get(key, 0) + k
            kernels.update(res["kernels"])
    for key, k in seen.items():
        _SEEN[key] = _SEEN.get(key, 0) + k
    ran = [c for c, res in zip(cases, per_rank[0]) if res is not None]
    reverse_ran = sum(c["backward"] == "reverse" for c in ran)
    return {"branches": seen, "kernels": kernels, "reverse_ran": reverse_ran}


RUNS = (
    [(w, name, opts) for w in (2, 3) for name, opts in SCHEDULES.items() if name not in W4_ONLY]
    + [(4, name, SCHEDULES[name]) for name in sorted(W4_ONLY)]
    + [(4, name, opts) for name, opts in W4_EXTRA.items()]
)


def test_every_schedule_is_covered():
    assert set(SCHEDULES) == set(BUILDERS)
    for name in set(BUILDERS) - W4_ONLY:
        assert {w for w, n, _ in RUNS if n == name} >= {2, 3}, name
    for name in W4_ONLY:  # it cannot run at W = 2 or 3
        for w in (2, 3):
            with pytest.raises(ValueError, match="node_size"):
                ha.plan(make_mask("causal"), SimulatedGroup(w, 0), schedule=name, node_size=2)


@pytest.mark.parametrize(
    ("w", "schedule", "opts"),
    RUNS,
    ids=[f"W{w}-{n}{'-node2' if o else ''}" for w, n, o in RUNS],
)
def test_low_precision_cp_vs_float64_oracle(pool, w, schedule, opts):
    cases = cases_for(w, schedule, opts)
    got = assert_cases_ok(cases, pool.run(_w_low_precision_cases, w, cases), w)
    br = got["branches"]
    _SEEN["runs"] = _SEEN.get("runs", 0) + 1
    assert got["reverse_ran"] > 0  # backward="reverse" applies to some layout
    # The CPU production path: sdpa (cpu_flash) in the inputs' dtype, never the reference.
    assert got["kernels"] == {"sdpa"}, got["kernels"]
    if w == 2:  # the W = 2 production path: every sum and message stays low
        assert br["merge_last"] > 0 and br["merge_f32acc"] == 0, br
        assert br["acc_f32"] == br["msg_f32"] == br["dq_f32"] == 0, br
        assert br["msg_low"] > 0 and br["dq_low"] > 0, br


def test_every_low_precision_branch_is_reached():
    """Over the whole matrix above (run first: pytest keeps file order)."""
    if _SEEN.get("runs", 0) < len(RUNS):
        pytest.skip("needs every case of test_low_precision_cp_vs_float64_oracle")
    missing = [k for k, n in _SEEN.items() if n == 0]
    assert not missing, f"branches never reached: {missing} ({_SEEN})"
