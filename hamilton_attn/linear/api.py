"""``linear_attention``: scalar-gated linear attention on one device or across ranks.

One primitive covers retention (a constant decay per head), simple gated linear
attention (a decay per token and head) and Mamba2's SSD (:mod:`.helpers`). The local
work runs on a backend behind one interface (:data:`LocalFn`): flash-linear-attention's
kernels (``fla_backend``, on CUDA where ``fla-core`` is installed) or the plain-torch
chunked path (:func:`.chunked.chunked_local`). Under a context-parallel plan each rank
computes its run of tokens with no incoming state, the ranks combine their states
(:mod:`.scan`, priced by :mod:`.cost`) and each adds its incoming state's share.

Legend: B batch, S tokens (this rank's when a plan is given), H heads, K key dim,
V value dim, N sequences (documents), W world size; tensors bshd.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable
from typing import NamedTuple, NoReturn

import torch

from ..planner.plans import Plan
from ..runtime.checks import exchange_rows
from ..runtime.comm import SimulatedGroup, timeout_problem
from . import checks
from .chunked import chunked_local, compute_dtype
from .cost import choose_strategy
from .scan import GatherFinal, ReplicatedGrad, StateScan

#: ``local_fn(q, k, v, g [B, S, H] float32 (float64 for float64 inputs), scale,
#: cu_seqlens (int64 [N + 1] on q's device, or None), initial_state ([N, H, K, V] or
#: None)) -> (o [B, S, H, V] in q's dtype, final_state [N, H, K, V])``; fla's also takes
#: g None or a constant ``[H]`` (:func:`local_backend` says which gate goes to which).
LocalFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]

_DTYPES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_STRATEGY_CODE = {"allgather": 1, "ring": 2}


def _fla():
    """The fla-core backend module, or None where it is not there."""
    try:
        from . import fla_backend
    except ImportError:
        return None
    return fla_backend


def _needs_grad(*xs) -> bool:
    """Whether a backward may follow: grad mode on and any of ``xs`` requires grad."""
    return torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in xs
    )


def _backend_problem(backend: str, q: torch.Tensor, g, needs_grad: bool) -> str | None:
    if problem := checks.choice_problem(backend, "backend", checks.BACKENDS):
        return problem
    if backend == "fla":
        fla = _fla()
        if fla is None or not fla.fla_available(q.device):
            return f"backend: 'fla' (flash-linear-attention) is not available on {q.device}"
        reason = fla.fla_unsupported_reason(q, _fla_gate(g, q, needs_grad), needs_grad=needs_grad)
        if reason:
            return f"backend: 'fla' cannot run this call: {reason} (backend='auto' falls back)"
    return None


def _fla_gate(g, q: torch.Tensor, needs_grad: bool):
    """The gate as fla gets it: None, a constant ``[H]`` as is (its ``g_gamma``, which
    has no gradient: only where none is wanted) or ``[B, S, H]``."""
    if g is None:
        return None
    if g.dim() == 1 and not (needs_grad and g.requires_grad):
        return _floored(g.detach().to(compute_dtype(q.dtype)))
    return _full_gate(g, q)


def local_backend(backend: str, q: torch.Tensor, g=None, *, needs_grad: bool = False):
    """``(local function, the gate to pass it)`` for ``backend``: ``"fla"``, ``"torch"``,
    or ``"auto"``: fla where it is available on q's device and does not refuse the call
    (``fla_unsupported_reason``: float64, or on Hopper with Triton < 3.7.1 the backward
    of a per-token gate), else torch. ``g``: None, ``[H]`` or ``[B, S, H]``;
    ``needs_grad``: a backward may follow. The gate is ``[B, S, H]`` in the compute
    dtype, except for fla: None for no gate, and a constant ``[H]`` without gradient
    goes as is (fla's ``g_gamma``)."""
    if backend != "torch":
        fla = _fla()
        if fla is not None and fla.fla_available(q.device):
            gate = _fla_gate(g, q, needs_grad)
            refused = fla.fla_unsupported_reason(q, gate, needs_grad=needs_grad)
            if backend == "fla" or refused is None:
                return fla.fla_local, gate
    return chunked_local, _full_gate(g, q)


#: Log decays below this are raised to it: ``exp`` of either is exactly 0 in float64
#: (it underflows below -745), as are their gradients, but a huge one (-1e30) would
#: swamp every small log decay summed after it in the running sums (G = -1e30 + ...).
GATE_FLOOR = -1000.0


def _floored(g: torch.Tensor) -> torch.Tensor:
    return g.clamp(min=GATE_FLOOR)


def _full_gate(g, q: torch.Tensor) -> torch.Tensor:
    """``g`` as ``[B, S, H]`` in the compute dtype (zeros for None), floored at
    :data:`GATE_FLOOR`."""
    b, s, h = q.shape[:3]
    cdt = compute_dtype(q.dtype)
    if g is None:
        return torch.zeros(b, s, h, dtype=cdt, device=q.device)
    return _floored(g.to(cdt)).expand(b, s, h)


def _scale(scale, q) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _common_problem(q, k, v, g, scale, backend, return_final_state, h0) -> str | None:
    return (
        checks.qkv_problem(q, k, v)
        or checks.gate_problem(g, q)
        or checks.scale_problem(scale)
        or _backend_problem(backend, q, g, _needs_grad(q, k, v, g, h0))
        or (
            None
            if isinstance(return_final_state, bool)
            else f"return_final_state: expected a bool, got {return_final_state!r}"
        )
    )


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    plan: Plan | None = None,
    cu_seqlens=None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    backend: str = "auto",
    strategy: str = "auto",
):
    """Scalar-gated (decaying) linear attention, causal, differentiable; layout bshd.

    ``o_t = scale * q_t . sum_{s <= t} exp(G_t - G_s) k_s^T v_s`` with G the running sum
    of g over the sequence (flash-linear-attention's convention): the state update is
    ``S_t = exp(g_t) S_{t-1} + k_t^T v_t`` and ``o_t = scale * q_t S_t``. No softmax, no
    normaliser, no sink. States reset at every sequence start.

    Args:
        q, k: ``[B, S, H, K]``; v: ``[B, S, H, V]``, one floating dtype and device. With
            a plan: this rank's shard (``dispatch(x, plan)``: ``plan.local_len`` tokens).
        g: log of the per-step decay, ``<= 0`` and finite: None (no decay), ``[H]`` (one
            constant per head: retention) or ``[B, S, H]`` (per token: GLA, SSD; with a
            plan, this rank's shard). Differentiable in both shapes.
        scale: default ``K ** -0.5``.
        plan: a :func:`hamilton_attn.plan` with ``dispatch="contiguous"`` over
            ``Mask.causal(S)`` or ``Mask.varlen(cu, causal=True)``: context parallelism.
            Documents (and so state resets, also across ranks) come from its mask.
        cu_seqlens: without a plan, ``[N + 1]`` sequence offsets ``0 < ... < S`` of
            packed sequences (B must be 1), as in flash-attn / flash-linear-attention.
        initial_state: ``[N, H, K, V]``: the state before each sequence's first token
            (N = B without documents, else the number of documents).
        return_final_state: also return the state after each sequence's last token,
            ``[N, H, K, V]`` float32 (float64 for float64 inputs). With a plan it is the
            whole tensor on every rank; as with ``undispatch``, every rank must compute
            the same loss of it (each rank's gradient counts for the rows it computed). It
            may be fed back as the next call's ``initial_state`` (segment by segment).
        backend: ``"auto"`` (fla-core on CUDA where installed, else torch), ``"torch"``
            (chunked plain torch, any device) or ``"fla"``.
        strategy: the cross-rank exchange: ``"auto"`` (the cheaper by
            :func:`hamilton_attn.linear.cost.exchange_cost` on the plan's topology),
            ``"allgather"`` or ``"ring"``.

    Returns ``o`` ``[B, S, H, V]`` in q's dtype, or ``(o, final_state)``.

    Every argument is checked before anything runs; with a plan, every rank hears of any
    rank's problem through one status exchange per call (g's sign is read on every
    call), so a bad input raises ValueError on every rank before a state moves
    (``plan.check="never"`` skips the exchange: a bad rank then raises alone).

    Gradients under a plan: a replicated ``g`` ``[H]`` gets this rank's share (sum it
    over the group, as for any parameter used on sharded tokens); ``initial_state``, a
    replicated state like ``final_state``, gets the gradient of the group's whole loss
    on every rank (the backward sums the shares), so do not sum it again.
    """
    if plan is not None:
        return _context_parallel(q, k, v, g, scale, plan, cu_seqlens, initial_state,
                                 return_final_state, backend, strategy)  # fmt: skip
    problem = _common_problem(q, k, v, g, scale, backend, return_final_state, initial_state)
    cu = None
    if problem is None and cu_seqlens is not None:
        cu, problem = checks.cu_seqlens_list(cu_seqlens, q)
    if problem is None:
        n_seq, what = (q.shape[0], "B") if cu is None else (len(cu) - 1, "len(cu_seqlens) - 1")
        problem = checks.initial_state_problem(initial_state, q, v, n_seq, what)
    if problem:
        raise ValueError(problem)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int64, device=q.device)
    fn, gate = local_backend(backend, q, g, needs_grad=_needs_grad(q, k, v, g, initial_state))
    o, final = fn(q, k, v, gate, _scale(scale, q), cu_t, initial_state)
    return (o, final) if return_final_state else o


