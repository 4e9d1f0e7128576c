"""score_mods compiled into the ``triton`` kernel (:mod:`hamilton_attn.kernels.triton.score_mod`),
run under Triton's interpreter on CPU.

Oracle: as in ``test_triton_kernel.py``: float64 attention from the variant's own score
pipeline (``BlockVariant.transform``: the user's score_mod on global positions and
heads, then softcap, then ALiBi), differentiated by autograd; the kernel's error at
most twice the same oracle's in the kernel's dtype plus a small slack. Forward and the
gradients of q, k, v (and of ALiBi slopes where they are on).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import hamilton_attn as ha
from hamilton_attn import config
from hamilton_attn.kernels import get_kernel
from hamilton_attn.masks import Mask
from hamilton_attn.variants import BlockVariant

pytest.importorskip("triton")

from test_triton_kernel import MASKS, _inputs, assert_close, check, oracle, run_triton  # noqa: E402

from hamilton_attn.kernels.triton import launch  # noqa: E402
from hamilton_attn.kernels.triton.score_mod import Unsupported, compile_mod  # noqa: E402


@pytest.fixture(autouse=True)
def interpreter():
    with config.override(triton_interpret=True):
        yield


_BIAS = torch.tensor([0.3, -0.8, 1.1, 0.05])
_REL = torch.linspace(-1.0, 1.0, 4 * 21, dtype=torch.float64).sin().view(4, 21)  # [h, bucket]
_DOC = torch.tensor([0] * 11 + [1] * 9 + [2] * 20 + [3] * 13)  # int table: document ids


def _rel_bucket(s, b, h, q, k):
    """T5-style relative bias: a 2-d float64 table, clamped distances, negative buckets."""
    return s + _REL[h, (q - k).clamp(-10, 10) + 10]


MODS = {
    "relpos": lambda s, b, h, q, k: s + (q - k).float() * 0.05,
    "head_bias": lambda s, b, h, q, k: s + _BIAS[h],
    "rel_bucket": _rel_bucket,
    "causal_by_mod": lambda s, b, h, q, k: torch.where(q >= k, s, float("-inf")),
    "same_doc": lambda s, b, h, q, k: torch.where(_DOC[q] == _DOC[k], s, -1e4),
    "tanh_square": lambda s, b, h, q, k: 3 * torch.tanh(s / 3) + 0.1 * s * s,
    "leaky": lambda s, b, h, q, k: torch.where(s > 0, s, 0.2 * s) - (s.abs() ** 3) * 0.01,
    "int_ops": lambda s, b, h, q, k: s + ((q - k) // 3) * 0.1 - ((q - k) % 5) * 0.07 + (h % 2),
    "smooth": lambda s, b, h, q, k: (
        torch.sigmoid(s) * 2 + torch.exp(-0.1 * s * s) + torch.sin(s + 0.3 * h) - torch.cos(s)
    ),
    "clamp_max": lambda s, b, h, q, k: (
        torch.maximum(s.clamp(-1.5, 1.0), 0.3 * s) + torch.minimum(s, torch.ones_like(s)) * 0.5
    ),
    "div_sqrt": lambda s, b, h, q, k: (
        s / (1.0 + (q - k).abs().float()).sqrt() + torch.rsqrt(s * s + 1.0)
    ),
    "int_sign": lambda s, b, h, q, k: s + 0.3 * torch.sign(q - k) - 0.2 * torch.sign(h - 1),
    "logic": lambda s, b, h, q, k: torch.where(((q - k) < 6) & ~(k == 3) | (h == 1), s, s - 2.0),
    # bounds that depend on the score: the derivative is the bound's where it wins
    "clamp_by_s": lambda s, b, h, q, k: (
        s.clamp(min=0.5 * s - 0.2, max=0.8 + 0.1 * s * s) + torch.clamp(s, min=-0.3 * s) * 0.5
    ),
    # a divisor that depends on the score: d(x - q y) = dx - q dy, q the rounded quotient
    "remainder_by_s": lambda s, b, h, q, k: (
        torch.remainder(s, 1.0 + s * s) + torch.fmod(3.0 * s, 1.0 + 0.2 * s * s)
    ),
    "small_tanh": lambda s, b, h, q, k: 500.0 * torch.tanh(s / 500.0) + (q - k) * 0.01,
    # torch's bool + bool is or, bool * bool is and
    "bool_arith": lambda s, b, h, q, k: (
        s
        + ((q > k) + (h == 2)) * 0.5
        + ((q < k + 4) * (h != 1)) * 0.3
        + torch.maximum(q == k, h == 0) * 0.2
    ),
    "sin_over_s": lambda s, b, h, q, k: s + 0.1 * torch.sin(s) / s,
    "ignores_score": lambda s, b, h, q, k: (q - k).float() * 0.1 + h * 0.2,
    # a selection that passes no gradient before a factor that is infinite there: 0, as
    # torch's backward gives, not 0 x inf
    "sqrt_relu": lambda s, b, h, q, k: (
        s + torch.sqrt(torch.relu(s)) + torch.clamp(s, min=0.0) ** 0.5 + torch.log(s.relu() + 1)
    ),
    # torch's float floor division and remainder (1.0 // 0.1 is 9), C's fmod (x at y = inf)
    "float_rounding": lambda s, b, h, q, k: (
        s
        + (q.float() // 0.1) * 0.01
        + torch.remainder(q.float() * 0.3, 0.1) * 10
        + torch.fmod(k.float() * -0.7, 0.3)
        + torch.fmod(s, float("inf"))
        + torch.div(k.float() * 1.1, -0.1, rounding_mode="floor") * 0.01
    ),
    # fmax / fmin skip a NaN operand, maximum / relu keep it (here it never reaches a
    # visible score: a NaN of log(s) replaced)
    "nan_aware": lambda s, b, h, q, k: (
        torch.fmax(torch.log(s), s) + torch.fmin(torch.sqrt(s), s * 0.5) + torch.relu(s)
    ),
    # float16 / bfloat16 results rounded as torch stores them
    "half_casts": lambda s, b, h, q, k: (
        s
        + ((q - k).float() * 0.01).to(torch.bfloat16).float()
        + ((q + k).float() * 0.013).half() * 3.0
    ),
    # clamp with min == max: torch gives neither x nor the bounds a gradient where x < min
    "clamp_tie": lambda s, b, h, q, k: torch.clamp(q * 0.0 - 0.5, min=s, max=s) + s * 0.5,
    "masked_fill": lambda s, b, h, q, k: (
        s.masked_fill(k > q + 30, float("-inf")).masked_fill(h == 1, 0.5) + torch.relu(q - k)
    ),
    "changed_after_use": lambda s, b, h, q, k: _changed_after_use(s, h),
    # a head's table entry (a scalar in the kernel) and-ed / or-ed with a tensor of bools
    "head_flag": lambda s, b, h, q, k: torch.where(
        (_FLAG[h] > 0) & (q > k) | (_FLAG[h] < -1) | ((q < k + 3) ^ (_FLAG[h] > 0.5)), s, s - 1.0
    ),
}
_FLAG = torch.tensor([0.3, -2.0, 0.9, -0.5])


def _changed_after_use(s, h):
    """A closure's tensor changed in place after an op read it: that op sees it as it was."""
    t = torch.arange(4.0) * 0.25
    r = s + t[h]
    t.add_(1.0)
    return r + t[h] * 0.1


