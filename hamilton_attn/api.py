"""The distributed public surface: plan / dispatch / calc_attn / undispatch."""

from __future__ import annotations

import struct

import torch

from . import variants as _variants
from .attention import resolve_scale
from .kernels import get_kernel, unavailable_hint
from .planner.heads import heads_problem
from .planner.plans import Plan, plan
from .runtime.checks import agreed_before, exchange_rows
from .runtime.comm import SimulatedGroup, timeout_problem
from .runtime.executor import ContextParallelFunction
from .runtime.heads import attend as attend_heads
from .runtime.shard import dispatch, get_position_ids, undispatch

_DTYPE_CODE = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.float64: 4}
# The plan options that may differ across ranks, named in the error that says they do.
_PLAN_OPTIONS = ": schedule, dispatch, backward, backend, check, degree, node_size, chunk, ..."


def _local_problem(q, k, v, plan: Plan) -> str | None:
    """What is wrong with this rank's inputs, or None (checked before any transfer)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q, k, v: expected 4-d bshd local shards, got {q.dim()}, {k.dim()}, {v.dim()} dims"
    n, nk = plan.local_len, plan.kv_local_len
    if q.shape[1] != n or k.shape[1] != nk or v.shape[1] != nk:
        want = f"{n}" if n == nk else f"{n}, {nk}, {nk}"
        return (
            f"q, k, v: expected {want} local tokens (the plan's shards) along "
            f"dim 1, got {q.shape[1]}, {k.shape[1]}, {v.shape[1]}"
        )
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1]:
        return f"q, k, v: shapes disagree: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        return f"k, v: {k.shape[2]} heads must divide q's {q.shape[2]} heads"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPE_CODE:
        return f"q, k, v: expected one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if not (q.device == k.device == v.device):
        return "q, k, v: expected one device"
    if plan.heads is not None:
        return heads_problem(q.shape[2], k.shape[2], plan.heads.degree)
    return None


def _scale_bits(scale: float) -> int:
    """The float64 bits of ``scale`` as an int64: ranks must agree on it exactly."""
    return struct.unpack("<q", struct.pack("<d", scale))[0]


def _variant_code(var, score_mod) -> list[int]:
    """Three int64s the ranks must agree on for a call's variant: its kind, the float64
    bits of its softcap (or sigmoid bias), and which of ALiBi, sink, score_mod it uses."""
    if var is None:
        return [0, 0, 0]
    kind = {"softmax": 1, "sigmoid": 2, "relu": 3}[var.kind]
    num = getattr(var, "softcap", None) if kind == 1 else getattr(var, "bias", 0.0)
    flags = (
        (getattr(var, "alibi_slopes", None) is not None)
        | (getattr(var, "sink", None) is not None) << 1
        | (score_mod is not None) << 2
    )
    return [kind, 0 if num is None else _scale_bits(float(num)), int(flags)]


def _backend_problem(plan: Plan, q, k, v, bv) -> str | None:
    """Why the plan's named backend cannot run this call's blocks (not on this device, the
    dtype, head dims or strides, the variant), found before any transfer so that every
    rank raises (the executor would refuse the first block mid-transfer)."""
    if plan.backend == "auto":
        return None
    kernel = get_kernel(plan.backend)
    if not kernel.available(q.device):
        return f"backend: {plan.backend!r} is not available on {q.device}{unavailable_hint(plan.backend)}"
    qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))
    reason = None
    if bv is not None:
        reason = kernel.variant_problem(bv, q.device)
    if reason is None:
        # every block of this rank, by its mask (sdpa runs FULL / CAUSAL pieces only):
        # the kernels read the mask and q / k / v's device, dtype, head dims and strides
        sig = (q.device, q.dtype, q.shape[-1], v.shape[-1], q.stride(-1), k.stride(-1),
               v.stride(-1))  # fmt: skip
        cache = plan._state.backend_ok
        if sig not in cache:
            cache[sig] = _blocks_problem(plan, kernel, qb, kb, vb)
        reason = cache[sig]
    return None if reason is None else f"backend: {plan.backend!r} cannot run this call: {reason}"


def _blocks_problem(plan: Plan, kernel, qb, kb, vb) -> str | None:
    inner = plan.heads.inner if plan.heads is not None else plan
    r = inner.rank
    seen = set()
    sched = inner.schedule
    for step in sched.steps + (sched.backward_steps or ()):
        pieces = step.compute[r]
        if not pieces or pieces in seen:
            continue
        seen.add(pieces)
        m = inner.fused_block(r, pieces)[0]
        reason = kernel.unsupported_reason(qb, kb, vb, m)
        if reason is not None:
            return reason
    return None


def _check(
    q,
    k,
    v,
    plan: Plan,
    scale: float,
    scale_problem: str | None = None,
    want_lse: bool = False,
    variant_code: tuple = (0, 0, 0),
) -> None:
    """Raise ValueError unless every rank's inputs are valid and agree (shapes, dtype,
    scale, plan); with ``check="first"`` a signature agreed once is not exchanged again
    (a rank that later has a problem raises alone: use ``check="always"`` for a
    ValueError on every rank)."""
    problem = _local_problem(q, k, v, plan) or scale_problem or timeout_problem()
    # With head parallelism, return_lse adds an exchange: every rank must ask alike.
    lse_flag = [int(want_lse)] if plan.heads is not None else []
    sig = (tuple(q.shape), tuple(k.shape), q.dtype, scale, *variant_code, *lse_flag)
    if agreed_before(plan, plan._state.checked, sig, problem):
        return
    shapes = list(q.shape) + list(k.shape) if problem is None else [0] * 8
    mine = (
        [
            0 if problem is None else 1,
            *plan.fingerprint,
            _DTYPE_CODE.get(q.dtype, 0),
            _scale_bits(scale),
        ]
        + shapes
        + list(variant_code)
        + lse_flag
    )
    everyone = exchange_rows(plan, mine, problem, q.device, "calc_attn", _PLAN_OPTIONS)
    nv = len(variant_code) + len(lse_flag)
    if any(
        row[-nv : -len(lse_flag) or None] != mine[-nv : -len(lse_flag) or None] for row in everyone
    ):
        raise ValueError(
            "variant: the ranks of the group passed different variants (kind, softcap or "
            "bias, ALiBi, sink, score_mod must agree)"
        )
    if any(row[3:] != mine[3:] for row in everyone):
        what = "shapes, dtypes, scale or return_lse" if lse_flag else "shapes, dtypes or scale"
        raise ValueError(f"q, k, v: {what} differ across the ranks of the group")
    plan._state.checked.add(sig)


# Opaque to torch.compile: a compiled model graph-breaks here and runs the executor
# eagerly (its per-step communication and plan lookups are not traceable).
@torch.compiler.disable
def calc_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: Plan,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    variant=None,
    score_mod=None,
):
    """Context-parallel attention of this rank's local shards; differentiable.

    Args:
        q: ``[B, S_local, Hq, D]`` local queries (from :func:`dispatch`), layout bshd.
        k, v: ``[B, Sk_local, Hk, D]``, Hq % Hk == 0 (``Sk_local == S_local`` for
            self-attention; cross-attention plans dispatch keys with ``role="kv"``).
        plan: from :func:`plan`; the same on every rank.
        scale: softmax scale, default ``1 / sqrt(D)``.
        variant, score_mod: as for :func:`hamilton_attn.attention`, on GLOBAL token
            indices (ALiBi distances and ``score_mod``'s ``q_idx`` / ``kv_idx`` are
            positions in the whole sequence, as :func:`get_position_ids` gives them). A
            sink is counted once per row; ``sink.grad`` gets this rank's rows' share
            (sum it over the ranks, as any gradient of a parameter used on sharded
            tokens); so does ``alibi_slopes.grad``. Every rank passes the same variant.

    Returns ``out`` ``[B, S_local, Hq, D]`` in q's dtype, or ``(out, lse)`` with lse
    ``[B, Hq, S_local]`` float32 (float64 for float64 inputs; no gradient). Inputs are
    checked on every rank before any communication. With ``plan.check="always"`` every
    call also exchanges a small status vector, so a problem on one rank raises ValueError
    on every rank; with the default ``"first"`` that exchange happens on the first call
    only (no per-call host synchronisation): later, a rank with a problem raises
    ValueError at once and its peers raise TimeoutError when their transfers time out.
    """
    if not isinstance(plan, Plan):
        raise ValueError(f"plan: expected a hamilton_attn.Plan, got {type(plan).__name__}")
    if isinstance(plan.group, SimulatedGroup) and plan.world_size > 1:
        raise ValueError("plan: built for a SimulatedGroup; it can be inspected, not run")
    try:
        scale, scale_problem = resolve_scale(scale, q), None
    except ValueError as err:
        # Reported through the status exchange, so that every rank raises, not only this.
        scale, scale_problem = 0.0, str(err)
    if scale is None:  # a 0-d q: the shape check below names it
        scale = 1.0
    var, var_problem = None, None
    try:
        b, hq = (q.shape[0], q.shape[2]) if q.dim() == 4 else (1, 1)
        sq, sk = plan.user_mask.shape
        var = _variants.resolve_variant(
            variant, score_mod, batch=b, heads=hq, device=q.device, seqlen_q=sq, seqlen_k=sk
        )
        if return_lse and var is not None and not var.normalised:
            raise ValueError(f"return_lse: the {var.kind} variant is not normalised and has no lse")
    except ValueError as err:
        var, var_problem = None, str(err)
    code = tuple(_variant_code(var, score_mod))
    sq, sk = plan.user_mask.shape
    bv, backend_problem = None, None
    if var_problem is None and _local_problem(q, k, v, plan) is None:
        bv = _variants.bind(
            var, score_mod, batch=q.shape[0], heads=slice(0, q.shape[2]), shift=sk - sq
        )
        backend_problem = _backend_problem(plan, q, k, v, bv)
    _check(q, k, v, plan, scale, scale_problem or var_problem or backend_problem, return_lse, code)
    if plan.heads is not None:
        out, lse = attend_heads(q, k, v, plan, scale, return_lse, var, score_mod, sk - sq)
    else:
        sink, alibi = getattr(var, "sink", None), getattr(var, "alibi_slopes", None)
        out, lse = ContextParallelFunction.apply(q, k, v, plan, scale, bv, sink, alibi)
    return (out, lse) if return_lse else out


class ContextParallelAttention(torch.nn.Module):
    """``calc_attn`` as a module; built from a Plan or from ``plan()``'s arguments
    (``group``: a process group or a DeviceMesh, as :func:`plan` takes it)."""

    def __init__(self, plan_or_mask, group=None, *, scale: float | None = None, **plan_options):
        super().__init__()
        if isinstance(plan_or_mask, Plan) and (group is not None or plan_options):
            raise ValueError(
                "group: a Plan carries its own group and options; pass a Mask to plan with "
                f"these ({', '.join(['group'] * (group is not None) + sorted(plan_options))})"
            )
        self.plan = (
            plan_or_mask
            if isinstance(plan_or_mask, Plan)
            else plan(plan_or_mask, group, **plan_options)
        )
        self.scale = scale

    def forward(self, q, k, v, return_lse: bool = False, variant=None, score_mod=None):
        return calc_attn(
            q,
            k,
            v,
            self.plan,
            scale=self.scale,
            return_lse=return_lse,
            variant=variant,
            score_mod=score_mod,
        )


__all__ = [
    "ContextParallelAttention",
    "Plan",
    "calc_attn",
    "dispatch",
    "get_position_ids",
    "plan",
    "undispatch",
]
