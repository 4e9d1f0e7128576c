"""MagiAttention's API (names, parameters, semantics of its docs) on top of our core.

Porting code written for ``magi_attention.api`` means changing the import line::

    from hamilton_attn.compat.magi import (
        DistAttnConfig, DispatchConfig, MinHeapDispatchAlg, OverlapConfig, AttnOverlapMode,
        UniformOverlapAlg, compute_pad_size, magi_attn_varlen_dispatch, calc_attn, undispatch,
    )

Legend: T tokens (global ``T = total_seqlen``, local ``T_local``), B batch, H heads
(Hq query, Hk key/value), D head dim, W the context-parallel size (``cp_size``).

How the names map onto the core (:func:`hamilton_attn.plan` and friends):

* **Mask.** ``(q_ranges, k_ranges, attn_mask_type)`` becomes
  :meth:`hamilton_attn.Mask.from_ranges` (``full | causal | inv_causal | bi_causal``,
  causal bottom-right aligned as in MagiAttention). A (q, k) pair covered by several
  rectangles counts once (union), also in :func:`flex_flash_attn_func`.
* **Runtime key.** ``magi_attn_*_key`` build a :class:`DistAttnRuntimeKey`: frozen and
  hashable, it holds the :class:`hamilton_attn.Plan` (schedule ``groupcast``: each KV
  chunk goes only to the ranks that need it), the total sequence lengths, the padding
  and the chunk size. Equal arguments give an equal key (plans are cached).
* **Padding and chunks.** Tokens are cut into chunks of ``chunk_size`` and every rank
  holds as many chunks; ``pad_size`` tokens are appended at the end of the sequence
  (they see nothing and are seen by nothing). Given both, ``total_seqlen_q +
  pad_size`` must be a multiple of ``cp_size * chunk_size`` (what
  :func:`compute_pad_size` returns); given only ``chunk_size``, the padding is computed;
  given neither, the core picks the chunks (16 per rank). ``head_dim`` is accepted and
  unused (no kernel limit on it here).
* **Dispatch algorithm.** ``DispatchConfig(alg=MinHeapDispatchAlg())`` is the core's
  ``dispatch="minheap"`` (chunks costed by the mask's area, largest first to the least
  loaded rank); ``SequentialDispatchAlg`` is ``"sequential"`` (rank r takes the r-th run
  of consecutive chunks) and ``RandomDispatchAlg(seed)`` is ``"random"``.
* **Self / cross-attention.** ``is_same_source=True``: keys and values are the queries'
  tokens, dispatched the same way (needs ``total_seqlen_q == total_seqlen_k``). Otherwise
  keys and values are dispatched on their own (``kv_dispatch``), and any ``Sq x Sk``
  mask is allowed; keys are padded to a multiple of ``cp_size * chunk_size`` of their
  own. ``is_q_permutable=False`` / ``is_k_permutable=False`` dispatch that side
  ``sequential`` (for self-attention, either flag makes both sequential, since queries
  and keys must then be placed alike). ``dispatch(x, key)`` dispatches query-side
  tensors (q, and for self-attention k and v too); for cross-attention dispatch the
  key/value source with ``dispatch(x_kv, key, role="kv")`` and gather key-side tensors
  with ``undispatch(..., role="kv")``.
* **Overlap.** ``OverlapConfig(mode=STATIC, degree=n)`` runs the groupcast transfers in
  n stages, each overlapped with the previous stage's compute; ``mode=DYNAMIC`` lets the
  core's cost model choose; ``enable=False`` is one stage. ``min_chunk_size``,
  ``max_num_chunks``, ``alg`` and the cost factors are validated and otherwise unused.
* **Hierarchy.** ``cp_mesh`` (from :func:`init_hierarchical_mesh`, dims ``("inter",
  "intra")``) runs on the mesh's whole group with ``node_size`` = the intra size: a KV
  chunk crosses to another node once and is fanned out inside it.
  ``DistAttnConfig(high_bandwith_domain_size=n)`` with n > 1 gives ``node_size=n``
  without a mesh.

Layouts. MagiAttention is token-major: ``x`` is ``(T, ...)`` and ``calc_attn`` takes
``(T_local, H, D)``. As an extension a batch of sequences that share the mask can be
kept unflattened: ``x`` ``(B, T, ...)`` (sequence dim 1, found when dim 0 is not a
sequence length, or pass ``seq_dim=1``) and ``calc_attn`` on ``(B, T_local, H, D)``.
``dispatch`` accepts ``x`` with or without the padding (``magi_attn_*_key`` return it
padded, as MagiAttention's did). ``calc_attn`` returns ``(out, lse)`` with lse
``(T_local, Hq)`` (``(B, T_local, Hq)`` batched), float32 (float64 for float64
inputs); a query that sees no key gets out 0 and lse -inf.

Not supported (ValueError): ``softcap != 0`` and attention ``sink``. Deterministic and
kernel-tuning knobs are accepted and ignored (the core is deterministic).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ... import api as _core
from ...attention import attention
from ...masks import NEG_INF_DIAG, POS_INF_DIAG, AttnMaskType, Band, Mask
from ...runtime.comm import group_info

__all__ = [
    "AttnMaskType",
    "AttnOverlapMode",
    "AttnRange",
    "AttnRanges",
    "DispatchAlg",
    "DispatchConfig",
    "DistAttnConfig",
    "DistAttnRuntimeKey",
    "MinHeapDispatchAlg",
    "OverlapConfig",
    "RandomDispatchAlg",
    "SequentialDispatchAlg",
    "UniformOverlapAlg",
    "calc_attn",
    "compute_pad_size",
    "dispatch",
    "flex_flash_attn_func",
    "full_attention_to_varlen_attention",
    "get_most_recent_key",
    "get_position_ids",
    "infer_attn_mask_from_cu_seqlens",
    "infer_attn_mask_from_sliding_window",
    "init_hierarchical_mesh",
    "magi_attn_flex_dispatch",
    "magi_attn_flex_key",
    "magi_attn_varlen_dispatch",
    "magi_attn_varlen_key",
    "squash_batch_dim",
    "undispatch",
]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_int(value, name: str, *, minimum: int = 0) -> int:
    if not _is_int(value) or value < minimum:
        kind = "non-negative" if minimum == 0 else f">= {minimum}"
        raise ValueError(f"{name}: expected a {kind} int, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------
# Ranges
# ---------------------------------------------------------------------------------------


class AttnRange:
    """The half-open token range ``[start, end)``; immutable."""

    __slots__ = ("_start", "_end")

    def __init__(self, start: int, end: int) -> None:
        if not (_is_int(start) and _is_int(end)) or not 0 <= start <= end:
            raise ValueError(
                f"AttnRange: expected ints 0 <= start <= end, got ({start!r}, {end!r})"
            )
        self._start, self._end = start, end

    @property
    def start(self) -> int:
        return self._start

    @property
    def end(self) -> int:
        return self._end

    @property
    def seqlen(self) -> int:
        return self._end - self._start

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
        return (self._start, self._end)

    def offset(self, offset: int) -> AttnRange:
        return AttnRange(self._start + offset, self._end + offset)

    def intersect(self, other: AttnRange) -> AttnRange:
        """The common part (an empty range when there is none)."""
        start, end = max(self._start, other._start), min(self._end, other._end)
        return AttnRange(start, max(start, end))

    def is_empty(self) -> bool:
        return self._start == self._end

    def __iter__(self) -> Iterator[int]:  # lets a range unpack as ``start, end = r``
        yield self._start
        yield self._end

    def __len__(self) -> int:
        return self.seqlen

    def __eq__(self, other) -> bool:
        return isinstance(other, AttnRange) and self.to_naive_range() == other.to_naive_range()

    def __hash__(self) -> int:
        return hash(self.to_naive_range())

    def __repr__(self) -> str:
        return f"[{self._start}, {self._end})"


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
        cu = _as_int_list(cu_seqlens, "cu_seqlens")
        if not cu:
            # MagiAttention: no boundaries, no ranges (whatever seq_len says)
            return AttnRanges()
        if cu[0] != 0 or any(b <= a for a, b in zip(cu, cu[1:])):
            # strictly: MagiAttention refuses a repeated boundary (an empty range)
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


def _as_int_list(values, name: str) -> list[int]:
    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or values.is_floating_point():
            raise ValueError(
                f"{name}: expected a 1-d int tensor, got {values.dtype} {tuple(values.shape)}"
            )
        return [int(v) for v in values.tolist()]
    try:
        out = [v for v in values]
    except TypeError:
        raise ValueError(f"{name}: expected a sequence of ints, got {values!r}") from None
    if not all(_is_int(v) for v in out):
        raise ValueError(f"{name}: expected ints, got {out!r}")
    return out


def _as_pairs(ranges, name: str) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` from AttnRanges, a pair list or an int tensor [n, 2]."""
    if isinstance(ranges, torch.Tensor) and ranges.is_floating_point():
        raise ValueError(f"{name}: expected an int tensor, got {ranges.dtype}")
    try:
        return AttnRanges.from_ranges(ranges).to_naive_ranges()
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def _as_types(attn_mask_type, n: int, name: str) -> list[AttnMaskType]:
    """One AttnMaskType per rectangle; a single value (str, enum, 0..3) is broadcast."""
    if isinstance(attn_mask_type, torch.Tensor):
        attn_mask_type = attn_mask_type.tolist()
    if isinstance(attn_mask_type, (str, int, AttnMaskType)):
        attn_mask_type = [attn_mask_type] * n
    types = list(attn_mask_type)
    if len(types) != n:
        raise ValueError(f"{name}: expected {n} entries (one per range), got {len(types)}")
    return [AttnMaskType.parse(t, arg=f"{name}[{i}]") for i, t in enumerate(types)]


