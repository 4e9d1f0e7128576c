"""Masks as data.

A mask over a ``seqlen_q x seqlen_k`` grid of (query, key) pairs is a union of
rectangles ``(q_range, k_range, type)``; ``type`` is one of the four
MagiAttention kinds (:class:`AttnMaskType`). Inside a rectangle of ``Lq`` rows
and ``Lk`` columns (row ``i``, column ``j``, 0-based)::

    FULL        every (i, j)
    CAUSAL      j <= i + (Lk - Lq)     bottom-right aligned: the last row sees every key
    INV_CAUSAL  j >= i                 top-left aligned
    BI_CAUSAL   both

    Lq = 4, Lk = 6      CAUSAL          INV_CAUSAL       BI_CAUSAL
                        x x x . . .     x x x x x x      x x x . . .
                        x x x x . .     . x x x x x      . x x x . .
                        x x x x x .     . . x x x x      . . x x x .
                        x x x x x x     . . . x x x      . . . x x x

Internally every rectangle is a :class:`Band`: rows ``[q0, q1)``, columns
``[k0, k1)`` and a diagonal strip ``lo <= k - q <= hi`` in global coordinates.
Bands are closed under cutting out a sub-block (a causal rectangle seen through
a context-parallel block is still one band), sliding windows are bands, and the
area of a band has a closed form. A :class:`Mask` keeps its bands disjoint
(overlapping input rectangles are merged row-segment by row-segment), so the
area is a sum and kernels may process bands independently.

Everything here is pure Python (torch only for ``to_dense``/row intervals).
"""

from __future__ import annotations

import bisect
import enum
import functools
import hashlib
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

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


def _as_range(value, arg: str, limit: int) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in value)
    except (TypeError, ValueError):
        raise ValueError(f"{arg}: expected a (start, end) pair of ints, got {value!r}") from None
    if not 0 <= a <= b <= limit:
        raise ValueError(f"{arg}: expected 0 <= start <= end <= {limit}, got ({a}, {b})")
    return a, b


# ---------------------------------------------------------------------------------------
# Union of overlapping bands -> disjoint bands.
#
# Within one band a row's keys form an interval [L(q), U(q)] whose ends are lines of
# slope 0 or 1 in q. Cutting the rows where any two such lines of overlapping bands
# cross (and where a band's lines switch slope), every segment either holds one row or
# has all interval orderings fixed, so a single sort-and-sweep per segment gives the union.
# ---------------------------------------------------------------------------------------


