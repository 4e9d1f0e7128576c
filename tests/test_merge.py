"""Merging partial (out, lse) results equals attention over the union of key sets."""

from __future__ import annotations

import math

import pytest
import torch

from hamilton_attn.masks import Mask
from hamilton_attn.merge import merge, merge_, merge_many
from hamilton_attn.testing.oracle import attention_oracle, dense_from_rects, max_err

NEG_INF = float("-inf")


def _qkv(gen, b=2, hq=4, hk=2, sq=37, sk=59, d=16):
    q = torch.randn(b, hq, sq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hk, sk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hk, sk, d, generator=gen, dtype=torch.float64)
    return q, k, v


def _split_keys(gen, sk: int, parts: int, contiguous: bool) -> list[torch.Tensor]:
    """Disjoint bool key sets [Sk] covering 0..Sk-1."""
    if contiguous:
        cuts = sorted(torch.randint(0, sk + 1, (parts - 1,), generator=gen).tolist())
        bounds = [0, *cuts, sk]
        label = torch.zeros(sk, dtype=torch.long)
        for p, (a, b) in enumerate(zip(bounds, bounds[1:])):
            label[a:b] = p
    else:
        label = torch.randint(0, parts, (sk,), generator=gen)
    return [label == p for p in range(parts)]


def _masks(sq, sk):
    return {
        "full": torch.ones(sq, sk, dtype=torch.bool),
        "causal": Mask.causal(sq, sk).to_dense(),
        "window": Mask.sliding_window(sq, (6, 2), sk).to_dense(),
        # rows 30.. see nothing at all
        "sparse": dense_from_rects(
            [(0, 12), (8, 30)], [(40, 59), (0, 9)], ["causal", "full"], sq, sk
        ),
    }


def _merge64(parts):
    """Independent float64 merge: softmax weights over the parts' lse."""
    lses = torch.stack([l.double() for _, l in parts])
    lse = torch.logsumexp(lses, dim=0)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    w = torch.exp(lses - safe)
    out = sum(wi.unsqueeze(-1) * o.double() for (o, _), wi in zip(parts, w))
    return out, lse


def _partials(q, k, v, dense, key_sets, scale):
    parts = []
    for keys in key_sets:
        out, lse = attention_oracle(q, k, v, dense & keys.view(1, -1), scale)
        parts.append((out, lse))
    return parts