def _rank_span(plan: Plan, rank: int, seqlen: int) -> tuple[int, int]:
    """``(first global token, real tokens)`` of ``rank``'s run (padding excluded)."""
    start = plan.placement.rank_ranges[rank][0][0]
    return start, max(0, min(start + plan.local_len, seqlen) - start)


def _owners(plan: Plan, ends: list[int]) -> tuple[int, ...]:
    """Per sequence (by its end offset), the plan rank holding its last token."""
    spans = [_rank_span(plan, r, ends[-1]) for r in range(plan.world_size)]
    return tuple(next(r for r, (s0, n) in enumerate(spans) if s0 < end <= s0 + n) for end in ends)


class _Call(NamedTuple):
    """What must agree across the ranks of one call: a status row's tail. A rank with a
    problem sends as many numbers (its problem's argument name, packed), so every row
    has one length by construction (rows of two lengths abort gloo's exchange)."""

    dtype: int
    batch: int
    tokens: int
    heads: int
    key_dim: int
    value_dim: int
    gate_dims: int
    has_initial_state: int
    returns_final_state: int
    strategy: int
    scale_bits: int


_NAME_BYTES = 8 * len(_Call._fields)


def _pack_name(problem: str) -> list[int]:
    """The argument a problem names (its text before ``": "``) as ``len(_Call._fields)``
    int64s."""
    name = problem.split(": ", 1)[0] if ": " in problem else ""
    raw = name.encode("ascii", "replace")[:_NAME_BYTES].ljust(_NAME_BYTES, b"\0")
    return [int.from_bytes(raw[i : i + 8], "little", signed=True) for i in range(0, _NAME_BYTES, 8)]


