"""MagiAttention's one-device kernel entry (``magi_attention.functional.flex_flash_attn``),
on the core's :func:`hamilton_attn.attention`."""

from __future__ import annotations

import torch

from ....attention import attention
from .._args import check_unsupported, is_int, lse_dtype
from ..common.mask import mask_from_ranges
from ..common.ranges import as_rects

__all__ = ["flex_flash_attn_func"]


def flex_flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_ranges,
    k_ranges,
    attn_type_map=None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    softmax_scale: float | None = None,
    softcap: float = 0.0,
    deterministic: bool = False,
    sm_margin: int = 0,
    disable_fwd_atomic_reduction: bool = False,
    auto_range_merge: bool = False,
    ref_block_size=None,
    *,
    sink: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention on one device for a mask of rectangles; differentiable in q, k, v.

    Args:
        q: ``(Tq, Hq, D)``; k, v: ``(Tk, Hk, D)``, Hq % Hk == 0.
        q_ranges, k_ranges: int tensors ``[n, 2]`` (or pair lists / :class:`AttnRanges`);
            rectangle i is ``q_ranges[i] x k_ranges[i]``. Overlaps are a union.
        attn_type_map: int ``[n]``, 0 full / 1 causal (bottom-right) / 2 inv_causal
            (top-left) / 3 bi_causal (both); None: all full.
        max_seqlen_q, max_seqlen_k: accepted, unused (kernel hints in MagiAttention).
            MagiAttention's older positional order ``(..., k_ranges, max_seqlen_q,
            max_seqlen_k, attn_type_map)`` is recognised by the int in 6th place.
        softmax_scale: default ``1 / sqrt(D)``.
        softcap, sink: unsupported (0 / None). deterministic, sm_margin,
            disable_fwd_atomic_reduction, auto_range_merge, ref_block_size: ignored.

    Returns ``(out, lse)``: out ``(Tq, Hq, D)`` in q's dtype; lse ``(Tq, Hq)`` float32
    (float64 for float64 inputs). A query no rectangle covers gets out 0, lse -inf.
    """
    if is_int(attn_type_map):  # MagiAttention < 1.0: (max_seqlen_q, max_seqlen_k, map)
        attn_type_map, max_seqlen_q, max_seqlen_k = max_seqlen_k, attn_type_map, max_seqlen_q
    check_unsupported(sink, softcap)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a (T, H, D) tensor, got {shape}")
    types = 0 if attn_type_map is None else attn_type_map
    rects = as_rects(q_ranges, k_ranges, types, "attn_type_map")
    mask = mask_from_ranges(*rects, q.shape[0], k.shape[0])
    out, lse = attention(
        q.unsqueeze(0),
        k.unsqueeze(0),
        v.unsqueeze(0),
        mask,
        scale=softmax_scale,
        layout="bshd",
        return_lse=True,
    )
    # [Hq, Tq] -> [Tq, Hq], MagiAttention's token-major lse
    return out[0], lse_dtype(lse[0].transpose(0, 1)).contiguous()
