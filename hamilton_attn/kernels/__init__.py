"""Local attention kernels behind one interface (see :mod:`.base`).

``get_kernel(name)`` returns a backend: ``reference`` (plain torch, any mask),
``sdpa`` (torch's aten attention ops that return lse: cuDNN / flash / efficient on
GPU, the CPU flash op on CPU; FULL and CAUSAL pieces), ``flex`` (FlexAttention, any
mask), ``triton`` (our own fused Triton kernel: any mask in one launch, and the
variants); ``sdpa+triton`` (sdpa with runs of small pieces joined into triton calls:
``auto`` weighs it where ``sdpa.MIX_PAIRS`` turns it on, off by default).
``select_kernel("auto", ...)`` picks the fastest backend that can run a block;
``memo_kernel`` remembers that choice per block for the context-parallel executor.
"""

from __future__ import annotations

import functools

import torch

from ..masks import Mask
from .base import AttentionKernel, check_block, empty_result
from .reference import ReferenceKernel

BACKENDS = ("auto", "reference", "sdpa", "flex", "triton")


@functools.cache
def get_kernel(name: str) -> AttentionKernel:
    if name == "reference":
        return ReferenceKernel()
    if name == "sdpa":
        from .sdpa import SdpaKernel

        return SdpaKernel()
    if name == "flex":
        from .flex import FlexKernel

        return FlexKernel()
    if name == "triton":
        from .triton import TritonKernel

        return TritonKernel()
    if name == "sdpa+triton":  # auto's: cuDNN for large pieces, one triton call for small
        from .sdpa import SdpaKernel

        return SdpaKernel(mix=True)
    raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")


def variant_key(variant) -> tuple | None:
    """What a kernel choice reads of a :class:`~hamilton_attn.variants.BlockVariant`:
    its kind and which features it uses (None: plain softmax)."""
    if variant is None:
        return None
    return (
        variant.kind,
        variant.softcap is not None,
        variant.alibi is not None,
        variant.score_mod is not None,
    )


def unavailable_hint(backend: str) -> str:
    """What to do where ``backend`` is not available (appended to the error)."""
    if backend == "triton":
        return (
            " (it needs CUDA; on CPU set TRITON_INTERPRET=1 or config triton_interpret=True "
            "to run it under Triton's interpreter)"
        )
    return ""


def _variant_order(q: torch.Tensor, variant) -> tuple[str, ...]:
    """``auto``'s candidates, fastest first, for a block with a variant. On GPU our
    Triton kernel first: beside compiled flex in one run (causal 32K, bf16,
    results/triton_H200_2026-12-02_s2.md) it ran softcap at 419 / 352 TF/s (flex 201 /
    155) and ALiBi at 446 / 368 (flex 298 / 231), and sigmoid and relu, which flex cannot
    run (it normalises), only it runs. A ``score_mod`` goes to triton first only where
    :data:`.triton.score_mod.AUTO` says (its compiled form is not yet timed on a GPU):
    else flex for softmax, the reference for sigmoid / relu. On CPU the reference kernel
    (flex's CPU path materialises the scores too, and is slower)."""
    if not q.is_cuda:
        return ("reference",)
    if variant.score_mod is not None:
        from .triton import score_mod

        if not score_mod.AUTO:
            return ("flex", "reference") if variant.kind == "softmax" else ("reference",)
    if variant.kind == "softmax":
        return ("triton", "flex", "reference")
    return ("triton", "reference")


