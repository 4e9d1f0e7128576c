"""``hamilton_attn.compat.attention_engine`` (AttentionEngine's API) against float64 oracles.

The seed's quick start (from ``examples/attention_engine_quickstart.py``, smaller shapes)
must route to the fast path and match ``attention()``; sigmoid, ReLU, softcap and
positional score_mods written in the seed's style must be recognised and match oracles
written from their formulas; online functions the library does not know (the seed's
retention, softmax with a +1 in its denominator) run on the blockwise path and must match
the float64 oracle forward and backward (gradients of q, k, v by autograd through the
dense formula); the context-parallel option runs on the session's gloo pool (workers
``_w_*`` return numbers, the assertions live in the tests).

Legend: B batch, S tokens, Hq / Hk heads, D head dim, W world size; tensors ``bshd``.
"""

from __future__ import annotations

import math
import os
import runpy
import warnings
import zlib
from pathlib import Path

import pytest
import torch

import hamilton_attn as ha
from hamilton_attn.compat.attention_engine import (
    AttentionEngine,
    CustomIO,
    OnlineFunc,
    SymbolScalar,
    Var,
    create_block_mask,
    meta_tensor,
)
from hamilton_attn.compat.attention_engine.recognise import classify_online, classify_score_mod

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "attention_engine_quickstart.py"
QS = runpy.run_path(str(EXAMPLE))  # the quick start's definitions (not its main)
F64 = torch.float64
TOL = 1e-10
_RUN_SEED = int.from_bytes(os.urandom(4), "little")


def _gen(*parts) -> torch.Generator:
    # Fresh inputs on every run (and per test and parameter).
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()) ^ _RUN_SEED)


def _qkv(b, s, hq, hk, d, dv, gen, dtype=F64, sk=None):
    sk = s if sk is None else sk
    q = torch.randn(b, s, hq, d, generator=gen, dtype=dtype).requires_grad_()
    k = torch.randn(b, sk, hk, d, generator=gen, dtype=dtype).requires_grad_()
    v = torch.randn(b, sk, hk, dv, generator=gen, dtype=dtype).requires_grad_()
    return q, k, v


def _meta(b, s, hq, hk, d, dv, dtype=F64, sk=None):
    sk = s if sk is None else sk
    return (
        meta_tensor(b, hq, s, d, dtype=dtype),
        meta_tensor(b, hk, sk, d, dtype=dtype),
        meta_tensor(b, hk, sk, dv, dtype=dtype),
    )


def _scores(q, k):
    """Raw ``q . k`` ``[B, Hq, Sq, Sk]`` in float64 (k's heads repeated for GQA)."""
    rep = q.shape[2] // k.shape[2]
    kk = k.double().repeat_interleave(rep, 2)
    return torch.einsum("bqhd,bkhd->bhqk", q.double(), kk)


def _combine(w, v, q):
    rep = q.shape[2] // v.shape[2]
    return torch.einsum("bhqk,bkhd->bqhd", w, v.double().repeat_interleave(rep, 2))


def _dense(fn, sq, sk):
    return fn(None, None, torch.arange(sq).view(-1, 1), torch.arange(sk).view(1, -1))


def softmax_oracle(q, k, v, vis, scale):
    s = (_scores(q, k) * scale).masked_fill(~vis, -math.inf)
    return _combine(torch.softmax(s, -1).nan_to_num(0.0), v, q)


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g, retain_graph=True)


def assert_matches(out, ref, inputs, tol=TOL, what=""):
    """Forward and the gradients of ``inputs`` under one random cotangent."""
    assert out.shape == ref.shape, what
    err = (out.double() - ref).abs().max().item()
    assert err <= tol, f"{what}: forward error {err:.3e}"
    g = torch.randn(out.shape, dtype=F64).to(out.dtype)
    ga = _grads(out, inputs, g)
    gr = _grads(ref, inputs, g.double())
    for name, a, r in zip("qkv", ga, gr):
        e = (a.double() - r).abs().max().item()
        assert e <= tol * 10, f"{what}: d{name} error {e:.3e}"


# -- online functions in the seed's style ------------------------------------------------


