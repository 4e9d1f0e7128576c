"""A plan's fingerprint: a 128-bit blake2b of everything that must be equal on every
rank (the mask, both placements, the verified schedule and its backward, the options that
change a call), hashed from flat int64 records so that 1M-token plans on 64 ranks hash
in well under a second."""

from __future__ import annotations

import hashlib
from array import array


def _ints(h, values: list[int]) -> None:
    h.update(array("q", values).tobytes())


def _hash_steps(h, steps) -> None:
    # Length-prefixed flat int64 records, one buffer per step: a hamilton plan of 1M
    # tokens on 64 ranks has some 630K transfers and blocks, which this hashes in 0.7 s
    # (the plan itself takes 50 s) where repr() of the dataclasses alone took over 4 s.
    if steps is None:
        _ints(h, [-1])
        return
    _ints(h, [len(steps)])
    for st in steps:
        buf = [len(st.compute)]
        for pieces in st.compute:
            buf.append(len(pieces))
            buf.extend([x for pc in pieces for x in (pc.owner, pc.part)])
        for transfers in (st.transfers, st.grad_transfers):
            buf.append(len(transfers))
            buf.extend([x for t in transfers for x in (t.piece.owner, t.piece.part, t.src, t.dst)])
        _ints(h, buf)


def _hash_ranges(h, ranges) -> None:
    """``ranges``: per item, a tuple of ``(a, b)`` pairs."""
    _ints(h, [len(ranges)])
    for rr in ranges:
        _ints(h, [len(rr), *(x for ab in rr for x in ab)])


def plan_digest(p) -> bytes:
    """16 bytes of blake2b over what identifies a plan across ranks (:attr:`Plan.fingerprint`)."""
    s = p.schedule
    h = hashlib.blake2b(digest_size=16)
    head = (
        "plan-fingerprint-1",
        p.user_mask.shape,
        p.user_mask.digest().hex(),
        p.mask.shape,
        p.world_size,
        p.group_ranks,
        p.heads.degree if p.heads else 1,
        p.backend,
        p.check,
        p.self_attention,
        s.name,
        s.world_size,
        s.comm,
        s.grad_route,
        float(s.buffer_budget).hex(),
    )
    h.update(repr(head).encode())
    for pl in (p.placement, p.kv_placement):
        h.update(repr((pl.kind, pl.seqlen, pl.padded_len, pl.world_size, pl.chunk_size)).encode())
        _hash_ranges(h, pl.rank_ranges)
    _hash_ranges(h, s.parts)
    _hash_steps(h, s.steps)
    _hash_steps(h, s.backward_steps)
    if s.retain is None:
        _ints(h, [-1])
    else:
        _ints(h, [len(s.retain)])
        for kept in s.retain:
            _ints(h, [len(kept), *(x for pc in kept for x in (pc.owner, pc.part))])
    return h.digest()
