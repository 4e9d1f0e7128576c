"""One-device attention for any mask: ``attention(q, k, v, mask)``."""

from __future__ import annotations

import functools
import math
import numbers

import torch

from . import variants as _variants
from .kernels import BACKENDS, check_block, empty_result, select_kernel
from .kernels.base import zeros_bhsd
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


def run_forward(kernel, q, k, v, mask, scale, variant):
    """A kernel's ``(out, lse)`` for one block, the empty block answered here; ``lse`` is
    None for the unnormalised variants (sigmoid, relu)."""
    if mask.is_empty():
        if variant is not None and not variant.normalised:
            return zeros_bhsd(q, v.shape[-1]), None
        return empty_result(q, v)
    if variant is None:
        return kernel.forward(q, k, v, mask, scale)
    return kernel.forward(q, k, v, mask, scale, variant=variant)


def run_backward(kernel, dout, q, k, v, out, lse, mask, scale, variant):
    """A kernel's share ``(dq, dk, dv)`` of one block (zeros for an empty block)."""
    if mask.is_empty():
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if variant is None:
        return kernel.backward(dout, q, k, v, out, lse, mask, scale)
    return kernel.backward(dout, q, k, v, out, lse, mask, scale, variant=variant)


def param_grads(bv, sink, alibi, heads: slice, dout, out, lse):
    """The gradients of a call's ``sink`` and ``alibi_slopes`` (user shapes, zeros off
    this call's heads ``heads``) from the finished rows (bhsd) and what the kernels added
    to ``bv.alibi_grad``; None for those that need none."""
    dsink = dalibi = None
    if sink is not None and sink.requires_grad:
        dsink = torch.zeros_like(sink)
        dsink[heads] = _variants.sink_grad(dout, out, lse, sink[heads])
    if alibi is not None and alibi.requires_grad and bv is not None and bv.alibi_grad is not None:
        full = torch.zeros(
            (bv.alibi_grad.shape[0], alibi.shape[-1]),
            dtype=bv.alibi_grad.dtype,
            device=alibi.device,
        )
        full[:, heads] = bv.alibi_grad
        dalibi = (full.sum(0) if alibi.dim() == 1 else full).to(alibi.dtype)
    return dsink, dalibi


def alibi_accumulator(bv, alibi):
    """A fresh d(slopes) accumulator on ``bv`` (``bv.alibi``'s dtype) when the slopes
    require grad."""
    if bv is not None and alibi is not None and alibi.requires_grad:
        bv.alibi_grad = torch.zeros_like(bv.alibi)


class _Attention(torch.autograd.Function):
    """One-device attention of one block; ``bv`` the bound variant (None: plain), ``sink``
    and ``alibi`` the user's tensors (inputs, so that their gradients flow)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, kernel, bv, sink, alibi):
        out, lse = run_forward(kernel, q, k, v, mask, scale, bv)
        if sink is not None:
            out, lse = _variants.apply_sink(out, lse, sink)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale, ctx.kernel, ctx.bv = mask, scale, kernel, bv
        ctx.sink, ctx.alibi = sink, alibi
        if lse is None:
            lse = out.new_empty(0)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        bv, sink, alibi = ctx.bv, ctx.sink, ctx.alibi
        alibi_accumulator(bv, alibi)
        dq, dk, dv = run_backward(ctx.kernel, dout, q, k, v, out, lse, ctx.mask, ctx.scale, bv)
        heads = slice(0, q.shape[1])
        dsink, dalibi = param_grads(bv, sink, alibi, heads, dout, out, lse)
        return dq, dk, dv, None, None, None, None, dsink, dalibi


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
    variant=None,
    score_mod=None,
):
    """Exact attention on one device, for any mask and variant; differentiable in q, k,
    v (and in a variant's ``sink`` / ``alibi_slopes`` where they require grad).

    Args:
        q: ``[B, Sq, Hq, D]`` (layout ``bshd``, as flash-attn), ``[B, Hq, Sq, D]``
            (``bhsd``) or ``[T, Hq, D]`` (``thd``: packed tokens, B = 1; describe the
            documents with ``Mask.varlen``).
        k, v: the same layout with Sk keys and Hk heads, Hq % Hk == 0 (GQA / MQA).
        mask: a :class:`Mask` of shape ``(Sq, Sk)``; None means full attention, or
            bottom-right causal with ``causal=True`` (query i sees keys
            ``j <= i + Sk - Sq``). Giving both is an error.
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: ``auto`` (fastest that can run the mask and variant), ``reference``,
            ``sdpa``, ``flex``, ``triton``.
        return_lse: also return the log-sum-exp of the scores per query row (softmax
            variants only; with a sink it counts the sink).
        variant: :class:`~hamilton_attn.variants.Softmax` (default; with ``softcap``,
            ``alibi_slopes``, ``sink``), :class:`~hamilton_attn.variants.Sigmoid` or
            :class:`~hamilton_attn.variants.ReLU` (:mod:`hamilton_attn.variants` gives
            the formulas).
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` applied to the
            scaled scores first (FlexAttention's signature, called on broadcast tensors).

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
    var = _variants.resolve_variant(
        variant,
        score_mod,
        batch=q4.shape[0],
        heads=q4.shape[1],
        device=q4.device,
        seqlen_q=q4.shape[2],
        seqlen_k=k4.shape[2],
    )
    if return_lse and var is not None and not var.normalised:
        raise ValueError(f"return_lse: the {var.kind} variant is not normalised and has no lse")
    hq = q4.shape[1]
    bv = _variants.bind(
        var, score_mod, batch=q4.shape[0], heads=slice(0, hq), shift=k4.shape[2] - q4.shape[2]
    )
    kernel = select_kernel(backend, q4, k4, v4, mask, bv)
    sink = getattr(var, "sink", None)
    alibi = getattr(var, "alibi_slopes", None)
    native = None
    if bv is None and sink is None and torch.is_grad_enabled():
        native = kernel.differentiable(q4, k4, v4, mask, scale)
    if native is not None:
        out4, lse = native
    else:
        out4, lse = _Attention.apply(q4, k4, v4, mask, scale, kernel, bv, sink, alibi)
    out = from_bhsd(out4, layout)
    if not return_lse:
        return out
    return out, (lse.squeeze(0) if layout == "thd" else lse)
