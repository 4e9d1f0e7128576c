"""Dense attention through torch's aten SDPA ops that return the log-sum-exp.

The four ops (``cudnn``, ``flash``, ``efficient``, ``cpu_flash``), their signatures
(checked for torch 2.11 - 2.13; older torch is refused with a clear error) and their
lse layouts are in :mod:`hamilton_attn.kernels.sdpa_ops`, the one place in the project
that calls them. This module chooses an op per call, plans the calls of a block, and
puts their results together.

Causal alignment differs when ``Lq != Lk``: flash is bottom-right aligned (this
project's convention), cudnn / efficient / cpu_flash are top-left aligned. This
module therefore never hands a *rectangular* causal call to a top-left op: such a
piece is split into a FULL call over its first ``Lk - Lq`` keys plus a square
causal call over the last ``Lq`` keys (square causal is the same under both
alignments), and the two are merged. cuDNN keeps such a piece on Hopper because it
runs at about twice flash's rate (GPU_FACTS) and the extra merge is one memory-bound
pass over the rows (not yet timed against one flash call).

A mask runs here when ``mask.dense_pieces()`` is not None (every band is FULL or
bottom-right CAUSAL) and has at most :data:`MAX_PIECES` pieces (the ``auto`` backend
weighs sdpa against flex per block: :mod:`hamilton_attn.kernels.choice`). One piece covering
every row (full, square causal, bottom-right causal on flash) is one op call with no
copy and no merge; otherwise calls run on row/column slices, and calls that share rows
are merged with :func:`hamilton_attn.merge.merge_` in float32
(float64 for float64 inputs). Rows that no piece covers get out 0 and lse -inf.

Op choice per call (:func:`choose_op`), first that applies:

1. ``force_op`` given to :class:`SdpaKernel`: that op or nothing (tests, benchmarks).
2. CPU: ``cpu_flash``.
3. fp16 / bf16 on compute capability 9.x (Hopper), cuDNN built and enabled, head
   dim within cuDNN's limit, ``Lk > 1``: ``cudnn`` (about 2x flash, GPU_FACTS).
4. fp16 / bf16 on sm80+ with flash built and enabled: ``flash``.
5. fp32 / fp16 / bf16 with the memory-efficient op enabled: ``efficient``.

The ``torch.backends.cuda.enable_{cudnn,flash,mem_efficient}_sdp`` switches (and the
``sdpa_kernel`` context manager) are honoured. float64 on GPU is not supported.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from ..masks import Mask
from ..merge import acc_dtype, merge_
from .base import FastPathKernel, lse_dtype, zeros_bhsd
from .sdpa_ops import CPU_FLASH, CUDNN, EFFICIENT, FLASH, OPS, backward_call, forward_call

MIN_TORCH = (2, 11)
MAX_PIECES = 64  # beyond this flex always wins (kernels/choice.py)
#: The op of a call that runs on the triton kernel (the ``sdpa+triton`` kernel's, which
#: ``auto`` weighs where :data:`MIX_PAIRS` is on).
TRITON = "triton"
#: ``sdpa+triton``: consecutive groups of calls (calls that share rows are one group)
#: with fewer visible pairs than this each, two calls or more, run as one call of the
#: triton kernel, the large ones keep cuDNN; 0 (default): off, and ``auto`` never
#: weighs it. The idea: cuDNN costs about 0.1 ms of host time per call and runs short
#: pieces below its dense rate. On an H200 at 1 << 21 (2M pairs) it gained nothing
#: (results/triton_fused_H200_2026-12-03_s8.md, TF/s forward / forward+backward against
#: cuDNN per piece): the 8K-per-rank document step of hamilton 427 / 325 against 434 /
#: 360, long-tailed documents at 32K 521 / 415 against 516 / 421 (the triton
#: backward's four launches on the small documents cost what the cuDNN calls saved).
#: Running the calls on concurrent streams instead was slower still (439 / 333 on one
#: stream, 277 / 324 on two: results/triton_ab_H200_2026-12-03_s8.md).
MIX_PAIRS = 0

# Ops whose is_causal is top-left aligned when Lq != Lk (torch SDPA's rule).
_TOP_LEFT = frozenset({CUDNN, EFFICIENT, CPU_FLASH})

# Compare the release numbers only, so pre-release builds (2.11.0a0+..., NGC) pass.
_TORCH_RELEASE = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
_TORCH_OK = _TORCH_RELEASE >= MIN_TORCH
# torch.compiler.assume_constant_result takes a Mask argument from torch 2.13 on; torch
# 2.11 raises inside dynamo ("UserDefinedObjectVariable(Mask) is not a constant",
# measured on the GPU image). There dynamo traces plan_calls itself and breaks the graph
# in the mask arithmetic, as before: compiled code still runs, fullgraph=True does not.
CONSTANT_PLAN_UNDER_COMPILE = _TORCH_RELEASE >= (2, 13)
_MIN_TORCH_STR = ".".join(map(str, MIN_TORCH))
_HALF = (torch.float16, torch.bfloat16)


def _require_torch() -> None:
    if not _TORCH_OK:
        raise RuntimeError(
            f"sdpa backend: needs torch >= {_MIN_TORCH_STR} (the aten SDPA ops that return lse "
            f"changed signature before it), found torch {torch.__version__}"
        )


# ---------------------------------------------------------------------------------------
# Op choice
# ---------------------------------------------------------------------------------------


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _cudnn_head_dim_limit(cc: tuple[int, int]) -> int:
    # torch's own gate (sdp_utils.cpp): 256 on sm90 with cuDNN >= 9.10, else 128.
    version = torch.backends.cudnn.version() or 0
    return 256 if cc == (9, 0) and version >= 91000 else 128


def _switches() -> tuple[bool, bool, bool]:
    """The user's SDPA backend switches (cudnn, flash, efficient)."""
    cuda = torch.backends.cuda
    return (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled())