# ---------------------------------------------------------------------------------------
# Helpers of magi_attention.api.functools
# ---------------------------------------------------------------------------------------


def compute_pad_size(
    total_seqlen_q: int,
    cp_size: int,
    head_dim: int | None = None,
    chunk_size: int | None = None,
) -> int:
    """Tokens to append so that ``total_seqlen_q + pad`` is a multiple of
    ``cp_size * chunk_size`` (every rank then holds the same number of whole chunks).

    ``head_dim`` is accepted for MagiAttention's 4-argument form and unused. Called with
    three arguments ``(total_seqlen_q, cp_size, chunk_size)`` (MagiAttention >= 1.0's
    form) the third is the chunk size.
    """
    _check_int(total_seqlen_q, "total_seqlen_q")
    _check_int(cp_size, "cp_size", minimum=1)
    if chunk_size is None:
        head_dim, chunk_size = None, head_dim
    if chunk_size is None:
        raise ValueError("chunk_size: required (the chunk size of the dispatch)")
    _check_int(chunk_size, "chunk_size", minimum=1)
    if head_dim is not None:
        _check_int(head_dim, "head_dim", minimum=1)
    return -total_seqlen_q % (cp_size * chunk_size)


def squash_batch_dim(x: torch.Tensor) -> torch.Tensor:
    """``(B, T, ...)`` -> ``(B * T, ...)`` (a view when x is contiguous)."""
    if x.dim() < 2:
        raise ValueError(f"x: expected at least 2 dims (batch, seqlen, ...), got {tuple(x.shape)}")
    return x.flatten(0, 1)


