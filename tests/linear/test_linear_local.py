"""Linear attention on one device against the float64 token-by-token recurrence.

Forward and backward (gradients of q, k, v, g in both shapes and the initial state,
with a loss on the output and the final states), each kind (no gate, retention's
constant ``g [H]``, simple GLA's ``g [B, S, H]``, Mamba2's SSD through its helper, whose
recurrence is written here from Mamba2's definition), odd lengths and lengths around
the chunk size (64), packed documents with one-token documents, batch 2. float32 is held
to flash-attention's bound against the float32 recurrence. Bad input raises ValueError
naming the argument. Also the exchange's cost model.

Legend: B batch, S tokens, H heads, K key dim, V value dim; bshd.
"""

from __future__ import annotations

import pytest
import torch

import hamilton_attn as ha
from hamilton_attn.linear import exchange_cost, retnet_decay
from hamilton_attn.linear.chunked import CHUNK
from hamilton_attn.testing.linear_oracle import linear_recurrence_oracle
from hamilton_attn.testing.oracle import max_err

H, K, V = 3, 6, 5
F64_TOL = 1e-11


def _draw(b, s, kind, n_seq, seed, init=True):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, v = rnd(b, s, H, K), rnd(b, s, H, K), rnd(b, s, H, V)
    g = {
        "none": None,
        "retention": torch.log(retnet_decay(H)).double() * 8,  # faster decays than RetNet's
        "gla": -torch.rand(b, s, H, generator=gen, dtype=torch.float64) * 2,
        "strong": -torch.rand(b, s, H, generator=gen, dtype=torch.float64) * 40,
    }[kind]
    return q, k, v, g, (rnd(n_seq, H, K, V) if init else None)


def _run(fn, tensors, dtype):
    """Output, final state and gradients of ``fn`` on leaves cast to ``dtype``."""
    leaves = [None if t is None else t.to(dtype).requires_grad_() for t in tensors]
    o, fin = fn(*leaves)
    wo = torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view_as(o).cos().to(o.dtype)
    wf = torch.linspace(-1, 1, fin.numel(), dtype=torch.float64).view_as(fin).to(fin.dtype)
    used = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad((o * wo).sum() + (fin * wf).sum(), used))
    return [o.detach(), fin.detach()] + [None if t is None else next(grads) for t in leaves]


def _ours(cu):
    def fn(q, k, v, g, h0):
        return ha.linear_attention(q, k, v, g, cu_seqlens=cu, initial_state=h0,
                                   return_final_state=True, backend="torch")  # fmt: skip

    return fn


def _oracle(cu):
    def fn(q, k, v, g, h0):
        return linear_recurrence_oracle(q, k, v, g, cu_seqlens=cu, initial_state=h0,
                                        dtype=q.dtype)  # fmt: skip

    return fn


def _assert_all_close(got, want, tol, tag):
    names = ("o", "final", "dq", "dk", "dv", "dg", "dh0")
    for n, a, b in zip(names, got, want, strict=True):
        if b is None:
            assert a is None, f"{tag}: {n}"
            continue
        assert a.shape == b.shape, f"{tag}: {n} shape {a.shape} != {b.shape}"
        e = max_err(a, b)
        assert e <= tol * max(1.0, b.abs().max().item()), f"{tag}: {n} error {e:.3e}"


LENGTHS = (1, 53, CHUNK - 1, CHUNK, CHUNK + 1, 97, 2 * CHUNK)


@pytest.mark.parametrize("kind", ["none", "retention", "gla", "strong"])
@pytest.mark.parametrize("s", LENGTHS)
def test_batch_matches_the_recurrence_float64(kind, s):
    tensors = _draw(2, s, kind, 2, seed=s)
    _assert_all_close(_run(_ours(None), tensors, torch.float64),
                      _run(_oracle(None), tensors, torch.float64), F64_TOL, (kind, s))  # fmt: skip


