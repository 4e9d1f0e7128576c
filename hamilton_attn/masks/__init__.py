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

Modules: :mod:`.bands` (the band arithmetic), :mod:`.union` (overlapping bands made
disjoint), :mod:`.checks` (argument checks of the builders), :mod:`.rows` (row tables
and dense pieces), :mod:`.mask` (the :class:`Mask` class). The private helpers below
are imported here for the modules that build bands themselves (compat/magi).
"""

# The public names, and (``name as name``: re-exports) the helpers of the former
# single-file module: the band helpers serve modules that build bands (compat/magi).
from .bands import NEG_INF_DIAG, POS_INF_DIAG, AttnMaskType, Band
from .bands import _intersect as _intersect
from .bands import _join_bands as _join_bands
from .bands import _rect_to_band as _rect_to_band
from .bands import _shift_band as _shift_band
from .bands import _try_join as _try_join
from .bands import _window_band as _window_band
from .checks import _as_range as _as_range
from .checks import _block_bounds as _block_bounds
from .checks import _check_cu_seqlens as _check_cu_seqlens
from .checks import _check_lens as _check_lens
from .checks import _check_window as _check_window
from .mask import _AREA_MEMO as _AREA_MEMO
from .mask import _AREA_MEMO_SIZE as _AREA_MEMO_SIZE
from .mask import _SLICE_CACHE as _SLICE_CACHE
from .mask import Mask
from .union import _any_overlap as _any_overlap
from .union import _boxes_touch as _boxes_touch
from .union import _lines as _lines
from .union import _union_bands as _union_bands

__all__ = ["AttnMaskType", "Band", "Mask", "NEG_INF_DIAG", "POS_INF_DIAG"]