def full_attention_to_varlen_attention(
    batch_size: int, seq_len: int, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cu_seqlens_q, cu_seqlens_k)``, int32 ``[batch_size + 1]``: ``batch_size``
    documents of ``seq_len`` tokens each (full attention inside each)."""
    _check_int(batch_size, "batch_size")
    _check_int(seq_len, "seq_len")
    cu = torch.arange(batch_size + 1, dtype=torch.int32, device=device) * seq_len
    return cu, cu.clone()


def _window_band(q_range: AttnRange, k_range: AttnRange, window_size) -> Band:
    """flash-attn's window inside one rectangle: query i (0-based in q_range) sees the
    keys ``j`` (0-based in k_range) with ``i + s - left <= j <= i + s + right``, ``s =
    len(k) - len(q)`` (bottom-right aligned); ``-1`` leaves a side unbounded."""
    left, right = _check_window(window_size, "window_size")
    shift = k_range.end - q_range.end  # k - q on the bottom-right diagonal, global
    lo = NEG_INF_DIAG if left < 0 else shift - left
    hi = POS_INF_DIAG if right < 0 else shift + right
    return Band(q_range.start, q_range.end, k_range.start, k_range.end, lo, hi)


def _check_window(window_size, name: str) -> tuple[int, int]:
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a (left, right) pair, got {window_size!r}") from None
    if not (_is_int(left) and _is_int(right)) or left < -1 or right < -1:
        raise ValueError(f"{name}: expected ints >= -1 (-1: unbounded), got {window_size!r}")
    return left, right


def _bands_to_triple(bands: list[Band]) -> tuple[AttnRanges, AttnRanges, list[AttnMaskType]]:
    """Disjoint typed rectangles covering the union of ``bands``, sorted by rows."""
    if not bands:
        return AttnRanges(), AttnRanges(), []
    sq = max(b.q1 for b in bands)
    sk = max(b.k1 for b in bands)
    rects = sorted(Mask(bands, sq, sk).ranges, key=lambda r: (r[0], r[1]))
    q = AttnRanges.from_ranges([r[0] for r in rects])
    k = AttnRanges.from_ranges([r[1] for r in rects])
    return q, k, [r[2] for r in rects]


def infer_attn_mask_from_sliding_window(
    q_range: AttnRange, k_range: AttnRange, window_size
) -> tuple[AttnRanges, AttnRanges, list[AttnMaskType]]:
    """One sliding-window mask on the rectangle ``q_range x k_range`` as disjoint
    ``(q_ranges, k_ranges, attn_mask_type)`` rectangles.

    ``window_size = (left, right)`` is flash-attn's, bottom-right aligned: query i of the
    rectangle sees its keys j with ``i + s - left <= j <= i + s + right`` where ``s =
    k_range.seqlen - q_range.seqlen``; ``-1`` leaves that side unbounded, so ``(-1, -1)``
    is FULL and ``(-1, 0)`` CAUSAL. Rows that see no key get no rectangle.

    As in MagiAttention, a ``q_range`` longer than ``k_range`` keeps only its last
    ``k_range.seqlen`` rows (then ``s = 0``): the first ``Lq - Lk`` rows see nothing,
    even where flash-attn's right window would reach a key.
    """
    q_range, k_range = AttnRange.from_range(q_range), AttnRange.from_range(k_range)
    band = _window_band(_magi_window_rows(q_range, k_range), k_range, window_size)
    nb = band.normalized()
    return _bands_to_triple([nb] if nb is not None else [])


def _magi_window_rows(q_range: AttnRange, k_range: AttnRange) -> AttnRange:
    """The rows MagiAttention gives a sliding window: the last ``k_range.seqlen`` of
    ``q_range`` when it is longer. Ported masks must match its rectangles row for row,
    so the rows above that square are dropped even where the right window reaches."""
    if q_range.seqlen > k_range.seqlen:
        return AttnRange(q_range.end - k_range.seqlen, q_range.end)
    return q_range


def infer_attn_mask_from_cu_seqlens(
    cu_seqlens_q,
    cu_seqlens_k,
    causal: bool = False,
    window_size=(-1, -1),
    global_window_size: int = 0,
) -> tuple[AttnRanges, AttnRanges, list[AttnMaskType], int, int]:
    """Varlen (packed documents) masks as ``(q_ranges, k_ranges, attn_mask_type,
    total_seqlen_q, total_seqlen_k)``.

    Document i is ``[cu_q[i], cu_q[i+1]) x [cu_k[i], cu_k[i+1])``. With ``window_size ==
    (-1, -1)`` it is one FULL (or, ``causal=True``, bottom-right CAUSAL) rectangle.
    Otherwise (``causal`` must then be False) each document gets flash-attn's sliding
    window (see :func:`infer_attn_mask_from_sliding_window`: with ``G = 0`` a document
    with more queries than keys keeps only its last ``Lk`` query rows, as in
    MagiAttention) and, with ``global_window_size = G > 0``, every query also sees the
    document's first G keys, except those past its right window: query i (0-based in the
    document) sees global key j < G when ``j <= i + right`` (right = -1: all G).
    """
    cu_q = _as_int_list(cu_seqlens_q, "cu_seqlens_q")
    cu_k = _as_int_list(cu_seqlens_k, "cu_seqlens_k")
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not cu or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"{name}: expected 0 = cu[0] <= cu[1] <= ..., got {cu}")
    if len(cu_q) != len(cu_k):
        raise ValueError(
            f"cu_seqlens_k: expected {len(cu_q)} entries like cu_seqlens_q, got {len(cu_k)}"
        )
    left, right = _check_window(window_size, "window_size")
    _check_int(global_window_size, "global_window_size")
    docs = [
        (AttnRange(cu_q[i], cu_q[i + 1]), AttnRange(cu_k[i], cu_k[i + 1]))
        for i in range(len(cu_q) - 1)
    ]
    if (left, right) == (-1, -1):
        kind = AttnMaskType.CAUSAL if causal else AttnMaskType.FULL
        q = AttnRanges.from_ranges([qr for qr, _ in docs])
        k = AttnRanges.from_ranges([kr for _, kr in docs])
        return q, k, [kind] * len(docs), cu_q[-1], cu_k[-1]
    if causal:
        raise ValueError(
            f"causal: must be False when window_size is given (got window_size={window_size}); "
            "use window_size=(left, 0) for a causal window"
        )
    q_all, k_all, types = AttnRanges(), AttnRanges(), []
    for qr, kr in docs:
        g = min(global_window_size, kr.seqlen)
        # Without global tokens MagiAttention runs its sliding-window inference per
        # document, which drops the rows of a document with more queries than keys.
        rows = _magi_window_rows(qr, kr) if g <= 0 else qr
        bands = [_window_band(rows, kr, (left, right))]
        if g > 0:
            hi = POS_INF_DIAG if right < 0 else (kr.start - qr.start) + right
            bands.append(Band(qr.start, qr.end, kr.start, kr.start + g, NEG_INF_DIAG, hi))
        bands = [b for b in (b.normalized() for b in bands) if b is not None]
        q, k, t = _bands_to_triple(bands)
        q_all.extend(q)
        k_all.extend(k)
        types += t
    return q_all, k_all, types, cu_q[-1], cu_k[-1]


# ---------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------
# Plain frozen dataclasses (positional arguments allowed, as in MagiAttention, so that
# ``RandomDispatchAlg(7)`` works); every field is checked in __post_init__.


@dataclass(frozen=True)
class DispatchAlg:
    """Base of the dispatch algorithms; ``kind`` names the core's ``dispatch=``."""

    kind = ""