@pytest.mark.parametrize("name", sorted(MODS))
def test_score_mods_forward_backward(name):
    """Each score_mod on softmax over a mask with documents and rows that see nothing."""
    check(MASKS["docs_gap"], var=BlockVariant(kind="softmax", score_mod=MODS[name]), hq=4, hk=2)


@pytest.mark.parametrize(
    "name,kind,mask,extra",
    [
        ("rel_bucket", "softmax", "magi", {"softcap": 2.0}),
        ("tanh_square", "softmax", "window", {"softcap": 1.5}),
        ("int_ops", "sigmoid", "magi", {"bias": -0.5}),
        ("leaky", "relu", "bottom_right", {}),
        ("causal_by_mod", "sigmoid", "full", {}),
        ("head_bias", "relu", "causal", {}),
        # NaN at the padding keys (s = 0 there): softcap's factor must not carry it
        ("sin_over_s", "softmax", "full", {"softcap": 2.5}),
        ("sqrt_relu", "softmax", "window", {"softcap": 4.0}),
    ],
)
def test_score_mods_with_the_other_variants(name, kind, mask, extra):
    """score_mod before softcap, and under the unnormalised sigmoid / relu weights."""
    var = BlockVariant(kind=kind, score_mod=MODS[name], **extra)
    check(MASKS[mask], var=var, hq=4, hk=1)