def _op_supports(
    op: str,
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    seqlen_k: int,
    switches: tuple[bool, bool, bool],
) -> bool:
    if op == CPU_FLASH:
        return device.type == "cpu" and dtype in (torch.float64, torch.float32, *_HALF)
    if device.type != "cuda":
        return False
    cc = _capability(device.index if device.index is not None else torch.cuda.current_device())
    use_cudnn, use_flash, use_efficient = switches
    # What cudnn and flash both need: fp16 / bf16 on sm80+, head dim a multiple of 8.
    half_sm80 = dtype in _HALF and cc[0] >= 8 and head_dim % 8 == 0
    if op == CUDNN:
        cudnn = torch.backends.cudnn
        return (
            use_cudnn
            and half_sm80
            and cudnn.is_available()
            and (cudnn.version() or 0) >= 90000
            and head_dim <= _cudnn_head_dim_limit(cc)
            and seqlen_k > 1  # cuDNN SDPA refuses a single key
        )
    if op == FLASH:
        built = torch.backends.cuda.is_flash_attention_available()
        return use_flash and half_sm80 and built and head_dim <= 256
    if op == EFFICIENT:
        if dtype not in (torch.float32, *_HALF):
            return False
        align = 16 // (torch.finfo(dtype).bits // 8)  # 16-byte rows, as torch's own gate
        return use_efficient and cc[0] >= 5 and head_dim % align == 0 and head_dim <= 256
    return False


def choose_op(
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    seqlen_k: int,
    force_op: str | None = None,
    switches: tuple[bool, bool, bool] | None = None,
) -> str | None:
    """The aten op for one call of ``seqlen_k`` keys, or None if none can run it.

    Rule (see the module docstring): ``force_op`` if given; CPU -> cpu_flash; half
    precision on Hopper -> cudnn; half precision on sm80+ -> flash; else efficient.
    """
    switches = _switches() if switches is None else switches
    if force_op is not None:
        return (
            force_op
            if _op_supports(force_op, device, dtype, head_dim, seqlen_k, switches)
            else None
        )
    if device.type == "cpu":
        order = (CPU_FLASH,)
    else:
        cc = _capability(device.index if device.index is not None else torch.cuda.current_device())
        order = (CUDNN, FLASH, EFFICIENT) if cc[0] == 9 else (FLASH, EFFICIENT)
    for op in order:
        if _op_supports(op, device, dtype, head_dim, seqlen_k, switches):
            return op
    return None


