"""Scans of a mask's rows: the table of every row's key intervals, and the dense
pieces (FULL or bottom-right CAUSAL rectangles) that dense kernels run.

Functions of the bands alone; :class:`~hamilton_attn.masks.Mask` caches what they give.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from .bands import Band

# A dense piece: rows [q0, q1), keys [k0, k1), and whether it is bottom-right causal.
Piece = tuple[int, int, int, int, bool]


def row_table(bands: Sequence[Band], seqlen_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Every row's maximal visible key intervals, as int64 ``rows, lo, hi`` sorted by
    (row, lo); touching intervals are joined. Vectorised over bands."""
    if not bands:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty, empty
    cols = torch.tensor([(b.q0, b.q1, b.k0, b.k1, b.lo, b.hi) for b in bands], dtype=torch.int64)
    n = cols[:, 1] - cols[:, 0]
    starts = torch.cumsum(n, 0) - n
    # One row of band columns per row of the table (one gather, not six repeats).
    band_of = torch.repeat_interleave(torch.arange(len(bands)), n)
    q0, _, k0, k1, lo, hi = cols[band_of].unbind(1)
    rows = torch.arange(int(n.sum())) - starts[band_of] + q0
    left = torch.maximum(k0, rows + lo)
    right = torch.minimum(k1 - 1, rows + hi)
    key = rows * (seqlen_k + 1) + left
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


def dense_pieces_of(bands: Sequence[Band], seqlen_k: int) -> list[Piece] | Literal[False]:
    """:meth:`Mask.dense_pieces` of the mask made of ``bands`` (False where it is None)."""
    pieces: list[Piece] = []
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

    for b in bands:
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
    if len(pieces) > 1 and not rows_cannot_join(bands, len(pieces)):
        again = pieces_from_rows(*row_table(bands, seqlen_k))
        if len(again) < len(pieces):
            return again
    return pieces


def rows_cannot_join(bands: Sequence[Band], n_pieces: int) -> bool:
    """True when cutting from the rows cannot give fewer than ``n_pieces`` pieces,
    proved from the bands alone (packed documents: 1M rows never tabulated).

    With no lower diagonal bounds, a band's row intervals all start at its k0; if
    no two bands' intervals touch in a shared row, no intervals join, so the rows'
    first keys are exactly the bands' k0s, and as a piece has one first key, the
    rows give at least as many pieces as there are distinct k0s. A row end
    ``min(k1 - 1, q + hi)`` never decreases and moves by at most one per row, so
    band A touches band B to its right iff ``B.k0 - 1`` lies between A's row ends
    at the first and last shared rows."""
    if n_pieces > len({b.k0 for b in bands}):
        return False
    order = sorted(bands, key=lambda b: b.q0)
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


def pieces_from_rows(rows: Tensor, lo: Tensor, hi: Tensor) -> list[Piece]:
    """Dense pieces from the rows' maximal key intervals (the k-th interval of each
    row forms track k): a run of consecutive rows of one track whose intervals share
    their first key and whose last key stays put (FULL) or moves one per row
    (bottom-right CAUSAL) is one piece. Only for masks without lower diagonal
    bounds, whose rows' intervals all start at a band's first column. ``rows, lo, hi``:
    :func:`row_table`."""
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