def test_score_mod_reads_global_positions_and_heads():
    """Given positions and a first head (a context-parallel block, head parallelism),
    with ALiBi on the same positions and its slopes' gradient."""
    sq, sk = MASKS["full"].shape
    var = BlockVariant(
        kind="softmax",
        score_mod=MODS["rel_bucket"],
        alibi=torch.tensor([[0.3, 0.1]]),
        q_pos=torch.arange(sq, dtype=torch.int64) * 2 + 5,
        k_pos=torch.arange(sk, dtype=torch.int64) + 3,
        shift=-4,
        head0=2,
    )
    check(MASKS["full"], var=var, hq=2, hk=1)


def test_fp16_inputs_and_gqa():
    var = BlockVariant(kind="softmax", score_mod=MODS["leaky"])
    check(MASKS["causal"], var=var, hq=4, hk=1, dtype=torch.float16, layout="thd")


REFUSED = {
    "data_dependent": (lambda s, b, h, q, k: s if (q > 3).item() else -s, "data-dependent"),
    "python_branch": (lambda s, b, h, q, k: s if q > 3 else -s, "data-dependent"),
    "no_compiled_op": (lambda s, b, h, q, k: torch.erf(s), "erf"),
    "grad_table": (
        lambda s, b, h, q, k: s + torch.nn.Parameter(torch.ones(4))[h],
        "requires grad",
    ),
    "table_elementwise": (lambda s, b, h, q, k: s + _BIAS, "used elementwise"),
    "odd_power": (lambda s, b, h, q, k: s.abs() ** 2.5, "exponent"),
    "not_a_tensor": (lambda s, b, h, q, k: 1.0, "one value per score"),
    "bool_index": (lambda s, b, h, q, k: s + _BIAS[h > 0], "cannot be recorded"),
    "in_place": (lambda s, b, h, q, k: (s * 1.0).add_(q - k), "in-place"),
    # integers are computed in 32 bits: narrower ones would not wrap
    "narrow_int": (lambda s, b, h, q, k: s + (q - k).to(torch.uint8).float(), "uint8"),
    "int8_table": (lambda s, b, h, q, k: s + _I8[q].float(), "int8"),
    "wide_int_table": (lambda s, b, h, q, k: s + (_WIDE[q] % 7).float(), "past 32 bits"),
}
_WIDE = torch.tensor([2**40 + 5, 3] * 40)
_I8 = torch.tensor([100, 120, -128, 7] * 20, dtype=torch.int8)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_score_mods_say_why(name):
    fn, words = REFUSED[name]
    with pytest.raises(Unsupported, match=words):
        compile_mod(fn, "cpu")
    kern = get_kernel("triton")
    reason = kern.variant_problem(BlockVariant(kind="softmax", score_mod=fn), "cpu")
    assert reason is not None and words in reason


def test_refused_score_mod_on_the_named_backend_is_a_value_error():
    q = torch.randn(1, 9, 2, 16)
    fn = REFUSED["no_compiled_op"][0]
    with pytest.raises(ValueError, match="score_mod.*erf"):
        ha.attention(q, q, q, Mask.causal(9), backend="triton", score_mod=fn)


def test_values_are_read_at_run_time_structure_compiles_once():
    """A new float in the closure or a table changed in place needs no new compilation,
    and the next call sees it (the recording runs once per call, never stale)."""
    mask = Mask.causal(37)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 37, 2, 16, generator=g) for _ in range(3))
    table = torch.randn(2)
    temp = [0.7]

    def mod(s, b, h, qi, kj):
        return s * temp[0] + table[h]

    def both():
        got = ha.attention(q, k, v, mask, backend="triton", score_mod=mod)
        want = ha.attention(q.double(), k.double(), v.double(), mask, backend="reference",
                            score_mod=mod)  # fmt: skip
        return got, want

    got, want = both()
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)
    modules = launch.load.cache_info().currsize
    temp[0] = 1.9
    table.mul_(-3.0)
    got2, want2 = both()
    torch.testing.assert_close(got2.double(), want2, atol=2e-5, rtol=0)
    assert (got2 - got).abs().max() > 1e-2  # the new values took effect
    assert launch.load.cache_info().currsize == modules  # no new module: no recompile


