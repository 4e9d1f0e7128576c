"""The local-kernel interface: one block of attention in, ``(out, lse)`` out.

Tensor legend (used across the project): B batch, S/T tokens (Sq queries, Sk keys),
H heads (Hq query heads, Hk key/value heads, Hq % Hk == 0 for GQA/MQA), D head dim,
W world size. Kernels take ``bhsd`` tensors (any strides with unit stride on D) and a
:class:`~hamilton_attn.masks.Mask` of shape ``(Sq, Sk)`` for exactly this block.

Contract of every backend:
- ``forward(q_BHSD, k_BHSD, v_BHSD, mask, scale) -> (out_BHSD, lse_BHS)``: ``out`` in
  q's dtype, ``lse`` natural-log in float32 (float64 for float64 inputs, see
  :func:`lse_dtype`); rows that see no key give out 0, lse -inf.
- ``backward(dout, q, k, v, out, lse, mask, scale) -> (dq, dk, dv)`` in the inputs'
  dtypes. ``out`` and ``lse`` may be the *merged* result over many blocks (as a
  context-parallel executor has them); the block's gradient is then its share of the
  exact gradient, so the shares of all blocks sum to the true gradient.
- A backend that runs attention variants (:meth:`AttentionKernel.variant_problem`
  returns None for them) takes ``variant=`` (a
  :class:`~hamilton_attn.variants.BlockVariant`) in both; for the unnormalised kinds
  (sigmoid, relu) ``forward`` returns ``(out, None)`` and ``backward`` ignores out /
  lse; with ALiBi slopes that require grad, ``backward`` adds the block's d(slopes)
  into ``variant.alibi_grad``. Sinks never reach a kernel.
"""

from __future__ import annotations

import torch

from ..masks import Mask


class AttentionKernel:
    """Base class of the backends; see the module docstring for the contract."""

    name: str = "?"

    def available(self, device: torch.device) -> bool:
        return True

    def unsupported_reason(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask
    ) -> str | None:
        """None if this backend can run the block, else why not (for errors and `auto`)."""
        return None

    def variant_problem(self, variant, device=None) -> str | None:
        """None if this backend runs the :class:`~hamilton_attn.variants.BlockVariant`
        ``variant`` (its ``forward`` / ``backward`` take it as ``variant=``), else why
        not (``device``: where the block runs, for backends that compile per device).
        The default: plain softmax only."""
        return f"runs plain softmax only, not the {variant.kind} variant given"

    def forward(self, q, k, v, mask: Mask, scale: float, variant=None):
        raise NotImplementedError

    def differentiable(self, q, k, v, mask: Mask, scale: float):
        """``(out, lse)`` with a native autograd graph, when the backend has one that is
        faster than forward + backward (one-device calls use it); None otherwise."""
        return None

    def backward(self, dout, q, k, v, out, lse, mask: Mask, scale: float, variant=None):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<kernel {self.name}>"


class FastPathKernel(AttentionKernel):
    """A backend whose fast path runs only some blocks, and on CPU only finite ones.

    :meth:`forward` and :meth:`backward` do what sdpa and flex both do around their fast
    path: check the shapes (:func:`check_block`), answer a block that sees no key, refuse
    a block the backend cannot run (ValueError from :meth:`_prepare`), and hand a CPU
    block with a non-finite input to the reference kernel, whose products keep such
    values to the rows that see them (its module docstring). Subclasses supply
    :meth:`_prepare`, :meth:`_forward` and :meth:`_backward`."""

    def _ready(self) -> None:
        """Raise if this backend cannot run at all here (checked before anything else)."""

    def _prepare(self, q, k, v, mask: Mask):
        """What the fast path needs for this block; raises ValueError if it cannot run."""
        raise NotImplementedError

    def _forward(self, q, k, v, mask: Mask, scale: float, prepared):
        raise NotImplementedError

    def _backward(self, dout, q, k, v, out, lse, mask: Mask, scale: float, prepared):
        raise NotImplementedError

    def forward(self, q, k, v, mask: Mask, scale: float, variant=None):
        """``(out [B, Hq, Sq, Dv] in q.dtype, lse [B, Hq, Sq] in lse_dtype(q.dtype))``.
        A ``variant`` (only where :meth:`variant_problem` allows it) reaches
        :meth:`_forward` as its keyword ``variant``."""
        check_block(q, k, v, mask)
        self._ready()
        if mask.is_empty():
            return empty_result(q, v)
        prepared = self._prepare(q, k, v, mask)
        kw = {} if variant is None else {"variant": variant}
        if not q.is_cuda and not all_finite(k, v):
            # The CPU fast paths' P @ V meets a non-finite V at keys a row does not see
            # (0 x NaN). On GPU the check would cost a host synchronisation per block
            # (docs/DESIGN.md).
            return reference_kernel().forward(q, k, v, mask, scale, **kw)
        return self._forward(q, k, v, mask, scale, prepared, **kw)

    def backward(self, dout, q, k, v, out, lse, mask: Mask, scale: float, variant=None):
        """This block's share of ``(dq, dk, dv)`` given the (possibly merged) out / lse."""
        check_block(q, k, v, mask)
        self._ready()
        if mask.is_empty():
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        prepared = self._prepare(q, k, v, mask)
        kw = {} if variant is None else {"variant": variant}
        if not q.is_cuda and not all_finite(q, k, v, dout, out, lse=lse):
            return reference_kernel().backward(dout, q, k, v, out, lse, mask, scale, **kw)
        return self._backward(dout, q, k, v, out, lse, mask, scale, prepared, **kw)


