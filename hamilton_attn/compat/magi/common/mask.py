"""Between MagiAttention's ``(q_ranges, k_ranges, attn_mask_type)`` triples and the
core's :class:`hamilton_attn.Mask` (``magi_attention.common.mask`` holds its mask type)."""

from __future__ import annotations

import functools

from ....masks import Mask
from .enum import AttnMaskType
from .ranges import AttnRanges

__all__ = ["mask_from_ranges", "triple_from_mask"]


@functools.lru_cache(maxsize=256)
def mask_from_ranges(qr: tuple, kr: tuple, types: tuple, seqlen_q: int, seqlen_k: int) -> Mask:
    """``Mask.from_ranges``, cached: ported training loops rebuild the same ranges (and
    so the same key) every step."""
    return Mask.from_ranges(qr, kr, types, seqlen_q, seqlen_k)


def triple_from_mask(
    mask: Mask, q_offset: int = 0, k_offset: int = 0
) -> tuple[AttnRanges, AttnRanges, list[AttnMaskType]]:
    """The mask's disjoint typed rectangles, sorted by rows, moved by ``(q_offset,
    k_offset)`` (a mask built on one rectangle of a larger grid)."""
    rects = sorted(mask.ranges, key=lambda r: (r[0], r[1]))
    q = AttnRanges.from_ranges([(a + q_offset, b + q_offset) for (a, b), _, _ in rects])
    k = AttnRanges.from_ranges([(a + k_offset, b + k_offset) for _, (a, b), _ in rects])
    return q, k, [kind for _, _, kind in rects]