def select_kernel(
    backend: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Mask,
    variant=None,
) -> AttentionKernel:
    """The kernel that runs this block: ``backend`` itself, or for ``auto`` the fastest
    that supports it: on GPU, among sdpa (FULL / CAUSAL pieces), triton, flex and, where
    :data:`.sdpa.MIX_PAIRS` turns it on, ``sdpa+triton`` (cuDNN for the large pieces, one
    triton call per run of small ones: :func:`.sdpa.mix_calls`), the one
    :mod:`.choice`'s cost model expects to finish first; else sdpa, flex,
    reference in that order. A block with a ``variant``
    (:class:`~hamilton_attn.variants.BlockVariant`) goes to a backend that supports it
    (:meth:`AttentionKernel.variant_problem`). Raises ValueError if a named backend
    cannot run it."""
    if backend != "auto":
        kernel = get_kernel(backend)
        if not kernel.available(q.device):
            raise ValueError(
                f"backend: {backend!r} is not available on {q.device}{unavailable_hint(backend)}"
            )
        reason = kernel.unsupported_reason(q, k, v, mask)
        if reason is None and variant is not None:
            reason = kernel.variant_problem(variant, q.device)
        if reason is not None:
            raise ValueError(f"backend: {backend!r} cannot run this block: {reason}")
        return kernel
    if variant is not None:
        return _first_able(_variant_order(q, variant), q, k, v, mask, variant)
    if q.is_cuda:
        from . import sdpa as sdpa_mod
        from .choice import choose

        sdpa, flex, tri = get_kernel("sdpa"), get_kernel("flex"), get_kernel("triton")
        calls = sdpa._plan(q, k, v, mask) if sdpa.available(q.device) else ""
        runs = {
            "flex": flex.available(q.device) and flex.unsupported_reason(q, k, v, mask) is None,
            "triton": tri.available(q.device) and tri.unsupported_reason(q, k, v, mask) is None,
        }
        mixed = None
        if runs["triton"] and not isinstance(calls, str) and sdpa_mod.MIX_PAIRS > 0:
            mixed = get_kernel("sdpa+triton")._plan(q, k, v, mask)
            mixed = None if isinstance(mixed, str) or mixed == calls else mixed
        if not isinstance(calls, str) or runs["flex"] or runs["triton"]:
            per_pair = 4.0 * q.shape[0] * q.shape[1] * q.shape[-1]
            name = choose(
                mask,
                None if isinstance(calls, str) else calls,
                per_pair,
                q.shape[-1],
                runs["flex"],
                runs["triton"],
                mixed,
            )
            if name is not None:
                return get_kernel(name)
    order = ("sdpa", "flex", "reference") if q.is_cuda else ("sdpa", "reference")
    return _first_able(order, q, k, v, mask)


def _first_able(order, q, k, v, mask: Mask, variant=None) -> AttentionKernel:
    """The first backend of ``order`` that can run the block (and its variant); the
    reference kernel, which runs everything, if none can."""
    for name in order:
        kernel = get_kernel(name)
        if (
            kernel.available(q.device)
            and (variant is None or kernel.variant_problem(variant, q.device) is None)
            and kernel.unsupported_reason(q, k, v, mask) is None
        ):
            return kernel
    return get_kernel("reference")


def selection_key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
    """Everything :func:`select_kernel` reads of a block's tensors: device, dtype, batch,
    query heads and head dims (the cost model's flops per pair), whether the head dim
    has unit stride, and on CUDA torch's SDPA switches. With the backend and the mask it
    decides the choice, so a memo keyed on them returns what ``select_kernel`` would."""
    unit = q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    switches = None
    if q.is_cuda:
        cuda = torch.backends.cuda
        switches = (
            cuda.cudnn_sdp_enabled(),
            cuda.flash_sdp_enabled(),
            cuda.mem_efficient_sdp_enabled(),
        )
    return (q.device, q.dtype, q.shape[0], q.shape[1], q.shape[-1], v.shape[-1], unit, switches)


def memo_kernel(
    memo: dict,
    block,
    backend: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Mask,
    variant=None,
) -> AttentionKernel:
    """:func:`select_kernel` for the block named ``block`` (whose mask is ``mask``),
    remembered in ``memo`` per backend and :func:`selection_key`: the context-parallel
    executor runs the same blocks on every call (``memo`` is the plan's). A refusal
    (ValueError) is not remembered: it is raised again on the next call."""
    key = (block, backend, selection_key(q, k, v), variant_key(variant))
    if variant is not None and variant.score_mod is not None:
        from .triton import score_mod

        if backend == "triton" or (backend == "auto" and q.is_cuda and score_mod.AUTO):
            # whether this call's score_mod compiles decides the kernel: part of the key
            got = score_mod.compiled_for(variant, q.device)
            key += (got if isinstance(got, str) else got.key,)
    kernel = memo.get(key)
    if kernel is None:
        kernel = memo[key] = select_kernel(backend, q, k, v, mask, variant)
    return kernel


__all__ = [
    "AttentionKernel",
    "BACKENDS",
    "check_block",
    "empty_result",
    "get_kernel",
    "memo_kernel",
    "select_kernel",
    "selection_key",
    "unavailable_hint",
    "variant_key",
]