DOC_LAYOUTS = [
    [0, 53],
    [0, 1, 2, 3, 53],  # one-token documents first
    [0, 20, 21, 64, 65, 97],  # documents ending at and just past a chunk edge
    [0, 63, 64, 128, 129, 130],
    [0, 130, 131, 200],  # 3, 1 and 2 chunks: sequences end at different scan steps
]


@pytest.mark.parametrize("shape", ["token", "head"])
def test_huge_log_decays_do_not_swamp_small_ones(shape):
    """A log decay of -1e30 (a hard reset) next to -1e-3 ones: the running sum must not
    lose the small ones after it (before the floor, G = -1e30 + ... rounded them away:
    decays of 1 instead of exp(-n 1e-3), errors of ~1e-2)."""
    q, k, v, g, h0 = _draw(1, 2 * CHUNK + 5, "gla", 1, seed=9)
    if shape == "token":
        g = torch.full_like(g, -1e-3)
        g[0, [3, 70, 71], :] = -1e30
    else:  # one head resets every step
        g = torch.tensor([-1e-3, -1e30, -0.5], dtype=torch.float64)
    tensors = (q, k, v, g, h0)
    _assert_all_close(_run(_ours(None), tensors, torch.float64),
                      _run(_oracle(None), tensors, torch.float64), F64_TOL, shape)  # fmt: skip


@pytest.mark.parametrize("cu", DOC_LAYOUTS)
@pytest.mark.parametrize("kind", ["retention", "gla"])
@pytest.mark.parametrize("init", [True, False])
def test_packed_documents_match_the_recurrence_float64(cu, kind, init):
    tensors = _draw(1, cu[-1], kind, len(cu) - 1, seed=len(cu), init=init)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    _assert_all_close(_run(_ours(cu_t), tensors, torch.float64),
                      _run(_oracle(cu), tensors, torch.float64), F64_TOL, (cu, kind))  # fmt: skip


@pytest.mark.parametrize("kind", ["gla", "retention"])
def test_float32_within_flash_attention_bound(kind):
    """err(ours, f64) <= 2 err(f32 recurrence, f64) + a few ulps, every output."""
    cu = [0, 5, 70, 71, 200]
    tensors = _draw(1, cu[-1], kind, len(cu) - 1, seed=11)
    want = _run(_oracle(cu), tensors, torch.float64)
    base = _run(_oracle(cu), tensors, torch.float32)
    got = _run(_ours(cu), tensors, torch.float32)
    eps = torch.finfo(torch.float32).eps
    for n, a, b, w in zip(("o", "final", "dq", "dk", "dv", "dg", "dh0"), got, base, want,
                          strict=True):  # fmt: skip
        assert a.dtype == w.to(a.dtype).dtype
        bound = 2 * max_err(b, w) + 4 * eps * max(1.0, w.abs().max().item())
        assert max_err(a, w) <= bound, (n, max_err(a, w), max_err(b, w))


def _mamba2_ssd(x, dt, a, b, c, d, h0):
    """Mamba2's recurrence as its paper writes it, per head h (group h // (H / G)):
    ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T`` (state [P, N]), ``y_t = h_t C_t + D x_t``."""
    rep = x.shape[2] // b.shape[2]
    b, c = b.repeat_interleave(rep, 2), c.repeat_interleave(rep, 2)
    state, ys = h0, []
    for t in range(x.shape[1]):
        da = torch.exp(dt[:, t] * a)[..., None, None]
        upd = (dt[:, t, :, None] * x[:, t])[..., :, None] * b[:, t, :, None, :]
        state = da * state + upd
        ys.append(torch.einsum("bhpn,bhn->bhp", state, c[:, t]) + d[:, None] * x[:, t])
    return torch.stack(ys, 1), state


