"""Recognition in ``compat.attention_engine`` must never take a score_mod for a form it
is not: each case here is a score_mod that agrees with a recognised form on sampled
points and differs elsewhere (a sparse positional term, a clamp beyond small scores),
or a custom input whose value changes between calls without a new tensor. Every call
must match the float64 oracle written from the user's formula.

Legend: B batch, S tokens, H heads, D head dim; tensors ``bshd``.
"""

from __future__ import annotations

import math

import pytest
import torch

from hamilton_attn.compat.attention_engine import (
    AttentionEngine,
    CustomIO,
    OnlineFunc,
    SymbolScalar,
    Var,
    meta_tensor,
)
from hamilton_attn.compat.attention_engine.recognise import classify_score_mod

F64 = torch.float64
B, S, H, D = 1, 41, 2, 8
SCALE = D**-0.5


class Softmax(OnlineFunc):
    """The seed's online softmax."""

    def __init__(self):
        rows = {"m": SymbolScalar("m", Var("-inf")), "r": SymbolScalar("r", Var("0.0"))}
        super().__init__(rows, {}, CustomIO())

    @staticmethod
    def online_fwd(scores, online_rowscales, b, h, q_idx):
        m, r = online_rowscales["m"], online_rowscales["r"]
        m_new = m.max(scores.get_reduce("max"))
        scale_tmp = (m - m_new).exp()
        scores = (scores - m_new).exp()
        return scores, {"m": m_new, "r": r * scale_tmp + scores.get_reduce("sum")}, scale_tmp

    @staticmethod
    def online_fwd_epilogue(o, online_rowscales, b, h, q_idx):
        return o / online_rowscales["r"], {}


class WeightedSum(OnlineFunc):
    """The seed's sigmoid / relu online function: the score_mod'ed scores are weights."""

    def __init__(self):
        super().__init__({}, {}, CustomIO())


def _qkv(seed, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, S, H, D, generator=gen, dtype=F64) * spread).requires_grad_()
    k = torch.randn(B, S, H, D, generator=gen, dtype=F64).requires_grad_()
    v = torch.randn(B, S, H, D, generator=gen, dtype=F64).requires_grad_()
    return q, k, v


def _meta():
    return tuple(meta_tensor(B, H, S, D, dtype=F64) for _ in range(3))


def _positions():
    """b, h, q_idx, kv_idx broadcast over ``[B, H, S, S]``."""
    return (
        torch.arange(B).view(-1, 1, 1, 1),
        torch.arange(H).view(1, -1, 1, 1),
        torch.arange(S).view(1, 1, -1, 1),
        torch.arange(S).view(1, 1, 1, -1),
    )


def _oracle(q, k, v, weights_of_scores):
    """``out = w(s) @ v`` with ``w`` a function of the raw scores ``[B, H, S, S]``."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k)
    return torch.einsum("bhqk,bkhd->bqhd", weights_of_scores(s), v)


def _check(mod, q, k, v, ref, *custom, tol=1e-10):
    out = mod(q, k, v, *custom)
    err = (out - ref).abs().max().item()
    assert err <= tol, f"route {mod.route!r}: forward error {err:.3e}"
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g, retain_graph=True)
    want = torch.autograd.grad(ref, (q, k, v), g, retain_graph=True)
    for name, a, r in zip("qkv", got, want):
        e = (a - r).abs().max().item()
        assert e <= tol * 10, f"route {mod.route!r}: d{name} error {e:.3e}"


def _user(mod_of_score_and_positions):
    """A score_mod in the seed's signature from ``f(score, b, h, q_idx, kv_idx)``."""
    return lambda score, custom, b, h, q_idx, kv_idx: mod_of_score_and_positions(
        score, b, h, q_idx, kv_idx
    )


SPARSE_MODS = {
    "next_token": lambda s, b, h, i, j: s * SCALE + 3 * ((i - j) == 1),
    "one_pair": lambda s, b, h, i, j: s * SCALE + 4 * ((i == 17) & (j == 5)),
    "one_head_pair": lambda s, b, h, i, j: s * SCALE - 5 * ((h == 1) & (i == 30) & (j == 2)),
}


