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

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hamilton_attn import config  # noqa: E402
from hamilton_attn.kernels import triton as tk  # noqa: E402
from hamilton_attn.kernels.triton import launch  # noqa: E402
from hamilton_attn.masks import Mask  # noqa: E402
from hamilton_attn.variants import BlockVariant  # noqa: E402

_TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
       torch.int64: "i64", torch.int32: "i32"}  # fmt: skip


class _Capture:
    """A kernels module whose launches are recorded, not run."""

    def __init__(self, mod, seen):
        self._mod, self._seen = mod, seen

    def __getattr__(self, name):
        fn = getattr(self._mod, name)
        if not isinstance(fn, triton.runtime.jit.JITFunction):
            return fn
        seen = self._seen

        class Grid:
            def __getitem__(self, grid):
                return lambda *args, **kw: seen.append((fn, args, kw))

        return Grid()


def _compile(fn, args, kw):
    names = [p.name for p in fn.params if not p.is_constexpr]
    assert len(names) == len(args)
    sig, constexprs, opts = {}, {}, {}
    for name, a in zip(names, args, strict=True):
        if isinstance(a, torch.Tensor):
            sig[name] = "*" + _TY[a.dtype]
        elif isinstance(a, bool):
            sig[name] = "i1"
        elif isinstance(a, int):
            sig[name] = "i32" if abs(a) < 2**31 else "i64"
        else:
            sig[name] = "fp32"
    for name, val in kw.items():
        if name in ("num_warps", "num_stages"):
            opts[name] = val
        else:
            sig[name], constexprs[name] = "constexpr", val
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    assert "cubin" in out.asm


@pytest.fixture
def launches(monkeypatch):
    seen = []
    real = launch.load
    monkeypatch.setattr(tk, "load", lambda interp, src=None: _Capture(real(False, src), seen))
    monkeypatch.setattr(tk, "_interpret", lambda device: False)
    monkeypatch.setattr(tk.TritonKernel, "available", lambda self, device: True)
    with config.override(triton_interpret=False):
        yield seen


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
def test_kernels_compile_for_hopper(name, launches, monkeypatch):
    mask, spec, dtype, dq_add = CASES[name]
    monkeypatch.setattr(tk, "DQ_ADD", dq_add)
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
    kern = tk.TritonKernel()
    out, lse = kern.forward(q, k, v, mask, 0.1, variant=var)
    kern.backward(torch.randn_like(out), q, k, v, out, lse, mask, 0.1, variant=var)
    kinds = {fn.fn.__name__ for fn, _, _ in launches}
    assert {"fwd_kernel", "dkdv_kernel"} <= kinds
    for fn, args, kw in launches:
        _compile(fn, args, kw)
