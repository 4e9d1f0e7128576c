"""The one executor: runs any verified schedule, forward and backward.

Per step (:class:`_Pass`, the one loop): start this step's transfers as one batch
(through the call's transport, :mod:`.transports`), compute this step's blocks on pieces
already held, then wait for the transfers, whose pieces are used from the next step on.
So the transfer of step s+1's KV overlaps step s's compute (double buffering); on GPU,
the transfers run on their own streams and ``wait`` only orders the compute stream after
them: the loop never synchronises the host.

Tensors: local shards in ``bshd`` ([B, S_local, H, D]); K and V travel as messages of
their own (:mod:`.pieces`); dK/dV accumulators travel the same way, in float32 unless
:func:`grad_precision` shows the inputs' dtype gives the same bits.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..attention import (
    alibi_accumulator,
    once_differentiable,
    param_grads,
    run_backward,
    run_forward,
)
from ..kernels import memo_kernel
from ..kernels.base import zeros_bhsd
from ..merge import acc_dtype, merge_, merge_last_
from ..planner.plans import Plan
from ..schedule import PieceId
from ..variants import apply_sink
from . import profile
from .pieces import _fates, _Held, _kv_transfers, _last_use, _step_kv
from .transports import Transport, transport_for


def _contiguous(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a contiguous tensor of ``dtype``: ``x`` itself when it already is (a
    kernel's own output, no copy), else one copy."""
    if x.dtype == dtype:
        return x.contiguous()
    return torch.empty(x.shape, dtype=dtype, device=x.device).copy_(x)


def _bhsd(kv, i: int) -> torch.Tensor:
    """K (i = 0) or V (i = 1) of a held piece ``(k_BSHD, v_BSHD)`` as a bhsd view."""
    return kv[i].transpose(1, 2)


def _block_variant(plan: Plan, bv, pieces, block, device):
    """The call's bound variant ``bv`` for this rank's block of ``pieces`` (None: plain):
    with the global positions of the block's rows and keys (cached per plan), which
    ALiBi and score_mod read. Padding slots (positions past the real lengths, which the
    mask hides) get the last real position: a score_mod indexing a table of the real
    length must not see an index it would refuse."""
    if bv is None or (bv.alibi is None and bv.score_mod is None):
        return bv
    _, (qa, qb), (ka, kb) = block
    key = (plan.rank, pieces, device)
    hit = plan._state.positions.get(key)
    if hit is None:
        rows = plan.placement.global_indices(plan.rank)
        keys = [i for p in pieces for a, b in plan.piece_ranges(p) for i in range(a, b)]
        sq, sk = plan.user_mask.shape
        hit = plan._state.positions[key] = (
            torch.tensor(rows, dtype=torch.long, device=device).clamp_(max=max(sq - 1, 0)),
            torch.tensor(keys, dtype=torch.long, device=device).clamp_(max=max(sk - 1, 0)),
        )
    return dataclasses.replace(bv, q_pos=hit[0][qa:qb], k_pos=hit[1][ka:kb])


def _transport(plan: Plan, k_BSHD: torch.Tensor) -> Transport:
    """This call's transport (:mod:`.transports`). Every rank asks at the start of every
    call (a copy-engine mailbox is set up collectively); its slots fit the largest
    message: a whole shard's K, or its float32 dK."""
    b, _, hk, d = k_BSHD.shape
    widest = b * plan.kv_local_len * hk * d * max(4, k_BSHD.element_size())
    return transport_for(plan.group, plan.group_ranks, k_BSHD.device, widest)


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


