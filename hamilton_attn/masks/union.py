"""The union of overlapping bands as disjoint bands.

Within one band a row's keys form an interval ``[L(q), U(q)]`` whose ends are lines of
slope 0 or 1 in q. Cutting the rows where any two such lines of overlapping bands cross
(and where a band's lines switch slope), every segment either holds one row or has all
interval orderings fixed, so a single sort-and-sweep per segment gives the union.
"""

from __future__ import annotations

from .bands import NEG_INF_DIAG, POS_INF_DIAG, Band, _intersect


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
