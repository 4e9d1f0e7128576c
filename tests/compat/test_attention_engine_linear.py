"""``compat.attention_engine.LinearAttentionEngine`` (the seed's linear examples) against
the float64 token-by-token recurrence, forward and backward, on one device and under
context parallelism (gloo pool; workers ``_w_*`` return numbers, the assertions live in
the tests).

The three examples are written as in AttentionEngine's ``attn_script``: retention
(``decay_mod = decay.log()``), simple gated retention (the log gate as decay) and
Mamba2's SSD with one group of B / C (``decay_mod = decay * A``, ``v_mod = v * dt``).

Legend: B batch, H heads, T tokens, D / DV head dims, W world size; tensors
``[B, H, T, D]`` as the seed's linear examples take them.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import hamilton_attn as ha
from hamilton_attn.compat.attention_engine import CustomIO, LinearAttentionEngine, meta_tensor

F64 = torch.float64


def recurrence(q, k, v, g):
    """``S_t = exp(g_t) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``, token by token in
    float64; q, k ``[B, H, T, D]`` (heads already those of v), g ``[B, H, T]``."""
    b, h, t, d = q.shape
    state = torch.zeros(b, h, d, v.shape[-1], dtype=F64)
    outs = []
    for i in range(t):
        state = g[:, :, i, None, None].exp() * state + k[:, :, i, :, None] * v[:, :, i, None, :]
        outs.append(torch.einsum("bhd,bhdv->bhv", q[:, :, i], state))
    return torch.stack(outs, 2)


def _scale_q(d):
    return lambda q, custom_io: q * d**-0.5


def _decay_log(decay, custom_io):
    return decay.log()


def _decay_times_a(decay, custom_io):
    return decay * custom_io.input_tensors["A"]


def _v_times_dt(v, custom_io):
    return v * custom_io.input_tensors["dt"]


MAMBA_IO = {"A": (1, "heads"), "dt": ("batch", "heads", "seq_len")}


def example(name, b, h, t, d, dv, gen, dtype=F64):
    """``(engine kwargs, call args, oracle, grads_of)`` of one of the seed's examples."""
    hq = 1 if name == "mamba2" else h
    q, k = (torch.randn(b, hq, t, d, generator=gen, dtype=dtype) for _ in range(2))
    v = torch.randn(b, h, t, dv, generator=gen, dtype=dtype)
    if name == "retention":
        gamma = 1 - 2.0 ** (-2.0 - torch.arange(h, dtype=dtype))  # quick decays: T matters
        decay = gamma.view(1, h, 1).expand(b, h, t).clone()
        kw = dict(q_mod=_scale_q(d), decay_mod=_decay_log)
        custom = []
    elif name == "simple_gla":
        decay = F.logsigmoid(torch.randn(b, h, t, generator=gen, dtype=dtype)).clamp_min(-5)
        kw = dict(q_mod=_scale_q(d))
        custom = []
    else:
        decay = F.softplus(torch.randn(b, h, t, generator=gen, dtype=dtype) - 1)  # dt > 0
        a = -torch.rand(1, h, generator=gen, dtype=dtype) - 0.2
        kw = dict(decay_mod=_decay_times_a, v_mod=_v_times_dt, custom_io=CustomIO(MAMBA_IO))
        custom = [a, decay.clone()]
    leaves = [x.requires_grad_() for x in (q, k, v, decay, *custom)]

    def oracle():
        q64, k64, v64, dec = (x.double() for x in leaves[:4])
        q64, k64 = (x.expand(b, h, t, d) for x in (q64, k64))
        if name == "retention":
            return recurrence(q64 * d**-0.5, k64, v64, dec.log())
        if name == "simple_gla":
            return recurrence(q64 * d**-0.5, k64, v64, dec)
        a64, dt64 = (x.double() for x in leaves[4:])
        return recurrence(q64, k64, v64 * dt64[..., None], dec * a64[..., None])

    meta = tuple(meta_tensor(*x.shape, dtype=dtype) for x in (q, k, v))
    return dict(qkv_meta=meta, **kw), leaves, oracle


def _errors(out, ref, leaves, gen):
    """Max abs error of the forward and of every leaf's gradient under one cotangent."""
    g = torch.randn(ref.shape, generator=gen, dtype=F64)
    got = torch.autograd.grad(out, leaves, g.to(out.dtype), retain_graph=True)
    want = torch.autograd.grad(ref, leaves, g, retain_graph=True)
    errs = [(out.double() - ref).abs().max().item()]
    return errs + [(a.double() - r).abs().max().item() for a, r in zip(got, want)]


@pytest.mark.parametrize("name", ["retention", "simple_gla", "mamba2"])
@pytest.mark.parametrize("t", [1, 37, 130])
def test_seed_examples_vs_recurrence(name, t):
    gen = torch.Generator().manual_seed(len(name) * 1000 + t)
    kw, leaves, oracle = example(name, 2, 3, t, 8, 5, gen)
    mod = LinearAttentionEngine(**kw, tune=False, tune_filename=name)
    out = mod(*leaves)
    assert out.shape == (2, 3, t, 5) and out.dtype == F64
    errs = _errors(out, oracle(), leaves, gen)
    assert max(errs) <= 1e-10, errs


