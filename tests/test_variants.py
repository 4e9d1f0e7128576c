"""Attention variants on one device against the float64 oracle written from the formulas.

Every variant (softmax plain / softcap / ALiBi [Hq] and [B, Hq] / sink / all three,
sigmoid with a bias, relu, score_mod alone and with softcap / sigmoid) x every mask
(full, causal, bottom-right causal Sq != Sk, packed documents with rows that see
nothing, sliding window, overlapping MagiAttention ranges of mixed types) x GQA / MQA,
at odd lengths (37, 53), in float32 through ``hamilton_attn.attention`` against
``variant_attention_oracle`` in float64: out, lse, and the gradients of q, k, v and of
``sink`` / ``alibi_slopes`` (which require grad), within flash-attention's bound (at most
``FACTOR`` times the error of the same oracle computed in float32, plus a few ulps).
Layouts rotate over bshd / bhsd / thd. Then: rows that see nothing, lse with a sink, and
bad input (a ValueError naming the argument).

Legend: B batch, Sq/Sk tokens, Hq/Hk heads, D head dim; oracle tensors are bhsd.
"""

from __future__ import annotations

import itertools
import math
import zlib

import pytest
import torch

import hamilton_attn as ha
from hamilton_attn.testing.oracle import (
    assert_close_to_oracle,
    dense_from_rects,
    dense_varlen,
    dense_window,
    max_err,
    variant_attention_oracle,
)
from hamilton_attn.variants import ReLU, Sigmoid, Softmax

FACTOR = 3.0  # the library's float32 error may be this many times the float32 oracle's
PARAM_ULPS = 16  # atol of the sink / slopes gradients, in ulps of their magnitude
KV_ULPS = 4  # atol of dK / dV (sums over every row of a KV head's query heads), in ulps
EPS32 = torch.finfo(torch.float32).eps
D = 8

# -- masks: (Mask, the oracle's dense mask built from the spec, not from Mask) ----------

_MAGI_Q = [(0, 37), (5, 30), (20, 37), (0, 15), (30, 37)]
_MAGI_K = [(0, 20), (10, 40), (30, 53), (40, 53), (0, 53)]
_MAGI_T = ["full", "causal", "inv_causal", "bi_causal", "causal"]
_GAP_Q = [(0, 10), (10, 25), (30, 37)]  # rows 25..29 see nothing


def make_mask(name: str):
    """``(mask, dense)`` for one named mask; ``dense`` from the oracle's own builders."""
    if name == "full":
        return ha.Mask.full(37), torch.ones(37, 37, dtype=torch.bool)
    if name == "causal":
        return ha.Mask.causal(37), dense_from_rects([(0, 37)], [(0, 37)], "causal", 37, 37)
    if name == "causal_br":  # bottom-right causal, Sq < Sk: row i sees j <= i + 16
        return ha.Mask.causal(37, 53), dense_from_rects([(0, 37)], [(0, 53)], "causal", 37, 53)
    if name == "causal_tall":  # Sq > Sk: the first 16 rows see nothing
        return ha.Mask.causal(53, 37), dense_from_rects([(0, 53)], [(0, 37)], "causal", 53, 37)
    if name == "docs_gap":  # packed causal documents with a gap of rows that see nothing
        m = ha.Mask.from_ranges(_GAP_Q, _GAP_Q, "causal", 37)
        return m, dense_from_rects(_GAP_Q, _GAP_Q, "causal", 37, 37)
    if name == "varlen_empty":  # a document with 8 queries and no keys; Sq != Sk
        cu_q, cu_k = [0, 12, 20, 37], [0, 12, 12, 53]
        m = ha.Mask.varlen(cu_q, cu_k, causal=True)
        return m, dense_varlen(cu_q, cu_k, causal=True)
    if name == "window":
        return ha.Mask.sliding_window(53, (7, 2)), dense_window(53, 53, 7, 2)
    if name == "magi":  # overlapping rectangles of the four types, Sq != Sk
        m = ha.Mask.from_ranges(_MAGI_Q, _MAGI_K, _MAGI_T, 37, 53)
        return m, dense_from_rects(_MAGI_Q, _MAGI_K, _MAGI_T, 37, 53)
    raise KeyError(name)


