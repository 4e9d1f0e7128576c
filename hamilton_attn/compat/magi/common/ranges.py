"""MagiAttention's ``AttnRanges`` (``magi_attention.common.ranges``), and the parsing of
the ``(q_ranges, k_ranges, attn_mask_type)`` rectangles every mask argument takes."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .._args import as_int_list
from .enum import AttnMaskType
from .range import AttnRange

__all__ = ["AttnRanges", "as_rects"]


class AttnRanges:
    """An ordered list of :class:`AttnRange` (one per mask rectangle, in MagiAttention).

    Build with :meth:`from_ranges` (pairs, ``AttnRange`` objects, another ``AttnRanges``
    or an int tensor ``[n, 2]``) or :meth:`from_cu_seqlens`.
    """

    __slots__ = ("_ranges",)

    def __init__(self) -> None:
        self._ranges: list[AttnRange] = []

    @staticmethod
    def from_ranges(ranges, check: bool = False) -> AttnRanges:
        out = AttnRanges()
        if isinstance(ranges, AttnRanges):
            out._ranges = list(ranges._ranges)
            return out
        if isinstance(ranges, torch.Tensor):
            if ranges.dim() != 2 or ranges.shape[1] != 2:
                raise ValueError(
                    f"ranges: expected an int tensor of shape [n, 2], got {tuple(ranges.shape)}"
                )
            ranges = ranges.tolist()
        out._ranges = [AttnRange.from_range(r) for r in ranges]
        return out

    @staticmethod
    def from_cu_seqlens(cu_seqlens, seq_len: int | None = None) -> AttnRanges:
        """``[cu[i], cu[i+1])`` for each i; ``cu`` starts at 0, is strictly increasing
        (a repeated boundary raises, as in MagiAttention) and, when ``seq_len`` is given,
        ends at ``seq_len``. An empty ``cu`` gives an empty AttnRanges."""
        cu = as_int_list(cu_seqlens, "cu_seqlens")
        if not cu:
            # MagiAttention: no boundaries, no ranges (whatever seq_len says)
            return AttnRanges()
        # Stricter than the core's cu_seqlens (which allows empty documents): MagiAttention
        # refuses a repeated boundary here, and ported code relies on the error.
        if cu[0] != 0 or any(b <= a for a, b in zip(cu, cu[1:])):
            raise ValueError(
                f"cu_seqlens: expected 0 = cu[0] < cu[1] < ... (strictly increasing), got {cu}"
            )
        if seq_len is not None and cu[-1] != seq_len:
            raise ValueError(f"cu_seqlens: expected to end at seq_len={seq_len}, got {cu[-1]}")
        return AttnRanges.from_ranges(list(zip(cu, cu[1:])))

    def append(self, attn_range, check: bool = False) -> None:
        self._ranges.append(AttnRange.from_range(attn_range))

    def extend(self, attn_ranges, check: bool = False) -> None:
        self._ranges.extend(AttnRanges.from_ranges(attn_ranges)._ranges)

    def to_naive_ranges(self) -> list[tuple[int, int]]:
        return [r.to_naive_range() for r in self._ranges]

    def to_tensor(self, device="cpu") -> torch.Tensor:
        """Int32 ``[n, 2]``."""
        return torch.tensor(self.to_naive_ranges(), dtype=torch.int32, device=device).view(-1, 2)

    def clone(self) -> AttnRanges:
        return AttnRanges.from_ranges(self)

    def sort(self) -> AttnRanges:
        """Sorted by start (stable)."""
        return AttnRanges.from_ranges(sorted(self._ranges, key=lambda r: r.start))

    def merge(self) -> AttnRanges:
        """Sorted, with overlapping or touching ranges joined."""
        out: list[list[int]] = []
        for r in self.sort():
            if out and r.start <= out[-1][1]:
                out[-1][1] = max(out[-1][1], r.end)
            else:
                out.append([r.start, r.end])
        return AttnRanges.from_ranges(out)

    def is_non_overlap(self) -> bool:
        return self.total_seqlen == self.merge().total_seqlen

    def is_cu_seqlens(self, seqlen: int) -> bool:
        """Whether the ranges tile ``[0, seqlen)`` in order."""
        pos = 0
        for r in self._ranges:
            if r.start != pos:
                return False
            pos = r.end
        return pos == seqlen

    def to_cu_seqlens(self, seq_len: int) -> list[int]:
        if not self.is_cu_seqlens(seq_len):
            raise ValueError(f"ranges: {self} do not tile [0, {seq_len}) in order")
        return [0] + [r.end for r in self._ranges]

    @property
    def total_seqlen(self) -> int:
        """Sum of the ranges' lengths (overlaps counted as often as they occur)."""
        return sum(r.seqlen for r in self._ranges)

    @property
    def max_seqlen(self) -> int:
        return max((r.seqlen for r in self._ranges), default=0)

    @property
    def size(self) -> int:
        return len(self._ranges)

    @property
    def start(self) -> int:
        if not self._ranges:
            raise ValueError("ranges: empty, so there is no start")
        return min(r.start for r in self._ranges)

    @property
    def end(self) -> int:
        if not self._ranges:
            raise ValueError("ranges: empty, so there is no end")
        return max(r.end for r in self._ranges)

    def is_empty(self) -> bool:
        return not self._ranges

    def __len__(self) -> int:
        return len(self._ranges)

    def __iter__(self) -> Iterator[AttnRange]:
        return iter(self._ranges)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return AttnRanges.from_ranges(self._ranges[idx])
        return self._ranges[idx]

    def __eq__(self, other) -> bool:
        return isinstance(other, AttnRanges) and self._ranges == other._ranges

    def __hash__(self) -> int:
        return hash(tuple(self._ranges))

    def __repr__(self) -> str:
        return f"AttnRanges({self._ranges})"


def _as_pairs(ranges, name: str) -> tuple[tuple[int, int], ...]:
    """``((start, end), ...)`` from AttnRanges, a pair list or an int tensor [n, 2]."""
    if isinstance(ranges, torch.Tensor) and ranges.is_floating_point():
        raise ValueError(f"{name}: expected an int tensor, got {ranges.dtype}")
    try:
        return tuple(AttnRanges.from_ranges(ranges).to_naive_ranges())
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def _as_types(attn_mask_type, n: int, name: str) -> tuple[AttnMaskType, ...]:
    """One AttnMaskType per rectangle; a single value (str, enum, 0..3) is broadcast."""
    if isinstance(attn_mask_type, torch.Tensor):
        attn_mask_type = attn_mask_type.tolist()
    if isinstance(attn_mask_type, (str, int, AttnMaskType)):
        attn_mask_type = [attn_mask_type] * n
    types = list(attn_mask_type)
    if len(types) != n:
        raise ValueError(f"{name}: expected {n} entries (one per range), got {len(types)}")
    return tuple(AttnMaskType.parse(t, arg=f"{name}[{i}]") for i, t in enumerate(types))


def as_rects(q_ranges, k_ranges, attn_mask_type, types_name: str):
    """``(q pairs, k pairs, types)`` as tuples (hashable: they key the mask cache);
    rectangle i is ``q_ranges[i] x k_ranges[i]`` of kind ``types[i]``. ``types_name`` is
    the argument's name in the caller (``attn_mask_type`` or ``attn_type_map``)."""
    qr = _as_pairs(q_ranges, "q_ranges")
    kr = _as_pairs(k_ranges, "k_ranges")
    if len(qr) != len(kr):
        raise ValueError(f"k_ranges: expected {len(qr)} ranges like q_ranges, got {len(kr)}")
    return qr, kr, _as_types(attn_mask_type, len(qr), types_name)
