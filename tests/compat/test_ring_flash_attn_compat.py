"""``hamilton_attn.compat.ring_flash_attn`` against a float64 oracle, in the patterns of
ring-flash-attention's own tests.

Each of its tests makes global q, k, v (and dout) on every rank, cuts out the rank's
shards in the function's layout, runs the function on them and compares the output, the
lse (``return_attn_probs``) and dq, dk, dv with flash-attn on the whole sequence sliced
the same way. Here flash-attn is the textbook float64 oracle of
``hamilton_attn.testing.oracle`` (dense masks written from the definitions), inputs are
float64 and fresh per case, and the shard cutting (``_local_*``) is written from
ring-flash-attention's test definitions, not from the module's placements. Workers
(``_w_*``) return the largest errors; the assertions live in the tests.

Legend: B batch, S tokens (S_local per rank), T packed tokens, Hq/Hk heads, D head dim,
W world size.
"""

from __future__ import annotations

import inspect
import math
import zlib

import pytest
import torch

import hamilton_attn as ha
from hamilton_attn.compat import ring_flash_attn as rfa
from hamilton_attn.runtime.comm import SimulatedGroup
from hamilton_attn.testing.oracle import attention_oracle, dense_varlen

TOL = 1e-9
HAS_VARIANTS = "variant" in inspect.signature(ha.calc_attn).parameters


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


# -- the layouts, as ring-flash-attention's tests cut them --------------------------------


def _index_contiguous(s: int, rank: int, w: int) -> list[int]:
    n = s // w
    return list(range(rank * n, (rank + 1) * n))


def _index_zigzag(s: int, rank: int, w: int) -> list[int]:
    n = s // (2 * w)
    second = 2 * w - 1 - rank
    return list(range(rank * n, (rank + 1) * n)) + list(range(second * n, (second + 1) * n))


def _index_stripe(s: int, rank: int, w: int) -> list[int]:
    return list(range(rank, s, w))  # tokens split in groups of W, the rank-th of each


_BATCH_INDEX = {"ring": _index_contiguous, "zigzag": _index_zigzag, "stripe": _index_stripe}


def _index_varlen(cu, rank: int, w: int, zigzag: bool) -> list[int]:
    out = []
    for a, b in zip(cu, cu[1:]):
        cut = _index_zigzag if zigzag else _index_contiguous
        out += [a + i for i in cut(b - a, rank, w)]
    return out


# -- oracle ---------------------------------------------------------------------------------