class _Pass:
    """One pass over a schedule's steps, forward or backward: the step loop, written once.

    Per step: the KV messages (:func:`_kv_transfers`) and the pass's own
    (:meth:`_grad_messages`) start as one batch; the step's block runs on pieces already
    held (:meth:`_compute`); then the transfers are waited for, what arrived is taken
    (:meth:`_arrived`), and received pieces past their last use are let go
    (:meth:`_release` first)."""

    phase = ""  # "fwd" | "bwd"

    def __init__(self, plan: Plan, steps, q_BSHD, k_BSHD, v_BSHD, bv=None):
        self.plan, self.steps, self.bv = plan, steps, bv
        self.q = q_BSHD.transpose(1, 2)
        self.k_BSHD, self.v_BSHD = k_BSHD, v_BSHD
        self.held = _Held(plan, k_BSHD, v_BSHD)

    def run(self) -> None:
        plan, steps, held, q = self.plan, self.steps, self.held, self.q
        r = plan.rank
        last = _last_use(plan, steps)
        prof = profile.current()
        call = prof.new_call() if prof is not None else 0
        fates = _fates(plan, steps, self.phase)
        transport = _transport(plan, self.k_BSHD)
        for s, step in enumerate(steps):
            sends, recvs, received = [], [], []
            _kv_transfers(plan, step, held, sends, recvs, received, fates)
            grads_in = self._grad_messages(s, step, sends, recvs)
            rec = None
            if prof is not None:
                rec = _record(prof, call, self.phase, s, plan, step, q, sends, recvs)
            pending = transport.start(sends, recvs) if sends or recvs else None
            pieces = step.compute[r]
            if pieces:
                kv = _step_kv(plan, held, pieces, self.k_BSHD, self.v_BSHD)
                m, (qa, qb), (ka, kb) = block = plan.fused_block(r, pieces)
                q_rows = q[:, :, qa:qb]
                k, v = _bhsd(kv, 0)[:, :, ka:kb], _bhsd(kv, 1)[:, :, ka:kb]
                bv = _block_variant(plan, self.bv, pieces, block, q.device)
                kernel = memo_kernel(
                    plan._state.kernels, (r, pieces), plan.backend, q_rows, k, v, m, bv
                )
                self._compute(s, pieces, kernel, block, q_rows, k, v, bv)
            _finish_step(rec, pending, q.device)
            held.update(received)
            self._arrived(grads_in)
            for p in [p for p in held if p.owner != r and last.get(p, -1) <= s]:
                self._release(p)
                del held[p]

    def _grad_messages(self, s: int, step, sends: list, recvs: list) -> list:
        """Add the pass's own messages of step ``s`` to ``sends`` and ``recvs``; returns
        what :meth:`_arrived` takes once they are in."""
        return []

    def _compute(self, s: int, pieces, kernel, block, q_rows, k, v, bv) -> None:
        """Run step ``s``'s block (``block``: :meth:`Plan.fused_block` of ``pieces``;
        ``bv`` its bound variant or None)."""
        raise NotImplementedError

    def _arrived(self, grads_in: list) -> None:
        """Take what :meth:`_grad_messages` received (the step's transfers are done)."""

    def _release(self, p: PieceId) -> None:
        """Received piece ``p`` is about to be let go (its last use is past)."""


