"""The ``triton`` backend's kernels compiled for Hopper (sm_90) on CPU, no GPU needed.

The interpreter tests run the kernels' Python; they cannot see what only Triton's
compiler checks (types across branches, what a jit function may return, shapes the
MLIR lowering takes, inline PTX). Here each launch a forward and a backward would make
on a GPU (tile configs, warps, stages, constexpr specialisations: plain, softcap, ALiBi,
sigmoid, and compiled score_mods) is captured instead of launched and compiled by
``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` down to a cubin (Triton's wheel
carries ptxas).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from hamilton_attn.kernels import triton as tk  # noqa: E402
from hamilton_attn.masks import Mask  # noqa: E402
from hamilton_attn.testing.triton_compile import captured_launches, compile_sm90  # noqa: E402
from hamilton_attn.variants import BlockVariant  # noqa: E402

_DOCS = Mask.varlen([0, 100, 300, 301, 700, 1000], causal=True)
_REL = torch.linspace(-1, 1, 4 * 65).sin().view(4, 65)
_DOC_ID = torch.arange(1000) // 77
_MODS = {
    "relative": lambda s, b, h, q, k: s - 0.01 * (q - k),
    "tables_ints": lambda s, b, h, q, k: torch.where(
        (q >= k) & (_DOC_ID[q] == _DOC_ID[k]),
        s + _REL[h % 4, (q - k).clamp(-32, 32) + 32] + ((q - k) // 7) * 0.01 - (q - k) % 5,
        -1e4,
    ),
    "elementwise": lambda s, b, h, q, k: (
        torch.maximum(s.clamp(-1.5, 1.0), 0.3 * s)
        + torch.rsqrt(s * s + 1.0)
        + torch.sigmoid(s) ** 2
        - torch.log(s * s + 2.0)
        + torch.cos(s)
        + torch.sign(q - k)
    ),
    # torch's float rounding and NaN rules, half / bfloat16 rounding, masked_fill
    "rounding_nan": lambda s, b, h, q, k: (
        torch.fmax(torch.log(s), s)
        + torch.remainder(s, 1.0 + s * s)
        + (q.float() // 0.1) * 0.01
        + ((q - k).float() * 0.01).to(torch.bfloat16).float()
        + ((q + k).float() * 0.013).half()
        + torch.clamp(s, min=0.5 * s - 0.2, max=0.8 + 0.1 * s * s)
    ).masked_fill(k > q + 30, -1e4),
}
CASES = {
    "plain causal bf16": (Mask.causal(1000), None, torch.bfloat16, 0),
    "softcap docs bf16": (_DOCS, dict(kind="softmax", softcap=20.0), torch.bfloat16, 0),
    "alibi docs, slopes' grad": (_DOCS, dict(kind="softmax", alibi="grad"), torch.bfloat16, 0),
    "sigmoid docs fp16, dQ by atomics": (_DOCS, dict(kind="sigmoid", bias=-1.0), torch.float16, 1),
    **{
        f"score_mod {name} bf16": (_DOCS, dict(kind="softmax", score_mod=fn), torch.bfloat16, 0)
        for name, fn in _MODS.items()
    },
    "score_mod + softcap + alibi fp32": (
        Mask.causal(1000),
        dict(kind="softmax", softcap=10.0, alibi="plain", score_mod=_MODS["relative"]),
        torch.float32,
        1,
    ),
    "score_mod relu fp16": (
        _DOCS,
        dict(kind="relu", score_mod=_MODS["elementwise"]),
        torch.float16,
        0,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernels_compile_for_hopper(name):
    mask, spec, dtype, dq_add = CASES[name]
    var = None
    if spec is not None:
        spec = dict(spec)
        alibi = spec.pop("alibi", None)
        if alibi is not None:
            spec["alibi"] = torch.rand(1, 4)
        var = BlockVariant(**spec)
        if alibi == "grad":
            var.alibi_grad = torch.zeros(1, 4)
    sq, sk = mask.shape
    q = torch.randn(1, 4, sq, 128, dtype=dtype)
    k, v = (torch.randn(1, 2, sk, 128, dtype=dtype) for _ in range(2))
    with captured_launches(dq_add) as launches:
        kern = tk.TritonKernel()
        out, lse = kern.forward(q, k, v, mask, 0.1, variant=var)
        kern.backward(torch.randn_like(out), q, k, v, out, lse, mask, 0.1, variant=var)
    kinds = {fn.fn.__name__ for fn, _, _ in launches}
    assert {"fwd_kernel", "dkdv_kernel"} <= kinds
    for fn, args, kw in launches:
        assert "cubin" in compile_sm90(fn, args, kw).asm


@pytest.mark.parametrize("name", ["plain causal bf16", "sigmoid docs fp16, dQ by atomics"])
def test_head_groups_compile_for_hopper(name, monkeypatch):
    """Programs of several heads per row tile (``HEAD_GROUP``: the launch index split
    into group, tile and head) compile in every pass."""
    monkeypatch.setattr(tk, "HEAD_GROUP", 5)
    test_kernels_compile_for_hopper(name)
