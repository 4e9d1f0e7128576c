"""Host-side work lists of the Triton kernel: which key tiles each query tile meets.

A mask is a union of bands (``q0 <= i < q1``, ``k0 <= j < k1``, ``lo <= j - i <= hi``).
Cut the ``Sq x Sk`` grid into tiles of ``BM`` rows by ``BN`` keys; a tile is

- *skipped* when no band meets it,
- *full* when one band covers all of it (the kernel then tests nothing), or
- *partial*: the kernel tests every element against the bands listed for the tile.

:func:`tile_lists` builds, for every "row" tile (query tiles for the forward and dQ
pass, key tiles for the dK/dV pass) the CSR list of the tiles it meets on the other axis,
each with the range of its bands in a flat band-index array (an empty range: full).
Built with numpy over (band, row tile) pairs, no Python loop per tile; cached per mask,
tile sizes, direction and device, since a plan runs the same blocks every step.

Full entries are also given as runs of consecutive tiles (``run_ptr`` / ``run_start`` /
``run_len``): the kernels walk a run with a plain counted loop (regular strides, which
Triton's software pipeliner overlaps), not one indirect entry at a time. When every
query row sees one contiguous key interval (causal, windows, packed documents, a single
band), :func:`row_intervals` gives it per row, and partial tiles test two bounds per
element instead of every band.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ...masks import Band, Mask


@dataclass(frozen=True)
class TileLists:
    """Work lists of one (mask, tile sizes, direction) on one device (int32 tensors).

    ``order`` ``[n_rows]``: every row tile, the heaviest first (the launch order: heavy
    tiles start in the first wave, light ones fill the tail; tiles meeting nothing come
    last and write zeros). ``ptr`` ``[n_rows + 1]``:
    entries ``ptr[t]:ptr[t+1]`` belong to row tile ``t``, its full ones
    first: ``ptr[t]:mid[t]`` (``mid`` ``[n_rows]``). Per entry: ``col`` the other
    axis's tile, ``b0``/``b1`` its range in ``band_idx`` (``b0 == b1``: full tile).
    ``bands`` ``[n_bands, 6]``: ``q0, q1, k0, k1, lo, hi`` (diagonals clamped to the
    grid, so every value fits int32). ``run_ptr`` ``[n_rows + 1]``: runs
    ``run_ptr[t]:run_ptr[t+1]`` cover row tile ``t``'s full entries, run ``r`` the tiles
    ``run_start[r] .. run_start[r] + run_len[r] - 1`` of the other axis. ``first``
    ``[n_rows]``: each row tile's lowest entry, as the first element (row or key) of the
    other axis it covers; ``contiguous``: every row tile's entries are consecutive tiles
    of the other axis from there (a counted loop can walk them with no per-entry load:
    ``RANGE`` in the kernels).

    Ragged lists (:func:`ragged_lists`, ``r0`` / ``r1`` set): row tile ``t`` is the rows
    ``r0[t] .. r1[t] - 1`` (at most a tile; tiles start where documents do, not on the
    grid), its ``ptr[t+1] - ptr[t]`` entries the consecutive tiles of the other axis from
    element ``first[t]`` (not on the grid either), every one tested (``mid == ptr``)."""

    order: torch.Tensor
    ptr: torch.Tensor
    mid: torch.Tensor
    col: torch.Tensor
    b0: torch.Tensor
    b1: torch.Tensor
    band_idx: torch.Tensor
    bands: torch.Tensor
    run_ptr: torch.Tensor
    run_start: torch.Tensor
    run_len: torch.Tensor
    first: torch.Tensor
    n_rows: int
    n_entries: int
    n_partial: int
    n_runs: int = 0
    contiguous: bool = False
    r0: torch.Tensor | None = None
    r1: torch.Tensor | None = None

    def short_runs(self, min_len: float = 4.0) -> bool:
        """Whether the full tiles come in runs shorter than ``min_len`` on average (or
        there are few of them): the kernels then walk every entry in one pipelined loop
        (``FLAT``), since a loop per short run pays its pipeline's fill each time."""
        full = self.n_entries - self.n_partial
        return full < min_len * max(self.n_runs, 1) or full < self.n_partial

    @property
    def ragged(self) -> bool:
        """Row tiles from ``r0`` / ``r1`` and entries at element offsets (:func:`ragged_lists`)."""
        return self.r0 is not None