class _Forward(_Pass):
    """The forward: the output accumulates in float32; until a second block arrives it is
    the first block's own output (q's dtype, no copy), and when the second block is also
    this rank's last, the one merge is computed in float32 and rounded once into it: the
    same numbers without the float32 passes (W = 2)."""

    phase = "fwd"

    def __init__(self, plan: Plan, q_BSHD, k_BSHD, v_BSHD, scale: float, kept, bv=None):
        super().__init__(plan, plan.schedule.forward_steps(), q_BSHD, k_BSHD, v_BSHD, bv)
        self.summed = bv is not None and not bv.normalised
        r = plan.rank
        self.scale, self.kept = scale, kept
        self.last_compute = max((s for s, st in enumerate(self.steps) if st.compute[r]), default=-1)
        self.keep = set(plan.schedule.retain[r]) if plan.schedule.retain else set()
        self.dt = acc_dtype(self.q.dtype)
        self.acc_out = self.acc_lse = None
        self.low = False  # acc_out holds one unmerged block in the kernel's dtype

    def _compute(self, s, pieces, kernel, block, q_rows, k, v, bv) -> None:
        m, (qa, qb), _ = block
        q, dt = self.q, self.dt
        o, l = run_forward(kernel, q_rows, k, v, m, self.scale, bv)
        if self.summed:
            self._add(s, qa, qb, o)
            return
        if self.acc_out is None:
            b, hq, sq, _ = q.shape
            if (qa, qb) == (0, sq):  # covers every row: no fill, no copy
                self.acc_out, self.acc_lse = o, l.to(dt, copy=True)
            else:
                self.acc_out = zeros_bhsd(q, o.shape[-1], o.dtype)
                self.acc_lse = torch.full((b, hq, sq), -math.inf, dtype=dt, device=q.device)
                self.acc_out[:, :, qa:qb] = o
                self.acc_lse[:, :, qa:qb] = l
            self.low = self.acc_out.dtype != dt
        elif self.low and s == self.last_compute:
            merge_last_(self.acc_out[:, :, qa:qb], self.acc_lse[:, :, qa:qb], o, l)
        else:
            if self.low:
                self.acc_out, self.low = self.acc_out.to(dt), False
            merge_(self.acc_out[:, :, qa:qb], self.acc_lse[:, :, qa:qb], o, l)

    def _add(self, s, qa, qb, o) -> None:
        """An unnormalised variant's partial result: the merge is a sum (in float32, and
        rounded once into the first block's own output when there are only two)."""
        q, dt = self.q, self.dt
        if self.acc_out is None:
            if (qa, qb) == (0, q.shape[2]):
                self.acc_out = o
            else:
                self.acc_out = zeros_bhsd(q, o.shape[-1], o.dtype)
                self.acc_out[:, :, qa:qb] = o
            self.low = self.acc_out.dtype != dt
        elif self.low and s == self.last_compute:
            rows = self.acc_out[:, :, qa:qb]
            rows.copy_(rows.to(dt) + o.to(dt))
        else:
            if self.low:
                self.acc_out, self.low = self.acc_out.to(dt), False
            self.acc_out[:, :, qa:qb] += o

    def _release(self, p: PieceId) -> None:
        if self.kept is not None and p in self.keep:
            self.kept[p] = self.held[p]

    def result(self):
        q = self.q
        acc_out, acc_lse = self.acc_out, self.acc_lse
        if acc_out is None:  # this rank's queries see nothing at all
            b, hq, sq, _ = q.shape
            acc_out = zeros_bhsd(q, self.v_BSHD.shape[-1])
            acc_lse = torch.full((b, hq, sq), -math.inf, dtype=self.dt, device=q.device)
        if self.summed:
            return acc_out.to(q.dtype).transpose(1, 2), None
        lse = acc_lse if q.dtype == torch.float64 else acc_lse.float()
        return acc_out.to(q.dtype).transpose(1, 2), lse


def forward(plan: Plan, q_BSHD, k_BSHD, v_BSHD, scale: float, kept: dict | None = None, bv=None):
    """Returns ``out_BSHD`` (q's dtype) and ``lse_BHS`` (float32; None for an unnormalised
    variant) for the local queries, under the bound variant ``bv`` (None: plain softmax).
    Received pieces the schedule's backward keeps (``retain``) go into ``kept``.
    Accumulation: :class:`_Forward`."""
    run = _Forward(plan, q_BSHD, k_BSHD, v_BSHD, scale, kept, bv)
    run.run()
    return run.result()


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
    hit = plan._state.grad_precision
    if hit is not None and hit[0] is steps:
        return hit[1]
    epoch: dict = {}
    parts: dict = {}  # (rank, piece, epoch) -> contributions: None (kernel share) or a message key
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
    plan._state.grad_precision = (steps, (acc_low, msg_low, n_dq))
    return acc_low, msg_low, n_dq