@dataclass(frozen=True)
class MinHeapDispatchAlg(DispatchAlg):
    """Work-balanced: chunks costed by the mask's area, largest first to the least
    loaded rank (every rank the same number of chunks)."""

    kind = "minheap"


@dataclass(frozen=True)
class SequentialDispatchAlg(DispatchAlg):
    """Baseline: rank r holds the r-th run of consecutive chunks."""

    kind = "sequential"


@dataclass(frozen=True)
class RandomDispatchAlg(DispatchAlg):
    """Baseline: a random permutation of the chunks, seeded (every rank agrees)."""

    seed: int = 0
    kind = "random"

    def __post_init__(self):
        _check_int(self.seed, "seed")


@dataclass(frozen=True)
class DispatchConfig:
    """How tokens are dispatched to ranks.

    Attributes:
        alg: a :class:`MinHeapDispatchAlg` (default), :class:`SequentialDispatchAlg` or
            :class:`RandomDispatchAlg`.
    """

    alg: DispatchAlg = field(default_factory=MinHeapDispatchAlg)

    def __post_init__(self):
        if not isinstance(self.alg, DispatchAlg) or not self.alg.kind:
            raise ValueError(
                "alg: expected MinHeapDispatchAlg(), SequentialDispatchAlg() or "
                f"RandomDispatchAlg(seed), got {self.alg!r}"
            )


class AttnOverlapMode(str, enum.Enum):
    """STATIC: the given number of stages; DYNAMIC: the core's cost model chooses."""

    STATIC = "static"
    DYNAMIC = "dynamic"


@dataclass(frozen=True)
class UniformOverlapAlg:
    """MagiAttention's stage-partition algorithm; accepted, not used (the core balances
    the tokens each stage moves)."""

    random_costs: bool = False
    random_seed: int | None = None


@dataclass(frozen=True)
class OverlapConfig:
    """Multi-stage overlap of KV transfers with compute.

    Attributes:
        enable: False runs one stage (all transfers, then compute on them).
        mode: ``STATIC`` (``degree`` stages) or ``DYNAMIC`` (the core's cost model picks
            the number of stages, up to ``dynamic_max_degree``; ``degree`` must be None).
        degree: stages in STATIC mode; 0 (no overlap) runs as 1.
        dynamic_max_degree, min_chunk_size, max_num_chunks, alg, calc_cost_factor,
        comm_cost_factor: MagiAttention's tuning fields; validated, not used.
    """

    enable: bool = True
    mode: AttnOverlapMode = AttnOverlapMode.STATIC
    degree: int | None = 1
    dynamic_max_degree: int | None = 8
    min_chunk_size: int = 512
    max_num_chunks: int = 64
    alg: UniformOverlapAlg = field(default_factory=UniformOverlapAlg)
    calc_cost_factor: float = 1.0
    comm_cost_factor: float = 1.0

    def __post_init__(self):
        if not isinstance(self.enable, bool):
            raise ValueError(f"enable: expected a bool, got {self.enable!r}")
        try:
            mode = AttnOverlapMode(self.mode)
        except ValueError:
            raise ValueError(
                f"mode: expected AttnOverlapMode.STATIC or DYNAMIC, got {self.mode!r}"
            ) from None
        object.__setattr__(self, "mode", mode)
        if self.enable and mode is AttnOverlapMode.DYNAMIC and self.degree is not None:
            raise ValueError(f"degree: must be None in DYNAMIC mode, got {self.degree!r}")
        if self.enable and mode is AttnOverlapMode.STATIC:
            if self.degree is None:
                raise ValueError("degree: required in STATIC mode (the number of stages)")
            _check_int(self.degree, "degree")
            if self.degree > self.max_num_chunks:
                raise ValueError(
                    f"degree: {self.degree} exceeds max_num_chunks={self.max_num_chunks}"
                )
        if self.dynamic_max_degree is not None:
            _check_int(self.dynamic_max_degree, "dynamic_max_degree", minimum=1)
        _check_int(self.min_chunk_size, "min_chunk_size", minimum=1)
        _check_int(self.max_num_chunks, "max_num_chunks", minimum=1)
        if not isinstance(self.alg, UniformOverlapAlg):
            raise ValueError(f"alg: expected a UniformOverlapAlg, got {self.alg!r}")
        for name in ("calc_cost_factor", "comm_cost_factor"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}: expected a positive number, got {value!r}")

    @property
    def stages(self) -> int | None:
        """The core's ``degree``: transfer stages, or None for its cost model."""
        if not self.enable:
            return 1
        if self.mode is AttnOverlapMode.DYNAMIC:
            return None
        return max(1, self.degree)


@dataclass(frozen=True)
class DistAttnConfig:
    """Everything the dispatch functions need besides the mask and the group.

    Attributes:
        dispatch_config: which dispatch algorithm (:class:`DispatchConfig`).
        overlap_config: how transfers overlap compute (:class:`OverlapConfig`).
        high_bandwith_domain_size: ranks per high-bandwidth domain (a node); > 1 plans
            hierarchically (each KV chunk crosses to another domain once). Must divide
            the group size. MagiAttention's spelling.
        deterministic: accepted; the core is deterministic anyway.
    """

    dispatch_config: DispatchConfig = field(default_factory=DispatchConfig)
    overlap_config: OverlapConfig = field(default_factory=OverlapConfig)
    high_bandwith_domain_size: int = 1
    deterministic: bool = False

    def __post_init__(self):
        if not isinstance(self.dispatch_config, DispatchConfig):
            raise ValueError(
                f"dispatch_config: expected a DispatchConfig, got {self.dispatch_config!r}"
            )
        if not isinstance(self.overlap_config, OverlapConfig):
            raise ValueError(
                f"overlap_config: expected an OverlapConfig, got {self.overlap_config!r}"
            )
        _check_int(self.high_bandwith_domain_size, "high_bandwith_domain_size", minimum=1)
        if not isinstance(self.deterministic, bool):
            raise ValueError(f"deterministic: expected a bool, got {self.deterministic!r}")


# ---------------------------------------------------------------------------------------
# Groups and meshes
# ---------------------------------------------------------------------------------------


def _mesh_device_type() -> str:
    backend = str(dist.get_backend())
    return "cuda" if "nccl" in backend else "cpu"


