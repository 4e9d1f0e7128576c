"""The :class:`Mask` class: a union of bands over a ``seqlen_q x seqlen_k`` grid, its
builders (causal, sliding window, packed documents, MagiAttention's typed rectangles),
its queries (area, slices, gathers, dense pieces) and its identity (digest, equality).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
from collections.abc import Iterable, Sequence

import torch

from .bands import (
    NEG_INF_DIAG,
    AttnMaskType,
    Band,
    _join_bands,
    _rect_to_band,
    _shift_band,
    _window_band,
)
from .checks import _as_range, _block_bounds, _check_cu_seqlens, _check_lens, _check_window
from .rows import Piece, dense_pieces_of, pieces_from_rows, row_table
from .union import _any_overlap, _union_bands

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
        return cls([_window_band((0, seqlen_q), (0, seqlen_k), (left, right))], seqlen_q, seqlen_k)

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
            doc_q, doc_k = (cu_q[i], cu_q[i + 1]), (cu_k[i], cu_k[i + 1])
            bands.append(_window_band(doc_q, doc_k, (left, right)))
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

    def dense_pieces(self) -> list[Piece] | None:
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
            self._dense = dense_pieces_of(self.bands, self.seqlen_k)
        return None if self._dense is False else list(self._dense)

    def _pieces_from_rows(self) -> list[Piece]:
        """Dense pieces cut from the rows' key intervals alone (:func:`pieces_from_rows`)."""
        return pieces_from_rows(*self._row_table())

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
        """Every row's maximal visible key intervals (:func:`row_table`)."""
        return row_table(self.bands, self.seqlen_k)

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