class _Backward(_Pass):
    """The backward: dQ of the local queries, and per piece its dK and dV sums
    (``[B, n, Hk, D]`` each, contiguous: they travel as is), which go home by the
    schedule's grad transfers."""

    phase = "bwd"

    def __init__(
        self, plan, dout_BSHD, q_BSHD, k_BSHD, v_BSHD, out_BSHD, lse_BHS, scale, kept, bv=None
    ):
        steps = plan.schedule.backward_steps or plan.schedule.steps
        super().__init__(plan, steps, q_BSHD, k_BSHD, v_BSHD, bv)
        self.held.update(kept or {})
        self.dout, self.out = dout_BSHD.transpose(1, 2), out_BSHD.transpose(1, 2)
        self.lse, self.scale = lse_BHS, scale
        self.gdt = acc_dtype(self.q.dtype)
        self.acc_low, self.msg_low, n_dq = grad_precision(plan, steps)
        self.dq_dt = self.q.dtype if n_dq <= 2 else self.gdt
        self.dq = None
        self.grad_acc: dict[PieceId, tuple[torch.Tensor, torch.Tensor]] = {}
        self.epoch: dict[PieceId, int] = {}

    def _acc_dt(self, p: PieceId) -> torch.dtype:
        low = self.acc_low.get((p, self.epoch.get(p, 0)), False)
        return self.k_BSHD.dtype if low else self.gdt

    def _grad_messages(self, s, step, sends, recvs) -> list:
        r, grads_in = self.plan.rank, []
        for t in step.grad_transfers:
            if t.src == r:
                sends += [(g, t.dst) for g in self.grad_acc.pop(t.piece)]
                self.epoch[t.piece] = self.epoch.get(t.piece, 0) + 1
            elif t.dst == r:
                ref = self.held.ref()
                n = self.plan.schedule.part_len(t.piece.part)
                dt = ref.dtype if self.msg_low[(s, t.src, t.piece)] else self.gdt
                shape = (ref.shape[0], n) + tuple(ref.shape[2:])
                buf = tuple(torch.empty(shape, dtype=dt, device=ref.device) for _ in range(2))
                recvs += [(g, t.src) for g in buf]
                grads_in.append((t.piece, buf))
        return grads_in

    def _compute(self, s, pieces, kernel, block, q_rows, k, v, bv) -> None:
        m, (qa, qb), (ka, kb) = block
        q, rows, grad_acc = self.q, slice(qa, qb), self.grad_acc
        lse = None if self.lse is None else self.lse[:, :, rows]
        dq_b, dk_b, dv_b = run_backward(
            kernel,
            self.dout[:, :, rows],
            q_rows,
            k,
            v,
            self.out[:, :, rows],
            lse,
            m,
            self.scale,
            bv,
        )
        if self.dq is None and (qa, qb) == (0, q.shape[2]) and dq_b.dtype == self.dq_dt:
            self.dq = dq_b  # the first share covers every row: no fill, no copy
        else:
            if self.dq is None:
                self.dq = zeros_bhsd(q, dtype=self.dq_dt)
            self.dq[:, :, rows] += dq_b
        off = 0
        for p in pieces:  # each piece's share of the step's dK/dV
            n = self.plan.schedule.part_len(p.part)
            a, b = max(ka, off), min(kb, off + n)
            if a < b:
                dk_p = dk_b[:, :, a - ka : b - ka].transpose(1, 2)
                dv_p = dv_b[:, :, a - ka : b - ka].transpose(1, 2)
                acc = grad_acc.get(p)
                if acc is None and b - a == n:  # the first share covers the piece
                    grad_acc[p] = tuple(_contiguous(g, self._acc_dt(p)) for g in (dk_p, dv_p))
                else:
                    if acc is None:
                        shape = (self.k_BSHD.shape[0], n) + tuple(self.k_BSHD.shape[2:])
                        acc = grad_acc[p] = tuple(
                            torch.zeros(shape, dtype=self._acc_dt(p), device=q.device)
                            for _ in range(2)
                        )
                    acc[0][:, a - off : b - off] += dk_p
                    acc[1][:, a - off : b - off] += dv_p
            off += n

    def _arrived(self, grads_in: list) -> None:
        for p, buf in grads_in:
            acc = self.grad_acc.get(p)
            if acc is None:
                self.grad_acc[p] = tuple(g.to(self._acc_dt(p)) for g in buf)
            else:
                acc[0].add_(buf[0])
                acc[1].add_(buf[1])

    def result(self, q_dtype: torch.dtype):
        r, k_BSHD, v_BSHD = self.plan.rank, self.k_BSHD, self.v_BSHD
        dq = zeros_bhsd(self.q) if self.dq is None else self.dq
        parts = self.plan.schedule.parts
        own = self.grad_acc.get(PieceId(r, 0))
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
                acc = self.grad_acc.get(PieceId(r, part))
                if acc is None:
                    continue
                pos = 0
                for a, b in rr:
                    dk[:, a:b] = acc[0][:, pos : pos + b - a]
                    dv[:, a:b] = acc[1][:, pos : pos + b - a]
                    pos += b - a
        return dq.to(q_dtype).transpose(1, 2), dk, dv


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
    bv=None,
):
    """Returns ``dq, dk, dv`` for the local shards, in the inputs' dtypes, under the bound
    variant ``bv`` (its ``alibi_grad`` takes the d(slopes) shares). Runs the
    schedule's own backward (with the pieces ``kept`` from the forward) if it has one,
    else replays the forward steps with their grad transfers. Sums accumulate in float32
    (float64 for float64) except where :func:`grad_precision` shows the inputs' dtype
    gives the same bits."""
    run = _Backward(plan, dout_BSHD, q_BSHD, k_BSHD, v_BSHD, out_BSHD, lse_BHS, scale, kept, bv)
    run.run()
    return run.result(q_BSHD.dtype)