@pytest.mark.parametrize("name", sorted(SPARSE_MODS))
def test_sparse_positional_softmax_is_exact(name):
    """A positional term that is zero almost everywhere is still positional: softmax of
    the user's own score_mod, not of a scale."""
    fn = SPARSE_MODS[name]
    mod = AttentionEngine(_meta(), CustomIO(), score_mod=_user(fn), online_func=Softmax())
    q, k, v = _qkv(1)
    ref = _oracle(q, k, v, lambda s: torch.softmax(fn(s, *_positions()), -1))
    _check(mod, q, k, v, ref)
    assert mod.route == "softmax with score_mod (positional)", mod.route


@pytest.mark.parametrize("name", sorted(SPARSE_MODS))
def test_sparse_positional_sigmoid_is_exact(name):
    fn = SPARSE_MODS[name]
    mod = AttentionEngine(
        _meta(), CustomIO(), score_mod=_user(lambda *a: fn(*a).sigmoid()),
        online_func=WeightedSum(),
    )  # fmt: skip
    q, k, v = _qkv(2)
    ref = _oracle(q, k, v, lambda s: torch.sigmoid(fn(s, *_positions())))
    _check(mod, q, k, v, ref)
    assert mod.route.startswith("blockwise"), mod.route


CLAMPED = lambda s: torch.clamp(s * SCALE, max=5.0)  # noqa: E731
FIVE = torch.tensor(5.0, dtype=F64)
CLAMPS = {  # name: (the user's score_mod of the score, the oracle's)
    "min_5": (lambda s: (s * SCALE).min(5.0), CLAMPED),
    "torch_minimum_5": (lambda s: torch.minimum(s * SCALE, FIVE), CLAMPED),
    "torch_clamp_max_5": (CLAMPED, CLAMPED),
    "zero_beyond_40": (lambda s: torch.where(s > 40.0, s * 0.0, s * SCALE),) * 2,
}


@pytest.mark.parametrize("name", sorted(CLAMPS))
def test_clamped_softmax_is_exact(name):
    """Scores of magnitude up to ~50 here: a clamp at 5 bites, so the mod is not a
    scale."""
    fn, oracle_fn = CLAMPS[name]
    mod = AttentionEngine(
        _meta(), CustomIO(), score_mod=_user(lambda s, *p: fn(s)), online_func=Softmax()
    )
    q, k, v = _qkv(3, spread=6.0)
    ref = _oracle(q, k, v, lambda s: torch.softmax(oracle_fn(s), -1))
    _check(mod, q, k, v, ref, tol=1e-9)
    assert not mod.route.startswith("softmax, scale"), mod.route


RELU6 = {
    "max_min": lambda s: s.max(0.0).min(6.0),
    "torch_clamp": lambda s: torch.clamp(s, 0.0, 6.0),
}


@pytest.mark.parametrize("name", sorted(RELU6))
def test_relu6_is_not_relu(name):
    fn = RELU6[name]
    mod = AttentionEngine(
        _meta(), CustomIO(), score_mod=_user(lambda s, *p: fn(s)), online_func=WeightedSum()
    )
    q, k, v = _qkv(4, spread=4.0)
    ref = _oracle(q, k, v, lambda s: torch.clamp(s, 0.0, 6.0))
    _check(mod, q, k, v, ref, tol=1e-9)
    assert mod.route.startswith("blockwise"), mod.route


def test_custom_input_changed_in_place_is_read_again():
    """``bias.data.fill_`` bumps no version counter: the route (Sigmoid(bias) with the
    bias read from the input) must follow the values, not the tensor's identity."""

    def score_mod(score, custom, b, h, q_idx, kv_idx):
        return (score * SCALE + custom.input_tensors["bias"]).sigmoid()

    mod = AttentionEngine(
        _meta(), CustomIO({"bias": (1,)}), score_mod=score_mod, online_func=WeightedSum()
    )
    q, k, v = _qkv(5)
    bias = torch.tensor([-1.0], dtype=F64)
    for value in (-1.0, 2.5, 2.5, 0.0):
        bias.data.fill_(value)
        ref = _oracle(q, k, v, lambda s, value=value: torch.sigmoid(s * SCALE + value))
        _check(mod, q, k, v, ref, bias)
        assert mod.route.startswith("sigmoid, bias"), mod.route
    # A bias that varies over positions is positional: the blockwise path, exact.
    wide = CustomIO({"bias": (1, "heads", "seq_len", "seq_len_kv")})
    mod = AttentionEngine(_meta(), wide, score_mod=score_mod, online_func=WeightedSum())
    field = torch.zeros(1, H, S, S, dtype=F64)
    _check(mod, q, k, v, _oracle(q, k, v, lambda s: torch.sigmoid(s * SCALE)), field)
    assert mod.route.startswith("sigmoid"), mod.route
    field.data[0, 1, 7, 3] = 9.0
    ref = _oracle(q, k, v, lambda s: torch.sigmoid(s * SCALE + field))
    _check(mod, q, k, v, ref, field)
    assert mod.route.startswith("blockwise"), mod.route