@dataclass(frozen=True, slots=True)
class Call:
    """One aten op call: rows ``[q0, q1)`` against keys ``[k0, k1)``; a causal call is
    bottom-right aligned and, for a top-left op, always square. ``op`` :data:`TRITON`
    (the ``sdpa+triton`` kernel): one call of the triton kernel on ``sub``, the block's
    mask on those rows and keys."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool
    op: str
    sub: Mask | None = None

    def rows(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor's slice of this call's rows (dim 2: bhsd, or lse's [B, H, S])."""
        return [t[:, :, self.q0 : self.q1] for t in tensors]

    def keys(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor's slice of this call's keys (dim 2)."""
        return [t[:, :, self.k0 : self.k1] for t in tensors]


@functools.lru_cache(maxsize=1024)
def plan_calls(
    mask: Mask,
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    force_op: str | None,
    switches: tuple[bool, bool, bool],
    max_pieces: int = MAX_PIECES,
    mix_pairs: int = 0,
) -> tuple[Call, ...] | str:
    """The op calls that run ``mask``, or a string saying why this backend cannot;
    ``mix_pairs`` > 0: small groups of calls joined into triton calls (:func:`mix_calls`)."""
    pieces = mask.dense_pieces()
    if pieces is None:
        return (
            "the mask has a band with a lower diagonal bound (sliding window or "
            "inv_causal), which dense SDPA ops cannot run"
        )
    if len(pieces) > max_pieces:
        return (
            f"the mask splits into {len(pieces)} dense pieces, more than {max_pieces} "
            "(that many belong to flex)"
        )
    calls: list[Call] = []
    for q0, q1, k0, k1, causal in pieces:
        op = choose_op(device, dtype, head_dim, k1 - k0, force_op, switches)
        if op is None:
            return _no_op_reason(device, dtype, head_dim, k1 - k0, force_op)
        if causal and (k1 - k0) != (q1 - q0) and op in _TOP_LEFT:
            # Bottom-right causal on a top-left op: FULL over the keys every row sees,
            # then a square causal block (alignment-free).
            split = k1 - (q1 - q0)
            for a, b, c in ((k0, split, False), (split, k1, True)):
                sub = choose_op(device, dtype, head_dim, b - a, force_op, switches)
                if sub is None:
                    return _no_op_reason(device, dtype, head_dim, b - a, force_op)
                calls.append(Call(q0, q1, a, b, c, sub))
        else:
            calls.append(Call(q0, q1, k0, k1, causal, op))
    return mix_calls(mask, calls, mix_pairs) if mix_pairs > 0 else tuple(calls)


def call_pairs(c: Call) -> int:
    """The visible pairs of one call."""
    if c.sub is not None:
        return c.sub.area()
    n, m = c.q1 - c.q0, c.k1 - c.k0
    return n * m - (n * (n - 1) // 2 if c.causal else 0)


def mix_calls(mask: Mask, calls: list[Call], limit: int) -> tuple[Call, ...]:
    """``calls`` with each run of consecutive small row groups joined into one triton
    call. A row group: calls whose rows overlap, transitively (their rows then see keys
    of those calls only); small: fewer than ``limit`` visible pairs; a run of two calls
    or more becomes ``Call(qa, qb, ka, kb, op=TRITON, sub=mask.slice(...))`` over the
    run's rows and the span of its keys, which holds exactly the run's pairs (no other
    call has rows there). Rows stay disjoint between calls wherever they were."""
    groups: list[list[Call]] = []
    for c in sorted(calls, key=lambda c: (c.q0, c.q1, c.k0)):
        if groups and c.q0 < max(g.q1 for g in groups[-1]):
            groups[-1].append(c)
        else:
            groups.append([c])
    out: list[Call] = []
    run: list[Call] = []

    def flush():
        if len(run) >= 2:
            qa, qb = min(c.q0 for c in run), max(c.q1 for c in run)
            ka, kb = min(c.k0 for c in run), max(c.k1 for c in run)
            out.append(Call(qa, qb, ka, kb, False, TRITON, mask.slice((qa, qb), (ka, kb))))
        else:
            out.extend(run)
        run.clear()

    for g in groups:
        if sum(call_pairs(c) for c in g) < limit:
            run.extend(g)
        else:
            flush()
            out.extend(g)
    flush()
    return tuple(out)


@torch.compiler.assume_constant_result
def _traced_plan_calls(*args) -> tuple[Call, ...] | str:
    """:func:`plan_calls` as torch.compile sees it: run at trace time, its result a
    constant. The mask is fixed for the compiled code, and tracing the mask arithmetic
    itself broke the graph (data-dependent shapes in the mask's row tables). A plain
    function: dynamo looks through an lru_cache wrapper to trace what it wraps."""
    return plan_calls(*args)


def _no_op_reason(device, dtype, head_dim, seqlen_k, force_op) -> str:
    what = f"op {force_op!r}" if force_op else "no SDPA op"
    return (
        f"{what} can run dtype {dtype} with head dim {head_dim} and {seqlen_k} keys on "
        f"{device} (GPU ops: fp16/bf16/fp32, head dim a multiple of 8 up to 256; the "
        "torch.backends.cuda SDPA switches are honoured)"
    )


def _triton():
    from . import get_kernel

    return get_kernel("triton")


def _forward_one(c: Call, q, k, v, scale: float):
    if c.op == TRITON:
        return _triton().forward(*c.rows(q), *c.keys(k, v), c.sub, scale)
    return forward_call(c.op, *c.rows(q), *c.keys(k, v), c.causal, scale)


def _backward_one(c: Call, dout, q, k, v, out, lse, scale: float):
    if c.op == TRITON:
        return _triton().backward(*c.rows(dout, q), *c.keys(k, v), *c.rows(out, lse), c.sub, scale)
    return backward_call(c.op, *c.rows(dout, q), *c.keys(k, v), *c.rows(out, lse), c.causal, scale)


def _disjoint(ranges: list[tuple[int, int]]) -> bool:
    ranges = sorted(ranges)
    return all(a1 <= b0 for (_, a1), (b0, _) in zip(ranges, ranges[1:]))


def _overlaps(r: tuple[int, int], seen: list[tuple[int, int]]) -> bool:
    return any(r[0] < b and a < r[1] for a, b in seen)


def _gather(parts, like, ranges):
    """Place per-call gradients ``parts`` (slices ``ranges`` of dim 2) into one tensor
    shaped and laid out like ``like``: copies if the ranges are disjoint, else a sum in
    the accumulator dtype."""
    if _disjoint(ranges):
        buf = zeros_bhsd(like)
        for (a, b), g in zip(ranges, parts):
            buf[:, :, a:b] = g
        return buf
    buf = zeros_bhsd(like, dtype=acc_dtype(like.dtype))
    for (a, b), g in zip(ranges, parts):
        buf[:, :, a:b] += g.to(buf.dtype)
    return buf.to(like.dtype)


def _positive_scale(q: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
    """``(q, scale)`` to hand the ops. They apply the scale after masking (in the
    exponent, ``exp(scale * (s - max))``, as their results show), so at ``scale <= 0`` a
    masked score's -inf turns into NaN (0 x -inf) or +inf: the CPU op's causal call gave
    NaN at ``scale=0`` and at ``scale=-2.5``. Scaling q instead and running at scale 1
    keeps the masked scores at -inf."""
    if scale > 0:
        return q, scale
    return q * scale, 1.0


class SdpaKernel(FastPathKernel):
    """FULL / bottom-right CAUSAL pieces on torch's aten SDPA ops (see module docstring).

    Args:
        force_op: run every call on this op (``cudnn``, ``flash``, ``efficient``,
            ``cpu_flash``) or refuse the block; None picks per :func:`choose_op`.
        max_pieces: most dense pieces a mask may have.
        mix: the ``sdpa+triton`` kernel (``auto`` weighs it where :data:`MIX_PAIRS` is
            on): small groups of calls joined into calls of the triton kernel
            (:func:`mix_calls`), where that kernel is available on the device.
    """

    name = "sdpa"

    def __init__(self, force_op: str | None = None, max_pieces: int = MAX_PIECES, mix=False):
        if force_op is not None and force_op not in OPS:
            raise ValueError(f"force_op: expected one of {OPS} or None, got {force_op!r}")
        self.force_op = force_op
        self.max_pieces = max_pieces
        self.mix = mix
        if mix:
            self.name = "sdpa+triton"

    def available(self, device: torch.device) -> bool:
        return _TORCH_OK and torch.device(device).type in ("cpu", "cuda")

    def _plan(self, q, k, v, mask: Mask) -> tuple[Call, ...] | str:
        if not _TORCH_OK:
            return f"needs torch >= {_MIN_TORCH_STR}, found {torch.__version__}"
        if q.device.type not in ("cpu", "cuda"):
            return f"runs on cpu and cuda only, got {q.device.type}"
        if v.shape[-1] != q.shape[-1]:
            return (
                f"value head dim {v.shape[-1]} differs from query head dim "
                f"{q.shape[-1]} (the SDPA ops need them equal)"
            )
        if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
            return "q, k, v need unit stride on the head dim"
        switches = _switches() if q.is_cuda else (False, False, False)
        planner = _traced_plan_calls if CONSTANT_PLAN_UNDER_COMPILE else plan_calls
        # the triton calls of the mixed plan stay out of compiled graphs
        mixing = self.mix and not torch.compiler.is_compiling() and _triton().available(q.device)
        mix = MIX_PAIRS if mixing else 0
        return planner(
            mask, q.device, q.dtype, q.shape[-1], self.force_op, switches, self.max_pieces, mix
        )

    def unsupported_reason(self, q, k, v, mask: Mask) -> str | None:
        plan = self._plan(q, k, v, mask)
        return plan if isinstance(plan, str) else None

    def calls(self, q, k, v, mask: Mask) -> tuple[Call, ...]:
        """The op calls for this block; raises ValueError if it cannot run it."""
        plan = self._plan(q, k, v, mask)
        if isinstance(plan, str):
            _require_torch()
            raise ValueError(f"sdpa backend cannot run this block: {plan}")
        return plan

    def _ready(self) -> None:
        _require_torch()

    def _prepare(self, q, k, v, mask: Mask) -> tuple[Call, ...]:
        return self.calls(q, k, v, mask)

    def _forward(self, q, k, v, mask: Mask, scale: float, calls: tuple[Call, ...]):
        q, scale = _positive_scale(q, scale)
        b, h, sq, _ = q.shape
        run = [(c, _forward_one(c, q, k, v, scale)) for c in calls]
        if len(run) == 1 and (calls[0].q0, calls[0].q1) == (0, sq):
            return run[0][1]  # fast path: one op call, no copy
        rows = [(c.q0, c.q1) for c in calls]
        if _disjoint(rows):
            # Calls that tile every row write every element: no fill first.
            tiled = sum(b1 - a1 for a1, b1 in rows) == sq
            if tiled and rows == sorted(rows):
                # In order: one concatenation each (two launches, not two per call),
                # into bshd memory like the shards.
                outs = [o.transpose(1, 2) for _, (o, _) in run]
                return (
                    torch.cat(outs, dim=1).transpose(1, 2),
                    torch.cat([l for _, (_, l) in run], dim=2).to(lse_dtype(q.dtype)),
                )
            out = zeros_bhsd(q, v.shape[-1], fill=not tiled)
            lse_dt = lse_dtype(q.dtype)
            if tiled:
                lse = torch.empty((b, h, sq), dtype=lse_dt, device=q.device)
            else:
                lse = torch.full((b, h, sq), float("-inf"), dtype=lse_dt, device=q.device)
            for c, (o, l) in run:
                out[:, :, c.q0 : c.q1] = o
                lse[:, :, c.q0 : c.q1] = l
            return out, lse
        adt = acc_dtype(q.dtype)
        acc_out = zeros_bhsd(q, v.shape[-1], adt)
        acc_lse = torch.full((b, h, sq), float("-inf"), dtype=adt, device=q.device)
        seen: list[tuple[int, int]] = []
        for c, (o, l) in run:
            r = (c.q0, c.q1)
            if _overlaps(r, seen):
                merge_(acc_out[:, :, c.q0 : c.q1], acc_lse[:, :, c.q0 : c.q1], o, l)
            else:
                acc_out[:, :, c.q0 : c.q1] = o
                acc_lse[:, :, c.q0 : c.q1] = l
            seen.append(r)
        return acc_out.to(q.dtype), acc_lse.to(lse_dtype(q.dtype))

    def _backward(self, dout, q, k, v, out, lse, mask: Mask, scale: float, calls: tuple[Call, ...]):
        q_scale = scale
        q, scale = _positive_scale(q, scale)
        # The ops want out / dout in the inputs' dtype and lse in float32 (float64 on
        # the CPU op for float64 inputs).
        out = out if out.dtype == q.dtype else out.to(q.dtype)
        dout = dout if dout.dtype == q.dtype else dout.to(q.dtype)
        lse = lse.to(lse_dtype(q.dtype))
        grads = [_backward_one(c, dout, q, k, v, out, lse, scale) for c in calls]
        if scale != q_scale:
            # The ops saw q * scale at scale 1: chain rule for dq (dk, dv are already right).
            grads = [(dq * q_scale, dk, dv) for dq, dk, dv in grads]
        sq, sk = q.shape[2], k.shape[2]
        one = calls[0]
        if len(calls) == 1 and (one.q0, one.q1, one.k0, one.k1) == (0, sq, 0, sk):
            dq, dk, dv = grads[0]
            return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
        rows = [(c.q0, c.q1) for c in calls]
        cols = [(c.k0, c.k1) for c in calls]
        dq = _gather([g[0] for g in grads], q, rows)
        dk = _gather([g[1] for g in grads], k, cols)
        dv = _gather([g[2] for g in grads], v, cols)
        return dq, dk, dv


__all__ = [
    "CPU_FLASH",
    "CUDNN",
    "Call",
    "EFFICIENT",
    "FLASH",
    "MAX_PIECES",
    "OPS",
    "SdpaKernel",
    "choose_op",
    "plan_calls",
]