MASKS = ("full", "causal", "causal_br", "causal_tall", "docs_gap", "varlen_empty", "window",
         "magi")  # fmt: skip


# -- variants: built fresh per case (their tensors are leaves that require grad) --------


def _smod(s, b, h, q_idx, kv_idx):
    """Uses every index: a per-head, per-position, per-batch bias (catches local vs global
    indices, a wrong head offset, a transposed q_idx / kv_idx)."""
    return s * (1 + 0.1 * b) + 0.3 * torch.sin(0.7 * h + 0.11 * q_idx - 0.05 * kv_idx)


def _smod_dist(s, b, h, q_idx, kv_idx):
    """A relative-position bias: asymmetric in q_idx - kv_idx."""
    return s - 0.02 * (h + 1) * (q_idx - kv_idx).abs() + 0.01 * (q_idx - kv_idx)


VARIANTS = ("softmax", "softcap", "alibi_h", "alibi_bh", "sink", "cap_alibi_sink", "sigmoid",
            "relu", "score_mod", "score_mod_cap", "score_mod_sigmoid")  # fmt: skip


def make_variant(name: str, b: int, hq: int, gen: torch.Generator):
    """``(variant, score_mod, params)``: ``params`` the tensors that require grad (float32
    leaves, by name: ``sink``, ``alibi_slopes``)."""

    def slopes(shape):
        return (0.05 + 0.4 * torch.rand(shape, generator=gen)).requires_grad_()

    def sink():
        return (torch.randn(hq, generator=gen) + 0.5).requires_grad_()

    if name == "softmax":
        return Softmax(), None, {}
    if name == "softcap":
        return Softmax(softcap=1.7), None, {}
    if name in ("alibi_h", "alibi_bh"):
        sl = slopes((hq,) if name == "alibi_h" else (b, hq))
        return Softmax(alibi_slopes=sl), None, {"alibi_slopes": sl}
    if name == "sink":
        sk = sink()
        return Softmax(sink=sk), None, {"sink": sk}
    if name == "cap_alibi_sink":
        sl, sk = slopes((b, hq)), sink()
        return (
            Softmax(softcap=2.5, alibi_slopes=sl, sink=sk),
            None,
            {"alibi_slopes": sl, "sink": sk},
        )
    if name == "sigmoid":
        return Sigmoid(bias=-1.3), None, {}
    if name == "relu":
        return ReLU(), None, {}
    if name == "score_mod":
        return Softmax(), _smod, {}
    if name == "score_mod_cap":
        return Softmax(softcap=1.5), _smod_dist, {}
    if name == "score_mod_sigmoid":
        return Sigmoid(bias=0.4), _smod, {}
    raise KeyError(name)


def _oracle_variant(variant, params, dtype):
    """The same variant with the parameters as fresh leaves of ``dtype`` (the oracle's
    gradients come from autograd into these)."""
    leaves = {n: t.detach().to(dtype).requires_grad_() for n, t in params.items()}
    if isinstance(variant, Softmax):
        return Softmax(variant.softcap, leaves.get("alibi_slopes"), leaves.get("sink")), leaves
    return variant, leaves


def _to_layout(x_bhsd, layout):
    if layout == "bshd":
        return x_bhsd.transpose(1, 2).contiguous()
    if layout == "thd":
        return x_bhsd[0].transpose(0, 1).contiguous()
    return x_bhsd.contiguous()


def _from_layout(x, layout):
    if layout == "bshd":
        return x.transpose(1, 2)
    if layout == "thd":
        return x.transpose(0, 1).unsqueeze(0)
    return x


