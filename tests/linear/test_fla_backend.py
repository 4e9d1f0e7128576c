"""The flash-linear-attention wrapper (``hamilton_attn/linear/fla_backend.py``).

On CPU only the refusals run: fla's kernels do not run under ``TRITON_INTERPRET=1``
(fla-core 0.6.0 calls ``.to`` on loop counters, plain ints in the interpreter, and its
autotuner asks for a GPU driver), so the convention checks against the float64
recurrence (``hamilton_attn.testing.linear_oracle``) need CUDA and fla-core, and skip
without them.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from hamilton_attn.linear.fla_backend import fla_available, fla_local, fla_unsupported_reason
from hamilton_attn.testing.linear_oracle import linear_recurrence_oracle

CUDA = torch.cuda.is_available()
needs_fla = pytest.mark.skipif(
    not (CUDA and fla_available("cuda")), reason="needs a CUDA GPU and fla-core"
)


def test_unavailable_off_cuda():
    assert not fla_available("cpu")
    q = torch.zeros(1, 4, 2, 8)
    assert "CUDA" in fla_unsupported_reason(q, None, needs_grad=False)
    with pytest.raises(RuntimeError, match="CUDA"):
        fla_local(q, q, q, None, 0.5)


def _relerr(x, ref):
    return ((x.double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


CASES = [  # (B, S, cu_seqlens, gate kind, initial state)
    (2, 97, None, "token", False),
    (1, 193, [0, 1, 60, 61, 150, 193], "token", True),
    (1, 130, [0, 64, 65, 130], "constant", True),
    (2, 59, None, None, True),
]


@needs_fla
@pytest.mark.parametrize("b, s, cu, gate, with_h0", CASES)
def test_against_float64_recurrence(b, s, cu, gate, with_h0):
    # float32 inputs: fla's dots run in TF32 (10-bit mantissa), hence the tolerance.
    gen = torch.Generator().manual_seed(s)
    h, dk, dv, scale = 3, 32, 16, 0.3
    q, k = (torch.randn(b, s, h, dk, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(b, s, h, dv, generator=gen, dtype=torch.float64)
    if gate == "token":
        g = -torch.rand(b, s, h, generator=gen, dtype=torch.float64) * 0.5
    elif gate == "constant":
        g = -torch.rand(h, generator=gen, dtype=torch.float64) * 0.2
    else:
        g = torch.zeros(b, s, h, dtype=torch.float64)
    n = b if cu is None else len(cu) - 1
    h0 = torch.randn(n, h, dk, dv, generator=gen, dtype=torch.float64) if with_h0 else None
    leaves = [q, k, v] + ([g] if gate == "token" else []) + ([h0] if with_h0 else [])
    names = ["q", "k", "v"] + (["g"] if gate == "token" else []) + (["h0"] if with_h0 else [])
    for t in leaves:
        t.requires_grad_()
    o_ref, ht_ref = linear_recurrence_oracle(
        q, k, v, g, scale=scale, cu_seqlens=cu, initial_state=h0
    )
    do = torch.randn(o_ref.shape, generator=gen, dtype=torch.float64)
    dht = torch.randn(ht_ref.shape, generator=gen, dtype=torch.float64)
    grads_ref = torch.autograd.grad((o_ref * do).sum() + (ht_ref * dht).sum(), leaves)

    dev = torch.device("cuda")
    cast = [t.detach().float().to(dev).requires_grad_() for t in leaves]
    q_, k_, v_ = cast[:3]
    g_ = cast[3] if gate == "token" else (g.float().to(dev) if gate else None)
    h0_ = cast[-1] if with_h0 else None
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    o, ht = fla_local(q_, k_, v_, g_, scale, cu_t, h0_)
    assert o.shape == o_ref.shape and o.dtype == torch.float32
    assert ht.shape == ht_ref.shape and ht.dtype == torch.float32
    assert _relerr(o, o_ref.detach()) < 1e-2
    assert _relerr(ht, ht_ref.detach()) < 1e-2
    if fla_unsupported_reason(q_, g_, needs_grad=True) is not None:
        pytest.skip(fla_unsupported_reason(q_, g_, needs_grad=True))
    loss = (o * do.float().to(dev)).sum() + (ht * dht.float().to(dev)).sum()
    for name, got, ref in zip(names, torch.autograd.grad(loss, cast), grads_ref):
        assert _relerr(got, ref) < 2e-2, name


@needs_fla
def test_bf16_output_dtype_and_refusals():
    dev = torch.device("cuda")
    q = torch.randn(1, 64, 2, 64, device=dev, dtype=torch.bfloat16)
    g = -torch.rand(1, 64, 2, device=dev)
    o, ht = fla_local(q, q, q, g, 0.125)
    assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32
    assert "float64" in fla_unsupported_reason(q.double(), g, needs_grad=False)
    g_const = torch.full((2,), -0.1, device=dev, requires_grad=True)
    assert "constant" in fla_unsupported_reason(q, g_const, needs_grad=True)


def test_benchmark_script_smoke(tmp_path, monkeypatch):
    """``benchmarks/linear_attention.py --smoke``: checks pass, every section writes rows,
    and without fla on CUDA its rows are absent and fla is recorded as such."""
    bench_dir = Path(__file__).resolve().parents[2] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))  # the script imports gpu_kernels' timer
    spec = importlib.util.spec_from_file_location("linear_bench", bench_dir / "linear_attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--smoke", "--out-dir", str(tmp_path), "--name", "smoke"]) == 0
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert data["checks"] and all(c["ok"] for c in data["checks"])
    assert {r["impl"] for r in data["kernels"]} >= {"ours chunked_local (torch), g [B,S,H]"}
    assert all(math.isfinite(r["fwd_ms"]) and "fb_ms" in r for r in data["kernels"])
    assert sorted({r["W"] for r in data["exchange"]}) == [2, 4, 8]
    assert not data["errors"]
    assert "MODELLED" in (tmp_path / "smoke.md").read_text()