def init_hierarchical_mesh(
    *sizes: int,
    world_size: int | None = None,
    world_size_inter_node: int | None = None,
    world_size_intra_node: int | None = None,
    device_type: str | None = None,
):
    """A 2-d ``DeviceMesh`` with dims ``("inter", "intra")`` over the whole world.

    Call as ``init_hierarchical_mesh(world_size_inter_node, world_size_intra_node)`` or
    with MagiAttention's ``(world_size, world_size_inter_node, world_size_intra_node)``
    (positionally or by keyword). Rank ``r`` is node ``r // world_size_intra_node``.
    ``device_type`` defaults to ``"cuda"`` under NCCL, else ``"cpu"``. Unlike
    MagiAttention this always returns the mesh (no environment variable needed); pass
    it as ``cp_mesh`` (with ``cp_group=None``) to plan hierarchically.
    """
    from torch.distributed.device_mesh import init_device_mesh

    if len(sizes) == 3:
        given = dict(zip(("world_size", "inter", "intra"), sizes))
    elif len(sizes) == 2:
        given = dict(zip(("inter", "intra"), sizes))
    elif not sizes:
        given = {}
    else:
        raise ValueError(
            "sizes: expected (world_size_inter_node, world_size_intra_node) or "
            f"(world_size, world_size_inter_node, world_size_intra_node), got {sizes}"
        )
    for key, value in (
        ("world_size", world_size),
        ("inter", world_size_inter_node),
        ("intra", world_size_intra_node),
    ):
        if value is not None:
            if key in given and given[key] != value:
                raise ValueError(f"{key}: given twice ({given[key]} and {value})")
            given[key] = value
    if "inter" not in given or "intra" not in given:
        raise ValueError("world_size_inter_node, world_size_intra_node: both are required")
    inter = _check_int(given["inter"], "world_size_inter_node", minimum=1)
    intra = _check_int(given["intra"], "world_size_intra_node", minimum=1)
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("init_hierarchical_mesh: torch.distributed is not initialised")
    w = dist.get_world_size()
    if given.get("world_size", w) != inter * intra or w != inter * intra:
        raise ValueError(
            f"world_size_inter_node * world_size_intra_node: {inter} x {intra} must equal "
            f"the world size {w}"
            + (f" (and world_size={given['world_size']})" if "world_size" in given else "")
        )
    return init_device_mesh(
        device_type or _mesh_device_type(), (inter, intra), mesh_dim_names=("inter", "intra")
    )


def _is_mesh(obj) -> bool:
    from torch.distributed.device_mesh import DeviceMesh

    return isinstance(obj, DeviceMesh)


def _resolve_group(cp_group, cp_mesh, domain_size: int):
    """``(group, node_size or None)`` from MagiAttention's ``cp_group`` / ``cp_mesh``."""
    if cp_group is not None and cp_mesh is not None:
        raise ValueError("cp_group, cp_mesh: give one of them, not both")
    if _is_mesh(cp_group):  # MagiAttention >= 1.0 passes ``cp_group_or_mesh``
        cp_group, cp_mesh = None, cp_group
    node_size = None
    if cp_mesh is not None:
        if not _is_mesh(cp_mesh):
            raise ValueError(f"cp_mesh: expected a DeviceMesh, got {type(cp_mesh).__name__}")
        if cp_mesh.ndim == 1:
            group = cp_mesh.get_group()
        elif cp_mesh.ndim == 2:
            ranks = cp_mesh.mesh.flatten().tolist()
            if ranks == list(range(dist.get_world_size())):
                group = dist.group.WORLD  # the flattened mesh is the world, in order
            else:
                group = cp_mesh._flatten().get_group()
            node_size = int(cp_mesh.mesh.shape[1])
        else:
            raise ValueError(f"cp_mesh: expected a 1-d or 2-d mesh, got {cp_mesh.ndim}-d")
    else:
        group = cp_group
    _, w, _ = group_info(group)
    if domain_size > 1:
        if node_size is not None and node_size != domain_size:
            raise ValueError(
                f"high_bandwith_domain_size: {domain_size} disagrees with cp_mesh's intra "
                f"size {node_size}"
            )
        node_size = domain_size
    if node_size is not None and w % node_size:
        raise ValueError(f"high_bandwith_domain_size: {node_size} must divide the group size {w}")
    # One node, or nodes of one rank, is the flat schedule.
    if node_size is not None and not 1 < node_size < w:
        node_size = None
    return group, w, node_size


# ---------------------------------------------------------------------------------------
# The runtime key
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistAttnRuntimeKey:
    """What :func:`dispatch`, :func:`calc_attn` and :func:`undispatch` need: the plan
    and the sequence bookkeeping. Frozen and hashable; equal arguments to the key
    functions give equal keys (the plan is cached).

    Attributes:
        plan: the core :class:`hamilton_attn.Plan` over the padded sequence.
        total_seqlen_q, total_seqlen_k: the unpadded global lengths.
        pad_size, kv_pad_size: tokens appended to the query / key side by this module.
        chunk_size: the dispatch chunk size (None: the core's default).
        is_same_source, is_q_permutable, is_k_permutable: as given.
        degree, node_size: the groupcast options used (None: the core's choice / flat).
    """

    plan: _core.Plan
    total_seqlen_q: int
    total_seqlen_k: int
    pad_size: int
    kv_pad_size: int
    chunk_size: int | None
    is_same_source: bool
    is_q_permutable: bool
    is_k_permutable: bool
    degree: int | None
    node_size: int | None

    @property
    def cp_group(self):
        return self.plan.group

    @property
    def cp_size(self) -> int:
        return self.plan.world_size

    def _side(self, role: str) -> tuple[int, int, int]:
        """``(total, padded by us, local length)`` of the ``q`` or ``kv`` side."""
        if role == "q":
            total, pad, local = self.total_seqlen_q, self.pad_size, self.plan.local_len
        elif role == "kv":
            total, pad = self.total_seqlen_k, self.kv_pad_size
            local = self.plan.kv_placement.local_len
        else:
            raise ValueError(
                f"role: expected 'q' (query side) or 'kv' (key/value side), got {role!r}"
            )
        return total, total + pad, local


_MOST_RECENT: list[DistAttnRuntimeKey] = []


def _touch(key: DistAttnRuntimeKey) -> DistAttnRuntimeKey:
    _MOST_RECENT[:] = [key]
    return key


def get_most_recent_key() -> DistAttnRuntimeKey | None:
    """The key most recently built or used by this module (None before any)."""
    return _MOST_RECENT[0] if _MOST_RECENT else None


