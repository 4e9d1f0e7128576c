"""The one executor: runs any verified schedule, forward and backward.

Per step: start this step's transfers (one batch of isend/irecv), compute this step's
blocks on pieces already held, then wait for the transfers, whose pieces are used from
the next step on. So the transfer of step s+1's KV overlaps step s's compute (double
buffering); on GPU, NCCL runs on its own stream and ``wait`` only orders the compute
stream after it: the loop never synchronises the host.

Tensors: local shards in ``bshd`` ([B, S_local, H, D]); a KV piece travels packed as one
``[2, B, n, Hk, D]`` buffer (K and V in one message); dK/dV accumulators travel the same
way in float32.
"""

from __future__ import annotations

import math
import weakref

import torch

from ..attention import once_differentiable
from ..kernels import select_kernel
from ..kernels.base import zeros_bhsd
from ..merge import acc_dtype, merge_, merge_last_
from ..planner.plans import Plan
from ..schedule import PieceId
from . import copy_engine, profile
from .comm import default_timeout, start_p2p


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


def _contiguous(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a contiguous tensor of ``dtype``: ``x`` itself when it already is (a
    kernel's own output, no copy), else one copy."""
    if x.dtype == dtype:
        return x.contiguous()
    return torch.empty(x.shape, dtype=dtype, device=x.device).copy_(x)


def _bhsd(kv, i: int) -> torch.Tensor:
    """K (i = 0) or V (i = 1) of a held piece ``(k_BSHD, v_BSHD)`` as a bhsd view."""
    return kv[i].transpose(1, 2)


_FATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fates(plan: Plan, steps, phase: str) -> dict[int, dict[PieceId, tuple[int, bool]]]:
    """Per rank, per piece: (last step it is used there, kept for the backward there).
    Pieces with one fate may share a receive buffer; every rank computes the same table
    (cached per plan and phase)."""
    per_plan = _FATES.setdefault(plan, {})
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


def _mailbox(plan: Plan, k_BSHD: torch.Tensor):
    """The copy-engine mailbox this call's transfers use (:mod:`..copy_engine`), or None
    for NCCL/gloo. Every rank asks at the start of every call (its first set-up is
    collective); slots fit the largest message: a whole shard's K, or its float32 dK."""
    if not k_BSHD.is_cuda or plan.world_size == 1:
        return None
    b, _, hk, d = k_BSHD.shape
    widest = b * plan.kv_local_len * hk * d * max(4, k_BSHD.element_size())
    return copy_engine.mailbox(plan.group, k_BSHD.device, widest, default_timeout().total_seconds())


def _record(prof, call, phase, s, plan, step, q, sends, recvs):
    nbytes = lambda items: sum(t.numel() * t.element_size() for t, _ in items)  # noqa: E731
    return prof.step(
        call,
        phase,
        s,
        plan.rank,
        q.device,
        len(step.compute[plan.rank]),
        nbytes(sends),
        nbytes(recvs),
    )


def _finish_step(rec, pending, device) -> None:
    """Wait for the step's transfers, timing compute and transfer if profiling."""
    if rec is not None:
        rec.t_compute_end = profile._Clock(device)
    if pending is not None:
        pending.wait()
        if rec is not None:
            rec.t_transfer_end = profile._Clock(device)


def forward(plan: Plan, q_BSHD, k_BSHD, v_BSHD, scale: float, kept: dict | None = None):
    """Returns ``out_BSHD`` (q's dtype) and ``lse_BHS`` (float32) for the local queries.
    Received pieces the schedule's backward keeps (``retain``) go into ``kept``.

    The output accumulates in float32; until a second block arrives it is the first
    block's own output (q's dtype, no copy), and when the second block is also this
    rank's last, the one merge is computed in float32 and rounded once into it: the
    same numbers without the float32 passes (W = 2)."""
    r = plan.rank
    q = q_BSHD.transpose(1, 2)
    held = _Held(plan, k_BSHD, v_BSHD)
    steps = plan.schedule.forward_steps()
    last = _last_use(plan, steps)
    last_compute = max((s for s, st in enumerate(steps) if st.compute[r]), default=-1)
    keep = set(plan.schedule.retain[r]) if plan.schedule.retain else set()
    dt = acc_dtype(q.dtype)
    acc_out = acc_lse = None
    low = False  # acc_out holds one unmerged block in the kernel's dtype
    prof = profile.current()
    call = prof.new_call() if prof is not None else 0
    fates = _fates(plan, steps, "fwd")
    mb = _mailbox(plan, k_BSHD)
    for s, step in enumerate(steps):
        sends, recvs, received = [], [], []
        _kv_transfers(plan, step, held, sends, recvs, received, fates)
        rec = None if prof is None else _record(prof, call, "fwd", s, plan, step, q, sends, recvs)
        pending = (
            start_p2p(sends, recvs, plan.group, plan.group_ranks, mailbox=mb)
            if sends or recvs
            else None
        )
        pieces = step.compute[r]
        for group in [pieces] if pieces else []:
            kv = _step_kv(plan, held, group, k_BSHD, v_BSHD)
            m, (qa, qb), (ka, kb) = plan.fused_block(r, group)
            qb_, k, v = q[:, :, qa:qb], _bhsd(kv, 0)[:, :, ka:kb], _bhsd(kv, 1)[:, :, ka:kb]
            kernel = select_kernel(plan.backend, qb_, k, v, m)
            o, l = kernel.forward(qb_, k, v, m, scale)
            if acc_out is None:
                b, hq, sq, _ = q.shape
                if (qa, qb) == (0, sq):  # covers every row: no fill, no copy
                    acc_out, acc_lse = o, l.to(dt, copy=True)
                else:
                    acc_out = zeros_bhsd(q, o.shape[-1], o.dtype)
                    acc_lse = torch.full((b, hq, sq), -math.inf, dtype=dt, device=q.device)
                    acc_out[:, :, qa:qb] = o
                    acc_lse[:, :, qa:qb] = l
                low = acc_out.dtype != dt
            elif low and s == last_compute:
                merge_last_(acc_out[:, :, qa:qb], acc_lse[:, :, qa:qb], o, l)
            else:
                if low:
                    acc_out, low = acc_out.to(dt), False
                merge_(acc_out[:, :, qa:qb], acc_lse[:, :, qa:qb], o, l)
        _finish_step(rec, pending, q.device)
        held.update(received)
        for p in [p for p in held if p.owner != r and last.get(p, -1) <= s]:
            if kept is not None and p in keep:
                kept[p] = held[p]
            del held[p]
    if acc_out is None:  # this rank's queries see nothing at all
        b, hq, sq, _ = q.shape
        acc_out = zeros_bhsd(q, v_BSHD.shape[-1])
        acc_lse = torch.full((b, hq, sq), -math.inf, dtype=dt, device=q.device)
    lse = acc_lse if q.dtype == torch.float64 else acc_lse.float()
    return acc_out.to(q.dtype).transpose(1, 2), lse


def grad_precision(plan: Plan, steps) -> tuple[dict, dict, int]:
    """Which gradient sums may stay in the inputs' dtype (say bfloat16) at no loss.

    A kernel returns its share of dQ/dK/dV in the inputs' dtype, so a sum of at most two
    such shares, added once in the inputs' dtype (the add runs in float32 and rounds
    once), equals the float32 sum rounded at the end: bit for bit. So an accumulator is
    kept "low" when it will take at most two contributions, each one kernel share or a
    low message, and is not sent on; a message is low when its accumulator took exactly
    one. Everything else sums in float32 as before. At W = 2 every accumulator is low
    and every dK/dV message is half the bytes.

    Returns ``(acc_low, msg_low, n_dq)``: ``acc_low[(piece, epoch)]`` for this rank's
    accumulators (an epoch ends when the accumulator is sent), ``msg_low[(step, src,
    piece)]`` for every message of the group (a receiver must know the sender's dtype),
    and the number of steps in which this rank computes (its dQ contributions). Cached
    per plan (the answer depends on the schedule alone)."""
    hit = _GRAD_PRECISION.get(plan)
    if hit is not None and hit[0] is steps:
        return hit[1]
    epoch: dict = {}
    parts: dict = {}  # (rank, piece, epoch) -> contributions: None (a kernel share) or a message key
    sent: set = set()
    msgs: dict = {}  # (step, src, piece) -> the sender's (rank, piece, epoch)
    for s, step in enumerate(steps):
        for t in step.grad_transfers:
            key = (t.src, t.piece, epoch.get((t.src, t.piece), 0))
            msgs[(s, t.src, t.piece)] = key
            sent.add(key)
            epoch[(t.src, t.piece)] = key[2] + 1
        for r, pieces in enumerate(step.compute):
            for piece in pieces:
                parts.setdefault((r, piece, epoch.get((r, piece), 0)), []).append(None)
        for t in step.grad_transfers:
            key = (t.dst, t.piece, epoch.get((t.dst, t.piece), 0))
            parts.setdefault(key, []).append((s, t.src, t.piece))
    memo: dict = {}

    def low(key) -> bool:
        if key not in memo:
            got = parts.get(key, [])
            memo[key] = len(got) <= (1 if key in sent else 2) and all(
                m is None or low(msgs[m]) for m in got
            )
        return memo[key]

    msg_low = {m: low(key) and len(parts.get(key, [])) == 1 for m, key in msgs.items()}
    r = plan.rank
    acc_low = {(piece, e): low((rr, piece, e)) for (rr, piece, e) in parts if rr == r}
    n_dq = sum(1 for step in steps if step.compute[r])
    _GRAD_PRECISION[plan] = (steps, (acc_low, msg_low, n_dq))
    return acc_low, msg_low, n_dq


_GRAD_PRECISION: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def backward(
    plan: Plan,
    dout_BSHD,
    q_BSHD,
    k_BSHD,
    v_BSHD,
    out_BSHD,
    lse_BHS,
    scale: float,
    kept: dict | None = None,
):
    """Returns ``dq, dk, dv`` for the local shards, in the inputs' dtypes. Runs the
    schedule's own backward (with the pieces ``kept`` from the forward) if it has one,
    else replays the forward steps with their grad transfers. Sums accumulate in float32
    (float64 for float64) except where :func:`grad_precision` shows the inputs' dtype
    gives the same bits."""
    r = plan.rank
    q, dout, out = q_BSHD.transpose(1, 2), dout_BSHD.transpose(1, 2), out_BSHD.transpose(1, 2)
    held = _Held(plan, k_BSHD, v_BSHD)
    steps = plan.schedule.backward_steps or plan.schedule.steps
    held.update(kept or {})
    last = _last_use(plan, steps)
    gdt = acc_dtype(q.dtype)
    acc_low, msg_low, n_dq = grad_precision(plan, steps)
    dq_dt = q.dtype if n_dq <= 2 else gdt
    dq = None
    # Per piece, its dK and dV sums ([B, n, Hk, D] each, contiguous: they travel as is).
    grad_acc: dict[PieceId, tuple[torch.Tensor, torch.Tensor]] = {}
    epoch: dict[PieceId, int] = {}

    def acc_dt(p: PieceId) -> torch.dtype:
        return k_BSHD.dtype if acc_low.get((p, epoch.get(p, 0)), False) else gdt

    prof = profile.current()
    call = prof.new_call() if prof is not None else 0
    fates = _fates(plan, steps, "bwd")
    mb = _mailbox(plan, k_BSHD)
    for s, step in enumerate(steps):
        sends, recvs, received = [], [], []
        _kv_transfers(plan, step, held, sends, recvs, received, fates)
        grads_in = []
        for t in step.grad_transfers:
            if t.src == r:
                sends += [(g, t.dst) for g in grad_acc.pop(t.piece)]
                epoch[t.piece] = epoch.get(t.piece, 0) + 1
            elif t.dst == r:
                ref = held.ref()
                n = plan.schedule.part_len(t.piece.part)
                dt = ref.dtype if msg_low[(s, t.src, t.piece)] else gdt
                shape = (ref.shape[0], n) + tuple(ref.shape[2:])
                buf = tuple(torch.empty(shape, dtype=dt, device=ref.device) for _ in range(2))
                recvs += [(g, t.src) for g in buf]
                grads_in.append((t.piece, buf))
        rec = None if prof is None else _record(prof, call, "bwd", s, plan, step, q, sends, recvs)
        pending = (
            start_p2p(sends, recvs, plan.group, plan.group_ranks, mailbox=mb)
            if sends or recvs
            else None
        )
        pieces = step.compute[r]
        for group in [pieces] if pieces else []:
            kv = _step_kv(plan, held, group, k_BSHD, v_BSHD)
            m, (qa, qb), (ka, kb) = plan.fused_block(r, group)
            rows = slice(qa, qb)
            k, v = _bhsd(kv, 0)[:, :, ka:kb], _bhsd(kv, 1)[:, :, ka:kb]
            kernel = select_kernel(plan.backend, q[:, :, rows], k, v, m)
            dq_b, dk_b, dv_b = kernel.backward(
                dout[:, :, rows],
                q[:, :, rows],
                k,
                v,
                out[:, :, rows],
                lse_BHS[:, :, rows],
                m,
                scale,
            )
            if dq is None and (qa, qb) == (0, q.shape[2]) and dq_b.dtype == dq_dt:
                dq = dq_b  # the first share covers every row: no fill, no copy
            else:
                if dq is None:
                    dq = zeros_bhsd(q, dtype=dq_dt)
                dq[:, :, rows] += dq_b
            off = 0
            for p in group:  # each piece's share of the step's dK/dV
                n = plan.schedule.part_len(p.part)
                a, b = max(ka, off), min(kb, off + n)
                if a < b:
                    dk_p = dk_b[:, :, a - ka : b - ka].transpose(1, 2)
                    dv_p = dv_b[:, :, a - ka : b - ka].transpose(1, 2)
                    acc = grad_acc.get(p)
                    if acc is None and b - a == n:  # the first share covers the piece
                        grad_acc[p] = tuple(_contiguous(g, acc_dt(p)) for g in (dk_p, dv_p))
                    else:
                        if acc is None:
                            shape = (k_BSHD.shape[0], n) + tuple(k_BSHD.shape[2:])
                            acc = grad_acc[p] = tuple(
                                torch.zeros(shape, dtype=acc_dt(p), device=q.device)
                                for _ in range(2)
                            )
                        acc[0][:, a - off : b - off] += dk_p
                        acc[1][:, a - off : b - off] += dv_p
                off += n
        _finish_step(rec, pending, q.device)
        held.update(received)
        for p, buf in grads_in:
            acc = grad_acc.get(p)
            if acc is None:
                grad_acc[p] = tuple(g.to(acc_dt(p)) for g in buf)
            else:
                acc[0].add_(buf[0])
                acc[1].add_(buf[1])
        for p in [p for p in held if p.owner != r and last.get(p, -1) <= s]:
            del held[p]
    if dq is None:
        dq = zeros_bhsd(q)
    parts = plan.schedule.parts
    own = grad_acc.get(PieceId(r, 0))
    if (
        len(parts) == 1
        and [tuple(x) for x in parts[0]] == [(0, k_BSHD.shape[1])]
        and own is not None
        and own[0].dtype == k_BSHD.dtype
        and own[1].dtype == v_BSHD.dtype
    ):
        dk, dv = own[0], own[1]  # one piece, the whole shard: its sum is the answer
    else:
        # Rounded once, on the copy, from whatever the accumulators hold.
        dk = torch.zeros_like(k_BSHD)
        dv = torch.zeros_like(v_BSHD)
        for part, rr in enumerate(parts):
            acc = grad_acc.get(PieceId(r, part))
            if acc is None:
                continue
            pos = 0
            for a, b in rr:
                dk[:, a:b] = acc[0][:, pos : pos + b - a]
                dv[:, a:b] = acc[1][:, pos : pos + b - a]
                pos += b - a
    return dq.to(q_BSHD.dtype).transpose(1, 2), dk, dv


class ContextParallelFunction(torch.autograd.Function):
    """Forward and backward of one context-parallel attention call, as one Function."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        kept: dict = {}
        out, lse = forward(plan, q, k, v, scale, kept)
        pieces = sorted(kept)
        ctx.save_for_backward(q, k, v, out, lse, *(t for p in pieces for t in kept[p]))
        ctx.plan, ctx.scale, ctx.kept_pieces = plan, scale, pieces
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable  # no double backward: raise, not give wrong numbers
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, *flat = ctx.saved_tensors
        kept = {p: (flat[2 * i], flat[2 * i + 1]) for i, p in enumerate(ctx.kept_pieces)}
        dq, dk, dv = backward(ctx.plan, dout.contiguous(), q, k, v, out, lse, ctx.scale, kept)
        return dq, dk, dv, None, None
