"""``hamilton_attn.compat.magi.v1_1`` (MagiAttention 1.1's forms) against float64 oracles.

Distributed tests run 1.1's ``magi_attn_*_dispatch -> calc_attn -> undispatch`` on the
shared gloo pool (process groups; meshes are tested with the seed's forms in
test_magi_compat), compare every rank's undispatched output, lse and input gradients
with the one-process oracle, and check that the seed's form of the same call gives the
same numbers. ``roll``, ``softcap`` and ``sink`` are checked against ``torch.roll`` and
the textbook formula. Workers (``_w_*``) return plain numbers; assertions live in tests.

Legend: T tokens, Hq/Hk heads, D head dim, W world size; tensors are token-major
``(T, H, D)``.
"""

from __future__ import annotations

import math
import warnings
import zlib

import pytest
import torch

from hamilton_attn.compat import magi
from hamilton_attn.compat.magi import v1_1
from hamilton_attn.testing.oracle import dense_from_rects, dense_varlen

TOL = 1e-9


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _oracle(q, k, v, dense, scale, softcap=None, sink=None):
    """Float64 ``(out (T, Hq, D), lse (T, Hq))``; softcap ``c tanh(s / c)``, ``sink``
    ``(S_sink, Hq)`` logits in every row's denominator (no value)."""
    hq, hk = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~dense, float("-inf"))
    if sink is not None:
        sinks = sink.double().t()[:, None, :].expand(hq, s.shape[1], sink.shape[0])
        full = torch.cat([s, sinks], dim=-1)
        lse = torch.logsumexp(full, -1)
        p = torch.exp(s - lse[..., None])
    else:
        lse = torch.logsumexp(s, -1)
        p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", p, v), lse.t()


def _inputs(g, t, hq, hk, d):
    return [torch.randn(t, h, d, generator=g, dtype=torch.float64) for h in (hq, hk, hk, hq)]


def _w_varlen(ctx, cu, causal, window, hq, hk, chunk):
    g = torch.Generator().manual_seed(_seed("v11", cu, causal, window, ctx.world_size))
    t, d = cu[-1], 8
    q, k, v, dout = _inputs(g, t, hq, hk, d)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    config = v1_1.DistAttnConfig(dispatch_config=v1_1.DispatchConfig(chunk_size=chunk))
    lq, key = v1_1.magi_attn_varlen_dispatch(q, cu_t, cu_t, hq, hk, d, 0, ctx.group,
                                             causal=causal, window_size=window,
                                             dist_attn_config=config)  # fmt: skip
    lk, lv = v1_1.dispatch(k, key), v1_1.dispatch(v, key)
    lq, lk, lv = (x.detach().requires_grad_() for x in (lq, lk, lv))
    out, meta = v1_1.calc_attn(lq, lk, lv, key)
    (out * v1_1.dispatch(dout, key)).sum().backward()
    gathered = [v1_1.undispatch(x, key) for x in (out, meta.lse, lq.grad, lk.grad, lv.grad)]
    # the seed's form on the same inputs gives the same numbers
    _, seed_key = magi.magi_attn_varlen_key(None, cu_t, cu_t, head_dim=d, chunk_size=chunk,
                                            cp_group=ctx.group, causal=causal,
                                            window_size=window)  # fmt: skip
    seed_out, _ = magi.calc_attn(magi.dispatch(q, seed_key), magi.dispatch(k, seed_key),
                                 magi.dispatch(v, seed_key), seed_key)  # fmt: skip
    seed_err = (magi.undispatch(seed_out, seed_key) - gathered[0]).abs().max().item()
    gq = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = _oracle(*gq, dense_varlen(cu, causal=causal, window=window), d**-0.5)
    (ref_out * dout).sum().backward()
    want = [ref_out, ref_lse, *(x.grad for x in gq)]
    errs = [(a - b).abs().max().item() for a, b in zip(gathered, want)]
    return (
        errs,
        seed_err,
        meta.max_logits is None,
        meta.lse.dtype == torch.float32,
        key.plan.placement.chunk_size,
    )