def _oracle(q, k, v, dense, scale, slopes=None):
    """``(out [B, S, Hq, D], lse [B, Hq, S])`` in float64 and the grads of ``(out * dout)``
    are taken by the caller; ALiBi as flash-attn adds it (``-slope |i - j|``)."""
    if slopes is None:
        out, lse = attention_oracle(*(t.transpose(1, 2) for t in (q, k, v)), dense, scale)
        return out.transpose(1, 2), lse
    hq, hk = q.shape[2], k.shape[2]
    qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))
    kb, vb = kb.repeat_interleave(hq // hk, 1), vb.repeat_interleave(hq // hk, 1)
    s = qb @ kb.transpose(-1, -2) * scale
    i = torch.arange(q.shape[1]).view(-1, 1)
    j = torch.arange(k.shape[1]).view(1, -1)
    sl = slopes.double().view(-1 if slopes.dim() == 2 else 1, hq, 1, 1)
    s = s - sl * (i - j).abs()
    s = s.masked_fill(~dense, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return (torch.softmax(s, -1) @ vb).transpose(1, 2), lse


def _errors(got, want) -> float:
    return max((g - w).abs().max().item() for g, w in zip(got, want))


def _run_case(ctx, fn, inputs, idx, want, dout, pack: str, token_dims: int, **kw):
    """Run ``fn`` on this rank's shards (packed as ``pack`` says) and return the largest
    error of out, lse and the input gradients against ``want`` (global tensors)."""
    sel = (slice(None), idx) if token_dims == 2 else (idx,)
    q, k, v = (t[sel].detach().clone().requires_grad_() for t in inputs)
    if pack == "qkv":
        qkv = torch.stack([q, k, v], dim=token_dims).detach().requires_grad_()
        out, lse, none = fn(qkv, return_attn_probs=True, group=ctx.group, **kw)
    elif pack == "kv":
        kv = torch.stack([k, v], dim=token_dims).detach().requires_grad_()
        out, lse, none = fn(q, kv, return_attn_probs=True, group=ctx.group, **kw)
    else:
        out, lse, none = fn(q, k, v, return_attn_probs=True, group=ctx.group, **kw)
    (out * dout[sel]).sum().backward()
    if pack == "qkv":
        dq, dk, dv = qkv.grad.unbind(token_dims)
    elif pack == "kv":
        dq, (dk, dv) = q.grad, kv.grad.unbind(token_dims)
    else:
        dq, dk, dv = q.grad, k.grad, v.grad
    out_w, lse_w, dq_w, dk_w, dv_w = want
    lse_sel = (slice(None), slice(None), idx) if token_dims == 2 else (slice(None), idx)
    errs = {
        "out": _errors([out], [out_w[sel]]),
        "lse": _errors([lse], [lse_w[lse_sel]]),
        "grads": _errors([dq, dk, dv], [dq_w[sel], dk_w[sel], dv_w[sel]]),
    }
    assert none is None
    return errs, out.dtype == q.dtype, tuple(lse.shape)


def _want(q, k, v, dense, scale, dout, slopes=None):
    g = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = _oracle(*g, dense, scale, slopes)
    (out * dout).sum().backward()
    return out.detach(), lse.detach(), *(t.grad for t in g)


# -- batch functions --------------------------------------------------------------------------


_BATCH_FNS = {
    ("ring", ""): rfa.ring_flash_attn_func,
    ("ring", "kv"): rfa.ring_flash_attn_kvpacked_func,
    ("ring", "qkv"): rfa.ring_flash_attn_qkvpacked_func,
    ("zigzag", ""): rfa.zigzag_ring_flash_attn_func,
    ("zigzag", "kv"): rfa.zigzag_ring_flash_attn_kvpacked_func,
    ("zigzag", "qkv"): rfa.zigzag_ring_flash_attn_qkvpacked_func,
    ("stripe", ""): rfa.stripe_flash_attn_func,
    ("stripe", "kv"): rfa.stripe_flash_attn_kvpacked_func,
    ("stripe", "qkv"): rfa.stripe_flash_attn_qkvpacked_func,
}


def _w_batch(ctx, cases):
    w, rank = ctx.world_size, ctx.rank
    results = []
    for layout, pack, s_local, b, hq, hk, causal, window, alibi, scale in cases:
        g = torch.Generator().manual_seed(_seed(layout, pack, s_local, w, causal, window, alibi))
        s, d = w * s_local, 8
        q = torch.randn(b, s, hq, d, generator=g, dtype=torch.float64)
        k = torch.randn(b, s, hk, d, generator=g, dtype=torch.float64)
        v = torch.randn(b, s, hk, d, generator=g, dtype=torch.float64)
        dout = torch.randn(b, s, hq, d, generator=g, dtype=torch.float64)
        slopes = torch.rand(b, hq, generator=g).float() if alibi else None
        dense = dense_varlen([0, s], causal=causal, window=window)
        want = _want(q, k, v, dense, scale or 1 / math.sqrt(d), dout, slopes)
        idx = _BATCH_INDEX[layout](s, rank, w)
        kw = {"causal": causal, "window_size": window, "softmax_scale": scale}
        if alibi:
            kw["alibi_slopes"] = slopes
        results.append(
            _run_case(ctx, _BATCH_FNS[layout, pack], (q, k, v), idx, want, dout, pack, 2, **kw)
        )
    return results


def _batch_cases():
    cases = []
    for layout in ("ring", "zigzag", "stripe"):
        for causal in (True, False):
            for pack in ("", "kv", "qkv"):
                hk = 4 if pack == "qkv" else 2  # GQA where the packing allows it
                s_local = 6 if layout == "zigzag" else 5  # odd lengths where allowed
                cases.append((layout, pack, s_local, 2, 4, hk, causal, (-1, -1), False, None))
        cases.append((layout, "", 8, 1, 4, 1, True, (3, 0), False, 0.3))  # window, MQA
        cases.append((layout, "", 8, 1, 2, 2, False, (2, 5), False, None))
    return cases


def _check(results, n):
    assert len(results) == n
    for errs, same_dtype, _ in results:
        assert same_dtype
        for name, e in errs.items():
            assert e < TOL, (name, e)


@pytest.mark.parametrize("w", [2, 4, 3])
def test_batch_layouts_match_oracle(pool, w):
    """contiguous, zigzag and stripe: out, lse, dq, dk, dv at every rank's tokens, causal
    and not, each packing, GQA/MQA, odd S_local, sliding windows, a given scale."""
    cases = _batch_cases() if w != 3 else [c for c in _batch_cases() if c[1] == ""]
    for rank, results in enumerate(pool.run(_w_batch, w, cases)):
        _check(results, len(cases))
        for (layout, _, s_local, b, hq, *_), (_, _, lse_shape) in zip(cases, results):
            assert lse_shape == (b, hq, s_local if layout != "zigzag" else s_local), rank


@pytest.mark.skipif(not HAS_VARIANTS, reason="calc_attn has no variant= yet")
def test_batch_alibi(pool):
    cases = [
        (layout, "", 6, 2, 4, 2, causal, (-1, -1), True, None)
        for layout in ("ring", "zigzag", "stripe")
        for causal in (True, False)
    ]
    for results in pool.run(_w_batch, 2, cases):
        _check(results, len(cases))


# -- varlen functions -----------------------------------------------------------------------

_VARLEN_FNS = {
    (False, ""): rfa.ring_flash_attn_varlen_func,
    (False, "kv"): rfa.ring_flash_attn_varlen_kvpacked_func,
    (False, "qkv"): rfa.ring_flash_attn_varlen_qkvpacked_func,
    (True, ""): rfa.zigzag_ring_flash_attn_varlen_func,
    (True, "kv"): rfa.zigzag_ring_flash_attn_varlen_kvpacked_func,
    (True, "qkv"): rfa.zigzag_ring_flash_attn_varlen_qkvpacked_func,
}


def _w_varlen(ctx, cases):
    w, rank = ctx.world_size, ctx.rank
    results = []
    for zigzag, pack, local_lens, hq, hk, causal, window, alibi in cases:
        g = torch.Generator().manual_seed(_seed(zigzag, pack, local_lens, w, causal, window))
        cu_local = [0]
        for n in local_lens:
            cu_local.append(cu_local[-1] + n)
        cu = [w * x for x in cu_local]  # the test's global offsets
        t, d = cu[-1], 4
        q = torch.randn(1, t, hq, d, generator=g, dtype=torch.float64)
        k = torch.randn(1, t, hk, d, generator=g, dtype=torch.float64)
        v = torch.randn(1, t, hk, d, generator=g, dtype=torch.float64)
        dout = torch.randn(1, t, hq, d, generator=g, dtype=torch.float64)
        slopes = torch.rand(hq, generator=g).float() if alibi else None
        dense = dense_varlen(cu, causal=causal, window=window)
        want = _want(q, k, v, dense, 1 / math.sqrt(d), dout, slopes)
        want = (want[0][0], want[1][0], *(x[0] for x in want[2:]))  # to thd, lse [Hq, T]
        idx = _index_varlen(cu, rank, w, zigzag)
        local_cu = torch.tensor(cu_local, dtype=torch.int32)
        kw = {"causal": causal, "window_size": window}
        if alibi:
            kw["alibi_slopes"] = slopes
        fn = _VARLEN_FNS[zigzag, pack]
        args = (local_cu, max(local_lens))

        def call(*x, fn=fn, args=args, **more):
            return fn(*x, *args, **more)

        results.append(_run_case(ctx, call, (q[0], k[0], v[0]), idx, want, dout[0], pack, 1, **kw))
    return results


def _varlen_cases():
    cases = []
    for zigzag in (False, True):
        lens = [4, 2, 6] if zigzag else [3, 1, 5]
        for causal in (True, False):
            for pack in ("", "kv", "qkv"):
                cases.append(
                    (zigzag, pack, lens, 4, 4 if pack == "qkv" else 2, causal, (-1, -1), False)
                )
        cases.append((zigzag, "", [6, 4], 2, 1, True, (3, -1), False))
        cases.append((zigzag, "", [2, 8], 2, 2, False, (2, 1), False))
    return cases


@pytest.mark.parametrize("w", [2, 4])
def test_varlen_layouts_match_oracle(pool, w):
    """ring and zigzag varlen: local cu_seqlens, each document cut per rank; out, lse
    ``[Hq, T_local]``, dq, dk, dv; causal and not, packings, GQA, windows."""
    cases = _varlen_cases()
    for results in pool.run(_w_varlen, w, cases):
        _check(results, len(cases))
        for (_, _, lens, hq, *_), (_, _, lse_shape) in zip(cases, results):
            assert lse_shape == (hq, sum(lens))


@pytest.mark.skipif(not HAS_VARIANTS, reason="calc_attn has no variant= yet")
def test_varlen_alibi(pool):
    cases = [(z, "", [4, 2], 2, 1, c, (-1, -1), True) for z in (False, True) for c in (True, False)]
    for results in pool.run(_w_varlen, 2, cases):
        _check(results, len(cases))


# -- llama3 -----------------------------------------------------------------------------------

_LLAMA3_FNS = {
    "": rfa.llama3_flash_attn_varlen_func,
    "kv": rfa.llama3_flash_attn_varlen_kvpacked_func,
    "qkv": rfa.llama3_flash_attn_varlen_qkvpacked_func,
}


def _w_llama3(ctx, cases):
    from hamilton_attn.compat.ring_flash_attn import llama3

    w, rank = ctx.world_size, ctx.rank
    results = []
    for pack, cu, hq, hk, stride, causal, window, forget in cases:
        g = torch.Generator().manual_seed(_seed("llama3", pack, cu, w, stride, causal, window))
        t, d = cu[-1], 4
        q = torch.randn(1, t, hq, d, generator=g, dtype=torch.float64)
        k = torch.randn(1, t, hk, d, generator=g, dtype=torch.float64)
        v = torch.randn(1, t, hk, d, generator=g, dtype=torch.float64)
        dout = torch.randn(1, t, hq, d, generator=g, dtype=torch.float64)
        dense = dense_varlen(cu, causal=causal, window=window)
        want = _want(q, k, v, dense, 1 / math.sqrt(d), dout)
        want = (want[0][0], want[1][0], *(x[0] for x in want[2:]))
        idx = _index_contiguous(t, rank, w)
        prepared = rfa.llama3_flash_attn_prepare_cu_seqlens(
            torch.tensor(cu, dtype=torch.int32), causal=causal, rank=rank, world_size=w
        )
        if forget:  # arguments made elsewhere: the ranks exchange them
            llama3._PREPARED.clear()
        fn = _LLAMA3_FNS[pack]
        cu_q, cu_k, max_q, max_k, k_slice = prepared

        args = (cu_q, cu_k, max_q, max_k, stride, k_slice)

        def call(*x, fn=fn, args=args, **more):
            return fn(*x, *args, **more)

        kw = {"causal": causal, "window_size": window}
        results.append(_run_case(ctx, call, (q[0], k[0], v[0]), idx, want, dout[0], pack, 1, **kw))
    return results


def _llama3_cases(w):
    t = 6 * w
    crossing = [0, 5, 5 + t // 2, t - 1, t]  # documents across rank cuts, one empty-free tail
    aligned = [0, t // w, t]
    cases = []
    for causal in (True, False):
        for pack in ("", "kv", "qkv"):
            hk = 4 if pack == "qkv" else 2
            cases.append((pack, crossing, 4, hk, 1, causal, (-1, -1), False))
        cases.append(("", crossing, 4, 2, 2, causal, (-1, -1), True))  # heads_k_stride = Hk
        cases.append(("", aligned, 2, 2, 1, causal, (2, 0) if causal else (1, 3), False))
    return cases


@pytest.mark.parametrize("w", [2, 4])
def test_llama3_matches_oracle(pool, w):
    """llama3: a contiguous cut of the packed sequence with documents crossing it;
    heads_k_stride 1 and Hk, arguments from prepare (no message) and from elsewhere (one
    exchange), causal and not, windows; out, lse ``[Hq, T_local]``, dq, dk, dv."""
    cases = _llama3_cases(w)
    for results in pool.run(_w_llama3, w, cases):
        _check(results, len(cases))


def test_llama3_prepare_cu_seqlens():
    """ring-flash-attention's prepare on a hand-checked case: T = 12 on 3 ranks, documents
    [0, 5), [5, 9), [9, 12)."""
    cu = torch.tensor([0, 5, 9, 12], dtype=torch.int32)
    cu_q, cu_k, mq, mk, sl = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, True, 1, 3)
    # rank 1 holds [4, 8): the tail of document 0 (1 token) and 3 of document 1
    assert cu_q.tolist() == [0, 1, 4] and cu_k.tolist() == [0, 5, 8]
    assert (mq, mk, sl) == (3, 5, slice(0, 8))
    cu_q, cu_k, mq, mk, sl = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, False, 1, 3)
    assert cu_q.tolist() == [0, 1, 4] and cu_k.tolist() == [0, 5, 9] and sl == slice(0, 9)
    cu_q, cu_k, mq, mk, sl = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, True, 0, 3)
    assert cu_q.tolist() == [0, 4] and cu_k.tolist() == [0, 4] and sl == slice(0, 4)
    with pytest.raises(ValueError, match="cu_seqlens"):
        rfa.llama3_flash_attn_prepare_cu_seqlens(torch.tensor([0, 5]), True, 0, 3)


def _w_llama3_mismatch(ctx):
    from hamilton_attn.compat.ring_flash_attn import llama3

    t = 4 * ctx.world_size
    x = torch.zeros(t // ctx.world_size, 2, 4, dtype=torch.float64)
    # rank 0 sees a document start at 2, rank 1 one document from 0: no single global
    # cu_seqlens gives both ranks' arguments
    cu = [0, 2, t] if ctx.rank == 0 else [0, t]
    args = rfa.llama3_flash_attn_prepare_cu_seqlens(
        torch.tensor(cu), True, ctx.rank, ctx.world_size
    )
    llama3._PREPARED.clear()
    try:
        rfa.llama3_flash_attn_varlen_func(x, x, x, *args[:4], 1, args[4], causal=True,
                                          group=ctx.group)  # fmt: skip
    except ValueError as err:
        return str(err)
    return None


def test_llama3_mismatched_ranks_raise_everywhere(pool):
    for msg in pool.run(_w_llama3_mismatch, 2):
        assert msg is not None and "cu_seqlens_q, cu_seqlens_k, local_k_slice" in msg


# -- argument errors (before any message) -----------------------------------------------------


def test_bad_arguments_name_them():
    g = SimulatedGroup(2)
    x = torch.zeros(1, 4, 2, 8)
    cu = torch.tensor([0, 4])

    def llama3(heads_k_stride, local_k_slice):
        t = x[0]
        return rfa.llama3_flash_attn_varlen_func(
            t, t, t, cu, cu, 4, 4, heads_k_stride, local_k_slice, group=g
        )

    cases = [
        (lambda: rfa.ring_flash_attn_func(x, x, x, dropout_p=0.1, group=g), "dropout_p"),
        (lambda: rfa.ring_flash_attn_func(x, x, x, window_size=(-2, 0), group=g), "window_size"),
        (lambda: rfa.ring_flash_attn_func(x, x, x, window_size=3, group=g), "window_size"),
        (lambda: rfa.ring_flash_attn_func(x[0], x, x, group=g), "q"),
        (lambda: rfa.ring_flash_attn_func(x, x[:, :, :1], x, group=g), "k, v"),
        (
            lambda: rfa.ring_flash_attn_func(
                x, torch.zeros(1, 4, 3, 8), torch.zeros(1, 4, 3, 8), group=g
            ),
            "heads",
        ),  # fmt: skip
        (lambda: rfa.zigzag_ring_flash_attn_func(x[:, :3], x[:, :3], x[:, :3], group=g), "even"),
        (lambda: rfa.ring_flash_attn_qkvpacked_func(x, group=g), "qkv"),
        (lambda: rfa.ring_flash_attn_kvpacked_func(x, torch.zeros(1, 4, 3, 2, 8), group=g), "kv"),
        (lambda: rfa.ring_flash_attn_func(x, x, x, causal="yes", group=g), "causal"),
        (lambda: rfa.ring_flash_attn_func(x, x, x, group="world"), "group"),
        (
            lambda: rfa.ring_flash_attn_func(x, x, x, alibi_slopes=torch.ones(3), group=g),
            "alibi_slopes",
        ),  # fmt: skip
        (
            lambda: rfa.ring_flash_attn_varlen_func(
                x[0], x[0], x[0], torch.tensor([0, 3]), 3, group=g
            ),
            "cu_seqlens",
        ),  # fmt: skip
        (
            lambda: rfa.ring_flash_attn_varlen_func(
                x[0], x[0], x[0], torch.tensor([0, 4]), None, group=g
            ),
            "max_seqlen",
        ),  # fmt: skip
        (
            lambda: rfa.zigzag_ring_flash_attn_varlen_func(
                x[0], x[0], x[0], torch.tensor([0, 1, 4]), 3, group=g
            ),
            "even",
        ),  # fmt: skip
        (lambda: llama3(3, slice(0, 4)), "heads_k_stride"),
        (lambda: llama3(1, slice(0, 5)), "local_k_slice"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=name):
            fn()


def test_signatures_match_ring_flash_attention():
    """Positional order and defaults as ring-flash-attention's (read from its sources)."""
    common = ["dropout_p", "softmax_scale", "causal", "window_size", "alibi_slopes",
              "deterministic", "return_attn_probs", "group"]  # fmt: skip
    for name in rfa.__all__:
        fn = getattr(rfa, name)
        params = list(inspect.signature(fn).parameters)
        if name.endswith("_func"):
            assert params[-len(common) :] == common, name
            assert inspect.signature(fn).parameters["causal"].default is False
    assert list(inspect.signature(rfa.llama3_flash_attn_varlen_func).parameters)[:9] == [
        "q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
        "heads_k_stride", "local_k_slice",
    ]  # fmt: skip
    assert list(inspect.signature(rfa.ring_flash_attn_varlen_kvpacked_func).parameters)[:4] == [
        "q",
        "kv",
        "cu_seqlens",
        "max_seqlen",
    ]


# -- the HF adapter ---------------------------------------------------------------------------


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attention_dropout=0.0)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).double().eval()


def _w_hf(ctx, lengths, stride):
    model = _tiny_llama()
    w, rank = ctx.world_size, ctx.rank
    g = torch.Generator().manual_seed(_seed("hf", lengths))
    ids = [torch.randint(0, 64, (n,), generator=g) for n in lengths]
    # the reference: each document alone through HF's own attention, in one process
    ref = torch.cat([model(input_ids=x[None]).logits[0] for x in ids])
    rfa.substitute_hf_flash_attn(ctx.group, heads_k_stride=stride)
    model.set_attn_implementation("ring_attention")
    packed = torch.cat(ids)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    rfa.update_ring_flash_attn_params(cu, ctx.group)
    local_ids = torch.chunk(packed, w, dim=1)[rank]
    local_pos = torch.chunk(pos, w, dim=1)[rank]
    logits = model(input_ids=local_ids, position_ids=local_pos).logits[0]
    n = packed.shape[1] // w
    err = (logits - ref[rank * n : (rank + 1) * n]).abs().max().item()
    logits.sum().backward()  # differentiable end to end
    grads_ok = all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    return err, grads_ok


@pytest.mark.parametrize("w,stride", [(2, 1), (4, 2)])
def test_hf_adapter_llama(pool, w, stride):
    """substitute_hf_flash_attn + update_ring_flash_attn_params on a tiny random Llama:
    packed documents chunked as in ring-flash-attention's README give the logits of each
    document run alone through HF's own attention."""
    pytest.importorskip("transformers")
    for err, grads_ok in pool.run(_w_hf, w, [5, 9, 6, 4], stride):
        assert err < 1e-9 and grads_ok
