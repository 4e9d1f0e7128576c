"""MagiAttention's ``AttnRange`` (``magi_attention.common.range``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .._args import is_int

__all__ = ["AttnRange"]


@dataclass(frozen=True, slots=True, repr=False)
class AttnRange:
    """The half-open token range ``[start, end)`` with ``0 <= start <= end``; immutable,
    hashable, and it unpacks as ``start, end = r``."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not (is_int(self.start) and is_int(self.end)) or not 0 <= self.start <= self.end:
            raise ValueError(
                f"AttnRange: expected ints 0 <= start <= end, got ({self.start!r}, {self.end!r})"
            )

    @property
    def seqlen(self) -> int:
        return self.end - self.start

    @staticmethod
    def from_range(attn_range, check: bool = False) -> AttnRange:
        """From an ``AttnRange`` or a ``(start, end)`` pair (``check`` is always on)."""
        if isinstance(attn_range, AttnRange):
            return attn_range
        try:
            start, end = (int(v) for v in attn_range)
        except (TypeError, ValueError):
            raise ValueError(
                f"AttnRange: expected a (start, end) pair of ints, got {attn_range!r}"
            ) from None
        return AttnRange(start, end)

    def to_naive_range(self) -> tuple[int, int]:
        return (self.start, self.end)

    def offset(self, offset: int) -> AttnRange:
        return AttnRange(self.start + offset, self.end + offset)

    def intersect(self, other: AttnRange) -> AttnRange:
        """The common part (an empty range when there is none)."""
        start, end = max(self.start, other.start), min(self.end, other.end)
        return AttnRange(start, max(start, end))

    def is_empty(self) -> bool:
        return self.start == self.end

    def __iter__(self) -> Iterator[int]:
        yield self.start
        yield self.end

    def __len__(self) -> int:
        return self.seqlen

    def __repr__(self) -> str:
        return f"[{self.start}, {self.end})"
