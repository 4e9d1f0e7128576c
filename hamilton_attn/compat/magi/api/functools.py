"""MagiAttention's helpers (``magi_attention.api.functools``): padding, batch
squashing, mask inference from sliding windows and ``cu_seqlens``, the hierarchical
mesh.

The masks are the core's: a sliding window is :meth:`hamilton_attn.Mask.sliding_window`
on the rectangle, moved into place, and its typed rectangles are the core mask's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ....masks import NEG_INF_DIAG, POS_INF_DIAG, Band, Mask, _check_cu_seqlens, _check_window
from ....placement import compute_pad_size as _placement_pad_size
from .._args import as_int_list, check_int, is_int
from ..common import AttnMaskType, AttnRange, AttnRanges
from ..common.mask import triple_from_mask

__all__ = [
    "compute_pad_size",
    "full_attention_to_varlen_attention",
    "infer_attn_mask_from_cu_seqlens",
    "infer_attn_mask_from_sliding_window",
    "init_hierarchical_mesh",
    "squash_batch_dim",
]


def compute_pad_size(
    total_seqlen_q: int, cp_size: int, head_dim: int | None = None, chunk_size: int | None = None
) -> int:
    """Tokens to append so that ``total_seqlen_q + pad`` is a multiple of
    ``cp_size * chunk_size`` (every rank then holds the same number of whole chunks).

    ``head_dim`` is accepted for MagiAttention's 4-argument form and unused. Called with
    three arguments ``(total_seqlen_q, cp_size, chunk_size)`` (MagiAttention >= 1.0's
    form) the third is the chunk size.
    """
    check_int(total_seqlen_q, "total_seqlen_q")
    check_int(cp_size, "cp_size", minimum=1)
    if chunk_size is None:
        head_dim, chunk_size = None, head_dim
    if chunk_size is None:
        raise ValueError("chunk_size: required (the chunk size of the dispatch)")
    check_int(chunk_size, "chunk_size", minimum=1)
    if head_dim is not None:
        check_int(head_dim, "head_dim", minimum=1)
    if total_seqlen_q == 0:
        # The core pads an empty sequence to one whole round of chunks (its placements
        # give every rank a token); MagiAttention pads nothing to nothing.
        return 0
    return _placement_pad_size(total_seqlen_q, cp_size, chunk_size)


def pad_at_dim(x: torch.Tensor, dim: int, pad_size: int) -> torch.Tensor:
    """``x`` with ``pad_size`` zero entries appended along ``dim``."""
    if pad_size == 0:
        return x
    return F.pad(x, [0, 0] * (x.dim() - dim - 1) + [0, pad_size])


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
    check_int(batch_size, "batch_size")
    check_int(seq_len, "seq_len")
    cu = torch.arange(batch_size + 1, dtype=torch.int32, device=device) * seq_len
    return cu, cu.clone()


def _check_window_size(window_size) -> tuple[int, int]:
    """flash-attn's ``(left, right)``, -1 unbounded. The rule on the values is the
    core's; MagiAttention takes ints only (the core also reads ``2.0`` or ``"2"``) and
    calls the argument ``window_size``."""
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise ValueError(
            f"window_size: expected a (left, right) pair, got {window_size!r}"
        ) from None
    problem = f"window_size: expected ints >= -1 (-1: unbounded), got {window_size!r}"
    if not (is_int(left) and is_int(right)):
        raise ValueError(problem)
    try:
        return _check_window((left, right))
    except ValueError:
        raise ValueError(problem) from None


def _magi_window_rows(q_range: AttnRange, k_range: AttnRange) -> AttnRange:
    """The rows MagiAttention gives a sliding window: the last ``k_range.seqlen`` of
    ``q_range`` when it is longer. Ported masks must match its rectangles row for row,
    so the rows above that square are dropped even where the right window reaches
    (the core's :meth:`Mask.sliding_window` keeps them)."""
    if q_range.seqlen > k_range.seqlen:
        return AttnRange(q_range.end - k_range.seqlen, q_range.end)
    return q_range


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
    rows = _magi_window_rows(q_range, k_range)
    window = Mask.sliding_window(rows.seqlen, _check_window_size(window_size), k_range.seqlen)
    return triple_from_mask(window, rows.start, k_range.start)


def _window_with_global_keys(q_range: AttnRange, k_range: AttnRange, window, g: int):
    """flash-attn's window on the whole document (every row: this extension has no
    MagiAttention original to match) plus its first ``g`` keys, each seen by the rows
    whose right window reaches it: query i sees key j < g when ``j <= i + right``."""
    right = window[1]
    lq, lk = q_range.seqlen, k_range.seqlen
    bands = Mask.sliding_window(lq, window, lk).bands
    glob = Band(0, lq, 0, g, NEG_INF_DIAG, POS_INF_DIAG if right < 0 else right)
    return triple_from_mask(Mask([*bands, glob], lq, lk), q_range.start, k_range.start)


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
    cu_q = _check_cu_seqlens(as_int_list(cu_seqlens_q, "cu_seqlens_q"), "cu_seqlens_q")
    cu_k = _check_cu_seqlens(as_int_list(cu_seqlens_k, "cu_seqlens_k"), "cu_seqlens_k")
    if len(cu_q) != len(cu_k):
        raise ValueError(
            f"cu_seqlens_k: expected {len(cu_q)} entries like cu_seqlens_q, got {len(cu_k)}"
        )
    window = _check_window_size(window_size)
    check_int(global_window_size, "global_window_size")
    docs = [
        (AttnRange(cu_q[i], cu_q[i + 1]), AttnRange(cu_k[i], cu_k[i + 1]))
        for i in range(len(cu_q) - 1)
    ]
    if window == (-1, -1):
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
        if g > 0:
            q, k, t = _window_with_global_keys(qr, kr, window, g)
        else:
            # MagiAttention runs its sliding-window inference per document, which drops
            # the rows of a document with more queries than keys.
            q, k, t = infer_attn_mask_from_sliding_window(qr, kr, window)
        q_all.extend(q)
        k_all.extend(k)
        types += t
    return q_all, k_all, types, cu_q[-1], cu_k[-1]


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
    inter = check_int(given["inter"], "world_size_inter_node", minimum=1)
    intra = check_int(given["intra"], "world_size_intra_node", minimum=1)
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