def test_captured_tensor_is_not_baked_in():
    """A tensor the score_mod closes over may change between calls: it is never read
    into a fused route's constants."""
    shift = torch.tensor(0.5, dtype=F64)
    mod = AttentionEngine(
        _meta(), CustomIO(), score_mod=_user(lambda s, *p: (s * SCALE + shift).sigmoid()),
        online_func=WeightedSum(),
    )  # fmt: skip
    q, k, v = _qkv(6)
    for value in (0.5, -3.0):
        shift.data.fill_(value)
        ref = _oracle(q, k, v, lambda s, value=value: torch.sigmoid(s * SCALE + value))
        _check(mod, q, k, v, ref)


def _form(fn):
    return classify_score_mod(lambda s, c, b, h, i, j: fn(s), CustomIO(), {})


def test_forms_are_read_from_the_expression():
    """The seed's spellings of each form, and near-misses that are none of them."""
    f = _form(lambda s: ((s + 0.25) * 0.5).tanh() * 0.5 + 0.5)
    assert (f.kind, f.c, f.d) == ("sigmoid", 1.0, 0.25)
    f = _form(lambda s: torch.sigmoid(s * 0.3 - 1))
    assert (f.kind, f.c, f.d) == ("sigmoid", 0.3, -1.0)
    f = _form(lambda s: torch.relu(s * 0.125))
    assert (f.kind, f.c) == ("relu", 0.125)
    f = _form(lambda s: torch.clamp(s * 2, min=0) * 0.5)
    assert (f.kind, f.c) == ("relu", 1.0)
    f = _form(lambda s: 30.0 * torch.tanh(s * SCALE / 30.0))
    assert f.kind == "softcap" and f.cap == 30.0 and math.isclose(f.c, SCALE, rel_tol=1e-15)
    f = _form(lambda s: -(s / 8) * -1 + 2)
    assert (f.kind, f.c, f.d) == ("affine", 0.125, 2.0)
    for miss in (
        lambda s: s.max(0.0) + 1e-3,  # relu plus a constant weight on every key
        lambda s: (s * 0.5).max(0.1),
        lambda s: (s + 1).tanh() * 3,  # a softcap of a shifted score
        lambda s: s * s,
        lambda s: s.exp(),
    ):
        assert _form(miss).kind == "function", _form(miss)
    # 0.49 (tanh(x / 2) + 1) is no sigmoid; in a softmax the constant cancels: a softcap.
    f = _form(lambda s: ((s * 0.5).tanh() + 1) * 0.49)
    assert f.kind == "softcap" and (f.cap, f.c) == (0.49, 0.49 * 0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_score_mod_capturing_cuda_tensors():
    """Probes are made on q's device: a score_mod reading a CUDA tensor by head works."""
    slopes = torch.tensor([0.5, 0.25], dtype=F64, device="cuda")

    def fn(s, b, h, i, j):
        return s * SCALE - slopes[h] * (i - j).abs()

    mod = AttentionEngine(_meta(), CustomIO(), score_mod=_user(fn), online_func=Softmax())
    q, k, v = (t.detach().cuda().requires_grad_() for t in _qkv(7))
    pos = [t.cuda() for t in _positions()]
    ref = _oracle(q, k, v, lambda s: torch.softmax(fn(s, *pos), -1))
    _check(mod, q, k, v, ref, tol=1e-9)
