"""Which local backend ``linear_attention(backend="auto" | "fla")`` runs, on CPU.

fla-core's kernels need CUDA, so a fake fla backend stands in (``api._fla``): available,
refusing what fla-core 0.6.0 refuses (a gradient of ``g_gamma``; on Hopper with Triton
in [3.4, 3.7.1), the backward of a per-token gate), and computing through the torch
path, so every result is also checked against the float64 recurrence. The calls record
which path ran and the gate's shape it got.

Legend: B batch, S tokens, H heads, K key dim, V value dim; bshd.
"""

from __future__ import annotations

import pytest
import torch

from hamilton_attn.linear import api, linear_attention
from hamilton_attn.linear.chunked import chunked_local
from hamilton_attn.testing.linear_oracle import linear_recurrence_oracle
from hamilton_attn.testing.oracle import max_err

B, S, H, K, V = 2, 37, 3, 4, 5


class FakeFla:
    """fla_backend's three entry points; ``hopper_refusal``: refuse the gated backward."""

    def __init__(self, hopper_refusal: bool):
        self.hopper_refusal = hopper_refusal
        self.gates: list = []  # per fla_local call, its gate's shape (None: no gate)

    def fla_available(self, device) -> bool:
        return True

    def fla_unsupported_reason(self, q, g, *, needs_grad: bool):
        if g is not None and g.dim() == 1 and g.requires_grad:
            return "fla has no gradient for a constant decay [H] (its g_gamma)"
        if needs_grad and g is not None and g.dim() == 3 and self.hopper_refusal:
            return "fla-core refuses the backward of a per-token gate on Hopper"
        return None

    def fla_local(self, q, k, v, g, scale, cu_seqlens=None, initial_state=None):
        self.gates.append(None if g is None else tuple(g.shape))
        full = torch.zeros(q.shape[:3]) if g is None else g.float().expand(q.shape[:3])
        return chunked_local(q, k, v, full, scale, cu_seqlens, initial_state)


@pytest.fixture
def paths(monkeypatch):
    """``(fake fla, torch-path call count)``; the fake's refusal is set per test."""
    fake, torch_calls = FakeFla(hopper_refusal=False), []

    def counted(*args, **kwargs):
        torch_calls.append(1)
        return chunked_local(*args, **kwargs)

    monkeypatch.setattr(api, "_fla", lambda: fake)
    monkeypatch.setattr(api, "chunked_local", counted)
    return fake, torch_calls


def _run(gate: str, grad: bool, backend="auto"):
    """Forward (and backward where ``grad``) of a float32 call; max error of o against
    the float64 recurrence (and of each gradient)."""
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(B, S, H, K, generator=gen) for _ in range(2))
    v = torch.randn(B, S, H, V, generator=gen)
    g = -torch.rand(*((B, S, H) if gate == "token" else (H,)), generator=gen)
    leaves = [t.requires_grad_(grad) for t in (q, k, v, g)]
    with torch.set_grad_enabled(grad):
        o = linear_attention(*leaves, backend=backend)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref, _ = linear_recurrence_oracle(*ref_leaves)
    errs = [max_err(o, ref)]
    if grad:
        w = torch.linspace(-1, 1, o.numel()).view_as(o)
        got = torch.autograd.grad((o * w).sum(), leaves)
        want = torch.autograd.grad((ref * w.double()).sum(), ref_leaves)
        errs += [max_err(a, b) for a, b in zip(got, want, strict=True)]
    return max(errs)


def test_gated_backward_refused_falls_back_to_torch(paths):
    fake, torch_calls = paths
    fake.hopper_refusal = True
    assert _run("token", grad=True) < 1e-4
    assert fake.gates == [] and len(torch_calls) == 1


def test_gated_forward_only_stays_on_fla_despite_the_refusal(paths):
    fake, torch_calls = paths
    fake.hopper_refusal = True
    assert _run("token", grad=False) < 1e-4
    assert fake.gates == [(B, S, H)] and not torch_calls


def test_gated_backward_runs_on_fla_where_not_refused(paths):
    fake, torch_calls = paths
    assert _run("token", grad=True) < 1e-4
    assert fake.gates == [(B, S, H)] and not torch_calls


def test_constant_gate_without_grad_reaches_fla_as_g_gamma(paths):
    fake, torch_calls = paths
    assert _run("constant", grad=False) < 1e-4
    assert fake.gates == [(H,)] and not torch_calls


def test_constant_gate_with_grad_reaches_fla_per_token(paths):
    """fla has no gradient for g_gamma: the gate goes per token (fla differentiates it;
    autograd sums the expanded gradient back to [H])."""
    fake, torch_calls = paths
    assert _run("constant", grad=True) < 1e-4
    assert fake.gates == [(B, S, H)] and not torch_calls


def test_constant_gate_with_grad_refused_falls_back_to_torch(paths):
    fake, torch_calls = paths
    fake.hopper_refusal = True
    assert _run("constant", grad=True) < 1e-4
    assert fake.gates == [] and len(torch_calls) == 1


def test_explicit_fla_refused_is_a_value_error_naming_backend(paths):
    fake, torch_calls = paths
    fake.hopper_refusal = True
    with pytest.raises(ValueError, match=r"^backend: 'fla' cannot run this call: .*Hopper"):
        _run("token", grad=True, backend="fla")
    assert fake.gates == [] and not torch_calls