class OnlineIdentity(OnlineFunc):
    """The seed's sigmoid / relu online function: weights are the score_mod'ed scores."""

    def __init__(self):
        super().__init__({}, {}, CustomIO())

    @staticmethod
    def online_fwd(scores, online_rowscales, b, h, q_idx):
        o_scale = SymbolScalar("o_scale", Var("1"))
        return scores, online_rowscales, o_scale

    @staticmethod
    def online_fwd_epilogue(o, online_rowscales, b, h, q_idx):
        return o, {}


class OnlineRetention(OnlineFunc):
    """The seed's retention: ``out_i = sum_j s_ij v_j / max(sum_j |s_ij|, 1)``."""

    def __init__(self):
        rows = {
            "r_wo_clamp": SymbolScalar("r_wo_clamp", Var("0.0")),
            "r": SymbolScalar("r", Var("0.0")),
        }
        super().__init__(rows, {"r": SymbolScalar("r", Var("0.0"))}, CustomIO())

    @staticmethod
    def online_fwd(scores, online_rowscales, b, h, q_idx):
        r_wo_clamp = online_rowscales["r_wo_clamp"] + scores.get_reduce("abssum")
        r_new = r_wo_clamp.max(1.0)
        o_scale = online_rowscales["r"] / r_new
        return scores / r_new, {"r_wo_clamp": r_wo_clamp, "r": r_new}, o_scale

    @staticmethod
    def online_fwd_epilogue(o, online_rowscales, b, h, q_idx):
        return o, {"r": online_rowscales["r"]}


class OnlineSoftmaxOne(OnlineFunc):
    """Softmax with a 1 in the denominator: ``sum_j e^s v_j / (1 + sum_j e^s)``."""

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
        m, r = online_rowscales["m"], online_rowscales["r"]
        return o / (r + (-m).exp()), {}


def softmax_one_oracle(q, k, v, vis, scale):
    s = (_scores(q, k) * scale).masked_fill(~vis, -math.inf)
    e = torch.exp(s)
    return _combine(e / (1 + e.sum(-1, keepdim=True)), v, q)


def window_docs_mask(b, h, q_idx, kv_idx):
    """Causal sliding window of 7 inside documents [0, 20), [20, 53); rows 0-4 see nothing."""
    same_doc = (q_idx < 20) == (kv_idx < 20)
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 7) & same_doc & (q_idx >= 5)


# -- the quick start ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_quickstart_matches_attention(dtype):
    """The seed's quick start (its score_mod, OnlineSoftmax and causal_mask) is recognised
    as scaled softmax and matches attention() and the oracle, forward and gradients."""
    b, s, h, d = 2, 67, 3, QS["D"]
    q, k, v = _qkv(b, s, h, h, d, d, _gen("qs", dtype), dtype)
    mod = AttentionEngine(
        _meta(b, s, h, h, d, d, dtype), QS["custom_fwd_inputs"], score_mod=QS["score_mod"],
        block_mask=QS["causal_mask"], online_func=QS["OnlineSoftmax"](),
        tune=False, tune_file="mha_tune.json",
    )  # fmt: skip
    assert mod.route.startswith("softmax, scale"), mod.route
    assert mod.mask == ha.Mask.causal(s)
    out = mod(q, k, v)
    ref = ha.attention(q, k, v, causal=True, scale=QS["softmax_scale"])
    tol = TOL if dtype == F64 else 1e-5
    assert_matches(out, ref.double(), (q, k, v), tol, "vs attention()")
    vis = _dense(QS["causal_mask"], s, s)
    assert_matches(out, softmax_oracle(q, k, v, vis, QS["softmax_scale"]), (q, k, v), tol, "oracle")


def test_quickstart_example_runs():
    mod, err = runpy.run_path(str(EXAMPLE))["main"](S=96, H=2)
    assert err <= 1e-5 and mod.route.startswith("softmax")


