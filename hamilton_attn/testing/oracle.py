"""Shared oracles: naive dense attention in a chosen precision, and honest error bounds.

The bound follows flash-attention's tests: a kernel's error against a float64 oracle
may be at most ``factor`` times the error that plain torch math in the kernel's own
precision makes, plus a small absolute slack.
"""

from __future__ import annotations

import math

import torch


def dense_attention(q_BHSD, k_BHSD, v_BHSD, mask_dense, scale=None, dtype=None):
    """Softmax attention by the textbook formula in ``dtype`` (default q's dtype), on a
    bool ``[Sq, Sk]`` mask; rows that see nothing give 0. Differentiable."""
    dtype = dtype or q_BHSD.dtype
    hq, hk = q_BHSD.shape[1], k_BHSD.shape[1]
    scale = 1.0 / math.sqrt(q_BHSD.shape[-1]) if scale is None else scale
    q, k, v = (t.to(dtype) for t in (q_BHSD, k_BHSD, v_BHSD))
    if hk != hq:
        k, v = (t.repeat_interleave(hq // hk, dim=1) for t in (k, v))
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask_dense.to(s.device), float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # fully masked rows
    return torch.matmul(p, v)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def error_bound(ref_same_precision_err: float, *, factor: float = 2.0, atol: float = 1e-5) -> float:
    return factor * ref_same_precision_err + atol