def check_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask) -> None:
    """Shape checks shared by every backend (bhsd)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v: expected 4-d bhsd tensors, got {q.dim()}, {k.dim()}, {v.dim()} dims"
        )
    b, hq, sq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"k, v: batch {k.shape[0]}, {v.shape[0]} != q's {b}")
    if k.shape != v.shape[:-1] + (k.shape[-1],) or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k, v: shapes disagree: {tuple(k.shape)} vs {tuple(v.shape)}")
    if k.shape[-1] != d:
        raise ValueError(f"k: head dim {k.shape[-1]} != q's {d}")
    hk = k.shape[1]
    if hk == 0 or hq % hk:
        raise ValueError(f"k, v: {hk} heads must divide q's {hq} heads (GQA/MQA)")
    if mask.shape != (sq, k.shape[2]):
        raise ValueError(f"mask: shape {mask.shape} != (Sq, Sk) = ({sq}, {k.shape[2]})")


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """lse is float32, except float64 for float64 inputs (so float64 runs stay exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def zeros_bhsd(
    like: torch.Tensor, d: int | None = None, dtype=None, *, fill: bool = True
) -> torch.Tensor:
    """Zeros shaped like ``like`` ``[B, H, S, D]`` (last dim ``d``, dtype ``dtype``) in
    ``like``'s memory order: ``bshd`` memory when its heads are inner to its tokens (the
    shards, and the kernels' outputs for them). Adds between such tensors stay
    contiguous, and results hand back to ``bshd`` without a copy. ``fill=False`` leaves
    the memory uninitialised, for a caller that writes every element."""
    b, h, s, d0 = like.shape
    d, dtype = d0 if d is None else d, like.dtype if dtype is None else dtype
    new = torch.zeros if fill else torch.empty
    if like.stride(1) < like.stride(2):
        return new(b, s, h, d, dtype=dtype, device=like.device).transpose(1, 2)
    return new(b, h, s, d, dtype=dtype, device=like.device)


def empty_result(q: torch.Tensor, v: torch.Tensor):
    """The result of a block in which no query sees any key."""
    b, h, s, _ = q.shape
    out = zeros_bhsd(q, v.shape[-1])
    lse = torch.full((b, h, s), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
    return out, lse


def expand_kv(x_BHSD: torch.Tensor, hq: int) -> torch.Tensor:
    """Repeat K/V heads so that query head h reads kv head h // (Hq // Hk)."""
    hk = x_BHSD.shape[1]
    return x_BHSD if hk == hq else x_BHSD.repeat_interleave(hq // hk, dim=1)


def reduce_kv_grad(g_BHSD: torch.Tensor, hk: int) -> torch.Tensor:
    """Sum the gradient of expanded K/V heads back onto the Hk shared heads."""
    b, hq, s, d = g_BHSD.shape
    return g_BHSD if hq == hk else g_BHSD.view(b, hk, hq // hk, s, d).sum(2)


def all_finite(*tensors: torch.Tensor, lse: torch.Tensor | None = None) -> bool:
    """True if no tensor holds a NaN or an infinity, and ``lse`` none but -inf (the lse
    of a row that sees no key).

    Under ``torch.compile`` this answers True without looking: a data-dependent branch
    would break the graph, so compiled calls take the kernels' plain paths."""
    if torch.compiler.is_compiling():
        return True
    flags = [torch.isfinite(t).all() for t in tensors]
    if lse is not None:
        flags.append((torch.isfinite(lse) | torch.isneginf(lse)).all())
    # One host synchronisation for all of them (this runs per block on the reference
    # kernel, GPU fallback included).
    return bool(torch.stack(flags).all()) if flags else True


def reference_kernel() -> AttentionKernel:
    """The reference backend, to which sdpa and flex hand blocks they cannot run exactly."""
    from . import get_kernel

    return get_kernel("reference")