def test_quickstart_forced_blockwise_is_exact():
    """The same online softmax on the blockwise path (GQA, odd lengths, several blocks)."""
    b, s, hq, hk, d = 1, 45, 4, 2, QS["D"]
    q, k, v = _qkv(b, s, hq, hk, d, 8, _gen("qs-blockwise"))
    mod = AttentionEngine(
        _meta(b, s, hq, hk, d, 8), CustomIO(), score_mod=QS["score_mod"],
        block_mask=window_docs_mask, online_func=QS["OnlineSoftmax"](), backend="blockwise",
        block_size=8,
    )  # fmt: skip
    assert mod.route.startswith("blockwise")
    vis = _dense(window_docs_mask, s, s)
    ref = softmax_oracle(q, k, v, vis, QS["softmax_scale"])
    assert_matches(mod(q, k, v), ref, (q, k, v), what="blockwise softmax")


# -- recognised variants -----------------------------------------------------------------


def test_sigmoid_in_the_seed_style():
    """The seed's sigmoid attention: sigmoid through tanh of the raw score plus a custom
    bias input, causal; recognised as Sigmoid(bias) (bias read from the input)."""

    def score_mod(score, custom_fwd_inputs, b, h, q_idx, kv_idx):
        score = score + custom_fwd_inputs.input_tensors["softmax_bias"]
        return ((score * 0.5).tanh() + 1) * 0.5

    b, s, h, d = 2, 41, 2, 8
    q, k, v = _qkv(b, s, h, 1, d, d, _gen("sigmoid"))
    bias = torch.randn(1, generator=_gen("bias"), dtype=F64)
    mod = AttentionEngine(
        _meta(b, s, h, 1, d, d), CustomIO({"softmax_bias": (1,)}), score_mod=score_mod,
        block_mask=QS["causal_mask"], online_func=OnlineIdentity(),
    )  # fmt: skip
    out = mod(q, k, v, bias)
    assert mod.route.startswith("sigmoid"), mod.route
    vis = _dense(QS["causal_mask"], s, s)
    w = torch.sigmoid(_scores(q, k) + bias).masked_fill(~vis, 0.0)
    assert_matches(out, _combine(w, v, q), (q, k, v), what="sigmoid")
    # A bias that requires grad takes the blockwise path and gets its gradient.
    bias_g = bias.clone().requires_grad_()
    out = mod(q, k, v, bias_g)
    ref = _combine(torch.sigmoid(_scores(q, k) + bias_g).masked_fill(~vis, 0.0), v, q)
    g = torch.randn(out.shape, dtype=F64)
    (da,) = torch.autograd.grad(out, bias_g, g)
    (dr,) = torch.autograd.grad(ref, bias_g, g)
    assert (da - dr).abs().max().item() <= 1e-9


def test_custom_inputs_bad_calls_name_the_argument():
    """Custom inputs given wrongly at call time: too many, an unknown or repeated name,
    one missing; each a ValueError naming custom_fwd_inputs."""

    def score_mod(score, custom_fwd_inputs, b, h, q_idx, kv_idx):
        return score + custom_fwd_inputs.input_tensors["softmax_bias"]

    b, s, h, d = 1, 9, 2, 8
    q, k, v = _qkv(b, s, h, 1, d, d, _gen("custom_bad"))
    mod = AttentionEngine(
        _meta(b, s, h, 1, d, d), CustomIO({"softmax_bias": (1,)}), score_mod=score_mod,
        block_mask=QS["causal_mask"], online_func=OnlineIdentity(),
    )  # fmt: skip
    bias = torch.randn(1, generator=_gen("bias"), dtype=F64)
    calls = [
        ("custom_fwd_inputs: missing", lambda: mod(q, k, v)),
        ("custom_fwd_inputs: the engine takes 1", lambda: mod(q, k, v, bias, bias)),
        ("custom_fwd_inputs: unknown input 'x'", lambda: mod(q, k, v, bias, x=bias)),
        ("custom_fwd_inputs: 'softmax_bias' given twice",
         lambda: mod(q, k, v, bias, softmax_bias=bias)),
    ]  # fmt: skip
    for what, call in calls:
        with pytest.raises(ValueError, match=what):
            call()
    assert torch.isfinite(mod(q, k, v, softmax_bias=bias)).all()