def _unpack_name(row: list[int]) -> str:
    raw = b"".join(x.to_bytes(8, "little", signed=True) for x in row[-len(_Call._fields) :])
    return raw.rstrip(b"\0").decode("ascii", "replace")


def _agree(plan: Plan, problem: str | None, call: _Call | None, device) -> None:
    """Raise ValueError on every rank if any rank has a problem (naming its argument on
    every rank) or the ranks' calls differ (shapes, dtype, gate kind, state flags,
    strategy, scale). ``call`` may be None only with a problem."""
    if plan.world_size == 1 or plan.check == "never":
        if problem:
            raise ValueError(problem)
        return
    tail = _pack_name(problem) if problem else list(call)
    mine = [int(problem is not None), *plan.fingerprint, *tail]
    rows = exchange_rows(plan, mine, problem, device, "linear_attention", "", _unpack_name)
    if any(row[3:] != mine[3:] for row in rows):
        raise ValueError(
            "q, k, v, g: shapes, dtype, gate shape, scale, initial_state (given, "
            "requiring grad) / return_final_state or strategy differ across the ranks of "
            "the group"
        )


def exchange_device(*xs) -> torch.device:
    """The status exchange's device: the first tensor's among ``xs`` (where a good
    rank's q is), else the CPU (a bad rank whose q is not a tensor)."""
    return next((x.device for x in xs if isinstance(x, torch.Tensor)), torch.device("cpu"))


