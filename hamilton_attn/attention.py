"""One-device attention for any mask: ``attention(q, k, v, mask)``."""

from __future__ import annotations

import functools
import math
import numbers

import torch

from .kernels import BACKENDS, check_block, empty_result, select_kernel
from .masks import Mask

LAYOUTS = ("bshd", "bhsd", "thd")


def to_bhsd(x: torch.Tensor, layout: str, name: str) -> torch.Tensor:
    """A ``bhsd`` view of a tensor in ``layout`` (no copy)."""
    want = 3 if layout == "thd" else 4
    if x.dim() != want:
        raise ValueError(
            f"{name}: layout {layout!r} expects a {want}-d tensor, got {x.dim()}-d "
            f"of shape {tuple(x.shape)}"
        )
    if layout == "bshd":
        return x.transpose(1, 2)
    if layout == "thd":
        return x.unsqueeze(0).transpose(1, 2)
    return x


def from_bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "bshd":
        return x.transpose(1, 2)
    if layout == "thd":
        return x.transpose(1, 2).squeeze(0)
    return x


DOUBLE_BACKWARD_ERROR = (
    "hamilton_attn: attention has no double backward (its backward is "
    "once_differentiable): gradients taken with create_graph=True cannot be "
    "differentiated again"
)


class _NoDoubleBackward(torch.autograd.Function):
    """``x`` itself, hung on ``anchors`` (the inputs q, k, v) so that autograd finds a
    path from them through it, and raises when it takes it."""

    @staticmethod
    def forward(ctx, x, *anchors):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, *_grads):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def once_differentiable(backward):
    """For an ``autograd.Function.backward`` whose math is not differentiable: it runs
    without a graph, and under ``create_graph=True`` its gradients come back marked so
    that differentiating them raises :data:`DOUBLE_BACKWARD_ERROR`. The Function's first
    three saved tensors must be its inputs q, k, v. (torch's own ``once_differentiable``
    marks gradients only when an incoming gradient requires grad, and hangs the mark on
    fresh leaves, so ``grad(dq.sum(), q)`` failed with "does not require grad" or "not
    used in the graph" instead; before either, the kernels' backward ops were
    differentiated as if out and lse were constants: second derivatives off by 8-116,
    issue #14.)"""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        create_graph = torch.is_grad_enabled()
        with torch.no_grad():
            results = backward(ctx, *grads)
        if not create_graph:
            return results
        anchors = [t for t in ctx.saved_tensors[:3] if t.requires_grad]
        anchors += [g for g in grads if isinstance(g, torch.Tensor) and g.requires_grad]
        return tuple(
            _NoDoubleBackward.apply(g, *anchors) if isinstance(g, torch.Tensor) else g
            for g in results
        )

    return wrapper


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale, kernel):
        if mask.is_empty():
            out, lse = empty_result(q, v)
        else:
            out, lse = kernel.forward(q, k, v, mask, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale, ctx.kernel = mask, scale, kernel
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if ctx.mask.is_empty():
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None, None, None
        dq, dk, dv = ctx.kernel.backward(dout, q, k, v, out, lse, ctx.mask, ctx.scale)
        return dq, dk, dv, None, None, None


def resolve_scale(scale, q: torch.Tensor) -> float | None:
    """The softmax scale for queries ``q`` (head dim last): ``scale`` as a float, or
    ``1 / sqrt(D)`` for None. Raises ValueError for a head dim of 0 and for a scale that
    is not a finite real number (inf or NaN make every score NaN). A 0-d ``q`` is left to
    the shape checks: None stays None."""
    if isinstance(q, torch.Tensor) and q.dim() and q.shape[-1] <= 0:
        raise ValueError(f"q: head dim D must be > 0, got shape {tuple(q.shape)}")
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1]) if isinstance(q, torch.Tensor) and q.dim() else None
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and not scale.is_complex():
        scale = scale.item()  # a one-element tensor, as float(scale) took it before
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ValueError(f"scale: expected a finite real number or None, got {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite real number, got {scale!r}")
    return float(scale)


def resolve_mask(mask: Mask | None, causal: bool, seqlen_q: int, seqlen_k: int) -> Mask:
    if mask is not None and causal:
        raise ValueError("mask, causal: give a mask or causal=True, not both")
    if mask is None:
        return Mask.causal(seqlen_q, seqlen_k) if causal else Mask.full(seqlen_q, seqlen_k)
    if not isinstance(mask, Mask):
        raise ValueError(f"mask: expected a hamilton_attn.Mask, got {type(mask).__name__}")
    if mask.shape != (seqlen_q, seqlen_k):
        raise ValueError(
            f"mask: shape {mask.shape} != (seqlen_q, seqlen_k) = "
            f"({seqlen_q}, {seqlen_k}) of the inputs"
        )
    return mask


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Mask | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "bshd",
    backend: str = "auto",
    return_lse: bool = False,
):
    """Exact softmax attention on one device, for any mask; differentiable in q, k, v.

    Args:
        q: ``[B, Sq, Hq, D]`` (layout ``bshd``, as flash-attn), ``[B, Hq, Sq, D]``
            (``bhsd``) or ``[T, Hq, D]`` (``thd``: packed tokens, B = 1; describe the
            documents with ``Mask.varlen``).
        k, v: the same layout with Sk keys and Hk heads, Hq % Hk == 0 (GQA / MQA).
        mask: a :class:`Mask` of shape ``(Sq, Sk)``; None means full attention, or
            bottom-right causal with ``causal=True`` (query i sees keys
            ``j <= i + Sk - Sq``). Giving both is an error.
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: ``auto`` (fastest that can run the mask), ``reference``, ``sdpa``, ``flex``.
        return_lse: also return the log-sum-exp of the scores per query row.

    Returns:
        ``out`` in q's layout and dtype, or ``(out, lse)`` with lse float32 of shape
        ``[B, Hq, Sq]`` (``[Hq, T]`` for thd; natural log, no gradient). A query that
        sees no key gets out 0 and lse -inf, and contributes zero gradients.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v: dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not q.is_floating_point():
        raise ValueError(f"q: expected a floating-point tensor, got {q.dtype}")
    q4, k4, v4 = (to_bhsd(t, layout, n) for t, n in ((q, "q"), (k, "k"), (v, "v")))
    mask = resolve_mask(mask, causal, q4.shape[2], k4.shape[2])
    check_block(q4, k4, v4, mask)
    scale = resolve_scale(scale, q4)
    kernel = select_kernel(backend, q4, k4, v4, mask)
    native = kernel.differentiable(q4, k4, v4, mask, scale) if torch.is_grad_enabled() else None
    out4, lse = native if native is not None else _Attention.apply(q4, k4, v4, mask, scale, kernel)
    out = from_bhsd(out4, layout)
    if not return_lse:
        return out
    return out, (lse.squeeze(0) if layout == "thd" else lse)
