"""The pieces a rank holds and the messages that move them, for the executor.

A piece (:class:`~hamilton_attn.schedule.PieceId`) is one part of a rank's local K/V
shard. K and V travel as two messages ``[B, n, Hk, D]`` (bshd, contiguous); a message
carries one piece, or a run of the sender's own pieces that lie back to back in its
shard (:func:`_message_runs`). Pieces a rank receives in one step go into one buffer
where they share their fate (:func:`_fates`), so that a later step computing several of
them reads one view (:func:`_adjacent`) instead of concatenating them."""

from __future__ import annotations

import math

import torch

from ..planner.plans import Plan
from ..schedule import PieceId


def _take(x_BSHD: torch.Tensor, ranges) -> torch.Tensor:
    """Tokens ``ranges`` of a local shard (a view when there is one range)."""
    if len(ranges) == 1:
        a, b = ranges[0]
        return x_BSHD[:, a:b]
    return torch.cat([x_BSHD[:, a:b] for a, b in ranges], dim=1)


class _Held(dict):
    """Pieces held by this rank: received ones as stored, own ones cut from the local
    shard when first asked for (a step that computes all of them in order reads the
    shard itself, so most are never cut: groupcast holds 16-64 own pieces per rank)."""

    def __init__(self, plan: Plan, k_BSHD, v_BSHD):
        super().__init__()
        # K and V travel as two messages, so an own piece is a view (no copy) when its
        # tokens are one contiguous range, as they are for every built-in schedule at
        # B = 1. A shard that is not contiguous (a slice of packed KV, say) is copied
        # once, so pieces stay back to back and one message can carry several.
        self._k, self._v = k_BSHD.contiguous(), v_BSHD.contiguous()
        self._rank, self._parts = plan.rank, plan.schedule.parts

    def __missing__(self, p: PieceId):
        if p.owner != self._rank or not 0 <= p.part < len(self._parts):
            raise KeyError(p)
        rr = self._parts[p.part]
        kv = self[p] = (_take(self._k, rr).contiguous(), _take(self._v, rr).contiguous())
        return kv

    def ref(self) -> torch.Tensor:
        """A held K tensor, for shapes and dtype."""
        return self._k


def _last_use(plan: Plan, steps, r: int | None = None) -> dict[PieceId, int]:
    """Last step at which rank ``r`` (default this rank) computes on or sends each piece."""
    r = plan.rank if r is None else r
    last: dict[PieceId, int] = {}
    for s, step in enumerate(steps):
        for p in step.compute[r]:
            last[p] = s
        for t in step.transfers:
            if t.src == r:
                last[t.piece] = s
    return last


def _step_kv(plan: Plan, held, pieces, k_BSHD, v_BSHD):
    """K and V (bshd) of the pieces a step computes, concatenated in order: one kernel
    call per step instead of one per piece (the local shard itself, no copy, when the
    pieces are all of this rank's own in order)."""
    if len(pieces) == 1:
        return held[pieces[0]]
    own = [PieceId(plan.rank, i) for i in range(len(plan.schedule.parts))]
    parts = plan.schedule.parts
    if (
        list(pieces) == own
        and all(x[-1][1] == y[0][0] for x, y in zip(parts, parts[1:]))
        and all(len(x) == 1 for x in parts)
    ):
        return k_BSHD, v_BSHD
    ks, vs = [held[p][0] for p in pieces], [held[p][1] for p in pieces]
    k, v = _adjacent(ks), _adjacent(vs)
    return (
        torch.cat(ks, dim=1) if k is None else k,
        torch.cat(vs, dim=1) if v is None else v,
    )


def _adjacent(xs: list[torch.Tensor]) -> torch.Tensor | None:
    """``cat(xs, dim=1)`` as a view when the ``[1, n, H, D]`` tensors lie back to back in
    one contiguous buffer (pieces received together, in order), else None."""
    row = math.prod(xs[0].shape[2:])
    if xs[0].shape[0] != 1 or not all(x.is_contiguous() and x.stride(1) == row for x in xs):
        return None  # (a one-token slice is "contiguous" whatever its row stride)
    step = xs[0].stride(1) * xs[0].element_size()
    for x, y in zip(xs, xs[1:]):
        if x.untyped_storage().data_ptr() != y.untyped_storage().data_ptr():
            return None
        if x.data_ptr() + x.shape[1] * step != y.data_ptr():
            return None
    n = sum(x.shape[1] for x in xs)
    return xs[0].as_strided((1, n) + tuple(xs[0].shape[2:]), xs[0].stride())