def raise_on_every_rank(problem: str, plan, device: torch.device) -> NoReturn:
    """Raise ValueError(``problem``) here and, under a runnable ``plan``, on every rank
    of its group: this rank joins the status exchange its peers' ``linear_attention``
    calls enter. For callers that check their own arguments before calling
    :func:`linear_attention` (the named forms, compat): raising alone would leave the
    good ranks waiting in that exchange until the timeout. ``device``: the device the
    peers' q is on (the exchange's)."""
    if isinstance(plan, Plan) and not isinstance(plan.group, SimulatedGroup):
        _agree(plan, problem, None, device)
    raise ValueError(problem)


def _context_parallel(q, k, v, g, scale, plan, cu_seqlens, h0, want_final, backend, strategy):
    if not isinstance(plan, Plan):
        raise ValueError(f"plan: expected a hamilton_attn.Plan, got {type(plan).__name__}")
    if isinstance(plan.group, SimulatedGroup) and plan.world_size > 1:
        raise ValueError("plan: built for a SimulatedGroup; it can be inspected, not run")
    problem = (
        checks.plan_problem(plan)
        or _common_problem(q, k, v, g, scale, backend, want_final, h0)
        or checks.choice_problem(strategy, "strategy", checks.STRATEGIES)
        or timeout_problem()
    )
    if problem is None and cu_seqlens is not None:
        problem = "cu_seqlens: with a plan, documents come from the plan's mask; pass None"
    if problem is None and q.shape[1] != plan.local_len:
        problem = (
            f"q, k, v: expected the plan's {plan.local_len} local tokens along dim 1 "
            f"(dispatch(x, plan)), got {q.shape[1]}"
        )
    docs = None if problem else list(checks.mask_documents(plan.user_mask))
    many = docs is not None and len(docs) > 2
    if problem is None and many and q.shape[0] != 1:
        problem = f"q: the plan's mask packs {len(docs) - 1} documents, which needs B = 1"
    if problem is None:
        n_seq, what = (len(docs) - 1, "documents") if many else (q.shape[0], "B")
        problem = checks.initial_state_problem(h0, q, v, n_seq, what)
    if problem is None and strategy == "auto":
        b, _, h, dk = q.shape
        nbytes = b * h * dk * v.shape[-1] * (8 if q.dtype == torch.float64 else 4)
        try:
            strategy = choose_strategy(plan.world_size, nbytes, plan.options.topology)
        except ValueError as err:
            problem = str(err)
    call = None
    if problem is None:
        bits = struct.unpack("<q", struct.pack("<d", _scale(scale, q)))[0]
        # initial_state: 0 none, 1 given, 2 requiring grad (its backward gathers)
        h0_kind = 0 if h0 is None else 1 + bool(h0.requires_grad and torch.is_grad_enabled())
        call = _Call(_DTYPES[q.dtype], *q.shape, v.shape[-1], 0 if g is None else g.dim(),
                     h0_kind, int(want_final), _STRATEGY_CODE[strategy], bits)  # fmt: skip
    _agree(plan, problem, call, exchange_device(q))
    return _run(q, k, v, g, _scale(scale, q), plan, docs, many, h0, want_final, backend, strategy)


def incoming_share(o, q, gate, s_in, scale: float, n0: int):
    """The incoming state's part of a run whose first ``n0`` tokens continue an earlier
    rank's sequence: ``o_t += scale * exp(G_t) q_t S_in`` for ``t < n0`` (G the running
    sum of ``gate`` ``[B, S, H]`` from the run's start), and the state it carries to the
    run's n0-th token, ``exp(G_{n0 - 1}) S_in`` ``[B, H, K, V]`` (None for n0 = 0).

    The running sum is taken along the last axis of a ``[B, H, S]`` copy (along S in
    place, CUDA scans each of the B * H columns serially: 6 ms at 32K tokens). For
    bfloat16 inputs ``q S_in`` runs on the tensor cores in bfloat16 with float32
    accumulation, as flash-linear-attention's kernels read a state, and the decay
    scales its rows after; float16 (whose range a state can exceed), float32 and float64
    stay in the compute dtype."""
    cdt = s_in.dtype
    g_bhs = gate[:, :n0].transpose(1, 2).contiguous().double()
    decay = g_bhs.cumsum(-1).to(cdt).exp().transpose(1, 2)  # [B, n0, H], float64 sums
    low = q.dtype == torch.bfloat16
    pdt = q.dtype if low else cdt
    qs = torch.einsum("bshk,bhkv->bshv", q[:, :n0].to(pdt), (scale * s_in).to(pdt))
    if low:
        add = qs * decay.to(pdt)[..., None]
    else:
        add = (qs * decay[..., None]).to(cdt)
    if n0 == o.shape[1]:
        o = o + add if low else (o.to(cdt) + add).to(o.dtype)
    else:
        o = torch.cat([(o[:, :n0].to(cdt) + add).to(o.dtype), o[:, n0:]], dim=1)
    carried = decay[:, -1][..., None, None] * s_in if n0 else None
    return o, carried