def test_relu_in_the_seed_style():
    """The seed's relu attention: ``(score * scale).max(0)``, no mask."""
    d = 16
    scores_scale = 1 / d**0.5

    def score_mod(score, custom_fwd_inputs, b, h, q_idx, kv_idx):
        score = score * scores_scale
        return score.max(0)

    b, s, h = 1, 38, 3
    q, k, v = _qkv(b, s, h, h, d, d, _gen("relu"))
    mod = AttentionEngine(
        _meta(b, s, h, h, d, d), CustomIO({}), score_mod=score_mod, block_mask=None,
        online_func=OnlineIdentity(), tune=False, tune_file="reluattn_tune.json",
    )  # fmt: skip
    assert mod.route.startswith("relu"), mod.route
    w = torch.relu(_scores(q, k) * scores_scale)
    assert_matches(mod(q, k, v), _combine(w, v, q), (q, k, v), what="relu")


def test_softcap_and_positional_score_mods():
    """Softmax with a softcap score_mod is Softmax(softcap); one that reads the positions
    runs as attention(score_mod=...)."""
    b, s, h, d = 1, 33, 2, 8
    scale, cap = d**-0.5, 2.5
    q, k, v = _qkv(b, s, h, h, d, d, _gen("softcap"))
    q = (q.detach() * 3).requires_grad_()  # scores large enough for the cap to bite
    vis = _dense(QS["causal_mask"], s, s)

    def softcap(score, custom_fwd_inputs, b, h, q_idx, kv_idx):
        return (score * scale / cap).tanh() * cap

    def alibi(score, custom_fwd_inputs, b, h, q_idx, kv_idx):
        return score * scale - (h + 1) * 0.25 * (q_idx - kv_idx).abs()

    meta = _meta(b, s, h, h, d, d)
    online = QS["OnlineSoftmax"]()
    mod = AttentionEngine(meta, CustomIO(), softcap, QS["causal_mask"], online)
    assert mod.route.startswith("softmax, softcap 2.5"), mod.route
    sc = _scores(q, k) * scale
    ref = _combine(
        torch.softmax((cap * torch.tanh(sc / cap)).masked_fill(~vis, -math.inf), -1), v, q
    )
    assert_matches(mod(q, k, v), ref, (q, k, v), what="softcap")
    mod = AttentionEngine(meta, CustomIO(), alibi, QS["causal_mask"], online)
    assert mod.route == "softmax with score_mod (positional)", mod.route
    slope = (torch.arange(h, dtype=F64) + 1).view(1, -1, 1, 1) * 0.25
    dist = (torch.arange(s).view(-1, 1) - torch.arange(s).view(1, -1)).abs()
    ref = _combine(torch.softmax((sc - slope * dist).masked_fill(~vis, -math.inf), -1), v, q)
    assert_matches(mod(q, k, v), ref, (q, k, v), what="positional")


def test_recognition_on_probes():
    assert classify_online(QS["OnlineSoftmax"](), {"m": -math.inf, "r": 0.0}) == "softmax"
    assert classify_online(OnlineIdentity(), {}) == "identity"
    assert classify_online(OnlineRetention(), {"r_wo_clamp": 0.0, "r": 0.0}) is None
    assert classify_online(OnlineSoftmaxOne(), {"m": -math.inf, "r": 0.0}) is None
    io = CustomIO()

    def fit(fn):
        return classify_score_mod(lambda s, c, b, h, i, j: fn(s), io, {})

    assert fit(lambda s: s * 0.3 + 2).kind == "affine"
    f = fit(lambda s: (s * 0.7 - 1.5).sigmoid())
    assert f.kind == "sigmoid" and abs(f.c - 0.7) < 1e-9 and abs(f.d + 1.5) < 1e-9
    f = fit(lambda s: (s * -0.4).max(0.0))
    assert f.kind == "relu" and abs(f.c + 0.4) < 1e-9
    f = fit(lambda s: (s * 0.2).tanh() * 5)
    assert f.kind == "softcap" and abs(f.cap - 5) < 1e-8 and abs(f.c - 1.0) < 1e-8
    assert fit(lambda s: s * s).kind == "function"
    assert fit(lambda s: (s * 0.5).max(0.0) + 1e-3).kind == "function"


# -- the blockwise path ------------------------------------------------------------------