def test_attention_api_gradients_with_a_compiled_score_mod():
    """Through ``attention()`` (bshd, GQA, a causal mask): out and every gradient against
    the reference backend in float64."""
    mask = Mask.varlen([0, 13, 14, 40], causal=True)
    g = torch.Generator().manual_seed(9)
    q = torch.randn(1, 40, 4, 16, generator=g)
    k, v = (torch.randn(1, 40, 2, 16, generator=g) for _ in range(2))
    do = torch.randn(1, 40, 4, 16, generator=g)
    fn = MODS["rel_bucket"]

    def run(backend, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = ha.attention(*leaves, mask, backend=backend, score_mod=fn,
                           variant=ha.Softmax(softcap=3.0))  # fmt: skip
        return [out, *torch.autograd.grad(out, leaves, do.to(dtype))]

    got, exact, same = (
        run("triton", torch.float32),
        run("reference", torch.float64),
        run("reference", torch.float32),
    )
    for a, b, c in zip(got, exact, same, strict=True):
        err, base = (a.double() - b).abs().max().item(), (c.double() - b).abs().max().item()
        assert err <= 2 * base + 1e-5, (err, base)


def test_backward_ignores_the_slope_at_keys_a_row_cannot_see():
    """A score_mod whose derivative is NaN at pairs the causal mask hides (the square root
    of a negative distance): the kernel's gradients stay finite and equal those of a
    score_mod that agrees on every visible pair (the oracle's own autograd would carry
    the NaN: 0 x NaN)."""
    mask = MASKS["causal"]
    q, k, v, do = _inputs(mask, 2, 1, 16, torch.float32, "bshd", seed=4)
    nan_slope = lambda s, b, h, q, k: s * (q - k).float().sqrt()  # noqa: E731
    safe = lambda s, b, h, q, k: s * (q - k).clamp(min=0).float().sqrt()  # noqa: E731
    got = run_triton(q, k, v, do, mask, 0.3, BlockVariant(kind="softmax", score_mod=nan_slope))
    spec = BlockVariant(kind="softmax", score_mod=safe)
    exact = oracle(q, k, v, do, mask, 0.3, spec)
    same = oracle(q, k, v, do, mask, 0.3, spec, ct=torch.float32)
    assert all(bool(torch.isfinite(t).all()) for t in got[2:])
    assert_close(got, exact, same)


def test_memo_is_shared_by_a_calls_blocks():
    var = BlockVariant(kind="softmax", score_mod=MODS["head_bias"])
    block = dataclasses.replace(var, q_pos=torch.arange(4))
    kern = get_kernel("triton")
    assert kern.variant_problem(var, "cpu") is None
    assert block.memo is var.memo and len(var.memo) == 1


def test_kernel_memo_keys_on_whether_the_score_mod_compiles():
    """The executor remembers a block's kernel per plan: a later call whose score_mod
    does not compile must not get the kernel a compiling one was given."""
    from hamilton_attn.kernels import memo_kernel

    q = torch.randn(1, 2, 9, 16)
    memo = {}
    good = BlockVariant(kind="softmax", score_mod=MODS["head_bias"])
    bad = BlockVariant(kind="softmax", score_mod=REFUSED["no_compiled_op"][0])
    mask = Mask.causal(9)
    assert memo_kernel(memo, "b", "triton", q, q, q, mask, good).name == "triton"
    with pytest.raises(ValueError, match="erf"):
        memo_kernel(memo, "b", "triton", q, q, q, mask, bad)


_ONE_HEAD = torch.tensor([0.7])


def test_a_table_of_one_head_compiles():
    """The recording indexes every table at 0: a table of one entry per head (one head)
    compiles and is read at run time."""
    fn = lambda s, b, h, q, k: s + _ONE_HEAD[h] * (q - k)  # noqa: E731
    compile_mod(fn, "cpu")
    check(MASKS["causal"], var=BlockVariant(kind="softmax", score_mod=fn), hq=1, hk=1)


def test_aliased_then_changed_in_place_is_refused_not_stale():
    """An alias taken before an in-place change keeps the old value in torch; a recording
    that followed the change would give both the new one. Refused, so ``auto`` takes a
    backend that runs the mod itself; the named ``triton`` backend says why."""

    def mod(s, b, h, q, k):
        t = s * 2.0
        before = t[...]
        t.add_(1.0)
        return before + t

    with pytest.raises(Unsupported, match="in-place"):
        compile_mod(mod, "cpu")
    q = torch.randn(1, 9, 2, 16)
    with pytest.raises(ValueError, match="in-place"):
        ha.attention(q, q, q, Mask.causal(9), backend="triton", score_mod=mod)


def test_reference_backend_runs_a_score_mod_that_ignores_the_score():
    """Its backward has no graph from the scores (q and k get no gradient through it)."""
    mask = Mask.varlen([0, 7, 20], causal=True)
    g = torch.Generator().manual_seed(2)
    q, k, v, do = (torch.randn(1, 20, 2, 8, generator=g, dtype=torch.float64) for _ in range(4))
    fn = MODS["ignores_score"]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ha.attention(*leaves, mask, backend="reference", score_mod=fn)
    grads = torch.autograd.grad(out, leaves, do)
    qi = torch.arange(20).view(-1, 1)
    bias = torch.stack([((qi - qi.T) * 0.1 + h * 0.2).double() for h in range(2)])
    w = bias.masked_fill(~mask.to_dense("cpu"), float("-inf")).softmax(-1)  # [h, q, k]
    want = torch.einsum("hqk,bkhd->bqhd", w, v)
    torch.testing.assert_close(out, want)
    assert grads[0].abs().max() == 0 and grads[1].abs().max() == 0
    torch.testing.assert_close(grads[2], torch.einsum("hqk,bqhd->bkhd", w, do))


def test_a_row_made_nan_by_the_score_mod_keeps_its_nan_to_itself():
    """A score_mod that puts +inf at one visible pair makes that row NaN (out, delta): the
    keys the row cannot see take no NaN from it (p = 0 there, 0 x NaN), as in torch."""
    mask = MASKS["causal"]
    q, k, v, do = _inputs(mask, 1, 1, 16, torch.float32, "bshd", seed=3)
    fn = lambda s, b, h, q, k: s + torch.where((q == 0) & (k == 0), float("inf"), 0.0)  # noqa: E731
    var = BlockVariant(kind="softmax", score_mod=fn)
    got = run_triton(q, k, v, do, mask, 0.3, var)
    exact = oracle(q, k, v, do, mask, 0.3, var)
    for name, a, b in zip(("dq", "dk", "dv"), got[2:5], exact[2:5], strict=True):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name
        assert torch.isfinite(b).any(), name  # not all NaN: the test compares something
    same = oracle(q, k, v, do, mask, 0.3, var, ct=torch.float32)
    assert_close(got[2:5], exact[2:5], same[2:5], names=("dq", "dk", "dv"))  # where finite


def test_a_score_mod_that_ignores_the_score_passes_no_gradient_through_nan():
    """NaN scores at visible pairs from a mod that never reads the score: torch gives q and
    k no gradient through it; the kernel's are 0, not NaN x 0."""
    mask = MASKS["window"]
    q, k, v, do = _inputs(mask, 2, 2, 16, torch.float32, "bshd", seed=6)
    fn = lambda s, b, h, q, k: torch.rsqrt((q - k).float() * 0.05)  # noqa: E731
    got = run_triton(q, k, v, do, mask, 0.3, BlockVariant(kind="sigmoid", score_mod=fn))
    assert got[2].abs().max() == 0 and got[3].abs().max() == 0


def test_an_int_table_changed_past_32_bits_is_refused_on_the_next_call():
    """The 32-bit check of an integer table is remembered per version: unchanged, it is
    not read again; changed in place past 2^31, the next call refuses it."""
    table = torch.tensor([3, -4, 5, 6] * 20)

    def fn(s, b, h, q, k):
        return s + (table[q] % 7).float() * 0.1

    compile_mod(fn, "cpu")
    table[1] = 2**40
    with pytest.raises(Unsupported, match="past 32 bits"):
        compile_mod(fn, "cpu")