@pytest.mark.parametrize("w", [2, 4])
def test_varlen_dispatch_calc_undispatch(pool, w):
    """1.1 varlen form: out, lse, dq, dk, dv against the oracle and equal to the seed's
    form; causal documents with GQA, and a sliding window; chunk_size from DispatchConfig."""
    for cu, causal, window in (([0, 7, 20, 24], True, (-1, -1)), ([0, 16, 30], False, (3, 2))):
        for errs, seed_err, no_max, f32, chunk in pool.run(
            _w_varlen, w, cu, causal, window, 4, 2, 2
        ):
            assert max(errs) < TOL, errs
            assert seed_err < TOL and no_max and chunk == 2
            assert not f32  # float64 inputs give a float64 lse, as the core documents


def _w_flex(ctx, softcap, n_sink):
    g = torch.Generator().manual_seed(_seed("flex", softcap, n_sink, ctx.world_size))
    t, d, hq, hk = 24, 8, 4, 4
    q, k, v, dout = _inputs(g, t, hq, hk, d)
    q = q * 3  # scores large enough for the cap to matter
    sink = torch.randn(n_sink, hq, generator=g, dtype=torch.float32) if n_sink else None
    qr, kr = [[0, 10], [10, 24], [10, 24]], [[0, 10], [0, 10], [10, 24]]
    types = [v1_1.AttnMaskType.from_int_type(i) for i in (1, 0, 1)]
    key = v1_1.magi_attn_flex_key(magi.AttnRanges.from_ranges(qr), magi.AttnRanges.from_ranges(kr),
                                  types, t, t, hq, hk, d, 0, ctx.group)  # fmt: skip
    lq, lk, lv = (v1_1.dispatch(x, key).requires_grad_() for x in (q, k, v))
    out, meta = v1_1.calc_attn(lq, lk, lv, key, sink=sink, softcap=softcap)
    (out * v1_1.dispatch(dout, key)).sum().backward()
    gathered = [v1_1.undispatch(x, key) for x in (out, meta.lse, lq.grad, lk.grad, lv.grad)]
    gq = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    dense = dense_from_rects(qr, kr, ["causal", "full", "causal"], t, t)
    ref_out, ref_lse = _oracle(*gq, dense, d**-0.5, softcap=softcap, sink=sink)
    (ref_out * dout).sum().backward()
    want = [ref_out, ref_lse, *(x.grad for x in gq)]
    return [(a - b).abs().max().item() for a, b in zip(gathered, want)]


@pytest.mark.parametrize("softcap,n_sink", [(0.0, 0), (5.0, 0), (0.0, 3), (4.0, 1)])
def test_flex_softcap_sink(pool, softcap, n_sink):
    """1.1 flex form with int mask types, ``softcap`` and ``sink`` (several sink tokens)."""
    for errs in pool.run(_w_flex, 2, softcap, n_sink):
        assert max(errs) < TOL, errs


def _w_roll(ctx, shift):
    t, d = 20, 4
    x = torch.arange(t * d, dtype=torch.float64).view(t, d).requires_grad_()
    cu = torch.tensor([0, 12, 20])
    lx, key = v1_1.magi_attn_varlen_dispatch(x, cu, cu, 2, 2, d, 0, ctx.group, causal=True)
    rolled = v1_1.roll(lx, shift, 0, key)
    other = v1_1.roll(lx, 1, 1, key)
    ok_other = torch.equal(other, torch.roll(lx, 1, 1))
    global_rolled = v1_1.undispatch(rolled, key)
    (
        rolled * v1_1.dispatch(torch.arange(t, dtype=torch.float64)[:, None].expand(t, d), key)
    ).sum().backward()
    # d/dx of sum(roll(x) * w) is roll(w, -shift)
    want_grad = torch.roll(torch.arange(t, dtype=torch.float64), -shift)[:, None].expand(t, d)
    same_simple = torch.equal(v1_1.roll_simple(lx, shift, 0, key), rolled)
    return (
        torch.equal(global_rolled, torch.roll(x, shift, 0)),
        ok_other,
        torch.equal(x.grad, want_grad),
        same_simple,
    )