def _fates(plan: Plan, steps, phase: str) -> dict[int, dict[PieceId, tuple[int, bool]]]:
    """Per rank, per piece: (last step it is used there, kept for the backward there).
    Pieces with one fate may share a receive buffer; every rank computes the same table
    (cached per plan and phase: ``plan._state.fates``)."""
    per_plan = plan._state.fates
    if phase not in per_plan:
        retain = plan.schedule.retain if phase == "fwd" else None
        table = {}
        for r in range(plan.world_size):
            kept = set(retain[r]) if retain else set()
            table[r] = {p: (s, p in kept) for p, s in _last_use(plan, steps, r).items()}
        per_plan[phase] = table
    return per_plan[phase]


def _message_runs(plan: Plan, transfers, batch: int, fates=None) -> list[list]:
    """``transfers`` grouped into messages: per (src, dst) pair, in list order, a run of
    the sender's own pieces with consecutive part numbers whose token ranges touch is
    one message (they lie back to back in the sender's shard), at batch 1, if they
    share their fate at the receiver (``fates``: freed at one step, kept alike; one
    message is one buffer there). Sender and receiver see the same transfer list and
    table, so both cut the same runs in the same order."""
    parts = plan.schedule.parts
    pairs: dict[tuple[int, int], list] = {}
    for t in transfers:
        pairs.setdefault((t.src, t.dst), []).append(t)
    runs: list[list] = []
    for ts in pairs.values():
        run = [ts[0]]
        for t in ts[1:]:
            a, b = run[-1].piece, t.piece
            if (
                batch == 1
                and a.owner == b.owner == t.src
                and b.part == a.part + 1
                and len(parts[a.part]) == len(parts[b.part]) == 1
                and parts[a.part][0][1] == parts[b.part][0][0]
                and (fates is None or fates[t.dst].get(a) == fates[t.dst].get(b))
            ):
                run.append(t)
            else:
                runs.append(run)
                run = [t]
        runs.append(run)
    return runs


def _kv_transfers(plan: Plan, step, held, sends, recvs, received, fates=None) -> None:
    """This step's messages: K and V of each run of :func:`_message_runs` (one piece, or
    several own pieces back to back, sent as one view of the shard). Pieces received in
    one step go into one K and one V buffer (views back to back along the tokens) when
    the batch is 1 and they share their fate here (``fates``, :func:`_fates`), so a
    later step computing several of them in order reads one view instead of
    concatenating (:func:`_step_kv`)."""
    r = plan.rank
    ref = held.ref()
    batch = ref.shape[0]
    for run in _message_runs(plan, [t for t in step.transfers if t.src == r], batch, fates):
        ks, vs = [held[t.piece][0] for t in run], [held[t.piece][1] for t in run]
        k = ks[0] if len(run) == 1 else _adjacent(ks)
        v = vs[0] if len(run) == 1 else _adjacent(vs)
        k = torch.cat(ks, dim=1) if k is None else k  # not back to back: one copy
        v = torch.cat(vs, dim=1) if v is None else v
        sends += [(k, run[0].dst), (v, run[0].dst)]
    runs = _message_runs(plan, [t for t in step.transfers if t.dst == r], batch, fates)
    incoming = [t for run in runs for t in run]
    if not incoming:
        return
    rest = tuple(ref.shape[2:])
    lens = [sum(plan.schedule.part_len(t.piece.part) for t in run) for run in runs]
    shared = (
        len(incoming) > 1
        and batch == 1
        and (fates is None or len({fates[r].get(t.piece) for t in incoming}) == 1)
    )
    if shared:
        kb = ref.new_empty((1, sum(lens)) + rest)
        vb = ref.new_empty((1, sum(lens)) + rest)
    off = 0
    for run, n in zip(runs, lens):
        if shared:
            buf = (kb[:, off : off + n], vb[:, off : off + n])
        else:
            shape = (batch, n) + rest
            buf = (ref.new_empty(shape), ref.new_empty(shape))
        off += n
        recvs += [(buf[0], run[0].src), (buf[1], run[0].src)]
        at = 0
        for t in run:
            m = plan.schedule.part_len(t.piece.part)
            received.append((t.piece, (buf[0][:, at : at + m], buf[1][:, at : at + m])))
            at += m