def _oracle_run(q, k, v, g, dense, variant, score_mod, params, dtype):
    """Out, lse and the gradients (q, k, v, then params by name) of the oracle in ``dtype``."""
    var, leaves = _oracle_variant(variant, params, dtype)
    qkv = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = variant_attention_oracle(
        *qkv, dense, scale=None, variant=var, score_mod=score_mod, dtype=dtype
    )
    grads = torch.autograd.grad((out * g.to(dtype)).sum(), [*qkv, *leaves.values()])
    return out.detach(), lse, dict(zip(["dq", "dk", "dv", *leaves], grads, strict=True))


def _cases():
    """Every variant x mask x heads (GQA (4, 2), MQA (3, 1)); the layout rotates over
    bshd / bhsd / thd (thd with B = 1)."""
    out = []
    layouts = itertools.cycle(("bshd", "bhsd", "thd"))
    for vname, mname, heads in itertools.product(VARIANTS, MASKS, ((4, 2), (3, 1))):
        hname = "gqa" if heads[1] > 1 else "mqa"
        lay = next(layouts)
        out.append(pytest.param(vname, mname, heads, lay, "auto", id=f"{vname}-{mname}-{hname}"))
        # FlexAttention runs the softmax variants through its own score_mod (on CPU its
        # eager forward and a dense recompute backward; compiled on GPU).
        if hname == "gqa" and "sigmoid" not in vname and "relu" not in vname:
            out.append(pytest.param(vname, mname, heads, lay, "flex", id=f"{vname}-{mname}-flex"))
    return out


def _assert_lse(lse, ref64, ref32, name):
    """lse against the oracle: -inf exactly where the oracle's is, the bound elsewhere."""
    neg = torch.isneginf(ref64)
    assert torch.equal(torch.isneginf(lse), neg), f"{name}: -inf rows differ from the oracle's"
    fin = ~neg
    assert_close_to_oracle(lse[fin], ref64[fin], ref32[fin], factor=FACTOR, name=name)


@pytest.mark.parametrize(("vname", "mname", "heads", "layout", "backend"), _cases())
def test_variant_matches_float64_oracle(vname, mname, heads, layout, backend):
    hq, hk = heads
    b = 1 if layout == "thd" else 2
    mask, dense = make_mask(mname)
    sq, sk = mask.shape
    gen = torch.Generator().manual_seed(zlib.crc32(f"{vname}/{mname}/{heads}".encode()))
    q = torch.randn(b, hq, sq, D, generator=gen)
    k = torch.randn(b, hk, sk, D, generator=gen)
    v = torch.randn(b, hk, sk, D, generator=gen)
    g = torch.randn(b, hq, sq, D, generator=gen)
    variant, score_mod, params = make_variant(vname, b, hq, gen)
    normalised = isinstance(variant, Softmax)

    leaves = [_to_layout(t, layout).requires_grad_() for t in (q, k, v)]
    res = ha.attention(*leaves, mask, layout=layout, variant=variant, score_mod=score_mod,
                       return_lse=normalised, backend=backend)  # fmt: skip
    out, lse = res if normalised else (res, None)
    assert out.dtype == torch.float32 and out.shape == leaves[0].shape
    out4 = _from_layout(out, layout)
    got = torch.autograd.grad((out4 * g).sum(), [*leaves, *params.values()])
    got = dict(zip(["dq", "dk", "dv", *params], got, strict=True))
    for n in ("dq", "dk", "dv"):
        got[n] = _from_layout(got[n], layout)

    ref64, lse64, grads64 = _oracle_run(q, k, v, g, dense, variant, score_mod, params,
                                        torch.float64)  # fmt: skip
    ref32, lse32, grads32 = _oracle_run(q, k, v, g, dense, variant, score_mod, params,
                                        torch.float32)  # fmt: skip
    tag = f"{vname}/{mname}/Hq={hq},Hk={hk}/{layout}/{backend}"
    assert_close_to_oracle(out4, ref64, ref32, factor=FACTOR, name=f"{tag}: out")
    for n in grads64:
        assert got[n].shape == grads64[n].shape, f"{tag}: {n} shape"
        # sink / slopes gradients are sums over every row (and key), dK / dV over every row
        # of the KV head's query heads: their rounding depends on the order of summation
        # (a blockwise kernel's differs from the dense oracle's, and with the CPU's vector
        # width), so they get a few more ulps of slack than dQ.
        ulps = {"dq": None, "dk": KV_ULPS, "dv": KV_ULPS}.get(n, PARAM_ULPS)
        atol = None if ulps is None else ulps * EPS32 * grads64[n].abs().max()
        assert_close_to_oracle(got[n], grads64[n], grads32[n], factor=FACTOR, atol=atol,
                               name=f"{tag}: {n}")  # fmt: skip
    if normalised:
        lse_b = lse.unsqueeze(0) if layout == "thd" else lse
        _assert_lse(lse_b, lse64, lse32, f"{tag}: lse")
    # Rows that see nothing: out exactly 0 and no gradient into their queries.
    empty = ~dense.any(dim=1)
    if empty.any():
        assert out4[:, :, empty].abs().max().item() == 0.0, tag
        assert got["dq"][:, :, empty].abs().max().item() == 0.0, tag
    # A sanity check on the test itself: the oracle's gradients are not trivially zero.
    assert all(t.abs().max().item() > 0 for t in grads64.values()), tag


