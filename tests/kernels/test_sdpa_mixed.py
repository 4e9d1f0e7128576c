"""The ``sdpa+triton`` kernel (``auto``'s: cuDNN for a block's large pieces, one call of
the triton kernel per run of small ones): its plan, and its results against the float64
oracle on CPU (the CPU flash op for the large pieces, Triton's interpreter for the rest),
forward and the gradients of q, k and v."""

from __future__ import annotations

import pytest
import torch

from hamilton_attn import config
from hamilton_attn.kernels import choice, get_kernel, sdpa
from hamilton_attn.kernels.sdpa import TRITON, Call, call_pairs, mix_calls
from hamilton_attn.masks import Mask
from hamilton_attn.testing.oracle import assert_close_to_oracle, attention_oracle


def _docs(lens) -> Mask:
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return Mask.varlen(cu, causal=True)


def _calls(mask: Mask, op="cudnn") -> list[Call]:
    return [Call(q0, q1, k0, k1, c, op) for q0, q1, k0, k1, c in mask.dense_pieces()]


def test_runs_of_small_documents_join_into_one_triton_call():
    mask = _docs([300, 20, 30, 5, 400, 40, 50])
    out = mix_calls(mask, _calls(mask), limit=1300)  # 50 * 51 / 2 = 1275 pairs: small
    kinds = [(c.q0, c.q1, c.op) for c in out]
    assert kinds == [
        (0, 300, "cudnn"),
        (300, 355, TRITON),  # 20, 30, 5: one call
        (355, 755, "cudnn"),
        (755, 845, TRITON),  # 40, 50
    ]
    for c in out:
        if c.op == TRITON:
            assert c.sub.shape == (c.q1 - c.q0, c.k1 - c.k0)
            assert torch.equal(
                c.sub.to_dense(), mask.to_dense()[c.q0 : c.q1, c.k0 : c.k1]
            )  # exactly the run's pairs
    # every visible pair is in exactly one call
    assert sum(call_pairs(c) for c in out) == mask.area()


def test_a_lone_small_call_and_calls_sharing_rows_with_a_large_one_stay():
    # rows 0-100 see a full rectangle and a causal one (a top-left op's split of one
    # bottom-right causal piece: two calls sharing rows, one group of 45,050 pairs); the
    # lone 10-token document after them has no partner
    mask = Mask.from_ranges(
        [(0, 100), (0, 100), (100, 110)],
        [(0, 400), (400, 500), (500, 510)],
        ["full", "causal", "causal"],
        110,
        510,
    )
    calls = [
        Call(0, 100, 0, 400, False, "cpu_flash"),
        Call(0, 100, 400, 500, True, "cpu_flash"),
        Call(100, 110, 500, 510, True, "cpu_flash"),
    ]
    assert mix_calls(mask, calls, limit=1000) == tuple(calls)
    # raise the limit past the large group: everything joins
    joined = mix_calls(mask, calls, limit=10**9)
    assert [(c.q0, c.q1, c.k0, c.k1, c.op) for c in joined] == [(0, 110, 0, 510, TRITON)]
    assert torch.equal(joined[0].sub.to_dense(), mask.to_dense())


def test_the_cost_model_counts_a_triton_call_at_the_triton_kernels_cost():
    # the 8K-per-rank step of hamilton on long-tailed documents: four causal documents
    mask = _docs([2566, 1275, 255, 4096])
    per_pair = 4.0 * 32 * 128
    calls = tuple(_calls(mask))
    mixed = mix_calls(mask, list(calls), 1 << 21)
    assert [c.op for c in mixed] == ["cudnn", TRITON, "cudnn"]
    big = [c for c in mixed if c.op != TRITON]
    gpu = sum(per_pair * call_pairs(c) / choice.CUDNN_RATE + choice.GPU_CALL for c in big) + (
        choice.triton_seconds(mixed[1].sub, per_pair, 128) - choice.HOST_TRITON
    )
    host = 2 * choice.HOST_CALL + choice.HOST_TRITON
    assert choice.sdpa_seconds(mixed, per_pair, 128) == pytest.approx(max(host, gpu))


pytest.importorskip("triton")


@pytest.fixture
def small_pieces(monkeypatch):  # mixing on, at this test's small sizes
    monkeypatch.setattr(sdpa, "MIX_PAIRS", 20 * 20)
    with config.override(triton_interpret=True):
        yield


def test_mixing_is_off_by_default():
    # measured no faster on an H200 (sdpa.MIX_PAIRS' note): auto never weighs it
    assert sdpa.MIX_PAIRS == 0
    mask = _docs([40, 9, 14, 3, 50])
    q = k = v = torch.randn(1, 2, mask.shape[0], 16)
    assert get_kernel("sdpa+triton").calls(q, k, v, mask) == get_kernel("sdpa").calls(q, k, v, mask)


MASKS = {
    "documents": _docs([37, 9, 14, 3, 50, 11, 16]),
    "rows shared": Mask.from_ranges(
        [(0, 30), (0, 30), (30, 41), (41, 49), (49, 90)],
        [(0, 50), (50, 80), (80, 91), (91, 99), (99, 140)],
        ["full", "causal", "causal", "full", "causal"],
        90,
        140,
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(MASKS))
def test_the_mixed_kernel_agrees_with_the_oracle(small_pieces, name, dtype):
    mask = MASKS[name]
    kern = get_kernel("sdpa+triton")
    sq, sk = mask.shape
    g = torch.Generator().manual_seed(len(name))
    q = torch.randn(2, 4, sq, 16, generator=g).to(dtype)
    k = torch.randn(2, 2, sk, 16, generator=g).to(dtype)
    v = torch.randn(2, 2, sk, 16, generator=g).to(dtype)
    do = torch.randn(2, 4, sq, 16, generator=g).to(dtype)
    plan = kern.calls(q, k, v, mask)
    assert TRITON in {c.op for c in plan} and len({c.op for c in plan}) == 2
    out, lse = kern.forward(q, k, v, mask, 0.3)
    grads = kern.backward(do, q, k, v, out, lse, mask, 0.3)

    def ref(dt):
        x = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o, l_ = attention_oracle(*x, mask.to_dense(), 0.3, dtype=dt)
        return [o, l_, *torch.autograd.grad(o, x, do.to(dt))]

    exact = ref(torch.float64)
    same = ref(dtype)
    fin = torch.isfinite(exact[1])
    assert torch.equal(torch.isneginf(lse), ~fin), "rows that see nothing"
    got = [out, torch.where(fin, lse, 0.0), *grads]
    exact[1], same[1] = torch.where(fin, exact[1], 0.0), torch.where(fin, same[1], 0.0)
    for n, a, b, c in zip(["out", "lse", "dq", "dk", "dv"], got, exact, same, strict=True):
        assert a.shape == b.shape, n
        assert_close_to_oracle(a, b, c, name=n)
