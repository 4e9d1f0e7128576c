"""Bands: the diagonal strips every mask is made of, and their arithmetic.

A :class:`Band` holds the pairs ``(q, k)`` with ``q0 <= q < q1``, ``k0 <= k < k1`` and
``lo <= k - q <= hi`` in global coordinates. Bands are closed under cutting out a
sub-block, a sliding window is one band, and a band's area has a closed form. This
module also holds the helpers that build, shift, intersect and join bands; the
union of overlapping bands is in :mod:`hamilton_attn.masks.union`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

# Sentinels for an unbounded diagonal: far outside any sequence length we handle,
# yet exact in Python ints.
NEG_INF_DIAG = -(1 << 62)
POS_INF_DIAG = 1 << 62


class AttnMaskType(str, enum.Enum):
    """The four rectangle kinds (MagiAttention's names); also accepted as strings."""

    FULL = "full"
    CAUSAL = "causal"
    INV_CAUSAL = "inv_causal"
    BI_CAUSAL = "bi_causal"

    @classmethod
    def parse(cls, value: AttnMaskType | str | int, *, arg: str = "type") -> AttnMaskType:
        if isinstance(value, AttnMaskType):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            for member in cls:
                if member.value == key or member.name.lower() == key:
                    return member
        elif isinstance(value, int) and not isinstance(value, bool):
            # MagiAttention's attn_type_map integers: 0 full, 1 causal, 2 inv_causal, 3 bi_causal.
            members = list(cls)
            if 0 <= value < len(members):
                return members[value]
        raise ValueError(
            f"{arg}: expected one of {[m.value for m in cls]} (or 0..3), got {value!r}"
        )


@dataclass(frozen=True, slots=True)
class Band:
    """Pairs ``(q, k)`` with ``q0 <= q < q1``, ``k0 <= k < k1`` and ``lo <= k - q <= hi``.

    ``lo`` / ``hi`` use :data:`NEG_INF_DIAG` / :data:`POS_INF_DIAG` when unbounded.
    Bands held by a :class:`Mask` are normalised: every row in ``[q0, q1)`` sees at
    least one key, every column in ``[k0, k1)`` is seen by at least one row, and the
    diagonal bounds are clamped to the rectangle.
    """

    q0: int
    q1: int
    k0: int
    k1: int
    lo: int = NEG_INF_DIAG
    hi: int = POS_INF_DIAG

    # -- per-row interval: keys [L(q), U(q)] -------------------------------------------
    def row_lo(self, q: int) -> int:
        return max(self.k0, q + self.lo)

    def row_hi(self, q: int) -> int:
        return min(self.k1 - 1, q + self.hi)

    def normalized(self) -> Band | None:
        """The same set of pairs with tight bounds, or None if the set is empty."""
        q0, q1, k0, k1, lo, hi = self.q0, self.q1, self.k0, self.k1, self.lo, self.hi
        for _ in range(4):
            if q0 >= q1 or k0 >= k1:
                return None
            lo = max(lo, k0 - (q1 - 1))
            hi = min(hi, (k1 - 1) - q0)
            if lo > hi:
                return None
            # Row q is non-empty iff k0 - hi <= q <= k1 - 1 - lo (given lo <= hi).
            nq0, nq1 = max(q0, k0 - hi), min(q1, k1 - lo)
            # Column k is hit iff q0 + lo <= k <= q1 - 1 + hi.
            nk0, nk1 = max(k0, nq0 + lo), min(k1, nq1 - 1 + hi + 1)
            if (nq0, nq1, nk0, nk1) == (q0, q1, k0, k1):
                break
            q0, q1, k0, k1 = nq0, nq1, nk0, nk1
        if q0 >= q1 or k0 >= k1:
            return None
        return Band(q0, q1, k0, k1, lo, hi)

    @property
    def lo_is_bound(self) -> bool:
        """True if the lower diagonal cuts the rectangle (normalised bands only)."""
        return self.lo > self.k0 - (self.q1 - 1)

    @property
    def hi_is_bound(self) -> bool:
        return self.hi < (self.k1 - 1) - self.q0

    def _segments(self) -> list[tuple[int, int]]:
        """Row ranges on which both row ends are linear: cut where L switches from k0 to
        q + lo and U from q + hi to k1 - 1."""
        cuts = sorted(
            {
                self.q0,
                self.q1,
                min(max(self.k0 - self.lo, self.q0), self.q1),
                min(max(self.k1 - self.hi, self.q0), self.q1),
            }
        )
        return [(a, b) for a, b in zip(cuts, cuts[1:]) if a < b]

    def area(self) -> int:
        """Number of pairs, in closed form (row widths are piecewise linear)."""
        total = 0
        for a, b in self._segments():
            # Width is linear on [a, b): sum of an arithmetic series.
            wa = self.row_hi(a) - self.row_lo(a) + 1
            wb = self.row_hi(b - 1) - self.row_lo(b - 1) + 1
            total += (wa + wb) * (b - a) // 2
        return total

    def clip(self, q_range: tuple[int, int], k_range: tuple[int, int]) -> Band | None:
        """The part inside ``q_range x k_range``, re-based so the window starts at (0, 0)."""
        (qa, qb), (ka, kb) = q_range, k_range
        window = Band(qa, qb, ka, kb)
        inside = _intersect(self, window)
        return None if inside is None else _shift_band(inside, -qa, -ka).normalized()

    def typed_rects(self) -> list[tuple[tuple[int, int], tuple[int, int], AttnMaskType]]:
        """Split into disjoint typed rectangles (at most five)."""
        out = []
        for a, b in self._segments():
            lo_slope = a + self.lo >= self.k0  # L(q) = q + lo on [a, b)
            hi_slope = (b - 1) + self.hi <= self.k1 - 1  # U(q) = q + hi on [a, b)
            k_start = a + self.lo if lo_slope else self.k0
            k_end = (b - 1) + self.hi + 1 if hi_slope else self.k1
            kind = {
                (False, False): AttnMaskType.FULL,
                (False, True): AttnMaskType.CAUSAL,
                (True, False): AttnMaskType.INV_CAUSAL,
                (True, True): AttnMaskType.BI_CAUSAL,
            }[(lo_slope, hi_slope)]
            out.append(((a, b), (k_start, k_end), kind))
        return out


def _rect_to_band(q_range, k_range, kind: AttnMaskType) -> Band:
    (q0, q1), (k0, k1) = q_range, k_range
    lo = k0 - q0 if kind in (AttnMaskType.INV_CAUSAL, AttnMaskType.BI_CAUSAL) else NEG_INF_DIAG
    hi = k1 - q1 if kind in (AttnMaskType.CAUSAL, AttnMaskType.BI_CAUSAL) else POS_INF_DIAG
    return Band(q0, q1, k0, k1, lo, hi)


def _window_band(q_range, k_range, window: tuple[int, int]) -> Band:
    """flash-attn's sliding window on the rectangle ``q_range x k_range`` (each a
    ``(start, end)`` pair): query i of the rectangle sees key j of it when ``i + s - left
    <= j <= i + s + right``, ``s = len(k_range) - len(q_range)`` (bottom-right aligned).
    ``window = (left, right)`` is already checked (:func:`_check_window`); ``-1`` leaves
    a side unbounded. The band is not normalised."""
    (q0, q1), (k0, k1) = q_range, k_range
    left, right = window
    shift = k1 - q1  # k - q on the bottom-right diagonal, global
    lo = NEG_INF_DIAG if left < 0 else shift - left
    hi = POS_INF_DIAG if right < 0 else shift + right
    return Band(q0, q1, k0, k1, lo, hi)


def _shift_band(b: Band, dq: int, dk: int) -> Band:
    lo = b.lo + dk - dq if b.lo > NEG_INF_DIAG // 2 else NEG_INF_DIAG
    hi = b.hi + dk - dq if b.hi < POS_INF_DIAG // 2 else POS_INF_DIAG
    return Band(b.q0 + dq, b.q1 + dq, b.k0 + dk, b.k1 + dk, lo, hi)


def _combine(a: Band, b: Band, outer: Callable, inner: Callable) -> Band | None:
    """The band whose starts and lower diagonals are ``outer`` of a's and b's, and whose
    ends and upper diagonals ``inner`` of theirs, normalised."""
    return Band(
        outer(a.q0, b.q0),
        inner(a.q1, b.q1),
        outer(a.k0, b.k0),
        inner(a.k1, b.k1),
        outer(a.lo, b.lo),
        inner(a.hi, b.hi),
    ).normalized()


def _intersect(a: Band, b: Band) -> Band | None:
    """The pairs in both ``a`` and ``b``, or None if there are none."""
    return _combine(a, b, max, min)


def _try_join(a: Band, b: Band) -> Band | None:
    """``a | b`` as one band if it is one (a, b disjoint), else None."""
    cand = _combine(a, b, min, max)  # the smallest band holding both
    if cand is None or cand.area() != a.area() + b.area():
        return None
    for part in (a, b):  # both inside cand and |cand| = |a| + |b|  =>  cand = a | b
        inter = _intersect(cand, part)
        if inter is None or inter.area() != part.area():
            return None
    return cand


def _join_bands(bands: list[Band]) -> list[Band]:
    """Join disjoint bands that share a full edge while the union stays one band:
    side by side first (fewer pieces per row means fewer kernel calls and merges),
    then stacked."""
    for horizontal in (True, False):
        changed = True
        while changed and len(bands) > 1:
            changed = False
            if horizontal:
                index = {(b.q0, b.q1, b.k1): i for i, b in enumerate(bands)}
            else:
                index = {(b.k0, b.k1, b.q1): i for i, b in enumerate(bands)}
            for i, b in enumerate(bands):
                if b is None:
                    continue
                j = index.get((b.q0, b.q1, b.k0) if horizontal else (b.k0, b.k1, b.q0))
                if j is None or j == i or bands[j] is None:
                    continue
                joined = _try_join(bands[j], b)
                if joined is not None:
                    bands[j], bands[i] = joined, None
                    changed = True
            bands = [b for b in bands if b is not None]
    return bands