# -- rows that see nothing, lse with a sink ---------------------------------------------


@pytest.mark.parametrize("mname", ["docs_gap", "causal_tall", "varlen_empty"])
def test_empty_rows_with_sink(mname):
    """A row that sees no key: out 0, lse = sink (the sink alone in the denominator), zero
    gradients into its query and finite everywhere (a NaN from 0/0 or log(0) would show);
    the sink's gradient from those rows is 0 (their out is 0)."""
    mask, dense = make_mask(mname)
    sq, sk = mask.shape
    gen = torch.Generator().manual_seed(11)
    q, g = (torch.randn(1, sq, 2, D, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, sk, 2, D, generator=gen) for _ in range(2))
    sink = torch.randn(2, generator=gen).requires_grad_()
    q.requires_grad_()
    out, lse = ha.attention(q, k, v, mask, variant=Softmax(sink=sink), return_lse=True)
    (out * g).sum().backward()
    empty = ~dense.any(dim=1)
    assert empty.sum() > 0
    assert out[:, empty].abs().max().item() == 0.0
    assert torch.equal(lse[0][:, empty], sink.detach().view(2, 1).expand(2, int(empty.sum())))
    assert q.grad[:, empty].abs().max().item() == 0.0
    assert torch.isfinite(q.grad).all() and torch.isfinite(sink.grad).all()
    # The sink's gradient from the visible rows only: drop the empty rows from the loss.
    sink2 = sink.detach().clone().requires_grad_()
    out2 = ha.attention(q.detach(), k, v, mask, variant=Softmax(sink=sink2))
    (out2[:, ~empty] * g[:, ~empty]).sum().backward()
    assert max_err(sink.grad, sink2.grad) <= 1e-6


@pytest.mark.parametrize("mname", ["causal", "magi"])
def test_lse_with_sink_is_logaddexp(mname):
    """return_lse with a sink = logaddexp(lse without it, sink) (float64: exact up to
    rounding), and out with it = out without it times sigmoid(lse - sink)."""
    mask, _ = make_mask(mname)
    sq, sk = mask.shape
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, sq, 4, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, sk, 2, D, generator=gen, dtype=torch.float64) for _ in range(2))
    sink = 2.0 * torch.randn(4, generator=gen, dtype=torch.float64)
    out0, lse0 = ha.attention(q, k, v, mask, return_lse=True)
    out1, lse1 = ha.attention(q, k, v, mask, variant=Softmax(sink=sink), return_lse=True)
    want = torch.logaddexp(lse0, sink.view(1, 4, 1).expand_as(lse0))
    assert max_err(lse1, want) <= 1e-12
    w = torch.sigmoid(lse0 - sink.view(1, 4, 1)).transpose(1, 2).unsqueeze(-1)
    assert max_err(out1, out0 * w) <= 1e-12
    assert max_err(out1, out0) > 1e-3  # the sink changed something