def test_ssd_helper_is_mamba2_with_groups():
    gen = torch.Generator().manual_seed(5)
    bsz, s, h, p, n, groups = 2, 70, 4, 3, 5, 2

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x, b, c = rnd(bsz, s, h, p), rnd(bsz, s, groups, n), rnd(bsz, s, groups, n)
    dt = torch.nn.functional.softplus(rnd(bsz, s, h))
    a, d, h0 = -torch.rand(h, generator=gen, dtype=torch.float64), rnd(h), rnd(bsz, h, p, n)
    leaves = [t.clone().requires_grad_() for t in (x, dt, a, b, c, d, h0)]
    y, fin = ha.ssd(*leaves[:5], D=leaves[5], initial_state=leaves[6], return_final_state=True)
    ref_leaves = [t.clone().requires_grad_() for t in (x, dt, a, b, c, d, h0)]
    y_ref, fin_ref = _mamba2_ssd(*ref_leaves)
    assert max_err(y, y_ref) < 1e-11 and max_err(fin, fin_ref) < 1e-11
    got = torch.autograd.grad(y.sum() + fin.sum(), leaves)
    want = torch.autograd.grad(y_ref.sum() + fin_ref.sum(), ref_leaves)
    for name, a_, b_ in zip("x dt A B C D h0".split(), got, want, strict=True):
        assert max_err(a_, b_) < 1e-10, name


def test_retention_helper_uses_retnet_decays():
    q, k, v, _, _ = _draw(1, 40, "none", 1, seed=2, init=False)
    o = ha.retention(q, k, v)
    g = torch.log(1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64)))
    want, _ = linear_recurrence_oracle(q, k, v, g.float().double())
    assert max_err(o, want) < 1e-6  # the default decays are float32, like RetNet's
    dec = torch.full((H,), 0.9, dtype=torch.float64, requires_grad=True)
    ha.retention(q, k, v, dec).sum().backward()
    assert dec.grad is not None and torch.isfinite(dec.grad).all()


def test_simple_gla_is_the_primitive_with_a_token_gate():
    q, k, v, g, _ = _draw(1, 30, "gla", 1, seed=4, init=False)
    assert torch.equal(ha.simple_gla(q, k, v, g), ha.linear_attention(q, k, v, g))
    with pytest.raises(ValueError, match="g: simple_gla"):
        ha.simple_gla(q, k, v, g[0, 0])


# -- bad input ---------------------------------------------------------------------------


def _bad_kwargs():
    q, k, v, g, h0 = _draw(1, 20, "gla", 1, seed=9)
    ok = dict(q=q, k=k, v=v, g=g)
    return {
        "g: log decay must be": dict(ok, g=g.abs()),
        "g: log decay must be finite": dict(ok, g=torch.full_like(g, -float("inf"))),
        "g: expected shape": dict(ok, g=g[..., :2]),
        "q, k, v: shapes disagree": dict(ok, k=k[:, :, :2]),
        "q, k, v: expected one dtype": dict(ok, v=v.float()),
        "q, k, v: expected 4-d": dict(ok, q=q[0]),
        "cu_seqlens: expected strictly increasing": dict(ok, cu_seqlens=[0, 5, 5, 20]),
        "cu_seqlens: expected [0, ..., S": dict(ok, cu_seqlens=[0, 5, 19]),
        "cu_seqlens: expected [0, ...": dict(ok, cu_seqlens=[1, 5, 20]),
        "cu_seqlens: packed sequences need batch 1": dict(
            ok,
            q=q.expand(2, -1, -1, -1),
            k=k.expand(2, -1, -1, -1),
            v=v.expand(2, -1, -1, -1),
            g=None,
            cu_seqlens=[0, 20],
        ),  # fmt: skip
        "cu_seqlens: expected a 1-d integer": dict(ok, cu_seqlens=torch.tensor([0.0, 20.0])),
        "initial_state: expected [N, H, K, V]": dict(ok, initial_state=h0[:, :, :2]),
        "initial_state: expected [N": dict(ok, cu_seqlens=[0, 4, 20], initial_state=h0),
        "scale: expected a finite": dict(ok, scale=float("nan")),
        "backend: expected one of": dict(ok, backend="triton"),
        "return_final_state: expected a bool": dict(ok, return_final_state="yes"),
    }