def test_retention_blockwise_vs_oracle():
    """The seed's retention (custom mask input, mask_value="0", create_block_mask) is not
    recognised and runs blockwise, exact forward and backward."""

    def score_mod(score, custom_fwd_inputs, b, h, q_idx, kv_idx):
        return score * custom_fwd_inputs.input_tensors["mask"]

    b, s, h, d, dv = 2, 37, 2, 8, 5
    gen = _gen("retention")
    q, k, v = _qkv(b, s, h, h, d, dv, gen)
    decay = torch.rand(1, h, s, s, generator=gen, dtype=F64)
    block_mask = create_block_mask(QS["causal_mask"], 1, 1, s, s, device="cpu")
    mod = AttentionEngine(
        _meta(b, s, h, h, d, dv), CustomIO({"mask": (1, "heads", "seq_len", "seq_len_kv")}),
        score_mod=score_mod, block_mask=block_mask, online_func=OnlineRetention(),
        mask_value="0", block_size=16,
    )  # fmt: skip
    out = mod(q, k, v, decay)
    assert mod.route == "blockwise (online function not recognised)"
    vis = _dense(QS["causal_mask"], s, s)
    sc = (_scores(q, k) * decay).masked_fill(~vis, 0.0)
    ref = _combine(sc / sc.abs().sum(-1, keepdim=True).clamp(min=1.0), v, q)
    assert_matches(out, ref, (q, k, v), what="retention")


@pytest.mark.parametrize("block", [4, 16, 64])
def test_softmax_one_blockwise_vs_oracle(block):
    """An unknown normaliser, GQA, odd lengths, windowed documents with empty rows."""
    b, s, hq, hk, d = 2, 53, 4, 2, 8
    q, k, v = _qkv(b, s, hq, hk, d, 6, _gen("softmax-one", block))
    mod = AttentionEngine(
        _meta(b, s, hq, hk, d, 6), CustomIO(), score_mod=QS["score_mod"],
        block_mask=window_docs_mask, online_func=OnlineSoftmaxOne(), block_size=block,
    )  # fmt: skip
    out = mod(q, k, v)
    assert mod.route.startswith("blockwise")
    vis = _dense(window_docs_mask, s, s)
    assert_matches(out, softmax_one_oracle(q, k, v, vis, QS["softmax_scale"]), (q, k, v))
    assert out[:, :5].abs().max().item() == 0.0  # rows that see nothing