# -- bad input ---------------------------------------------------------------------------


def _qkv(b=2, s=5, hq=4, hk=2):
    gen = torch.Generator().manual_seed(3)
    return (torch.randn(b, s, h, D, generator=gen) for h in (hq, hk, hk))


_BAD = [
    ("sink_shape", lambda: Softmax(sink=torch.randn(5)), None, "sink"),
    ("sink_shape_bh", lambda: Softmax(sink=torch.randn(2, 4)), None, "sink"),
    ("sink_int", lambda: Softmax(sink=torch.ones(4, dtype=torch.int64)), None, "sink"),
    ("sink_meta", lambda: Softmax(sink=torch.randn(4, device="meta")), None, "sink"),
    ("sink_list", lambda: Softmax(sink=[0.0] * 4), None, "sink"),
    ("slopes_shape", lambda: Softmax(alibi_slopes=torch.rand(3)), None, "alibi_slopes"),
    ("slopes_shape_bh", lambda: Softmax(alibi_slopes=torch.rand(3, 4)), None, "alibi_slopes"),
    (
        "slopes_int",
        lambda: Softmax(alibi_slopes=torch.ones(4, dtype=torch.int32)),
        None,
        "alibi_slopes",
    ),  # fmt: skip
    (
        "slopes_meta",
        lambda: Softmax(alibi_slopes=torch.rand(4, device="meta")),
        None,
        "alibi_slopes",
    ),  # fmt: skip
    ("softcap_zero", lambda: Softmax(softcap=0.0), None, "softcap"),
    ("softcap_neg", lambda: Softmax(softcap=-1.0), None, "softcap"),
    ("softcap_inf", lambda: Softmax(softcap=math.inf), None, "softcap"),
    ("softcap_nan", lambda: Softmax(softcap=math.nan), None, "softcap"),
    ("softcap_bool", lambda: Softmax(softcap=True), None, "softcap"),
    ("softcap_str", lambda: Softmax(softcap="2"), None, "softcap"),
    ("bias_inf", lambda: Sigmoid(bias=math.inf), None, "bias"),
    ("unknown_str", lambda: "tanh", None, "variant"),
    ("unknown_obj", lambda: object(), None, "variant"),
    ("unknown_cls", lambda: Softmax, None, "variant"),  # the class, not an instance
    ("score_mod_raises", lambda: None, lambda s, b, h, i, j: s[:, :, 99], "score_mod"),
    ("score_mod_float", lambda: None, lambda s, b, h, i, j: 1.0, "score_mod"),
    ("score_mod_not_callable", lambda: None, 3, "score_mod"),
]


@pytest.mark.parametrize(("what", "variant", "score_mod", "name"), _BAD, ids=[c[0] for c in _BAD])
def test_bad_variant_raises_value_error_naming_the_argument(what, variant, score_mod, name):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        ha.attention(q, k, v, variant=variant(), score_mod=score_mod)


@pytest.mark.parametrize(
    "score_mod",
    [lambda s, b, h, i, j: s.sum(-1), lambda s, b, h, i, j: s[..., None]],
    ids=["drops_a_dim", "adds_a_dim"],
)
def test_score_mod_of_wrong_shape_raises_value_error(score_mod):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"^score_mod\b"):
        ha.attention(q, k, v, score_mod=score_mod)


@pytest.mark.parametrize("variant", [Sigmoid(), ReLU(), "relu"], ids=["sigmoid", "relu", "str"])
def test_return_lse_refused_for_unnormalised(variant):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"^return_lse\b"):
        ha.attention(q, k, v, variant=variant, return_lse=True)