@pytest.mark.parametrize("shift", [1, -3, 7])
def test_roll_is_global_torch_roll(pool, shift):
    for flags in pool.run(_w_roll, 4, shift):
        assert all(flags), flags


def test_mask_type_ints_and_configs():
    t = v1_1.AttnMaskType
    assert [t.to_int_type(t.from_int_type(i)) for i in range(4)] == [0, 1, 2, 3]
    assert t.from_int_type(1) is magi.AttnMaskType.CAUSAL and t.BICAUSAL is t.BI_CAUSAL
    assert t.to_int_type(t.INVCAUSAL) == 2 and t("full") is t.FULL
    assert isinstance(magi.AttnMaskType.FULL, t)
    with pytest.raises(ValueError, match="int_type"):
        t.from_int_type(4)
    with pytest.raises(ValueError, match="chunk_size"):
        v1_1.DispatchConfig(chunk_size=0)
    assert v1_1.DispatchConfig(chunk_size=8).chunk_size == 8
    assert magi.AttnForwardMeta is v1_1.AttnForwardMeta and magi.roll is v1_1.roll


def _w_errors(ctx):
    cu = torch.tensor([0, 8])
    msgs = []
    for call in (
        lambda: v1_1.magi_attn_varlen_key(cu, cu, 4, 3, 8, 0, ctx.group),
        lambda: v1_1.magi_attn_varlen_key(cu, cu, 0, 1, 8, 0, ctx.group),
    ):
        try:
            call()
        except ValueError as err:
            msgs.append(str(err))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        key = v1_1.magi_attn_varlen_key(cu, cu, 2, 1, 8, 4, ctx.group, causal=True)
    warned = any(issubclass(w.category, DeprecationWarning) for w in caught)
    x = torch.zeros(key.plan.local_len, 2, 8, dtype=torch.float64)
    kv = torch.zeros(key.plan.local_len, 1, 8, dtype=torch.float64)
    for call in (
        lambda: v1_1.calc_attn(x, x, x, key),  # 2 KV heads, key made for 1
        lambda: v1_1.calc_attn(x, kv, kv, key, return_max_logits=True),
        lambda: v1_1.undispatch(x, key, is_partial_grad=True),
        lambda: v1_1.calc_attn(x, kv, kv, key, sink=torch.zeros(3)),
    ):
        try:
            call()
        except ValueError as err:
            msgs.append(str(err))
    recent = v1_1.get_most_recent_key(ctx.group) is key
    v1_1.clear_cache()
    try:
        v1_1.get_most_recent_key(ctx.group)
        cleared = False
    except ValueError:
        cleared = True
    return msgs, warned, recent, cleared


def test_errors_name_arguments(pool):
    for msgs, warned, recent, cleared in pool.run(_w_errors, 2):
        names = [
            "num_heads_kv",
            "num_heads_q",
            "q, k",
            "return_max_logits",
            "is_partial_grad",
            "sink",
        ]
        assert len(msgs) == len(names), msgs
        for name, msg in zip(names, msgs):
            assert msg.startswith(name), (name, msg)
        assert warned and recent and cleared


def test_signatures_follow_magi_attention_1_1():
    import inspect

    params = list(inspect.signature(v1_1.magi_attn_varlen_key).parameters)
    assert params[:7] == ["cu_seqlens_q", "cu_seqlens_k", "num_heads_q", "num_heads_kv",
                          "head_dim", "pad_size", "cp_group_or_mesh"]  # fmt: skip
    params = list(inspect.signature(v1_1.magi_attn_flex_key).parameters)
    assert params[5:10] == [
        "num_heads_q",
        "num_heads_kv",
        "head_dim",
        "pad_size",
        "cp_group_or_mesh",
    ]
    params = list(inspect.signature(v1_1.calc_attn).parameters)
    assert params == ["q", "k", "v", "key", "sink", "softmax_scale", "softcap", "return_max_logits"]
    assert math.isclose(1.0, 1.0)