def _check_key(key) -> DistAttnRuntimeKey:
    if not isinstance(key, DistAttnRuntimeKey):
        raise ValueError(
            f"key: expected a DistAttnRuntimeKey (from magi_attn_*_key / *_dispatch), "
            f"got {type(key).__name__}"
        )
    return _touch(key)


def _flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected a bool, got {value!r}")
    return value


def _build_key(
    q_ranges,
    k_ranges,
    attn_mask_type,
    total_seqlen_q,
    total_seqlen_k,
    head_dim,
    pad_size,
    chunk_size,
    cp_group,
    cp_mesh,
    dist_attn_config,
    is_same_source,
    is_q_permutable,
    is_k_permutable,
) -> DistAttnRuntimeKey:
    _check_int(total_seqlen_q, "total_seqlen_q")
    _check_int(total_seqlen_k, "total_seqlen_k")
    if head_dim is not None:
        _check_int(head_dim, "head_dim", minimum=1)
    if pad_size is not None:
        _check_int(pad_size, "pad_size")
    if chunk_size is not None:
        _check_int(chunk_size, "chunk_size", minimum=1)
    config = DistAttnConfig() if dist_attn_config is None else dist_attn_config
    if not isinstance(config, DistAttnConfig):
        raise ValueError(f"dist_attn_config: expected a DistAttnConfig, got {config!r}")
    same = _flag(is_same_source, "is_same_source")
    q_perm = _flag(is_q_permutable, "is_q_permutable")
    k_perm = _flag(is_k_permutable, "is_k_permutable")
    if same and total_seqlen_q != total_seqlen_k:
        raise ValueError(
            f"total_seqlen_k: is_same_source=True needs total_seqlen_q == total_seqlen_k, "
            f"got {total_seqlen_q} and {total_seqlen_k} (use is_same_source=False for "
            "cross-attention)"
        )
    qr = _as_pairs(q_ranges, "q_ranges")
    kr = _as_pairs(k_ranges, "k_ranges")
    if len(qr) != len(kr):
        raise ValueError(f"k_ranges: expected {len(qr)} ranges like q_ranges, got {len(kr)}")
    types = _as_types(attn_mask_type, len(qr), "attn_mask_type")
    group, w, node_size = _resolve_group(cp_group, cp_mesh, config.high_bandwith_domain_size)

    # Our own padding, so that pad_size means what MagiAttention says; the core then
    # adds none (its chunks of chunk_size tile the padded length exactly).
    if pad_size is not None and chunk_size is not None:
        if (total_seqlen_q + pad_size) % (w * chunk_size):
            raise ValueError(
                f"pad_size: total_seqlen_q + pad_size = {total_seqlen_q + pad_size} must be a "
                f"multiple of cp_size * chunk_size = {w} x {chunk_size} (compute_pad_size("
                f"{total_seqlen_q}, {w}, head_dim, {chunk_size}) = "
                f"{compute_pad_size(total_seqlen_q, w, None, chunk_size)})"
            )
    if pad_size is None:
        pad_size = (
            0 if chunk_size is None else compute_pad_size(total_seqlen_q, w, None, chunk_size)
        )
    if same:
        kv_pad = pad_size
    else:
        kv_pad = 0 if chunk_size is None else compute_pad_size(total_seqlen_k, w, None, chunk_size)
    mask = _mask_from_ranges(
        tuple(qr), tuple(kr), tuple(types), total_seqlen_q + pad_size, total_seqlen_k + kv_pad
    )

    kind = config.dispatch_config.alg.kind
    options: dict = {}
    if same:
        dispatch_kind = kind if (q_perm and k_perm) else "sequential"
    else:
        dispatch_kind = kind if q_perm else "sequential"
        options["kv_dispatch"] = kind if k_perm else "sequential"
    if isinstance(config.dispatch_config.alg, RandomDispatchAlg):
        options["dispatch_seed"] = config.dispatch_config.alg.seed
    degree = config.overlap_config.stages
    if degree is not None:
        options["degree"] = degree
    if node_size is not None:
        options["node_size"] = node_size
    p = _core.plan(
        mask, group, schedule="groupcast", dispatch=dispatch_kind, chunk_size=chunk_size, **options
    )
    key = DistAttnRuntimeKey(
        plan=p,
        total_seqlen_q=total_seqlen_q,
        total_seqlen_k=total_seqlen_k,
        pad_size=pad_size,
        kv_pad_size=kv_pad,
        chunk_size=chunk_size,
        is_same_source=same,
        is_q_permutable=q_perm,
        is_k_permutable=k_perm,
        degree=degree,
        node_size=node_size,
    )
    return _touch(key)


@functools.lru_cache(maxsize=256)
def _mask_from_ranges(qr, kr, types, seqlen_q, seqlen_k) -> Mask:
    """``Mask.from_ranges``, cached: the compat calls rebuild the same ranges per step."""
    return Mask.from_ranges(qr, kr, types, seqlen_q, seqlen_k)


def _pad_along(x: torch.Tensor, dim: int, pad: int) -> torch.Tensor:
    if pad == 0:
        return x
    spec = [0, 0] * (x.dim() - dim - 1) + [0, pad]
    return F.pad(x, spec)