def _band_table(mask: Mask) -> np.ndarray:
    sq, sk = mask.shape
    rows = []
    for b in mask.bands:
        lo = max(b.lo, b.k0 - (b.q1 - 1), -sq)
        hi = min(b.hi, (b.k1 - 1) - b.q0, sk)
        rows.append((b.q0, b.q1, b.k0, b.k1, lo, hi))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 6)


def _triples(bt: np.ndarray, bm: int, bn: int):
    """All (band, q tile, k tile) meeting, with whether the band covers the whole tile."""
    q0, q1, k0, k1, lo, hi = (bt[:, i] for i in range(6))
    t_first, t_last = q0 // bm, (q1 - 1) // bm
    n_t = t_last - t_first + 1
    band = np.repeat(np.arange(len(bt)), n_t)
    start = np.repeat(np.cumsum(n_t) - n_t, n_t)
    qt = np.repeat(t_first, n_t) + (np.arange(band.size) - start)
    # Rows of the tile inside the band, and the keys those rows see.
    ra = np.maximum(q0[band], qt * bm)
    rb = np.minimum(q1[band], (qt + 1) * bm) - 1
    kl = np.maximum(k0[band], ra + lo[band])
    kh = np.minimum(k1[band] - 1, rb + hi[band])
    ok = kl <= kh
    band, qt, kl, kh = band[ok], qt[ok], kl[ok], kh[ok]
    u_first, u_last = kl // bn, kh // bn
    n_u = u_last - u_first + 1
    b2 = np.repeat(band, n_u)
    start = np.repeat(np.cumsum(n_u) - n_u, n_u)
    kt = np.repeat(u_first, n_u) + (np.arange(b2.size) - start)
    qt2 = np.repeat(qt, n_u)
    # Unclipped tile bounds: a tile reaching past Sq or Sk is never "full", so the
    # kernel masks the padding rows / keys through the band test.
    a, b = qt2 * bm, qt2 * bm + bm - 1
    c, d = kt * bn, kt * bn + bn - 1
    full = (
        (a >= q0[b2])
        & (b < q1[b2])
        & (c >= k0[b2])
        & (d < k1[b2])
        & (c - b >= lo[b2])
        & (d - a <= hi[b2])
    )
    # A band may meet the tile's row range only in rows that see other keys: keep
    # only tiles where the band really has a pair (a diagonal strip can pass between).
    ra = np.maximum(q0[b2], a)
    rb = np.minimum(q1[b2] - 1, b)
    # keys of rows ra..rb: [max(k0, r + lo), min(k1 - 1, r + hi)]; a pair exists in
    # [c, d] iff some row's interval meets it: the union of intervals is contiguous.
    klo = np.maximum(k0[b2], ra + lo[b2])
    khi = np.minimum(k1[b2] - 1, rb + hi[b2])
    hit = (klo <= d) & (khi >= c)
    return b2[hit], qt2[hit], kt[hit], full[hit]


