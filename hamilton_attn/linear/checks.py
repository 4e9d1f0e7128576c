"""Argument checks of :func:`hamilton_attn.linear_attention`, before anything runs.

Each check returns a problem (a message naming the argument) or None, so that under
context parallelism every rank can hear of any rank's problem through the status
exchange before a state moves. Also: the documents of a plan's mask.

Legend: B batch, S tokens, H heads, K key dim, V value dim, N sequences; tensors bshd.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch

from ..masks import Mask

BACKENDS = ("auto", "torch", "fla")
STRATEGIES = ("auto", "allgather", "ring")
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tensor_problem(x, name: str) -> str | None:
    if not isinstance(x, torch.Tensor):
        return f"{name}: expected a tensor, got {type(x).__name__}"
    if x.dtype not in FLOATS:
        return f"{name}: expected a floating dtype ({', '.join(map(str, FLOATS))}), got {x.dtype}"
    return None


def qkv_problem(q, k, v) -> str | None:
    """Shapes ``q, k [B, S, H, K]``, ``v [B, S, H, V]``, one dtype, one device."""
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        if problem := _tensor_problem(x, name):
            return problem
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q, k, v: expected 4-d bshd tensors, got {q.dim()}, {k.dim()}, {v.dim()} dims"
    if q.shape != k.shape or k.shape[:3] != v.shape[:3]:
        return (
            "q, k, v: shapes disagree (q, k [B, S, H, K], v [B, S, H, V]): "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if min(q.shape) == 0 or v.shape[-1] == 0:
        return f"q, k, v: every dim must be > 0, got {tuple(q.shape)}, {tuple(v.shape)}"
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if not (q.device == k.device == v.device):
        return f"q, k, v: expected one device, got {q.device}, {k.device}, {v.device}"
    return None


def gate_problem(g, q) -> str | None:
    """``g`` None, ``[H]`` or ``[B, S, H]`` (q's), on q's device, finite and <= 0."""
    if g is None:
        return None
    if problem := _tensor_problem(g, "g"):
        return problem
    b, s, h = q.shape[:3]
    if tuple(g.shape) not in ((h,), (b, s, h)):
        return f"g: expected shape [H] = ({h},) or [B, S, H] = {(b, s, h)}, got {tuple(g.shape)}"
    if g.device != q.device:
        return f"g: expected q's device {q.device}, got {g.device}"
    finite = torch.isfinite(g)
    if not bool((finite & (g <= 0)).all()):
        gd = g.detach().double()
        worst = (
            f"largest value {gd.max().item()}"
            if bool(finite.all())
            else f"{int((~finite).sum())} non-finite value(s), e.g. {gd[~finite][0].item()}"
        )
        return (
            "g: log decay must be finite and <= 0 (exp(g) is the per-step decay, at most 1: "
            f"a positive log gate grows the state without bound); got {worst}"
        )
    return None


def scale_problem(scale) -> str | None:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        return f"scale: expected a finite real number or None, got {scale!r}"
    if not math.isfinite(scale):
        return f"scale: expected a finite real number, got {scale!r}"
    return None


def cu_seqlens_list(cu_seqlens, q) -> tuple[list[int] | None, str | None]:
    """``(starts and end as ints, None)`` or ``(None, problem)``: a 1-d integer sequence
    from 0, strictly increasing, ending at S, with B = 1."""
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point or cu_seqlens.is_complex():
            return None, (
                f"cu_seqlens: expected a 1-d integer tensor, got {cu_seqlens.dim()}-d "
                f"{cu_seqlens.dtype}"
            )
        cu = [int(x) for x in cu_seqlens.tolist()]
    elif isinstance(cu_seqlens, (list, tuple)) and all(
        isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in cu_seqlens
    ):
        cu = [int(x) for x in cu_seqlens]
    else:
        return None, f"cu_seqlens: expected a 1-d integer tensor or list, got {cu_seqlens!r}"
    b, s = q.shape[:2]
    if b != 1:
        return None, f"cu_seqlens: packed sequences need batch 1 (B = 1), got B = {b}"
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != s:
        return None, f"cu_seqlens: expected [0, ..., S = {s}] (at least two entries), got {cu}"
    if any(b1 <= b0 for b0, b1 in zip(cu, cu[1:])):
        return None, f"cu_seqlens: expected strictly increasing offsets, got {cu}"
    return cu, None


def initial_state_problem(h0, q, v, n_seq: int, what: str) -> str | None:
    """``initial_state`` None or ``[N, H, K, V]``, floating, on q's device."""
    if h0 is None:
        return None
    if problem := _tensor_problem(h0, "initial_state"):
        return problem
    want = (n_seq, q.shape[2], q.shape[3], v.shape[3])
    if tuple(h0.shape) != want:
        return f"initial_state: expected [N, H, K, V] = {want} (N = {what}), got {tuple(h0.shape)}"
    if h0.device != q.device:
        return f"initial_state: expected q's device {q.device}, got {h0.device}"
    return None


def choice_problem(value, name: str, allowed) -> str | None:
    if value not in allowed:
        return f"{name}: expected one of {', '.join(map(repr, allowed))}, got {value!r}"
    return None


@functools.lru_cache(maxsize=64)
def mask_documents(mask: Mask) -> tuple[int, ...] | None:
    """Starts of the documents of a causal-documents mask and its length (``(0, S)`` for
    plain causal), or None for any other mask: every row t sees exactly the keys from
    its document's start to t, and a document starts where a row's first key is itself."""
    s = mask.seqlen_q
    if mask.seqlen_k != s or s == 0:
        return None
    lo, hi = mask.row_intervals()
    if lo.shape[0] != 1:
        return None
    lo, hi, t = lo[0].long(), hi[0].long(), torch.arange(s)
    same_doc = lo[1:] == lo[:-1]
    if lo[0] != 0 or not torch.equal(hi, t) or not bool((same_doc | (lo[1:] == t[1:])).all()):
        return None
    return (*torch.nonzero(lo == t).flatten().tolist(), s)


def plan_problem(plan) -> str | None:
    """What keeps ``plan`` from running linear attention, or None."""
    if plan.heads is not None:
        return "plan: head parallelism (ulysses_degree) is not supported by linear_attention"
    if plan.placement.kind != "contiguous" or not plan.self_attention:
        return (
            f"plan: linear attention needs dispatch='contiguous' (each rank one run of "
            f"tokens, in rank order), got dispatch={plan.placement.kind!r}"
            + ("" if plan.self_attention else " with kv_dispatch")
        )
    if mask_documents(plan.user_mask) is None:
        return (
            "plan: linear attention needs a causal mask (Mask.causal) or causal packed "
            "documents (Mask.varlen(cu_seqlens, causal=True)); the plan's mask is neither"
        )
    return None
