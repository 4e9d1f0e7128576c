"""Block masks: a mask function ``mask_mod(b, h, q_idx, kv_idx) -> bool`` as a
:class:`hamilton_attn.Mask` (bands), which every path of the library runs.

The function is evaluated once on the ``Sq x Sk`` grid (a chunk of rows at a time, so no
``Sq x Sk`` tensor is held), each row's visible keys become maximal intervals, and runs
of consecutive rows whose intervals stay put or move one key per row become rectangles
of MagiAttention's four kinds (FULL, CAUSAL, INV_CAUSAL, BI_CAUSAL): a causal mask is
one rectangle, packed documents one per document, a sliding window one band.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import Mask

# Elements evaluated per chunk of rows (bool grid), and rows sampled for the b/h check.
_CHUNK_ELEMS = 1 << 22
_SAMPLE_ROWS = 16

_KINDS = {(0, 0): "full", (0, 1): "causal", (1, 0): "inv_causal", (1, 1): "bi_causal"}


@dataclass(frozen=True, eq=False)
class BlockMask:
    """What :func:`create_block_mask` returns: the mask as a :class:`Mask` and the
    batch / head sizes it was built for (1 means: the same for every b / h)."""

    mask: Mask
    batch: int
    heads: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.mask.shape


def _row_intervals(grid_RK: torch.Tensor, row0: int):
    """Maximal runs of True in each row of a bool grid: int64 ``rows, lo, hi`` (hi
    inclusive), sorted by (row, lo)."""
    g = grid_RK.to(torch.int8)
    pad = torch.zeros(g.shape[0], 1, dtype=torch.int8, device=g.device)
    d = torch.diff(torch.cat([pad, g, pad], 1), dim=1)
    starts = torch.nonzero(d == 1)
    ends = torch.nonzero(d == -1)
    rows = starts[:, 0].cpu() + row0
    return rows, starts[:, 1].cpu(), ends[:, 1].cpu() - 1


def _call_mask_mod(fn, b, h, q, k) -> torch.Tensor:
    try:
        got = fn(b, h, q, k)
    except Exception as err:  # noqa: BLE001 - any failure is the user's function
        raise ValueError(
            f"block_mask: the mask function failed on index tensors: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(got, torch.Tensor):
        got = torch.as_tensor(got)
    if got.dtype != torch.bool:
        raise ValueError(f"block_mask: the mask function must return bools, got {got.dtype}")
    return got


def mask_from_function(fn, batch: int, heads: int, seqlen_q: int, seqlen_k: int) -> Mask:
    """The :class:`Mask` of ``fn(b, h, q_idx, kv_idx)`` over ``seqlen_q x seqlen_k``.
    ValueError when the function fails, returns no bools, or depends on b or h (a Mask is
    the same for every batch entry and head)."""
    if not callable(fn):
        raise ValueError(f"block_mask: expected a function, got {type(fn).__name__}")
    zero = torch.zeros((), dtype=torch.long)
    kk = torch.arange(seqlen_k)
    # b / h independence, on a few rows spread over the sequence.
    if (batch > 1 or heads > 1) and seqlen_q and seqlen_k:
        rows = torch.linspace(0, seqlen_q - 1, min(_SAMPLE_ROWS, seqlen_q)).round().long()
        got = _call_mask_mod(
            fn,
            torch.arange(batch).view(-1, 1, 1, 1),
            torch.arange(heads).view(1, -1, 1, 1),
            rows.view(1, 1, -1, 1),
            kk.view(1, 1, 1, -1),
        )
        got = torch.broadcast_to(got, (batch, heads, rows.numel(), seqlen_k))
        if not bool((got == got[:1, :1]).all()):
            raise ValueError(
                "block_mask: the mask function depends on b or h; masks here are the same "
                "for every batch entry and head (give per-head patterns as score_mod)"
            )
    rows_all, lo_all, hi_all = [], [], []
    step = max(1, _CHUNK_ELEMS // max(seqlen_k, 1))
    for r0 in range(0, seqlen_q, step):
        r1 = min(seqlen_q, r0 + step)
        q = torch.arange(r0, r1).view(-1, 1)
        got = _call_mask_mod(fn, zero, zero, q, kk.view(1, -1))
        got = torch.broadcast_to(
            got.reshape(got.shape[-2:]) if got.dim() > 2 else got, (r1 - r0, seqlen_k)
        )
        r, lo, hi = _row_intervals(got, r0)
        rows_all.append(r)
        lo_all.append(lo)
        hi_all.append(hi)
    if not rows_all:
        return Mask([], seqlen_q, seqlen_k)
    return mask_from_intervals(
        torch.cat(rows_all), torch.cat(lo_all), torch.cat(hi_all), seqlen_q, seqlen_k
    )


def mask_from_intervals(rows, lo, hi, seqlen_q: int, seqlen_k: int) -> Mask:
    """Rectangles from every row's maximal key intervals ``lo..hi`` (sorted by row, then
    lo): the k-th interval of consecutive rows continues one run while its ends move by a
    constant 0 or 1 per row."""
    q_ranges, k_ranges, kinds = [], [], []
    open_: dict[int, list] = {}  # track -> [row0, last_row, lo0, hi0, lo_last, hi_last, dl, dh]

    def close(seg):
        a, last, lo0, hi0, lo_l, hi_l, dl, dh = seg
        dl, dh = dl or 0, dh or 0
        q_ranges.append((a, last + 1))
        k_ranges.append((lo0, (hi_l if dh else hi0) + 1))
        kinds.append(_KINDS[(dl, dh)])

    rows_, lo_, hi_ = rows.tolist(), lo.tolist(), hi.tolist()
    i, n = 0, len(rows_)
    while i < n:
        row = rows_[i]
        j = i
        while j < n and rows_[j] == row:
            j += 1
        for t in [t for t, seg in open_.items() if seg[1] != row - 1 or t >= j - i]:
            close(open_.pop(t))
        for t in range(j - i):
            a, b = lo_[i + t], hi_[i + t]
            seg = open_.get(t)
            if seg is not None:
                dl, dh = a - seg[4], b - seg[5]
                if seg[6] is None and dl in (0, 1) and dh in (0, 1):
                    seg[6], seg[7] = dl, dh
                if seg[6] == dl and seg[7] == dh:
                    seg[1], seg[4], seg[5] = row, a, b
                    continue
                close(open_.pop(t))
            open_[t] = [row, row, a, b, a, b, None, None]
        i = j
    for seg in open_.values():
        close(seg)
    return Mask.from_ranges(q_ranges, k_ranges, kinds, seqlen_q, seqlen_k)


def create_block_mask(mask_mod, B: int, H: int, QLen: int, KVLen: int, device=None) -> BlockMask:
    """AttentionEngine's (and FlexAttention's) ``create_block_mask(mask_mod, B, H, Sq,
    Sk, device)``: ``mask_mod(b, h, q_idx, kv_idx)`` over ``QLen x KVLen`` as a
    :class:`BlockMask`. ``device`` is accepted and unused (the mask is data, not a
    tensor)."""
    for name, val in (("B", B), ("H", H), ("QLen", QLen), ("KVLen", KVLen)):
        if not isinstance(val, int) or isinstance(val, bool) or val < (0 if "Len" in name else 1):
            raise ValueError(f"{name}: expected a positive int, got {val!r}")
    return BlockMask(mask_from_function(mask_mod, B, H, QLen, KVLen), B, H)


def resolve_block_mask(block_mask, batch: int, heads: int, seqlen_q: int, seqlen_k: int) -> Mask:
    """``block_mask`` (None, a mask function, a :class:`BlockMask` or a
    :class:`hamilton_attn.Mask`) as a Mask of shape ``(seqlen_q, seqlen_k)``."""
    if block_mask is None:
        return Mask.full(seqlen_q, seqlen_k)
    if isinstance(block_mask, BlockMask):
        block_mask = block_mask.mask
    if isinstance(block_mask, Mask):
        if block_mask.shape != (seqlen_q, seqlen_k):
            raise ValueError(
                f"block_mask: shape {block_mask.shape} != (seqlen_q, seqlen_k) = "
                f"({seqlen_q}, {seqlen_k}) of qkv_meta"
            )
        return block_mask
    if callable(block_mask):
        return mask_from_function(block_mask, batch, heads, seqlen_q, seqlen_k)
    raise ValueError(
        "block_mask: expected None, a function mask_mod(b, h, q_idx, kv_idx), "
        f"create_block_mask(...) or a hamilton_attn.Mask, got {type(block_mask).__name__}"
    )
