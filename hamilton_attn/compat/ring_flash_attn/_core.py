"""What every ring-flash-attention function shares: argument checks, the placements of
its shard layouts, the plan cache and the call into :func:`hamilton_attn.calc_attn`.

Legend: B batch, S tokens (``S_local`` per rank), T packed tokens (``T_local`` per rank),
H heads (Hq query, Hk key/value), D head dim, W ranks of ``group``.

ring-flash-attention never sees the global sequence: each rank passes its own shards in
one of the layouts below, and the global sequence is what those shards are pieces of.
So a call here rebuilds the global mask (one document, or the documents of
``cu_seqlens``), states where each rank's tokens sit in it as a
:class:`~hamilton_attn.placement.Placement` of exactly that layout, plans once per
``(layout, lengths, options, group)`` and runs :func:`~hamilton_attn.calc_attn` on the
shards as they are: no dispatch, no copy, no padding.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch

from ... import Mask, Plan, calc_attn, plan
from ...placement import Placement
from ...placement.layouts import _coalesce
from ...runtime.comm import group_info

#: Schedules that match each family's communication (ring: KV passed around the ring;
#: llama3: KV all-gathered).
RING, ALLGATHER = "ring", "allgather"


# -- placements of the shard layouts ------------------------------------------------------


def _placement(kind: str, seqlen: int, w: int, per_rank) -> Placement:
    """A placement without padding from each rank's global ranges (in local order)."""
    ranges = tuple(tuple(_coalesce(rr)) for rr in per_rank)
    lens = [b - a for rr in ranges for a, b in rr]
    chunk = functools.reduce(math.gcd, lens, 0) or 1
    return Placement(kind, seqlen, seqlen, w, ranges, chunk)


@functools.lru_cache(maxsize=128)
def layout_placement(layout: str, cu: tuple[int, ...], w: int) -> Placement:
    """Where ring-flash-attention's layout ``layout`` puts the tokens of the documents
    ``cu`` (global offsets; one document for the batch functions) on ``w`` ranks:

    * ``contiguous``: document cut into W equal runs, rank r holds run r (per document
      for varlen: rank r holds the r-th W-th of every document);
    * ``zigzag``: document cut into 2W runs, rank r holds runs r and 2W-1-r (per
      document for varlen);
    * ``stripe``: token t on rank t % W (stripes of one token; batch functions only);
    * ``llama3``: the packed sequence cut into W equal runs, documents crossing them.
    """
    total = cu[-1]
    per_rank: list[list[tuple[int, int]]] = [[] for _ in range(w)]
    if layout == "llama3":
        n = total // w
        for r in range(w):
            per_rank[r].append((r * n, (r + 1) * n))
    elif layout == "stripe":
        for r in range(w):
            per_rank[r].extend((t, t + 1) for t in range(r, total, w))
    else:
        parts = w if layout == "contiguous" else 2 * w
        for a, b in zip(cu, cu[1:]):
            n = (b - a) // parts
            for r in range(w):
                per_rank[r].append((a + r * n, a + (r + 1) * n))
                if layout == "zigzag":
                    c = 2 * w - 1 - r
                    per_rank[r].append((a + c * n, a + (c + 1) * n))
    return _placement(layout, total, w, per_rank)


# -- argument checks ----------------------------------------------------------------------