def test_float32_and_plain_linear_attention():
    """float32 within a float32 tolerance; no decay and no mods: plain causal linear
    attention ``o_t = q_t sum_{s <= t} k_s^T v_s``."""
    gen = torch.Generator().manual_seed(5)
    kw, leaves, oracle = example("simple_gla", 1, 2, 50, 16, 16, gen, torch.float32)
    errs = _errors(LinearAttentionEngine(**kw)(*leaves), oracle(), leaves, gen)
    assert max(errs) <= 1e-4, errs
    q, k, v = (torch.randn(1, 2, 19, 4, generator=gen, dtype=F64) for _ in range(3))
    mod = LinearAttentionEngine(tuple(meta_tensor(*x.shape, dtype=F64) for x in (q, k, v)))
    ref = recurrence(q, k, v, torch.zeros(1, 2, 19, dtype=F64))
    assert (mod(q, k, v) - ref).abs().max().item() <= 1e-12


def _w_context_parallel(ctx, cases):
    results = []
    for name, t, seed in cases:
        gen = torch.Generator().manual_seed(seed)
        kw, leaves, oracle = example(name, 1, 2, t, 4, 3, gen)
        plan = ha.plan(ha.Mask.causal(t), ctx.group, dispatch="contiguous")
        mod = LinearAttentionEngine(**kw, context_parallel=plan)
        full = [x.detach() for x in leaves]
        # Token-indexed inputs are sharded along dim 2; Mamba2's A is a replicated
        # parameter (its gradient: this rank's share, summed over the ranks below).
        sharded = [i for i, x in enumerate(full) if x.dim() >= 3]
        local = [
            (ha.dispatch(x, plan, seq_dim=2) if i in sharded else x.clone()).requires_grad_()
            for i, x in enumerate(full)
        ]
        out_l = mod(*local)
        g = torch.randn(1, 2, t, 3, generator=gen, dtype=F64)
        grads = torch.autograd.grad(out_l, local, ha.dispatch(g, plan, seq_dim=2))
        out = ha.undispatch(out_l.detach(), plan, seq_dim=2)
        grads = [
            ha.undispatch(x, plan, seq_dim=2) if i in sharded else x for i, x in enumerate(grads)
        ]
        ref = oracle()
        ref_grads = torch.autograd.grad(ref, leaves, g)
        results.append(
            {
                "out": (out - ref).abs().max().item(),
                "sharded": max((grads[i] - ref_grads[i]).abs().max().item() for i in sharded),
                "replicated": [
                    (grads[i], ref_grads[i]) for i in range(len(full)) if i not in sharded
                ],
            }
        )
    return results


@pytest.mark.parametrize("w", [1, 2, 3])
def test_context_parallel_matches_recurrence(pool, w):
    cases = [("retention", 41, 3 * w), ("simple_gla", 29, 5 * w), ("mamba2", 37, 7 * w)]
    per_rank = pool.run(_w_context_parallel, w, cases)
    for i, case in enumerate(cases):
        for rank, results in enumerate(per_rank):
            res = results[i]
            assert res["out"] <= 1e-10 and res["sharded"] <= 1e-9, (case, rank, res)
        for j, (_, want) in enumerate(per_rank[0][i]["replicated"]):
            total = sum(results[i]["replicated"][j][0] for results in per_rank)
            assert (total - want).abs().max().item() <= 1e-9, (case, "replicated", j)


def test_bad_input_names_the_argument():
    gen = torch.Generator().manual_seed(9)
    kw, leaves, _ = example("mamba2", 1, 2, 16, 4, 3, gen)
    mod = LinearAttentionEngine(**kw)
    q, k, v, decay, a, dt = (x.detach() for x in leaves)
    bad_calls = [
        ("q:", lambda: mod(q.transpose(2, 3), k, v, decay, a, dt)),
        ("v:", lambda: mod(q, k, v.float(), decay, a, dt)),
        ("decay:", lambda: mod(q, k, v, decay[:, :1], a, dt)),
        ("decay:", lambda: mod(q, k, v, None, a, dt)),
        ("custom_io: missing", lambda: mod(q, k, v, decay, a)),
        ("custom_io: the engine takes 2", lambda: mod(q, k, v, decay, a, dt, dt)),
        ("custom_io: unknown input 'x'", lambda: mod(q, k, v, decay, a, dt, x=dt)),
        ("custom_io: 'A' given twice", lambda: mod(q, k, v, decay, a, dt, A=a)),
        ("A:", lambda: mod(q, k, v, decay, a.view(2, 1), dt)),
        ("g", lambda: mod(q, k, v, decay, -a, dt)),  # a positive log decay: a growing state
    ]
    for what, call in bad_calls:
        with pytest.raises(ValueError, match=what):
            call()
    bad = LinearAttentionEngine(**{**kw, "v_mod": lambda v, io: v @ v})
    with pytest.raises(ValueError, match="v_mod"):
        bad(q, k, v, decay, a, dt)
    meta = kw["qkv_meta"]
    bad_builds = [
        ("qkv_meta", dict(qkv_meta=meta[:2])),
        ("qkv_meta", dict(qkv_meta=(meta[0], meta_tensor(1, 2, 15, 4, dtype=F64), meta[2]))),
        ("q_mod", dict(q_mod=3)),
        ("custom_io", dict(custom_io={"A": (1, "heads")})),
        ("custom_io", dict(custom_io=CustomIO({"A": ("heads",)}))),
        ("tune", dict(tune="yes")),
        ("context_parallel", dict(context_parallel="ring")),
        (
            "context_parallel",
            dict(context_parallel=ha.plan(ha.Mask.causal(8), ha.SimulatedGroup(1))),
        ),
    ]
    for what, extra in bad_builds:
        with pytest.raises(ValueError, match=what):
            LinearAttentionEngine(**{**kw, **extra})
    with pytest.warns(UserWarning, match="tune_filename"):
        LinearAttentionEngine(**kw, tune=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LinearAttentionEngine(**kw, tune=False, tune_filename="mamba2")
    assert math.isfinite(mod(q, k, v, decay, a, dt).abs().max().item())