@pytest.mark.parametrize("text", list(_bad_kwargs()))
def test_bad_input_raises_value_error_naming_the_argument(text):
    kw = _bad_kwargs()[text]
    with pytest.raises(ValueError, match=r"^" + __import__("re").escape(text)):
        ha.linear_attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("g"), **kw)


def test_fla_backend_refused_where_absent():
    q, k, v, g, _ = _draw(1, 8, "gla", 1, seed=1)
    with pytest.raises(ValueError, match="backend: 'fla'"):
        ha.linear_attention(q, k, v, g, backend="fla")


# -- the exchange's cost model ------------------------------------------------------------


def test_cost_model_prefers_allgather_on_a_switch_and_ring_on_a_line():
    state = 32 * 128 * 128 * 4  # B 1, H 32, K = V = 128, float32
    on_switch = exchange_cost(8, state, "nvswitch:8")
    assert on_switch.best == "allgather" and on_switch.allgather_s < on_switch.ring_s
    assert exchange_cost(8, state, "line:8").best == "ring"
    assert exchange_cost(64, state, "nodes:8x8").best == "ring"
    assert exchange_cost(1, state, "nvswitch:1").allgather_s == 0.0
    with pytest.raises(ValueError, match="topology"):
        exchange_cost(4, state, "nvswitch:8")


@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("n0", [0, 7, 40])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_incoming_state_share_matches_float64(dtype, n0, b):
    """A rank's incoming-state share (``api.incoming_share``: bfloat16 on the tensor
    cores, float16 / float32 in float32) against the same formula in float64: output
    rows t < n0 gain ``scale exp(G_t) q_t S_in``, the others are unchanged, and the
    carried state is ``exp(G_{n0-1}) S_in``; forward and the gradients of o, q, the gate
    and S_in, within a few roundings of the dtype."""
    from hamilton_attn.linear.api import incoming_share

    gen = torch.Generator().manual_seed(n0)
    s, h = 40, 3
    q = torch.randn(b, s, h, K, generator=gen, dtype=torch.float64)
    o = torch.randn(b, s, h, V, generator=gen, dtype=torch.float64)
    g = -torch.rand(b, s, h, generator=gen, dtype=torch.float64) * 0.3
    s_in = torch.randn(b, h, K, V, generator=gen, dtype=torch.float64) * 4
    cdt = torch.float32
    leaves = [o.to(dtype), q.to(dtype), g.to(cdt), s_in.to(cdt)]
    leaves = [t.requires_grad_() for t in leaves]
    got, carried = incoming_share(*leaves, 0.4, n0)
    exact = [t.detach().double().requires_grad_() for t in leaves]
    eo, eq, eg, es = exact
    G = eg[:, :n0].cumsum(1)
    add = 0.4 * torch.einsum("bshk,bhkv->bshv", eq[:, :n0] * G.exp()[..., None], es)
    want = torch.cat([eo[:, :n0] + add, eo[:, n0:]], dim=1)
    assert got.dtype == dtype and got.shape == o.shape
    eps = torch.finfo(dtype).eps
    assert max_err(got, want) <= 8 * eps * want.abs().max().item()
    assert torch.equal(got[:, n0:], leaves[0][:, n0:])
    if n0:
        assert max_err(carried, G[:, -1].exp()[..., None, None] * es) <= 1e-5
    else:
        assert carried is None
    wt = torch.linspace(-1, 1, want.numel(), dtype=torch.float64).view_as(want).cos()
    if n0 == 0:  # nothing depends on q, g or S_in
        return
    dg = torch.autograd.grad((got.double() * wt).sum(), leaves)
    dw = torch.autograd.grad((want * wt).sum(), exact)
    for name, a, e in zip(("do", "dq", "dg", "ds_in"), dg, dw, strict=True):
        assert max_err(a, e) <= 16 * eps * max(1.0, e.abs().max().item()), name