class ContextParallelFunction(torch.autograd.Function):
    """Forward and backward of one context-parallel attention call, as one Function.

    ``bv``: the call's bound variant (None: plain softmax; positions are filled per
    block); ``sink`` / ``alibi``: the user's tensors (inputs, so their gradients flow),
    of which this call uses heads ``heads`` (all of them but under head parallelism)."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale, bv=None, sink=None, alibi=None, heads=None):
        kept: dict = {}
        out, lse = forward(plan, q, k, v, scale, kept, bv)
        heads = slice(0, q.shape[2]) if heads is None else heads
        if sink is not None:  # counted once per row, on the merged result
            out4, lse = apply_sink(out.transpose(1, 2), lse, sink[heads])
            out = out4.transpose(1, 2)
        pieces = sorted(kept)
        saved_lse = out.new_empty(0) if lse is None else lse
        ctx.save_for_backward(q, k, v, out, saved_lse, *(t for p in pieces for t in kept[p]))
        ctx.plan, ctx.scale, ctx.kept_pieces = plan, scale, pieces
        ctx.bv, ctx.sink, ctx.alibi, ctx.heads, ctx.summed = bv, sink, alibi, heads, lse is None
        ctx.mark_non_differentiable(saved_lse)
        return out, saved_lse

    @staticmethod
    @once_differentiable  # no double backward: raise, not give wrong numbers
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, *flat = ctx.saved_tensors
        lse = None if ctx.summed else lse
        kept = {p: (flat[2 * i], flat[2 * i + 1]) for i, p in enumerate(ctx.kept_pieces)}
        bv, sink, alibi = ctx.bv, ctx.sink, ctx.alibi
        alibi_accumulator(bv, alibi)
        dout = dout.contiguous()
        dq, dk, dv = backward(ctx.plan, dout, q, k, v, out, lse, ctx.scale, kept, bv)
        dsink, dalibi = (
            param_grads(bv, sink, alibi, ctx.heads, dout.transpose(1, 2), out.transpose(1, 2), lse)
            if sink is not None or alibi is not None
            else (None, None)
        )
        return dq, dk, dv, None, None, None, dsink, dalibi, None
