"""One rank's bad input under a plan: a ValueError naming the argument on EVERY rank.

Each case gives rank 1 alone a bad argument (a positive or -inf log gate, a wrong shape)
through every entry point that takes a plan: ``linear_attention``, the named forms
``simple_gla``, ``retention``, ``ssd`` (whose own checks must go through the same status
exchange as ``linear_attention``'s, or the good ranks wait in it alone) and
``LinearAttentionEngine``. A hang would show as a TimeoutError on the good ranks after
``HAMILTON_ATTN_TIMEOUT`` (5 s here), and the group must still work afterwards.

Legend: B batch, S tokens, H heads, K key dim, V value dim, W world size; bshd.
"""

from __future__ import annotations

import os

import pytest
import torch

import hamilton_attn as ha
from hamilton_attn.compat.attention_engine import LinearAttentionEngine, meta_tensor

S, H, K, V = 23, 2, 4, 3
DOCS = [0, 5, 13, S]


def _call(entry: str, kind: str, bad: bool, p, q, k, v, g):
    """``entry``'s call on this rank, with ``kind``'s bad argument where ``bad``: a
    positive log gate (a decay > 1, a negative dt), a -inf one (dt = inf), or a wrong
    shape (q with one head fewer; g, dt [B, S]; a decay [H - 1]); for ssd also an
    initial state that is not a tensor."""
    bad_kind = kind if bad else ""
    if bad_kind == "positive_g":
        g = g.abs() + 0.1
    elif bad_kind == "inf_g":
        g = g.clone()
        g[0, 1, 0] = -float("inf")
    if entry == "linear_attention":
        q = q[:, :, :1] if bad_kind == "shape" else q
        return ha.linear_attention(q, k, v, g, plan=p)
    if entry == "simple_gla":
        return ha.simple_gla(q, k, v, g[:, :, 0] if bad_kind == "shape" else g, plan=p)
    if entry == "retention":
        decay = torch.tensor([0.9, 0.8], dtype=q.dtype)
        decay = {"positive_g": decay + 0.5, "shape": decay[:1]}.get(bad_kind, decay)
        return ha.retention(q, k, v, decay, plan=p)
    if entry == "ssd":  # dt = -g, A = -1
        dt = -g[:, :, 0] if bad_kind == "shape" else -g
        h0 = "not a state" if bad_kind == "state" else None
        return ha.ssd(v, dt, torch.full((H,), -1.0, dtype=q.dtype), k, q, plan=p,
                      initial_state=h0)  # fmt: skip
    metas = [meta_tensor(1, H, DOCS[-1], d, dtype=q.dtype) for d in (K, K, V)]
    engine = LinearAttentionEngine(metas, context_parallel=p)
    q = q[:, :, :1] if bad_kind == "shape" else q
    out = engine(*(t.transpose(1, 2) for t in (q, k, v, g)))
    return out.transpose(1, 2)


def _one_bad_rank(ctx, cases):
    """``(error type, message)`` per case on this rank, then a good call's outcome."""
    old = os.environ.get("HAMILTON_ATTN_TIMEOUT")
    os.environ["HAMILTON_ATTN_TIMEOUT"] = "5"
    try:
        p = ha.plan(ha.Mask.varlen(DOCS, causal=True), ctx.group, dispatch="contiguous",
                    schedule="ring")  # fmt: skip
        gen = torch.Generator().manual_seed(5)
        full = [torch.randn(1, S, H, d, generator=gen, dtype=torch.float64) for d in (K, K, V)]
        g = -torch.rand(1, S, H, generator=gen, dtype=torch.float64)
        q, k, v, g = (ha.dispatch(t, p) for t in (*full, g))
        out = []
        for entry, kind in cases:
            try:
                _call(entry, kind, ctx.rank == 1, p, q, k, v, g)
                out.append(("no error", ""))
            except Exception as err:  # noqa: BLE001 - the test is about which error
                out.append((type(err).__name__, str(err)))
        good = ha.linear_attention(q, k, v, g, plan=p)
        out.append(("ok" if bool(torch.isfinite(good).all()) else "bad", ""))
        return out
    finally:
        if old is None:
            os.environ.pop("HAMILTON_ATTN_TIMEOUT")
        else:
            os.environ["HAMILTON_ATTN_TIMEOUT"] = old


CASES = {  # (entry, kind): the argument every rank's message names
    ("linear_attention", "positive_g"): "g",
    ("linear_attention", "inf_g"): "g",
    ("linear_attention", "shape"): "q, k, v",
    ("simple_gla", "positive_g"): "g",
    ("simple_gla", "inf_g"): "g",
    ("simple_gla", "shape"): "g",
    ("retention", "positive_g"): "decay",
    ("retention", "shape"): "decay",
    ("ssd", "positive_g"): "dt",
    ("ssd", "inf_g"): "dt",
    ("ssd", "shape"): "dt",
    ("ssd", "state"): "initial_state",
    ("engine", "positive_g"): "g",
    ("engine", "shape"): "q",
}


@pytest.mark.parametrize("w", [2, 3])
def test_one_bad_rank_raises_value_error_naming_it_on_every_rank(pool, w):
    per_rank = pool.run(_one_bad_rank, w, list(CASES))
    for i, (case, name) in enumerate(CASES.items()):
        for rank, res in enumerate(per_rank):
            typ, msg = res[i]
            assert typ == "ValueError", f"{case}, W={w} rank {rank}: {typ}: {msg}"
            assert msg.startswith(f"{name}:"), f"{case}, W={w} rank {rank}: {msg}"
            if rank != 1:
                assert "rank(s) [1]" in msg, f"{case}, W={w} rank {rank}: {msg}"
    assert all(res[-1][0] == "ok" for res in per_rank)