def magi_attn_flex_key(
    x: torch.Tensor | None,
    q_ranges,
    k_ranges,
    attn_mask_type,
    total_seqlen_q: int,
    total_seqlen_k: int,
    head_dim: int | None = None,
    pad_size: int | None = None,
    chunk_size: int | None = None,
    cp_group=None,
    cp_mesh=None,
    dist_attn_config: DistAttnConfig | None = None,
    is_same_source: bool = True,
    is_q_permutable: bool = True,
    is_k_permutable: bool = True,
    *,
    seq_dim: int | None = None,
) -> tuple[torch.Tensor | None, DistAttnRuntimeKey]:
    """Build the runtime key of a mask given as rectangles; return ``(x padded, key)``.

    Args:
        x: the global query-source tensor ``(T, ...)`` (or ``(B, T, ...)``), or None.
        q_ranges, k_ranges: :class:`AttnRanges`, lists of ``(start, end)`` or int tensors
            ``[n, 2]``; rectangle i is ``q_ranges[i] x k_ranges[i]``.
        attn_mask_type: one of ``full | causal | inv_causal | bi_causal`` (str,
            :class:`AttnMaskType` or 0..3) for all rectangles, or one per rectangle.
        total_seqlen_q, total_seqlen_k: the global sequence lengths (mask rows, columns).
        head_dim: accepted, unused. pad_size, chunk_size: see the module docstring.
        cp_group: the process group (None with ``cp_mesh=None``: the default group, or one
            process when torch.distributed is not initialised). cp_mesh: a 1-d or 2-d
            ``DeviceMesh`` instead of ``cp_group`` (2-d: hierarchical).
        dist_attn_config: :class:`DistAttnConfig` (default: min-heap dispatch, one stage).
        is_same_source, is_q_permutable, is_k_permutable: see the module docstring.
        seq_dim: x's sequence dim (default: 0 if its size there is ``total_seqlen_q``,
            else 1).

    Returns ``(x padded with pad_size zero tokens at the end, key)`` (x None: None).
    Every rank of the group must call this with equal arguments.
    """
    key = _build_key(
        q_ranges,
        k_ranges,
        attn_mask_type,
        total_seqlen_q,
        total_seqlen_k,
        head_dim,
        pad_size,
        chunk_size,
        cp_group,
        cp_mesh,
        dist_attn_config,
        is_same_source,
        is_q_permutable,
        is_k_permutable,
    )
    if x is None:
        return None, key
    total, padded, _ = key._side("q")
    dim = _find_seq_dim(x, seq_dim, (total, padded), "x")
    return _pad_along(x, dim, padded - x.shape[dim]), key


def magi_attn_flex_dispatch(
    x: torch.Tensor,
    q_ranges,
    k_ranges,
    attn_mask_type,
    total_seqlen_q: int,
    total_seqlen_k: int,
    head_dim: int | None = None,
    pad_size: int | None = None,
    chunk_size: int | None = None,
    cp_group=None,
    cp_mesh=None,
    dist_attn_config: DistAttnConfig | None = None,
    is_same_source: bool = True,
    is_q_permutable: bool = True,
    is_k_permutable: bool = True,
    *,
    seq_dim: int | None = None,
) -> tuple[torch.Tensor, DistAttnRuntimeKey]:
    """:func:`magi_attn_flex_key`, then :func:`dispatch` of x: returns ``(local_x, key)``
    with local_x ``((T + pad) / cp_size, ...)`` this rank's tokens (differentiable)."""
    x_padded, key = magi_attn_flex_key(
        x,
        q_ranges,
        k_ranges,
        attn_mask_type,
        total_seqlen_q,
        total_seqlen_k,
        head_dim,
        pad_size,
        chunk_size,
        cp_group,
        cp_mesh,
        dist_attn_config,
        is_same_source,
        is_q_permutable,
        is_k_permutable,
        seq_dim=seq_dim,
    )
    return dispatch(x_padded, key, seq_dim=seq_dim), key


def magi_attn_varlen_key(
    x: torch.Tensor | None,
    cu_seqlens_q,
    cu_seqlens_k,
    head_dim: int | None = None,
    pad_size: int | None = None,
    chunk_size: int | None = None,
    cp_group=None,
    cp_mesh=None,
    causal: bool = False,
    dist_attn_config: DistAttnConfig | None = None,
    *,
    window_size=(-1, -1),
    seq_dim: int | None = None,
) -> tuple[torch.Tensor | None, DistAttnRuntimeKey]:
    """flash-attn varlen style: packed documents from ``cu_seqlens_q`` / ``cu_seqlens_k``
    (int tensors or lists), FULL or (``causal=True``) bottom-right CAUSAL in each, or a
    sliding ``window_size`` (see :func:`infer_attn_mask_from_cu_seqlens`);
    self-attention. Otherwise as :func:`magi_attn_flex_key`."""
    q_ranges, k_ranges, types, total_q, total_k = infer_attn_mask_from_cu_seqlens(
        cu_seqlens_q, cu_seqlens_k, causal=_flag(causal, "causal"), window_size=window_size
    )
    return magi_attn_flex_key(
        x,
        q_ranges,
        k_ranges,
        types,
        total_q,
        total_k,
        head_dim,
        pad_size,
        chunk_size,
        cp_group,
        cp_mesh,
        dist_attn_config,
        True,
        True,
        True,
        seq_dim=seq_dim,
    )


def magi_attn_varlen_dispatch(
    x: torch.Tensor,
    cu_seqlens_q,
    cu_seqlens_k,
    head_dim: int | None = None,
    pad_size: int | None = None,
    chunk_size: int | None = None,
    cp_group=None,
    cp_mesh=None,
    causal: bool = False,
    dist_attn_config: DistAttnConfig | None = None,
    *,
    window_size=(-1, -1),
    seq_dim: int | None = None,
) -> tuple[torch.Tensor, DistAttnRuntimeKey]:
    """:func:`magi_attn_varlen_key`, then :func:`dispatch` of x: ``(local_x, key)``."""
    x_padded, key = magi_attn_varlen_key(
        x,
        cu_seqlens_q,
        cu_seqlens_k,
        head_dim,
        pad_size,
        chunk_size,
        cp_group,
        cp_mesh,
        causal,
        dist_attn_config,
        window_size=window_size,
        seq_dim=seq_dim,
    )
    return dispatch(x_padded, key, seq_dim=seq_dim), key


# ---------------------------------------------------------------------------------------
# dispatch / calc_attn / undispatch
# ---------------------------------------------------------------------------------------