def _lines(b: Band, qa: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(intercept, slope) of L and U valid on a segment starting at qa."""
    lo_line = (b.lo, 1) if qa + b.lo >= b.k0 else (b.k0, 0)
    hi_line = (b.hi, 1) if qa + b.hi <= b.k1 - 1 else (b.k1 - 1, 0)
    return lo_line, hi_line


def _boxes_touch(a: Band, b: Band) -> bool:
    return a.q0 < b.q1 and b.q0 < a.q1 and a.k0 <= b.k1 and b.k0 <= a.k1


def _union_bands(bands: list[Band]) -> list[Band]:
    cuts: set[int] = set()
    for b in bands:
        cuts.update((b.q0, b.q1, b.k0 - b.lo, b.k1 - b.hi))
    all_lines = [((b.lo, 1), (b.k0, 0), (b.hi, 1), (b.k1 - 1, 0)) for b in bands]
    for i, a in enumerate(bands):
        for j in range(i + 1, len(bands)):
            if not _boxes_touch(a, bands[j]):
                continue
            for c1, s1 in all_lines[i]:
                for c2, s2 in all_lines[j]:
                    if s1 != s2 and abs(c2 - c1) < POS_INF_DIAG // 2:
                        root = (c2 - c1) // (s1 - s2)
                        # +-2: merging also joins intervals that merely touch (L = U + 1).
                        cuts.update(range(root - 2, root + 3))
    qmin = min(b.q0 for b in bands)
    qmax = max(b.q1 for b in bands)
    cuts_sorted = sorted(c for c in cuts if qmin <= c <= qmax)
    pieces: list[tuple[int, int, tuple[int, int], tuple[int, int]]] = []
    for qa, qb in zip(cuts_sorted, cuts_sorted[1:]):
        active = [b for b in bands if b.q0 <= qa and qb <= b.q1]
        ivs = []
        for b in active:
            if b.row_lo(qa) > b.row_hi(qa):
                continue
            lo_line, hi_line = _lines(b, qa)
            ivs.append((lo_line, hi_line))
        if not ivs:
            continue

        def at(line, q):
            return line[0] + line[1] * q

        # Sort by L at qa, ties broken by slope so the order also holds after qa.
        ivs.sort(key=lambda iv: (at(iv[0], qa), iv[0][1]))
        cur_lo, cur_hi = ivs[0]
        for lo_line, hi_line in ivs[1:]:
            if at(lo_line, qa) <= at(cur_hi, qa) + 1:
                if (at(hi_line, qa), hi_line[1]) > (at(cur_hi, qa), cur_hi[1]):
                    cur_hi = hi_line
            else:
                pieces.append((qa, qb, cur_lo, cur_hi))
                cur_lo, cur_hi = lo_line, hi_line
        pieces.append((qa, qb, cur_lo, cur_hi))
    # Stitch vertically adjacent segments that continue the same lines.
    pieces.sort(key=lambda p: (p[2], p[3], p[0]))
    stitched: list[list] = []
    for p in pieces:
        if stitched and stitched[-1][2:] == [p[2], p[3]] and stitched[-1][1] == p[0]:
            stitched[-1][1] = p[1]
        else:
            stitched.append([p[0], p[1], p[2], p[3]])
    out = []
    for qa, qb, (lc, ls), (hc, hs) in stitched:
        k0, lo = (lc + qa, lc) if ls else (lc, NEG_INF_DIAG)
        k1, hi = (hc + qb, hc) if hs else (hc + 1, POS_INF_DIAG)
        nb = Band(qa, qb, k0, k1, lo, hi).normalized()
        if nb is not None:
            out.append(nb)
    return out


def _any_overlap(bands: list[Band]) -> bool:
    order = sorted(bands, key=lambda b: b.q0)
    active: list[Band] = []
    for b in order:
        active = [a for a in active if a.q1 > b.q0]
        for a in active:
            if a.k0 < b.k1 and b.k0 < a.k1:
                if _intersect(a, b) is not None:
                    return True
        active.append(b)
    return False


_SLICE_CACHE = 4096  # slices kept per mask
_AREA_MEMO: dict[tuple[int, ...], int] = {}  # Mask.area_in's band areas by shape
_AREA_MEMO_SIZE = 1 << 16


class Mask:
    """A union of rectangles over a ``seqlen_q x seqlen_k`` grid; immutable and hashable.

    Build it with :meth:`full`, :meth:`causal`, :meth:`varlen`, :meth:`sliding_window`,
    :meth:`block_causal`, :meth:`prefix_lm`, :meth:`shared_question` or
    :meth:`from_ranges`. ``bands`` are disjoint and sorted by (q0, k0).
    """

    __slots__ = (
        "seqlen_q",
        "seqlen_k",
        "bands",
        "_digest",
        "_dense",
        "_index",
        "_slices",
        "__weakref__",
    )

    def __init__(
        self,
        bands: Iterable[Band],
        seqlen_q: int,
        seqlen_k: int | None = None,
        *,
        _canonical: bool = False,
    ):
        seqlen_k = seqlen_q if seqlen_k is None else seqlen_k
        for name, val in (("seqlen_q", seqlen_q), ("seqlen_k", seqlen_k)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 0:
                raise ValueError(f"{name}: expected a non-negative int, got {val!r}")
        self.seqlen_q = seqlen_q
        self.seqlen_k = seqlen_k
        if _canonical:
            bs = list(bands)
        else:
            bs = []
            for b in bands:
                if not (0 <= b.q0 <= b.q1 <= seqlen_q and 0 <= b.k0 <= b.k1 <= seqlen_k):
                    raise ValueError(f"bands: {b} lies outside the {seqlen_q} x {seqlen_k} grid")
                nb = b.normalized()
                if nb is not None:
                    bs.append(nb)
            if len(bs) > 1 and _any_overlap(bs):
                bs = _union_bands(bs)
        bs.sort(key=lambda b: (b.q0, b.k0, b.q1, b.k1))
        self.bands: tuple[Band, ...] = tuple(bs)
        self._digest: bytes | None = None
        self._dense: list | None = None
        self._index: tuple | None = None
        self._slices: dict = {}

    # -- builders -----------------------------------------------------------------------
    @classmethod
    def from_ranges(
        cls,
        q_ranges: Sequence,
        k_ranges: Sequence,
        types: Sequence | AttnMaskType | str,
        seqlen_q: int,
        seqlen_k: int | None = None,
    ) -> Mask:
        """Union of rectangles ``q_ranges[i] x k_ranges[i]`` of kind ``types[i]``."""
        seqlen_k = seqlen_q if seqlen_k is None else seqlen_k
        q_ranges, k_ranges = list(q_ranges), list(k_ranges)
        if isinstance(types, (str, AttnMaskType)):
            types = [types] * len(q_ranges)
        types = list(types)
        if not (len(q_ranges) == len(k_ranges) == len(types)):
            raise ValueError(
                f"q_ranges, k_ranges, types: lengths disagree "
                f"({len(q_ranges)}, {len(k_ranges)}, {len(types)})"
            )
        bands = []
        for i, (qr, kr, t) in enumerate(zip(q_ranges, k_ranges, types)):
            qr = _as_range(qr, f"q_ranges[{i}]", seqlen_q)
            kr = _as_range(kr, f"k_ranges[{i}]", seqlen_k)
            bands.append(_rect_to_band(qr, kr, AttnMaskType.parse(t, arg=f"types[{i}]")))
        return cls(bands, seqlen_q, seqlen_k)

    @classmethod
    @functools.lru_cache(maxsize=256)  # noqa: B019 - immutable results, hot in attention()
    def full(cls, seqlen_q: int, seqlen_k: int | None = None) -> Mask:
        seqlen_k = _check_lens(seqlen_q, seqlen_k)
        return cls.from_ranges([(0, seqlen_q)], [(0, seqlen_k)], "full", seqlen_q, seqlen_k)

    @classmethod
    @functools.lru_cache(maxsize=256)  # noqa: B019 - immutable results, hot in attention()
    def causal(cls, seqlen_q: int, seqlen_k: int | None = None) -> Mask:
        """Bottom-right aligned causal: query i sees keys ``j <= i + seqlen_k - seqlen_q``."""
        seqlen_k = _check_lens(seqlen_q, seqlen_k)
        return cls.from_ranges([(0, seqlen_q)], [(0, seqlen_k)], "causal", seqlen_q, seqlen_k)

    @classmethod
    def sliding_window(
        cls, seqlen_q: int, window: tuple[int, int], seqlen_k: int | None = None
    ) -> Mask:
        """flash-attn's window: query i sees keys in ``[i + Sk - Sq - left, i + Sk - Sq + right]``.

        ``-1`` leaves that side unbounded; ``window=(-1, 0)`` is causal.
        """
        seqlen_k = seqlen_q if seqlen_k is None else seqlen_k
        left, right = _check_window(window)
        shift = seqlen_k - seqlen_q
        lo = NEG_INF_DIAG if left < 0 else shift - left
        hi = POS_INF_DIAG if right < 0 else shift + right
        return cls([Band(0, seqlen_q, 0, seqlen_k, lo, hi)], seqlen_q, seqlen_k)

    @classmethod
    def varlen(
        cls,
        cu_seqlens_q,
        cu_seqlens_k=None,
        *,
        causal: bool = False,
        window: tuple[int, int] = (-1, -1),
    ) -> Mask:
        """Packed documents: document i is ``[cu_q[i], cu_q[i+1]) x [cu_k[i], cu_k[i+1])``.

        ``causal`` and ``window`` apply inside each document with flash-attn's
        bottom-right alignment.
        """
        cu_q = _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q")
        cu_k = cu_q if cu_seqlens_k is None else _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k")
        if len(cu_k) != len(cu_q):
            raise ValueError(
                f"cu_seqlens_k: expected {len(cu_q)} entries like cu_seqlens_q, got {len(cu_k)}"
            )
        left, right = _check_window(window)
        if causal:
            right = 0 if right < 0 else min(right, 0)
        bands = []
        for i in range(len(cu_q) - 1):
            q0, q1, k0, k1 = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
            shift = (k1 - k0) - (q1 - q0) + (k0 - q0)  # bottom-right diagonal, global
            lo = NEG_INF_DIAG if left < 0 else shift - left
            hi = POS_INF_DIAG if right < 0 else shift + right
            bands.append(Band(q0, q1, k0, k1, lo, hi))
        return cls(bands, cu_q[-1], cu_k[-1])

    @classmethod
    def block_causal(cls, seqlen: int, block_size: int | Sequence[int]) -> Mask:
        """Queries of block b see every key of blocks 0..b (block sizes: one int or a list)."""
        bounds = _block_bounds(seqlen, block_size)
        return cls.from_ranges(
            [(a, b) for a, b in zip(bounds, bounds[1:])],
            [(0, b) for b in bounds[1:]],
            "full",
            seqlen,
            seqlen,
        )

    @classmethod
    def prefix_lm(cls, seqlen: int, prefix_len: int) -> Mask:
        """Every query sees the first ``prefix_len`` keys; the rest is causal."""
        _check_lens(seqlen, None, "seqlen")
        if not 0 <= prefix_len <= seqlen:
            raise ValueError(f"prefix_len: expected 0 <= prefix_len <= {seqlen}, got {prefix_len}")
        return cls.from_ranges(
            [(0, seqlen), (0, seqlen)],
            [(0, prefix_len), (0, seqlen)],
            ["full", "causal"],
            seqlen,
            seqlen,
        )

    @classmethod
    def shared_question(cls, question_len: int, answer_lens: Sequence[int]) -> Mask:
        """One question then several answers: all causal over the question, each answer
        causal over itself only (the answers never see each other)."""
        if question_len < 0 or any(a < 0 for a in answer_lens):
            raise ValueError("question_len, answer_lens: expected non-negative lengths")
        total = question_len + sum(answer_lens)
        qr, kr, ty = [(0, question_len)], [(0, question_len)], ["causal"]
        start = question_len
        for a in answer_lens:
            qr += [(start, start + a), (start, start + a)]
            kr += [(0, question_len), (start, start + a)]
            ty += ["full", "causal"]
            start += a
        return cls.from_ranges(qr, kr, ty, total, total)

    # -- queries ------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return self.seqlen_q, self.seqlen_k

    @property
    def ranges(self) -> list[tuple[tuple[int, int], tuple[int, int], AttnMaskType]]:
        """Disjoint typed rectangles ``(q_range, k_range, type)`` covering this mask."""
        return [r for b in self.bands for r in b.typed_rects()]

    def area(self) -> int:
        """Number of visible (query, key) pairs, from the bands alone."""
        return sum(b.area() for b in self.bands)

    def is_empty(self) -> bool:
        return len(self.bands) == 0  # dynamo cannot trace `not` on this tuple

    def is_full(self) -> bool:
        return self.area() == self.seqlen_q * self.seqlen_k

    def slice(self, q_range: tuple[int, int], k_range: tuple[int, int]) -> Mask:
        """The mask seen by the sub-block ``q_range x k_range``, re-based to (0, 0)."""
        qa, qb = _as_range(q_range, "q_range", self.seqlen_q)
        ka, kb = _as_range(k_range, "k_range", self.seqlen_k)
        return self._shared_slice(qa, qb, ka, kb)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - masks are immutable and few
    def _shared_slice(self, qa: int, qb: int, ka: int, kb: int) -> Mask:
        # Keyed by the mask, so equal masks (the same pairs, however cut) share their
        # slices, as they always have for callers of slice(); the planner's own cuts
        # of the padded mask use _slice, which never hashes it (a 1M-row digest).
        return self._slice(qa, qb, ka, kb)

    def _band_index(self) -> tuple[list[int], list[int]]:
        """Bands' first rows and the running max of their ends (bands are sorted by
        q0): the bands a row range can touch form one run between two bisections, so
        a slice of a mask of many bands (packed documents) skips the rest."""
        if self._index is None:
            q0s = [b.q0 for b in self.bands]
            ends = list(itertools.accumulate((b.q1 for b in self.bands), max))
            self._index = (q0s, ends)
        return self._index

    def _slice(self, qa: int, qb: int, ka: int, kb: int) -> Mask:
        # Cached on the mask itself: a cache keyed by the mask would hash it, and the
        # hash of a mask the planner builds (the padded one) reads every row.
        key = (qa, qb, ka, kb)
        hit = self._slices.get(key)
        if hit is None:
            if len(self._slices) >= _SLICE_CACHE:
                self._slices.clear()
            hit = self._slices[key] = self._cut(qa, qb, ka, kb)
        return hit

    def _cut(self, qa: int, qb: int, ka: int, kb: int) -> Mask:
        bands = []
        q0s, ends = self._band_index()
        for b in self.bands[bisect.bisect_right(ends, qa) : bisect.bisect_left(q0s, qb)]:
            if b.q0 >= qb or b.q1 <= qa or b.k0 >= kb or b.k1 <= ka:
                continue
            c = b.clip((qa, qb), (ka, kb))
            if c is not None:
                bands.append(c)
        return Mask(bands, qb - qa, kb - ka, _canonical=True)

    def area_in(self, qa: int, qb: int, ka: int, kb: int) -> int:
        """``slice((qa, qb), (ka, kb)).area()`` without building the slice (the
        planner asks it for many blocks)."""
        index = self._index
        q0s, ends = self._band_index() if index is None else index
        bands = self.bands
        memo = _AREA_MEMO
        total = 0
        # Conditional expressions, not max()/min(): groupcast's cost model asks for
        # some 500K blocks at W = 64.
        for i in range(bisect.bisect_right(ends, qa), bisect.bisect_left(q0s, qb)):
            b = bands[i]
            if b.q1 <= qa or b.k0 >= kb or b.k1 <= ka:
                continue
            # The pairs of a band inside a rectangle do not change when both move
            # along the diagonal, so the areas are memoised by the rectangle's place
            # relative to the diagonals: the blocks of a causal mask cut on a regular
            # grid share a handful of shapes.
            q0 = qa if qa > b.q0 else b.q0
            q1 = qb if qb < b.q1 else b.q1
            k0 = ka if ka > b.k0 else b.k0
            k1 = kb if kb < b.k1 else b.k1
            key = (q1 - q0, k0 - q0, k1 - q0, b.lo, b.hi)
            area = memo.get(key)
            if area is None:
                inside = Band(q0, q1, k0, k1, b.lo, b.hi).normalized()
                area = 0 if inside is None else inside.area()
                if len(memo) >= _AREA_MEMO_SIZE:
                    memo.clear()
                memo[key] = area
            total += area
        return total

    def gather(
        self, q_ranges: Sequence[tuple[int, int]], k_ranges: Sequence[tuple[int, int]]
    ) -> Mask:
        """The mask seen by the rows ``q_ranges`` (concatenated in order) against the
        columns ``k_ranges`` (concatenated): the block a context-parallel rank computes
        when its query chunks and a KV piece are not contiguous (zigzag, stripe).
        Touching bands that form one band are joined, so a zigzag diagonal block is a
        single causal band rather than three pieces."""
        bands: list[Band] = []
        k_offsets = []
        ko = 0
        for ka, kb in k_ranges:
            k_offsets.append(ko)
            ko += kb - ka
        qo = 0
        for qa, qb in q_ranges:
            for (ka, kb), kofs in zip(k_ranges, k_offsets):
                for b in self._slice(qa, qb, ka, kb).bands:
                    bands.append(_shift_band(b, qo, kofs))
            qo += qb - qa
        return Mask(_join_bands(bands), qo, ko, _canonical=True)

    def dense_pieces(self) -> list[tuple[int, int, int, int, bool]] | None:
        """Disjoint ``(q0, q1, k0, k1, causal)`` pieces, each FULL or bottom-right CAUSAL
        with ``k1 - k0 >= q1 - q0``, covering the mask; None if some band has a lower
        diagonal bound (sliding window, inv_causal), which dense kernels cannot run.

        Pieces that continue one another (rows back to back, same first key, and the same
        last key per row: equal columns if FULL, equal diagonal if CAUSAL) are joined, so
        a block that is one causal square, however its bands cut it (a zigzag rank's own
        block, say), is one piece and one kernel call. Where bands still leave several
        pieces, the mask is cut again from its rows' key intervals (touching intervals
        joined, :meth:`_pieces_from_rows`), which also joins pieces side by side (a
        causal square cut into column strips, as groupcast's pieces cut a rank's own
        block); the fewer pieces win. Cached on the mask."""
        if self._dense is None:
            self._dense = self._dense_pieces()
        return None if self._dense is False else list(self._dense)

    def _dense_pieces(self):
        pieces: list[tuple[int, int, int, int, bool]] = []
        ends: dict[tuple, int] = {}  # (q1, k0, causal, last-key rule) -> index in pieces

        def add(q0: int, q1: int, k0: int, k1: int, causal: bool) -> None:
            rule = k1 - q1 if causal else k1
            i = ends.pop((q0, k0, causal, rule), None)
            if i is not None:
                q0 = pieces[i][0]
                pieces[i] = (q0, q1, k0, k1, causal)
            else:
                i = len(pieces)
                pieces.append((q0, q1, k0, k1, causal))
            ends[(q1, k0, causal, rule)] = i

        for b in self.bands:
            if b.lo_is_bound:
                return False
            if not b.hi_is_bound:
                add(b.q0, b.q1, b.k0, b.k1, False)
                continue
            # Rows up to k1 - 1 - hi fit one bottom-right causal piece (the last of them
            # sees every key); rows after it see the whole column range.
            qc = min(b.q1, b.k1 - b.hi)
            if qc > b.q0:
                add(b.q0, qc, b.k0, qc + b.hi, True)
            if qc < b.q1:
                add(qc, b.q1, b.k0, b.k1, False)
        if len(pieces) > 1 and not self._rows_cannot_join(len(pieces)):
            again = self._pieces_from_rows()
            if len(again) < len(pieces):
                return again
        return pieces

    def _rows_cannot_join(self, n_pieces: int) -> bool:
        """True when cutting from the rows cannot give fewer than ``n_pieces`` pieces,
        proved from the bands alone (packed documents: 1M rows never tabulated).

        With no lower diagonal bounds, a band's row intervals all start at its k0; if
        no two bands' intervals touch in a shared row, no intervals join, so the rows'
        first keys are exactly the bands' k0s, and as a piece has one first key, the
        rows give at least as many pieces as there are distinct k0s. A row end
        ``min(k1 - 1, q + hi)`` never decreases and moves by at most one per row, so
        band A touches band B to its right iff ``B.k0 - 1`` lies between A's row ends
        at the first and last shared rows."""
        if n_pieces > len({b.k0 for b in self.bands}):
            return False
        order = sorted(self.bands, key=lambda b: b.q0)
        active: list[Band] = []
        budget = 4 * len(order) + 1024  # many row-sharing bands: just cut from rows
        for b in order:
            active = [a for a in active if a.q1 > b.q0]
            for a in active:
                budget -= 1
                if budget < 0:
                    return False
                qs, qe = max(a.q0, b.q0), min(a.q1, b.q1) - 1
                for left, right in ((a, b), (b, a)):
                    if left.row_hi(qs) <= right.k0 - 1 <= left.row_hi(qe):
                        return False
            active.append(b)
        return True

    def _pieces_from_rows(self) -> list[tuple[int, int, int, int, bool]]:
        """Dense pieces from the rows' maximal key intervals (the k-th interval of each
        row forms track k): a run of consecutive rows of one track whose intervals share
        their first key and whose last key stays put (FULL) or moves one per row
        (bottom-right CAUSAL) is one piece. Only for masks without lower diagonal
        bounds, whose rows' intervals all start at a band's first column."""
        rows, lo, hi = self._row_table()
        n = rows.numel()
        if n == 0:
            return []
        # Track of each interval: its index within its row (the table is sorted by row).
        idx = torch.arange(n)
        first = torch.ones(n, dtype=torch.bool)
        first[1:] = rows[1:] != rows[:-1]
        track = idx - torch.cummax(torch.where(first, idx, 0), 0).values
        if not bool(first.all()):  # some row has several intervals: order by track
            order = torch.sort(track, stable=True).indices  # rows ascending within one
            rows, lo, hi, track = rows[order], lo[order], hi[order], track[order]
        # step[i]: how entry i continues entry i - 1 of its track: 0 not at all, 1 with
        # the same last key (FULL), 2 with the last key one further (CAUSAL).
        same = torch.zeros(n, dtype=torch.bool)
        same[1:] = (track[1:] == track[:-1]) & (rows[1:] == rows[:-1] + 1) & (lo[1:] == lo[:-1])
        step = torch.zeros(n, dtype=torch.int64)
        db = torch.zeros(n, dtype=torch.int64)
        db[1:] = hi[1:] - hi[:-1]
        step[same & (db == 0)] = 1
        step[same & (db == 1)] = 2
        # A piece starts at entry i with no kind; the next step fixes its kind (or ends
        # it) and it runs to the end of that run of equal steps: the scan below visits
        # one entry per piece, not per row.
        change = torch.ones(n, dtype=torch.bool)
        change[1:] = step[1:] != step[:-1]
        run_start = torch.nonzero(change).flatten()
        run_end = torch.cat([run_start[1:] - 1, torch.tensor([n - 1])])
        run_of = torch.cumsum(change.to(torch.int64), 0) - 1
        end_of = run_end[run_of].numpy()
        rows_, lo_, hi_, step_ = rows.numpy(), lo.numpy(), hi.numpy(), step.numpy()
        pieces = []
        i = 0
        while i < n:
            kind = int(step_[i + 1]) if i + 1 < n else 0
            j = int(end_of[i + 1]) if kind else i
            piece = (int(rows_[i]), int(rows_[j]) + 1, int(lo_[i]), int(hi_[j]) + 1, kind == 2)
            pieces.append(piece)
            i = j + 1
        return sorted(pieces)

    def kind(self) -> AttnMaskType | None:
        """FULL or CAUSAL if the whole grid is exactly that, else None."""
        if self.seqlen_q == 0 or self.seqlen_k == 0:
            return None
        if self == Mask.full(self.seqlen_q, self.seqlen_k):
            return AttnMaskType.FULL
        if self == Mask.causal(self.seqlen_q, self.seqlen_k):
            return AttnMaskType.CAUSAL
        return None

    def _row_table(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every row's maximal visible key intervals, as int64 ``rows, lo, hi`` sorted by
        (row, lo); touching intervals are joined. Vectorised over bands."""
        if not self.bands:
            empty = torch.zeros(0, dtype=torch.int64)
            return empty, empty, empty
        cols = torch.tensor(
            [(b.q0, b.q1, b.k0, b.k1, b.lo, b.hi) for b in self.bands], dtype=torch.int64
        )
        n = cols[:, 1] - cols[:, 0]
        starts = torch.cumsum(n, 0) - n
        # One row of band columns per row of the table (one gather, not six repeats).
        band_of = torch.repeat_interleave(torch.arange(len(self.bands)), n)
        q0, _, k0, k1, lo, hi = cols[band_of].unbind(1)
        rows = torch.arange(int(n.sum())) - starts[band_of] + q0
        left = torch.maximum(k0, rows + lo)
        right = torch.minimum(k1 - 1, rows + hi)
        key = rows * (self.seqlen_k + 1) + left
        # Keys are distinct (bands are disjoint), so when they already ascend (bands
        # one below another: packed documents, causal) the sort is the identity.
        if key.numel() > 1 and not bool((key[1:] > key[:-1]).all()):
            order = torch.argsort(key)
            rows, left, right = rows[order], left[order], right[order]
        new = torch.ones_like(rows, dtype=torch.bool)
        new[1:] = (rows[1:] != rows[:-1]) | (left[1:] != right[:-1] + 1)
        last = torch.ones_like(new)
        last[:-1] = new[1:]
        return rows[new], left[new], right[last]

    def digest(self) -> bytes:
        """16 bytes that identify the set of visible pairs (not how bands cut it)."""
        if self._digest is None:
            rows, lo, hi = self._row_table()
            h = hashlib.blake2b(digest_size=16)
            h.update(f"{self.seqlen_q}x{self.seqlen_k}".encode())
            for t in (rows, lo, hi):
                h.update(t.numpy().tobytes())
            self._digest = h.digest()
        return self._digest

    def row_intervals(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row visible key intervals as int32 tensors ``lo, hi`` of shape ``[R, Sq]``.

        Row q sees keys ``lo[r, q] <= k <= hi[r, q]`` for each slot r; unused slots hold
        ``lo = 0, hi = -1``. R is the largest number of disjoint intervals in any row
        (1 for causal, varlen, sliding window and block-causal masks).
        """
        sq = self.seqlen_q
        rows, left, right = self._row_table()
        count = (
            torch.bincount(rows, minlength=sq)
            if rows.numel()
            else torch.zeros(sq, dtype=torch.int64)
        )
        r = max(int(count.max()) if sq else 0, 1)
        first = torch.cumsum(count, 0) - count
        slot = torch.arange(rows.numel()) - first[rows] if rows.numel() else rows
        lo = torch.zeros(r * sq, dtype=torch.int64)
        hi = torch.full((r * sq,), -1, dtype=torch.int64)
        lo[slot * sq + rows] = left
        hi[slot * sq + rows] = right
        lo, hi = lo.view(r, sq).to(torch.int32), hi.view(r, sq).to(torch.int32)
        return lo.to(device), hi.to(device)

    def to_dense(self, device=None) -> torch.Tensor:
        """Bool ``[seqlen_q, seqlen_k]``; for small sizes and tests."""
        dense = torch.zeros(self.seqlen_q, self.seqlen_k, dtype=torch.bool, device=device)
        for b in self.bands:
            q = torch.arange(b.q0, b.q1, device=device).view(-1, 1)
            k = torch.arange(b.k0, b.k1, device=device).view(1, -1)
            d = k - q
            dense[b.q0 : b.q1, b.k0 : b.k1] |= (d >= max(b.lo, NEG_INF_DIAG)) & (d <= b.hi)
        return dense

    def __eq__(self, other) -> bool:
        """Equal when the same pairs are visible, however the rectangles were cut."""
        if not isinstance(other, Mask) or self.shape != other.shape:
            return False
        return self.bands == other.bands or self.digest() == other.digest()

    def __hash__(self) -> int:
        return hash(self.digest())

    def __repr__(self) -> str:
        shown = ", ".join(
            f"[{q0}:{q1}]x[{k0}:{k1}] {t.value}" for (q0, q1), (k0, k1), t in self.ranges[:4]
        )
        more = f", ... ({len(self.bands)} bands)" if len(self.bands) > 4 else ""
        return f"Mask({self.seqlen_q}x{self.seqlen_k}: {shown}{more})"


def _shift_band(b: Band, dq: int, dk: int) -> Band:
    lo = b.lo + dk - dq if b.lo > NEG_INF_DIAG // 2 else NEG_INF_DIAG
    hi = b.hi + dk - dq if b.hi < POS_INF_DIAG // 2 else POS_INF_DIAG
    return Band(b.q0 + dq, b.q1 + dq, b.k0 + dk, b.k1 + dk, lo, hi)


def _intersect(a: Band, b: Band) -> Band | None:
    return Band(
        max(a.q0, b.q0),
        min(a.q1, b.q1),
        max(a.k0, b.k0),
        min(a.k1, b.k1),
        max(a.lo, b.lo),
        min(a.hi, b.hi),
    ).normalized()


def _try_join(a: Band, b: Band) -> Band | None:
    """``a | b`` as one band if it is one (a, b disjoint), else None."""
    cand = Band(
        min(a.q0, b.q0),
        max(a.q1, b.q1),
        min(a.k0, b.k0),
        max(a.k1, b.k1),
        min(a.lo, b.lo),
        max(a.hi, b.hi),
    ).normalized()
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


def _check_lens(seqlen_q, seqlen_k, name_q: str = "seqlen_q") -> int:
    """Validate sequence lengths before they reach range checks; returns seqlen_k."""
    for name, val in ((name_q, seqlen_q), ("seqlen_k", seqlen_k)):
        if val is None and name == "seqlen_k":
            continue
        if not isinstance(val, int) or isinstance(val, bool) or val < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {val!r}")
    return seqlen_q if seqlen_k is None else seqlen_k


def _check_window(window) -> tuple[int, int]:
    try:
        left, right = (int(x) for x in window)
    except (TypeError, ValueError):
        raise ValueError(f"window: expected (left, right) ints, got {window!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"window: expected each side >= -1 (-1 = unbounded), got {window!r}")
    return left, right


def _check_cu_seqlens(cu, arg: str) -> list[int]:
    if isinstance(cu, torch.Tensor):
        cu = cu.tolist()
    try:
        vals = [int(x) for x in cu]
    except (TypeError, ValueError):
        raise ValueError(f"{arg}: expected a sequence of ints, got {cu!r}") from None
    if len(vals) < 1 or vals[0] != 0:
        raise ValueError(f"{arg}: expected a non-empty sequence starting at 0, got {vals[:8]}")
    if any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{arg}: expected non-decreasing offsets, got {vals[:8]}...")
    return vals


def _block_bounds(seqlen: int, block_size) -> list[int]:
    if isinstance(block_size, int):
        if block_size <= 0:
            raise ValueError(f"block_size: expected a positive int, got {block_size}")
        bounds = list(range(0, seqlen, block_size)) + [seqlen]
    else:
        sizes = [int(s) for s in block_size]
        if any(s < 0 for s in sizes) or sum(sizes) != seqlen:
            raise ValueError(f"block_size: expected non-negative sizes summing to {seqlen}")
        bounds = [0]
        for s in sizes:
            bounds.append(bounds[-1] + s)
    return bounds


__all__ = ["AttnMaskType", "Band", "Mask", "NEG_INF_DIAG", "POS_INF_DIAG"]