def _build(mask: Mask, bm: int, bn: int, transpose: bool, device: torch.device) -> TileLists:
    sq, sk = mask.shape
    bt = _band_table(mask)
    band, qt, kt, full = _triples(bt, bm, bn)
    rows_, cols_ = (kt, qt) if transpose else (qt, kt)
    n_rows = -(-(sk if transpose else sq) // (bn if transpose else bm))
    n_cols = -(-(sq if transpose else sk) // (bm if transpose else bn))
    key = rows_ * n_cols + cols_
    o = np.lexsort((band, key))
    key, band, full = key[o], band[o], full[o]
    uniq, first, counts = np.unique(key, return_index=True, return_counts=True)
    if uniq.size:
        any_full = np.maximum.reduceat(full.astype(np.int8), first).astype(bool)
    else:
        any_full = np.zeros(0, dtype=bool)
    e_row, e_col = uniq // n_cols, uniq % n_cols
    # Per row tile: full entries first, then partial ones (the kernels run them in two
    # loops, the first without any masking code).
    perm = np.lexsort((e_col, ~any_full, e_row))
    e_row, e_col, partial, counts = e_row[perm], e_col[perm], ~any_full[perm], counts[perm]
    # Bands of the partial entries, in the new entry order.
    ent = np.repeat(np.arange(uniq.size), np.diff(np.append(first, key.size)))
    pos = np.empty(uniq.size, dtype=np.int64)
    pos[perm] = np.arange(uniq.size)
    keep = ~any_full[ent]
    t_pos, t_band = pos[ent[keep]], band[keep]
    band_idx = t_band[np.argsort(t_pos, kind="stable")]
    nb = np.where(partial, counts, 0)
    b1 = np.cumsum(nb)
    b0 = b1 - nb
    per_row = np.bincount(e_row, minlength=n_rows)
    ptr = np.concatenate([[0], np.cumsum(per_row)])
    mid = ptr[:-1] + np.bincount(e_row, weights=~partial, minlength=n_rows).astype(np.int64)
    # Heaviest first; partial tiles weigh more (the band test), ties by index.
    weight = np.bincount(e_row, weights=1.0 + 0.5 * partial, minlength=n_rows)
    order = np.lexsort((np.arange(n_rows), -weight))
    # Runs of consecutive full tiles (full entries are sorted by column within a row).
    fi = np.flatnonzero(~partial)
    fr, fc = e_row[fi], e_col[fi]
    brk = np.ones(fi.size, dtype=bool)
    brk[1:] = (fr[1:] != fr[:-1]) | (fc[1:] != fc[:-1] + 1)
    starts = np.flatnonzero(brk)
    run_len = np.diff(np.append(starts, fi.size))
    run_ptr = np.concatenate([[0], np.cumsum(np.bincount(fr[starts], minlength=n_rows))])
    # Each row tile's column span: contiguous when it holds exactly its entry count.
    first = np.zeros(n_rows, dtype=np.int64)
    contiguous = True
    if uniq.size:
        starts_r = ptr[:-1][per_row > 0]
        lo_c = np.minimum.reduceat(e_col, starts_r)
        hi_c = np.maximum.reduceat(e_col, starts_r)
        first[per_row > 0] = lo_c * (bm if transpose else bn)  # elements
        contiguous = bool(np.all(hi_c - lo_c + 1 == per_row[per_row > 0]))

    def t(x):
        return torch.as_tensor(np.ascontiguousarray(x, dtype=np.int32), device=device)

    bands = bt if len(bt) else np.zeros((1, 6), dtype=np.int64)
    return TileLists(
        order=t(order),
        ptr=t(ptr),
        mid=t(mid),
        col=t(e_col),
        b0=t(b0),
        b1=t(b1),
        band_idx=t(band_idx if band_idx.size else np.zeros(1)),
        bands=t(bands),
        run_ptr=t(run_ptr),
        run_start=t(fc[starts] if starts.size else np.zeros(1)),
        run_len=t(run_len if starts.size else np.zeros(1)),
        first=t(first),
        n_rows=int(order.size),
        n_entries=int(uniq.size),
        n_partial=int(partial.sum()),
        n_runs=int(starts.size),
        contiguous=contiguous,
    )


def _ragged_rows(lo: np.ndarray, hi: np.ndarray, bm: int, bn: int, n_other: int):
    """Ragged row tiles of rows whose visible keys are ``lo[i] .. hi[i]`` (none where
    ``lo > hi``): a tile starts where a run of rows seeing nothing starts or ends, where
    a row's keys start after the previous row's end (a new document), or ``bm`` rows
    into a run. Returns ``(r0, r1, first, count, n_full)``: each tile's rows, its first
    key, how many ``bn``-key tiles from there cover its rows' keys, and how many of those
    every row of the tile sees whole."""
    n = lo.size
    vis = lo <= hi
    brk = np.ones(n, dtype=bool)
    brk[1:] = (vis[1:] != vis[:-1]) | (vis[1:] & (lo[1:] > hi[:-1]))
    seg = np.cumsum(brk) - 1
    pos = np.arange(n) - np.flatnonzero(brk)[seg]
    r0 = np.flatnonzero(brk | (pos % bm == 0))
    r1 = np.append(r0[1:], n)
    big = np.iinfo(np.int64).max
    klo = np.minimum.reduceat(np.where(vis, lo, big), r0)
    khi = np.maximum.reduceat(np.where(vis, hi, -1), r0)
    seen = klo <= khi
    first = np.where(seen, klo, 0)
    count = np.where(seen, (khi - first) // bn + 1, 0)
    # full: keys [c, c + bn) inside every row's interval (and inside the axis)
    lo_max = np.maximum.reduceat(np.where(vis, lo, -1), r0)
    hi_min = np.minimum(np.minimum.reduceat(np.where(vis, hi, big), r0), n_other - 1)
    e_a = -(-(lo_max - first) // bn)
    e_b = (hi_min - bn + 1 - first) // bn
    n_full = np.where(seen, np.clip(e_b - e_a + 1, 0, None), 0)
    return r0, r1, first, count, n_full


@functools.lru_cache(maxsize=256)
def _intervals_np(mask: Mask, transpose: bool):
    """``(lo, hi)`` int64 numpy arrays: each row's (each key's, when ``transpose``) one
    visible interval on the other axis, or None where some row (key) sees two."""
    if transpose:
        sq, sk = mask.shape
        bands = [Band(b.k0, b.k1, b.q0, b.q1, -b.hi, -b.lo) for b in mask.bands]
        mask = Mask(bands, sk, sq)
    lo, hi = mask.row_intervals()
    if lo.shape[0] != 1:
        return None
    return lo[0].numpy().astype(np.int64), hi[0].numpy().astype(np.int64)


@functools.lru_cache(maxsize=1024)
def _ragged_of(mask: Mask, bm: int, bn: int, transpose: bool):
    """:func:`_ragged_rows` of the mask's rows (keys, when ``transpose``), or None."""
    iv = _intervals_np(mask, transpose)
    if iv is None:
        return None
    rows, cols = (bn, bm) if transpose else (bm, bn)
    return _ragged_rows(*iv, rows, cols, mask.shape[0 if transpose else 1])


def ragged_counts(mask: Mask, bm: int, bn: int, transpose: bool) -> tuple[int, int] | None:
    """``(tiles, partial tiles)`` of :func:`ragged_lists` (host arrays only), or None
    where the mask's rows (keys, when ``transpose``) do not each see one interval."""
    got = _ragged_of(mask, bm, bn, transpose)
    if got is None:
        return None
    count, n_full = got[3], got[4]
    return int(count.sum()), int((count - n_full).sum())


@functools.lru_cache(maxsize=1024)
def ragged_lists(mask: Mask, bm: int, bn: int, transpose: bool, device: torch.device):
    """Ragged work lists (:class:`TileLists` with ``r0`` / ``r1``) for ``bm x bn`` tiles,
    or None where rows (keys, when ``transpose``) do not each see one interval. Row
    tiles start at document starts and key tiles at each row tile's first key, so short
    documents waste less than on the grid (64-512-token documents on 64 x 32 tiles:
    0.73 of the visited pairs visible, against 0.67). The kernels test every entry
    against the rows' intervals (``RAGGED``, with ``RANGE``'s counted loop)."""
    got = _ragged_of(mask, bm, bn, transpose)
    if got is None:
        return None
    r0, r1, first, count, n_full = got
    n_rows = r0.size
    ptr = np.concatenate([[0], np.cumsum(count)])
    order = np.lexsort((np.arange(n_rows), -count))

    def t(x):
        return torch.as_tensor(np.ascontiguousarray(x, dtype=np.int32), device=device)

    zero = t(np.zeros(1))
    return TileLists(
        order=t(order),
        ptr=t(ptr),
        mid=t(ptr[:-1]),
        col=zero,
        b0=zero,
        b1=zero,
        band_idx=zero,
        bands=t(np.zeros((1, 6))),
        run_ptr=t(np.zeros(n_rows + 1)),
        run_start=zero,
        run_len=zero,
        first=t(first),
        n_rows=int(n_rows),
        n_entries=int(ptr[-1]),
        n_partial=int((count - n_full).sum()),  # tiles some row does not see whole
        n_runs=0,
        contiguous=True,
        r0=t(r0),
        r1=t(r1),
    )


@functools.lru_cache(maxsize=4096)
def tile_counts(mask: Mask, bm: int, bn: int) -> tuple[int, int]:
    """``(tiles visited, partial tiles)`` for ``bm x bn`` tiles (no device arrays)."""
    if mask.is_empty():
        return 0, 0
    _, sk = mask.shape
    band, qt, kt, full = _triples(_band_table(mask), bm, bn)
    key = qt * (-(-sk // bn)) + kt
    uniq = np.unique(key)
    n_full = np.unique(key[full]).size
    return int(uniq.size), int(uniq.size - n_full)


@functools.lru_cache(maxsize=1024)
def tile_lists(mask: Mask, bm: int, bn: int, transpose: bool, device: torch.device) -> TileLists:
    """The work lists of ``mask`` for ``bm x bn`` tiles (rows x keys): per query tile,
    or per key tile when ``transpose`` (the dK/dV pass), on ``device`` (cached)."""
    return _build(mask, bm, bn, transpose, device)


@functools.lru_cache(maxsize=1024)
def row_intervals(mask: Mask, device: torch.device):
    """``(lo, hi)`` int32 ``[Sq]`` tensors on ``device`` when every row's visible keys
    are one interval ``lo[i] <= j <= hi[i]`` (rows that see nothing: ``lo > hi``), else
    None (some row sees two disjoint intervals; cached). :meth:`Mask.row_intervals`
    with one slot."""
    lo, hi = mask.row_intervals(device)
    if lo.shape[0] != 1:
        return None
    return lo[0].contiguous(), hi[0].contiguous()


def dense_of(lists: TileLists, mask: Mask, bm: int, bn: int, transpose: bool) -> np.ndarray:
    """The element mask the lists describe ``[Sq, Sk]`` (tests: lists == mask)."""
    sq, sk = mask.shape
    out = np.zeros((sq, sk), dtype=bool)
    ptr = lists.ptr.cpu().numpy()
    col, b0, b1 = (x.cpu().numpy() for x in (lists.col, lists.b0, lists.b1))
    bi, bt = lists.band_idx.cpu().numpy(), lists.bands.cpu().numpy()
    ii, jj = np.arange(sq)[:, None], np.arange(sk)[None, :]
    for r in range(len(ptr) - 1):
        for e in range(ptr[r], ptr[r + 1]):
            qt, kt = (col[e], r) if transpose else (r, col[e])
            rs, cs = slice(qt * bm, (qt + 1) * bm), slice(kt * bn, (kt + 1) * bn)
            if b0[e] == b1[e]:
                out[rs, cs] = True
                continue
            for j in bi[b0[e] : b1[e]]:
                q0, q1, k0, k1, lo, hi = bt[j]
                i, k = ii[rs], jj[:, cs]
                out[rs, cs] |= (
                    (q0 <= i) & (i < q1) & (k0 <= k) & (k < k1) & (lo <= k - i) & (k - i <= hi)
                )
    return out