def check_options(dropout_p, window_size, deterministic, return_attn_probs) -> tuple[int, int]:
    """The shared keyword arguments; returns the window as two ints."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or dropout_p != 0:
        raise ValueError(f"dropout_p: only 0.0 is supported (no dropout), got {dropout_p!r}")
    try:
        left, right = (int(x) for x in window_size)
    except (TypeError, ValueError):
        raise ValueError(f"window_size: expected (left, right) ints, got {window_size!r}") from None
    if left < -1 or right < -1:
        raise ValueError(
            f"window_size: each side must be >= -1 (-1: unbounded), got {window_size!r}"
        )
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic: expected a bool, got {deterministic!r}")
    if not isinstance(return_attn_probs, bool):
        raise ValueError(f"return_attn_probs: expected a bool, got {return_attn_probs!r}")
    return left, right


def check_qkv(q, k, v, token_dims: int) -> None:
    """``q [.., Hq, D]``, ``k, v [.., Hk, D]`` with ``token_dims`` leading dims (2: bshd,
    1: thd) that agree, Hk dividing Hq, one floating dtype and device."""
    want = token_dims + 2
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.dim() != want:
            layout = "[B, S_local, H, D]" if token_dims == 2 else "[T_local, H, D]"
            raise ValueError(f"{name}: expected a {want}-d {layout} shard, got {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k, v: shapes differ: {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:token_dims] != k.shape[:token_dims] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q, k: token dims and head dim must agree, got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    hq, hk = q.shape[-2], k.shape[-2]
    if hk == 0 or hq % hk:
        raise ValueError(f"k: its {hk} heads must divide q's {hq} heads (GQA)")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(
            f"q, k, v: expected one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: expected one device, got {q.device}, {k.device}, {v.device}")


def unpack(packed, n: int, name: str, token_dims: int) -> list[torch.Tensor]:
    """``qkv [.., 3, H, D]`` or ``kv [.., 2, Hk, D]`` split along its packing dim."""
    if not isinstance(packed, torch.Tensor) or packed.dim() != token_dims + 3:
        got = tuple(packed.shape) if isinstance(packed, torch.Tensor) else type(packed).__name__
        lead = "B, S_local" if token_dims == 2 else "T_local"
        raise ValueError(f"{name}: expected a [{lead}, {n}, H, D] tensor, got {got}")
    if packed.shape[token_dims] != n:
        raise ValueError(
            f"{name}: expected {n} along dim {token_dims} (packed {name}), got "
            f"{packed.shape[token_dims]}"
        )
    return list(packed.unbind(dim=token_dims))


def cu_list(cu, name: str) -> tuple[int, ...]:
    """``cu_seqlens`` (tensor or sequence) as a tuple of ints, checked: starts at 0 and
    does not decrease."""
    if isinstance(cu, torch.Tensor):
        if cu.dim() != 1 or cu.is_floating_point():
            raise ValueError(
                f"{name}: expected a 1-d integer tensor, got {cu.dtype} {tuple(cu.shape)}"
            )
        cu = cu.tolist()
    try:
        vals = tuple(int(x) for x in cu)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a sequence of ints, got {cu!r}") from None
    if len(vals) < 2 or vals[0] != 0 or any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(
            f"{name}: expected non-decreasing offsets starting at 0 (at least one "
            f"document), got {list(vals[:8])}{'...' if len(vals) > 8 else ''}"
        )
    return vals


def world(group) -> tuple[int, int]:
    """``(rank, size)`` of this process in ``group`` (no message sent)."""
    try:
        rank, w, _ = group_info(group)
    except ValueError as err:
        raise ValueError(f"group: {err}") from err
    return rank, w


# -- planning and the call ----------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def layout_plan(
    layout: str, cu: tuple[int, ...], causal: bool, window: tuple[int, int], group, w: int,
    schedule: str,
) -> Plan:  # fmt: skip
    """The plan of documents ``cu`` (global), ``causal`` / ``window`` inside each (flash-
    attn's semantics), with ring-flash-attention's ``layout`` as its placement."""
    mask = Mask.varlen(list(cu), causal=causal, window=window)
    return plan(mask, group, schedule=schedule, placement=layout_placement(layout, cu, w))


def _takes_variant() -> bool:
    return "variant" in inspect.signature(calc_attn).parameters


def variant_for(alibi_slopes, q: torch.Tensor, batch: int):
    """``Softmax(alibi_slopes=...)`` for ``calc_attn``, or None without slopes. Slopes are
    ``[Hq]`` or ``[B, Hq]`` float32, as flash-attn takes them."""
    if alibi_slopes is None:
        return None
    hq = q.shape[-2]
    if not isinstance(alibi_slopes, torch.Tensor) or tuple(alibi_slopes.shape) not in (
        (hq,),
        (batch, hq),
    ):
        got = tuple(alibi_slopes.shape) if isinstance(alibi_slopes, torch.Tensor) else alibi_slopes
        raise ValueError(f"alibi_slopes: expected a [{hq}] or [{batch}, {hq}] tensor, got {got}")
    if alibi_slopes.dtype != torch.float32:
        raise ValueError(
            f"alibi_slopes: expected float32 (as flash-attn), got {alibi_slopes.dtype}"
        )
    if not _takes_variant():
        raise ValueError(
            "alibi_slopes: this hamilton_attn has no attention variants (calc_attn(variant=))"
        )
    from ...variants import Softmax

    return Softmax(alibi_slopes=alibi_slopes.to(q.device))


def attend_bshd(q, k, v, p: Plan, scale, variant):
    """``calc_attn`` on ``[B, S_local, H, D]`` shards: ``(out, lse [B, Hq, S_local])``."""
    kw = {} if variant is None else {"variant": variant}
    out, lse = calc_attn(q, k, v, p, scale=scale, return_lse=True, **kw)
    return out, lse


def finish(out, lse, return_attn_probs: bool):
    """flash-attn's return: ``out``, or ``(out, softmax_lse, None)`` (no probabilities)."""
    return (out, lse, None) if return_attn_probs else out


def named_forms(family: str, module: str, forms, doc) -> tuple:
    """Name the ``(suffix, function, args)`` forms of one function family
    (``{family}_func``, ``_kvpacked_func``, ...) as ring-flash-attention does, each with
    the docstring ``doc(name, args)``; returns the functions in order."""
    for suffix, f, args in forms:
        f.__name__ = f.__qualname__ = f"{family}_{suffix}"
        f.__doc__ = doc(f.__name__, args)
        f.__module__ = module
    return tuple(f for _, f, _ in forms)