@pytest.mark.parametrize(
    ("variant", "score_mod"),
    [(Softmax(softcap=2.0), None), (Sigmoid(), None), (None, _smod),
     (Softmax(alibi_slopes=torch.rand(4)), None)],
    ids=["softcap", "sigmoid", "score_mod", "alibi"],
)  # fmt: skip
def test_sdpa_backend_refuses_a_variant(variant, score_mod):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"^backend\b"):
        ha.attention(q, k, v, backend="sdpa", variant=variant, score_mod=score_mod)


def test_sdpa_backend_runs_a_sink_alone():
    """A sink alone never reaches a kernel (applied to the finished rows), so sdpa runs it
    and agrees with the reference backend."""
    q, k, v = (t.double() for t in _qkv())
    var = Softmax(sink=torch.randn(4, dtype=torch.float64))
    a = ha.attention(q, k, v, causal=True, backend="sdpa", variant=var)
    b = ha.attention(q, k, v, causal=True, backend="reference", variant=var)
    assert max_err(a, b) <= 1e-12


@pytest.mark.parametrize(("s", "hq", "index"), [(5, 1, "h"), (2, 4, "q_idx")])
def test_score_mod_indexing_tables_of_the_calls_size_runs(s, hq, index):
    """FlexAttention's ALiBi example indexes per-head slopes with h; document masks index
    per-token ids with q_idx. Such a score_mod is valid for the call it is given to."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, s, hq, D, generator=gen, dtype=torch.float64) for _ in range(3))
    table = torch.randn(hq if index == "h" else s, generator=gen, dtype=torch.float64)

    def smod(sc, b, h, q_idx, kv_idx):
        return sc + table[h if index == "h" else q_idx]

    out = ha.attention(q, k, v, score_mod=smod)
    ref, _ = variant_attention_oracle(
        *(t.transpose(1, 2) for t in (q, k, v)),
        torch.ones(s, s, dtype=torch.bool),
        scale=None,
        variant=None,
        score_mod=smod,
    )
    assert max_err(out, ref.transpose(1, 2)) <= 1e-12


def test_score_mod_probe_runs_on_the_calls_device():
    """The probe builds its scores and indices on the call's device: a score_mod reading a
    table it captured there (on GPU: a CUDA tensor) must not be refused because the probe
    ran on CPU. The meta device stands in for CUDA on a CPU-only machine."""
    from hamilton_attn.variants import resolve_variant

    table = torch.linspace(0.0, 1.0, 16, device="meta")

    def smod(s, b, h, q_idx, kv_idx):
        if s.device != table.device:
            raise RuntimeError(f"scores on {s.device}, table on {table.device}")
        return s + table[(q_idx - kv_idx).abs()]

    got = resolve_variant(None, smod, batch=1, heads=2, device=torch.device("meta"))
    assert got is not None
    with pytest.raises(ValueError, match="score_mod: failed on a small probe"):
        resolve_variant(None, smod, batch=1, heads=2, device=torch.device("cpu"))


def test_flex_slopes_gradient_where_a_score_mod_hides_a_whole_row():
    """A row whose every visible score a score_mod sets to -inf sees nothing: the flex
    backend's recompute gave NaN slopes gradients there (logsumexp's backward, 0 x NaN);
    they must match the reference backend's (0 from that row)."""
    import hamilton_attn as ha

    def hide_key_1(s, b, h, q_idx, kv_idx):
        return torch.where(kv_idx == 1, torch.full_like(s, float("-inf")), s)

    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 6, 2, 8, generator=g, dtype=torch.float64) for _ in range(4))
    mask = ha.Mask.sliding_window(6, (0, 0))  # row 1 sees key 1 only: all its scores -inf
    got = {}
    for backend in ("reference", "flex"):
        sl = torch.tensor([0.1, 0.3], dtype=torch.float64, requires_grad=True)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = ha.attention(*leaves, mask, backend=backend, score_mod=hide_key_1,
                           variant=ha.Softmax(alibi_slopes=sl))  # fmt: skip
        grads = torch.autograd.grad((out * do).sum(), [*leaves, sl])
        got[backend] = [out, *grads]
    for a, b in zip(got["flex"], got["reference"], strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