def _find_seq_dim(x: torch.Tensor, seq_dim: int | None, lengths: tuple[int, ...], name: str) -> int:
    """The sequence dim of x: ``seq_dim`` if given, else 0 (token-major, MagiAttention's
    layout) when x.shape[0] is one of ``lengths``, else 1 (batched) when x.shape[1] is."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(x).__name__}")
    want = " or ".join(str(n) for n in sorted(set(lengths)))
    if seq_dim is not None:
        if not _is_int(seq_dim) or not -x.dim() <= seq_dim < x.dim():
            raise ValueError(f"seq_dim: {seq_dim!r} is out of range for a {x.dim()}-d {name}")
        dim = seq_dim % x.dim()
        if x.shape[dim] not in lengths:
            raise ValueError(
                f"{name}: expected {want} tokens along seq_dim={dim}, got shape {tuple(x.shape)}"
            )
        return dim
    for dim in (0, 1):
        if dim < x.dim() and x.shape[dim] in lengths:
            return dim
    raise ValueError(
        f"{name}: expected {want} tokens along dim 0 (token-major) or dim 1 (batched), got "
        f"shape {tuple(x.shape)}"
    )


def _role(key: DistAttnRuntimeKey, role: str) -> str | None:
    """The core's role argument: None where K/V share the queries' placement."""
    key._side(role)  # validates
    return None if role == "q" or key.plan.kv_placement is key.plan.placement else "kv"


def dispatch(
    x: torch.Tensor,
    key: DistAttnRuntimeKey,
    *,
    role: str = "q",
    seq_dim: int | None = None,
    pad_value: float = 0.0,
) -> torch.Tensor:
    """This rank's tokens of the global tensor ``x`` (identical on every rank).

    ``x`` is ``(T, ...)`` or ``(T + pad_size, ...)`` (padded by the key functions), or
    batched ``(B, T, ...)``; the result is ``(T_local, ...)`` (``(B, T_local, ...)``).
    ``role="kv"`` dispatches the key/value source of a cross-attention key
    (``is_same_source=False``). Padding tokens hold ``pad_value``. Differentiable: x's
    gradient is the full gradient on every rank.
    """
    key = _check_key(key)
    total, padded, _ = key._side(role)
    core_role = _role(key, role)
    dim = _find_seq_dim(x, seq_dim, (total, padded), "x")
    # The core pads to its own placement (nothing more when our padding already tiles
    # its chunks); it gets x padded to our length so that pad_size means Magi's.
    x_padded = _pad_along(x, dim, padded - x.shape[dim])
    kw = {} if core_role is None else {"role": core_role}
    local = _core.dispatch(x_padded, key.plan, seq_dim=dim, **kw)
    if pad_value != 0:
        pos = _core.get_position_ids(key.plan, device=local.device, **kw)
        shape = [1] * local.dim()
        shape[dim] = pos.numel()
        local = local.masked_fill((pos >= total).view(shape), pad_value)
    return local


def undispatch(
    x: torch.Tensor,
    key: DistAttnRuntimeKey,
    *,
    role: str = "q",
    seq_dim: int | None = None,
) -> torch.Tensor:
    """The global tensor ``(T, ...)`` (padding removed) from every rank's ``(T_local,
    ...)`` shard, on every rank; batched ``(B, T_local, ...)`` gives ``(B, T, ...)``.
    ``role="kv"`` for key-side shards of a cross-attention key. Differentiable."""
    key = _check_key(key)
    total, _, local = key._side(role)
    core_role = _role(key, role)
    dim = _find_seq_dim(x, seq_dim, (local,), "x")
    kw = {} if core_role is None else {"role": core_role}
    full = _core.undispatch(x, key.plan, seq_dim=dim, **kw)
    return full.narrow(dim, 0, total)


def calc_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key: DistAttnRuntimeKey,
    sink: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Context-parallel attention of this rank's local shards; differentiable.

    Args:
        q: ``(T_local, Hq, D)`` (MagiAttention's layout) or ``(B, T_local, Hq, D)``.
        k, v: ``(Tk_local, Hk, D)`` / ``(B, Tk_local, Hk, D)``, Hq % Hk == 0.
        key: from the dispatch / key functions.
        softmax_scale: default ``1 / sqrt(D)``.
        sink, softcap: unsupported (must be None / 0).

    Returns ``(out, lse)``: out like q; lse ``(T_local, Hq)`` (``(B, T_local, Hq)``),
    float32 (float64 for float64 inputs), -inf where a query sees no key.
    """
    key = _check_key(key)
    if sink is not None:
        raise ValueError("sink: attention sinks are not supported")
    if softcap != 0:
        raise ValueError(f"softcap: only 0 is supported, got {softcap!r}")
    dims = {t.dim() for t in (q, k, v)}
    if len(dims) != 1 or dims.pop() not in (3, 4):
        raise ValueError(
            "q, k, v: expected all (T_local, H, D) or all (B, T_local, H, D), got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    token_major = q.dim() == 3
    if token_major:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    out, lse = _core.calc_attn(q, k, v, key.plan, scale=softmax_scale, return_lse=True)
    lse = lse.transpose(1, 2)  # [B, Hq, T] -> [B, T, Hq], MagiAttention's token-major lse
    if lse.dtype != torch.float64:
        lse = lse.float()
    if token_major:
        return out.squeeze(0), lse.squeeze(0)
    return out, lse


def get_position_ids(key: DistAttnRuntimeKey, *, role: str = "q", device=None) -> torch.Tensor:
    """Global position of each of this rank's local tokens (int64, ``(T_local,)``);
    padding tokens get positions ``>= total_seqlen``."""
    key = _check_key(key)
    core_role = _role(key, role)
    kw = {} if core_role is None else {"role": core_role}
    return _core.get_position_ids(key.plan, device=device, **kw)


# ---------------------------------------------------------------------------------------
# One device
# ---------------------------------------------------------------------------------------


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
    if _is_int(attn_type_map):  # MagiAttention < 1.0: (max_seqlen_q, max_seqlen_k, map)
        attn_type_map, max_seqlen_q, max_seqlen_k = max_seqlen_k, attn_type_map, max_seqlen_q
    if sink is not None:
        raise ValueError("sink: attention sinks are not supported")
    if softcap != 0:
        raise ValueError(f"softcap: only 0 is supported, got {softcap!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a (T, H, D) tensor, got {shape}")
    qr = _as_pairs(q_ranges, "q_ranges")
    kr = _as_pairs(k_ranges, "k_ranges")
    if len(qr) != len(kr):
        raise ValueError(f"k_ranges: expected {len(qr)} ranges like q_ranges, got {len(kr)}")
    types = _as_types(0 if attn_type_map is None else attn_type_map, len(qr), "attn_type_map")
    mask = _mask_from_ranges(tuple(qr), tuple(kr), tuple(types), q.shape[0], k.shape[0])
    out, lse = attention(
        q.unsqueeze(0),
        k.unsqueeze(0),
        v.unsqueeze(0),
        mask,
        scale=softmax_scale,
        layout="bshd",
        return_lse=True,
    )
    lse = lse[0].transpose(0, 1)  # [Hq, Tq] -> [Tq, Hq]
    if lse.dtype != torch.float64:
        lse = lse.float()
    return out[0], lse.contiguous()