def test_create_block_mask_is_exact():
    cases = [
        lambda b, h, q, k: q >= k,
        lambda b, h, q, k: (q - k).abs() <= 3,
        lambda b, h, q, k: ((q // 10) == (k // 10)) | (k < 2),
        lambda b, h, q, k: (k >= q) & (k % 3 != 1),
    ]
    for i, fn in enumerate(cases):
        bm = create_block_mask(fn, 1, 1, 47, 59, device="cpu")
        assert torch.equal(bm.mask.to_dense(), _dense(fn, 47, 59)), i
    with pytest.raises(ValueError, match="depends on b or h"):
        create_block_mask(lambda b, h, q, k: q >= k + h, 1, 2, 8, 8, device="cpu")
    with pytest.raises(ValueError, match="block_mask"):
        create_block_mask(lambda b, h, q, k: q - k, 1, 1, 8, 8, device="cpu")


# -- bad input ---------------------------------------------------------------------------


def test_bad_input_names_the_argument():
    meta = _meta(1, 16, 2, 2, 8, 8)
    online = QS["OnlineSoftmax"]()
    good = dict(score_mod=QS["score_mod"], block_mask=QS["causal_mask"], online_func=online)
    mod = AttentionEngine(meta, CustomIO(), **good)
    q, k, v = _qkv(1, 16, 2, 2, 8, 8, _gen("bad"))
    bad_calls = [
        ("q:", lambda: mod(q.transpose(1, 2), k, v)),
        ("k:", lambda: mod(q, k[:, :8], v)),
        ("v:", lambda: mod(q, k, v.float())),
        ("custom_fwd_inputs", lambda: mod(q, k, v, torch.ones(1))),
        ("custom_fwd_inputs", lambda: mod(q, k, v, bias=torch.ones(1))),
    ]
    for what, call in bad_calls:
        with pytest.raises(ValueError, match=what):
            call()
    bad_builds = [
        ("qkv_meta", dict(qkv_meta=meta[:2])),
        ("qkv_meta", dict(qkv_meta=(meta[0], meta[1], meta_tensor(1, 3, 16, 8, dtype=F64)))),
        ("custom_fwd_inputs", dict(custom_fwd_inputs={"x": (1,)})),
        ("backend", dict(backend="cuda_magic")),
        ("block_mask", dict(block_mask="causal")),
        ("block_mask", dict(block_mask=ha.Mask.causal(15))),
        ("mask_value", dict(mask_value="-1e9")),
        ("tune", dict(tune="yes")),
        ("online_func", dict(online_func=object())),
        ("score_mod", dict(score_mod=3)),
        ("block_size", dict(block_size=0)),
        ("context_parallel", dict(context_parallel="ring")),
    ]
    for what, kw in bad_builds:
        args = dict(qkv_meta=meta, custom_fwd_inputs=CustomIO(), **good)
        args.update(kw)
        with pytest.raises(ValueError, match=what):
            AttentionEngine(**args)

    class NoInit(OnlineFunc):
        def __init__(self):
            super().__init__({"m": SymbolScalar("m", Var("m0"))}, {}, CustomIO())

    with pytest.raises(ValueError, match="online_rowscales"):
        AttentionEngine(meta, CustomIO(), online_func=NoInit())
    io = CustomIO({"mask": (1, "heads", "seq_len", "seq_len_kv")})
    mod = AttentionEngine(meta, io, score_mod=lambda s, c, b, h, i, j: s * c.input_tensors["mask"])
    with pytest.raises(ValueError, match="mask: declared shape"):
        mod(q, k, v, torch.ones(1, 2, 16, 15, dtype=F64))
    # A score_mod is probed at the first call, on q's device (where tensors it closes
    # over live), before any transfer.
    mod = AttentionEngine(meta, CustomIO(), score_mod=lambda s, c, b, h, i, j: s.nope())
    with pytest.raises(ValueError, match="score_mod"):
        mod(q, k, v)
    with pytest.warns(UserWarning, match="tune_file"):
        AttentionEngine(meta, CustomIO(), **good, tune=True, tune_file="t.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AttentionEngine(meta, CustomIO(), **good, tune=False, tune_file="t.json")


# -- context parallelism -----------------------------------------------------------------


def _w_context_parallel(ctx, cases):
    from hamilton_attn.compat.attention_engine import AttentionEngine as Engine
    from hamilton_attn.compat.attention_engine import CustomIO as IO

    results = []
    for c in cases:
        s, h, d, schedule, online_name, seed = c
        gen = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(1, s, h, d, generator=gen, dtype=F64) for _ in range(3))
        g = torch.randn(1, s, h, d, generator=gen, dtype=F64)
        mask_fn = window_docs_mask if online_name == "softmax_one" else QS["causal_mask"]
        online = OnlineSoftmaxOne() if online_name == "softmax_one" else QS["OnlineSoftmax"]()
        bm = create_block_mask(mask_fn, 1, 1, s, s, device="cpu")
        plan = ha.plan(bm.mask, ctx.group, schedule=schedule)
        mod = Engine(
            _meta(1, s, h, h, d, d), IO(), score_mod=QS["score_mod"], block_mask=bm,
            online_func=online, context_parallel=plan, block_size=8,
        )  # fmt: skip
        ql, kl, vl = (ha.dispatch(t, plan).requires_grad_() for t in (q, k, v))
        out_l = mod(ql, kl, vl)
        dq, dk, dv = torch.autograd.grad(out_l, (ql, kl, vl), ha.dispatch(g, plan))
        out = ha.undispatch(out_l.detach(), plan)
        grads = [ha.undispatch(x, plan) for x in (dq, dk, dv)]
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
        vis = _dense(mask_fn, s, s)
        oracle = softmax_one_oracle if online_name == "softmax_one" else softmax_oracle
        ref = oracle(qr, kr, vr, vis, QS["softmax_scale"])
        ref_grads = torch.autograd.grad(ref, (qr, kr, vr), g)
        errs = [(out - ref).abs().max().item()]
        errs += [(a - r).abs().max().item() for a, r in zip(grads, ref_grads)]
        results.append({"route": mod.route, "err": max(errs)})
    return results


@pytest.mark.parametrize("w", [2, 3])
def test_context_parallel_recognised_and_blockwise(pool, w):
    cases = [
        (37, 2, 8, "ring", "softmax", 11 * w),
        (37, 2, 8, "hamilton", "softmax", 13 * w),
        (53, 2, 8, "allgather", "softmax_one", 17 * w),
        (53, 2, 8, "ring", "softmax_one", 19 * w),
    ]
    per_rank = pool.run(_w_context_parallel, w, cases)
    for rank, results in enumerate(per_rank):
        for c, res in zip(cases, results, strict=True):
            want = "blockwise" if c[4] == "softmax_one" else "softmax"
            assert res["route"].startswith(want), (rank, c, res)
            assert res["err"] <= 1e-9, (rank, c, res)


def test_context_parallel_mask_must_match_the_plan():
    plan = ha.plan(ha.Mask.causal(16), ha.SimulatedGroup(1))
    meta = _meta(1, 16, 2, 2, 8, 8)
    with pytest.raises(ValueError, match="context_parallel"):
        AttentionEngine(meta, CustomIO(), block_mask=None, context_parallel=ha.plan(
            ha.Mask.causal(12), ha.SimulatedGroup(1)))  # fmt: skip
    with pytest.raises(ValueError, match="context_parallel"):
        AttentionEngine(meta, CustomIO(), block_mask=ha.Mask.full(16), context_parallel=plan)
    mod = AttentionEngine(
        meta, CustomIO(), online_func=QS["OnlineSoftmax"](), context_parallel=plan
    )
    assert mod.mask == ha.Mask.causal(16)


def _w_bad_one_rank(ctx, kind):
    """Rank 1 alone passes bad input to a context-parallel engine, then every rank makes
    a good call. Returns (exception type, message, good call ok) on this rank."""
    from hamilton_attn.compat.attention_engine import AttentionEngine as Engine
    from hamilton_attn.compat.attention_engine import CustomIO as IO

    s, h, d = 37, 2, 8
    bm = create_block_mask(QS["causal_mask"], 1, 1, s, s, device="cpu")
    plan = ha.plan(bm.mask, ctx.group, schedule="ring")
    gen = torch.Generator().manual_seed(3)
    q, k, v = (ha.dispatch(torch.randn(1, s, h, d, generator=gen, dtype=F64), plan)
               for _ in range(3))  # fmt: skip
    smod = QS["score_mod"]
    if kind == "score_mod" and ctx.rank == 1:
        smod = lambda s_, c, b, hh, i, j: s_.nope()  # noqa: E731
    mod = Engine(_meta(1, s, h, h, d, d), IO(), score_mod=smod, block_mask=bm,
                 online_func=QS["OnlineSoftmax"](), context_parallel=plan)  # fmt: skip
    bad_q = q[..., :-1] if kind == "q_shape" and ctx.rank == 1 else q
    try:
        mod(bad_q, k, v)
        res = ("no error", "")
    except Exception as err:  # noqa: BLE001 - the test is about which error
        res = (type(err).__name__, str(err))
    good = Engine(_meta(1, s, h, h, d, d), IO(), score_mod=QS["score_mod"], block_mask=bm,
                  online_func=QS["OnlineSoftmax"](), context_parallel=plan)(q, k, v)  # fmt: skip
    return (*res, bool(torch.isfinite(good).all()))


@pytest.mark.parametrize("kind", ["score_mod", "q_shape"])
def test_context_parallel_bad_input_on_one_rank_raises_on_every_rank(pool, kind):
    per_rank = pool.run(_w_bad_one_rank, 2, kind)
    for rank, (typ, msg, good) in enumerate(per_rank):
        assert typ == "ValueError", (rank, typ, msg)
        assert good, rank
    assert kind.split("_")[0] in per_rank[1][1]
    assert "rank(s) [1]" in per_rank[0][1]