# Parts in float32 merge in float32; float64 parts merge in float64 (acc dtype).
TOL = {torch.float32: (2e-6, 1e-5), torch.float64: (1e-12, 1e-12)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("contiguous", [True, False], ids=["chunks", "scattered"])
@pytest.mark.parametrize("mask_name", ["full", "causal", "window", "sparse"])
@pytest.mark.parametrize("n_parts", [2, 3, 4])
def test_merge_equals_union(n_parts, mask_name, contiguous, dtype):
    gen = torch.Generator().manual_seed(1000 * n_parts + len(mask_name) + contiguous)
    q, k, v = _qkv(gen)
    sq, sk = q.shape[2], k.shape[2]
    dense = _masks(sq, sk)[mask_name]
    scale = 1 / math.sqrt(q.shape[-1])
    ref_out, ref_lse = attention_oracle(q, k, v, dense, scale)
    parts = _partials(q, k, v, dense, _split_keys(gen, sk, n_parts, contiguous), scale)
    parts = [(o.to(dtype), l.to(dtype)) for o, l in parts]
    empty_rows = ~dense.any(dim=1)
    out_tol, lse_tol = TOL[dtype]

    # merge: pairwise fold
    out, lse = parts[0]
    for o, l in parts[1:]:
        out, lse = merge(out, lse, o, l)
    # merge_: float32 accumulators seeded with the empty result
    acc_out = torch.zeros(ref_out.shape, dtype=dtype)
    acc_lse = torch.full(ref_lse.shape, NEG_INF, dtype=dtype)
    for o, l in parts:
        merge_(acc_out, acc_lse, o, l)
    # merge_many: all at once
    many_out, many_lse = merge_many(parts)

    for name, (o, l) in {
        "merge": (out, lse),
        "merge_": (acc_out, acc_lse),
        "merge_many": (many_out, many_lse),
    }.items():
        assert o.dtype == dtype and l.dtype == dtype, name
        assert not torch.isnan(o).any() and not torch.isnan(l).any(), name
        assert max_err(o, ref_out) < out_tol, f"{name}: out error {max_err(o, ref_out):.2e}"
        # lse: -inf exactly where the row saw nothing, float32-close elsewhere.
        assert torch.equal(torch.isneginf(l), torch.isneginf(ref_lse)), name
        assert torch.isneginf(l[..., empty_rows]).all(), name
        assert (o[..., empty_rows, :] == 0).all(), name
        fin = torch.isfinite(ref_lse)
        assert max_err(l[fin], ref_lse[fin]) < lse_tol, f"{name}: lse error"


def test_merge_is_symmetric_and_identity_on_empty():
    gen = torch.Generator().manual_seed(5)
    q, k, v = _qkv(gen, sq=11, sk=23)
    dense = Mask.causal(11, 23).to_dense()
    a, b = _partials(q, k, v, dense, _split_keys(gen, 23, 2, True), 0.3)
    ab, ba = merge(*a, *b), merge(*b, *a)
    assert max_err(ab[0], ba[0]) < 1e-6 and max_err(ab[1], ba[1]) < 1e-6
    empty = (torch.zeros_like(a[0]), torch.full_like(a[1], NEG_INF))
    for out, lse in (merge(*a, *empty), merge(*empty, *a), merge_many([a, empty])):
        assert max_err(out, a[0]) < 1e-6
        assert max_err(lse, a[1]) < 1e-5


def test_merge_one_side_neg_inf():
    gen = torch.Generator().manual_seed(2)
    out_a = torch.randn(3, 5, 8, generator=gen)
    lse_a = torch.randn(3, 5, generator=gen)
    out_b = torch.randn(3, 5, 8, generator=gen)  # garbage under -inf must be ignored
    lse_b = torch.full((3, 5), NEG_INF)
    lse_b[0, 1] = 0.5  # one row where b contributes
    out, lse = merge(out_a, lse_a, out_b, lse_b)
    keep = torch.isneginf(lse_b)
    assert torch.equal(out[keep], out_a[keep])
    assert torch.equal(lse[keep], lse_a[keep])
    w = torch.softmax(torch.tensor([lse_a[0, 1].item(), 0.5], dtype=torch.float64), 0)
    expect = w[0] * out_a[0, 1].double() + w[1] * out_b[0, 1].double()
    assert max_err(out[0, 1], expect) < 1e-6
    assert abs(lse[0, 1].item() - math.log(math.exp(lse_a[0, 1].item()) + math.exp(0.5))) < 1e-6


def test_merge_both_neg_inf_gives_zero_no_nan():
    gen = torch.Generator().manual_seed(3)
    out_a = torch.randn(2, 4, 6, generator=gen)
    out_b = torch.randn(2, 4, 6, generator=gen)
    lse = torch.full((2, 4), NEG_INF)
    for got_out, got_lse in (
        merge(out_a, lse, out_b, lse),
        merge_many([(out_a, lse), (out_b, lse), (out_a, lse)]),
    ):
        assert not torch.isnan(got_out).any() and not torch.isnan(got_lse).any()
        assert (got_out == 0).all()
        assert torch.isneginf(got_lse).all()
    acc_out, acc_lse = torch.zeros(2, 4, 6), lse.clone()
    merge_(acc_out, acc_lse, out_b, lse)
    assert (acc_out == 0).all() and torch.isneginf(acc_lse).all()


def test_merge_large_lse_gap_stays_finite():
    """Factoring out the larger lse: lse values far beyond exp's float32 range."""
    gen = torch.Generator().manual_seed(4)
    out_a, out_b = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    lse_a = torch.tensor([1000.0, -1000.0, 500.0, 88.0])
    lse_b = torch.tensor([1000.0, -1000.0, -500.0, 90.0])
    out, lse = merge(out_a, lse_a, out_b, lse_b)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    ref_lse = torch.logaddexp(lse_a.double(), lse_b.double())
    assert max_err(lse, ref_lse) < 1e-3
    wa = torch.exp(lse_a.double() - ref_lse).unsqueeze(-1)
    wb = torch.exp(lse_b.double() - ref_lse).unsqueeze(-1)
    assert max_err(out, wa * out_a.double() + wb * out_b.double()) < 1e-5


@pytest.mark.parametrize(
    "out_dtype,lse_dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),
        (torch.float32, torch.bfloat16),
        # float64 accumulators are allowed, but both must share one dtype
        (torch.float32, torch.float64),
        (torch.float64, torch.float32),
    ],
    ids=str,
)
def test_merge_in_place_rejects_non_float32_accumulators(out_dtype, lse_dtype):
    acc_out = torch.zeros(2, 3, 4, dtype=out_dtype)
    acc_lse = torch.full((2, 3), NEG_INF, dtype=lse_dtype)
    out, lse = torch.ones(2, 3, 4), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="acc_out, acc_lse"):
        merge_(acc_out, acc_lse, out, lse)


def test_merge_many_rejects_empty():
    with pytest.raises(ValueError, match="parts"):
        merge_many([])


def test_bf16_inputs_merged_in_float32():
    gen = torch.Generator().manual_seed(6)
    q, k, v = _qkv(gen, sq=29, sk=41, d=32)
    dense = Mask.sliding_window(29, (9, 0), 41).to_dense()
    scale = 0.2
    ref_out, ref_lse = attention_oracle(q, k, v, dense, scale)
    parts = _partials(q, k, v, dense, _split_keys(gen, 41, 3, False), scale)
    parts16 = [(o.bfloat16(), l.bfloat16()) for o, l in parts]
    exact = _merge64(parts16)

    out, lse = merge(*parts16[0], *parts16[1])
    out, lse = merge(out, lse, *parts16[2])
    many_out, many_lse = merge_many(parts16)
    acc_out = parts16[0][0].float()
    acc_lse = parts16[0][1].float()
    merge_(acc_out, acc_lse, *parts16[1])
    merge_(acc_out, acc_lse, *parts16[2])
    for name, (o, l) in {
        "merge": (out, lse),
        "merge_many": (many_out, many_lse),
        "merge_": (acc_out, acc_lse),
    }.items():
        assert o.dtype == torch.float32 and l.dtype == torch.float32, name
        # Merging adds only float32 rounding on top of the bf16 inputs ...
        assert max_err(o, exact[0]) < 1e-5, name
        assert max_err(l, exact[1]) < 1e-5, name
        # ... and the result is as close to the truth as the bf16 parts allow.
        assert max_err(o, ref_out) < 2e-2, name