def _run(q, k, v, g, scale, plan, docs, many, h0, want_final, backend, strategy):
    """Checked inputs: the local pass, the exchange, the incoming state's share."""
    seqlen, length, cdt = docs[-1], plan.local_len, compute_dtype(q.dtype)
    s0, real = _rank_span(plan, plan.rank, seqlen)
    gate = _full_gate(g, q)
    if real < length:  # padding at the sequence's end: it must change no state
        keep = (torch.arange(length, device=q.device) < real).to(q.dtype)
        q, k = q * keep[:, None, None], k * keep[:, None, None]
        gate = gate * keep[:, None].to(cdt)
    starts_here = s0 in docs[:-1]
    if many:
        inner = [d - s0 for d in docs[1:-1] if s0 < d < s0 + real]
        first = bisect.bisect_right(docs, s0) - 1 if real else len(docs) - 2
        n_pieces = len(inner) + 1
        cu = torch.tensor([0, *inner, length], dtype=torch.int64, device=q.device)
        first_len = inner[0] if inner else length
    else:
        inner, first, n_pieces, cu, first_len = [], 0, 1, None, length
    init = None
    if h0 is not None and h0.requires_grad and torch.is_grad_enabled():
        h0 = ReplicatedGrad.apply(h0, plan)  # every rank gets the whole gradient
    h0_in = h0 if h0 is not None and h0.requires_grad else None
    if h0 is not None and many:
        rows = h0[first + (not starts_here) : first + n_pieces]
        if not starts_here:
            rows = torch.cat([h0.new_zeros(1, *h0.shape[1:]), rows])
        init = rows if len(rows) else None
    elif h0 is not None and starts_here:
        init = h0
    # Padding must not decay a state: a constant gate then goes masked, per token.
    fn, local_gate = local_backend(backend, q, g if real == length else gate,
                                   needs_grad=_needs_grad(q, k, v, g, h0))  # fmt: skip
    o, fin = fn(q, k, v, local_gate, scale, cu, init)
    fin = fin.to(cdt)
    m = fin[-1:] if many else fin  # [B, H, K, V]: the state this rank's run leaves
    if n_pieces == 1 and not starts_here:
        a = gate.double().sum(1).exp().to(cdt)
    else:
        a = gate.new_zeros(gate.shape[0], gate.shape[2])
    s_in = StateScan.apply(m, a, h0_in, plan, strategy)
    # Tokens before this rank's first document start continue the previous rank's
    # sequence (none where the run starts at one; the empty term keeps s_in in the
    # graph, so every rank's backward joins the exchange).
    n0 = 0 if starts_here else first_len
    o, carried = incoming_share(o, q, gate, s_in, scale, n0)
    if not want_final:
        return o
    if n0:
        fin = torch.cat([fin[:1] + carried[:1], fin[1:]]) if many else fin + carried
    ends = docs[1:] if many else [seqlen]
    owner = _owners(plan, ends) if many else _owners(plan, ends) * q.shape[0]
    if many:
        rows = tuple(first + i if owner[first + i] == plan.rank else -1 for i in range(n_pieces))
    else:
        rows = tuple(i if owner[i] == plan.rank else -1 for i in range(q.shape[0]))
    return o, GatherFinal.apply(fin, s_in, rows, owner, plan)
