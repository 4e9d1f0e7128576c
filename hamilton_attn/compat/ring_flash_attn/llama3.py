"""ring-flash-attention's llama3 functions: packed documents over a contiguous cut of the
whole packed sequence, keys and values gathered ``heads_k_stride`` KV heads at a time.

Layout: the packed sequence of T tokens is cut into W equal runs, rank r holds tokens
``[r * T / W, (r + 1) * T / W)`` (documents cross the cuts), shards ``[T_local, H, D]``.
:func:`llama3_flash_attn_prepare_cu_seqlens` turns the GLOBAL ``cu_seqlens`` into what
the functions take: the local queries' document offsets, the offsets of the keys they
need inside ``local_k_slice`` of the gathered keys, and the longest of each.

Here the functions run :func:`hamilton_attn.calc_attn` with schedule ``allgather`` (the
same communication: every rank gets every other's KV), one call per group of
``heads_k_stride`` KV heads (with their query heads), so at most that many KV heads of
the whole sequence are held at once, as in ring-flash-attention. The global documents
are known without a message when the arguments came from
:func:`llama3_flash_attn_prepare_cu_seqlens` in this process; otherwise the ranks
exchange their offsets once per distinct argument set (the global ``cu_seqlens`` is
rebuilt from them and must reproduce every rank's arguments, else ValueError).

Returns ``out`` ``[T_local, Hq, D]``, or ``(out, softmax_lse, None)`` with softmax_lse
``[Hq, T_local]`` float32.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ...runtime.comm import exchange_status
from . import _core

# (causal, rank, W, cu_q, cu_k, slice) -> global cu_seqlens, from prepare() calls.
_PREPARED: OrderedDict = OrderedDict()
_PREPARED_MAX = 256


def _prepare(cu: tuple[int, ...], causal: bool, rank: int, w: int):
    """The pure-Python core of :func:`llama3_flash_attn_prepare_cu_seqlens`."""
    total = cu[-1]
    n = total // w
    lo, hi = rank * n, (rank + 1) * n
    # The documents that hold this rank's queries: first with an end > lo, last with a
    # start < hi.
    first = next(i for i in range(len(cu) - 1) if cu[i + 1] > lo)
    last = max(i for i in range(len(cu) - 1) if cu[i] < hi)
    starts = list(cu[first : last + 1])
    cu_q = [max(s, lo) - lo for s in starts] + [n]
    k_left = cu[first]
    k_right = hi if causal else cu[last + 1]
    cu_k = [s - k_left for s in starts] + [k_right - k_left]
    max_q = max(b - a for a, b in zip(cu_q, cu_q[1:]))
    max_k = max(b - a for a, b in zip(cu_k, cu_k[1:]))
    return cu_q, cu_k, max_q, max_k, slice(k_left, k_right)


def llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, causal: bool, rank: int, world_size: int):
    """``(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice)`` of
    rank ``rank`` of ``world_size`` for the GLOBAL ``cu_seqlens`` (int32 tensors on its
    device, two ints and a slice), as ring-flash-attention returns them. The total length
    must be a multiple of ``world_size``."""
    cu = _core.cu_list(cu_seqlens, "cu_seqlens")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank: expected an int in [0, {world_size}), got {rank!r}")
    if cu[-1] % world_size or cu[-1] == 0:
        raise ValueError(
            f"cu_seqlens: the total length {cu[-1]} must be a positive multiple of "
            f"world_size {world_size}"
        )
    cu = tuple(sorted(set(cu)))  # empty documents hold no token
    cu_q, cu_k, max_q, max_k, k_slice = _prepare(cu, bool(causal), rank, world_size)
    key = (bool(causal), rank, world_size, tuple(cu_q), tuple(cu_k), k_slice.start, k_slice.stop)
    _PREPARED[key] = cu
    _PREPARED.move_to_end(key)
    while len(_PREPARED) > _PREPARED_MAX:
        _PREPARED.popitem(last=False)
    device = cu_seqlens.device if isinstance(cu_seqlens, torch.Tensor) else None
    as_t = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    return as_t(cu_q), as_t(cu_k), max_q, max_k, k_slice


def _global_cu(mine: tuple, causal: bool, rank: int, w: int, group, device) -> tuple[int, ...]:
    """The global ``cu_seqlens`` behind this rank's arguments ``mine`` = ``(cu_q, cu_k,
    slice start, slice stop)``: from prepare()'s record, else from every rank's."""
    known = _PREPARED.get((causal, rank, w, *mine))
    if known is not None:
        return known
    flat = [*mine[0], -1, *mine[1], -1, mine[2], mine[3]]
    sizes = exchange_status([len(flat)], group, device)
    width = max(row[0] for row in sizes)
    rows = exchange_status(flat + [-2] * (width - len(flat)), group, device)
    theirs = []
    for (n,), row in zip(sizes, rows):
        row = row[:n]
        cut = row.index(-1)
        theirs.append((tuple(row[:cut]), tuple(row[cut + 1 : -3]), row[-2], row[-1]))
    # A document starts at each rank's key slice start plus each of its key offsets.
    starts = {t[2] + s for t in theirs for s in t[1][:-1]}
    cu = tuple(sorted(starts | {0, w * mine[0][-1]}))
    for r, got in enumerate(theirs):
        want = _prepare(cu, causal, r, w)
        if (tuple(want[0]), tuple(want[1]), want[4].start, want[4].stop) != got:
            raise ValueError(
                f"cu_seqlens_q, cu_seqlens_k, local_k_slice: rank {r}'s are not what "
                "llama3_flash_attn_prepare_cu_seqlens gives for one global cu_seqlens "
                f"(rebuilt from every rank's: {list(cu[:8])}{'...' if len(cu) > 8 else ''})"
            )
    return cu


def _llama3(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride,
            local_k_slice, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
            deterministic, return_attn_probs, group):  # fmt: skip
    window = _core.check_options(dropout_p, window_size, deterministic, return_attn_probs)
    if not isinstance(causal, bool):
        raise ValueError(f"causal: expected a bool, got {causal!r}")
    _core.check_qkv(q, k, v, token_dims=1)
    cu_q = _core.cu_list(cu_seqlens_q, "cu_seqlens_q")
    cu_k = _core.cu_list(cu_seqlens_k, "cu_seqlens_k")
    if cu_q[-1] != q.shape[0]:
        raise ValueError(
            f"cu_seqlens_q: its last offset {cu_q[-1]} must be q's T_local {q.shape[0]}"
        )
    if len(cu_k) != len(cu_q):
        raise ValueError(
            f"cu_seqlens_k: expected {len(cu_q)} offsets like cu_seqlens_q, got {len(cu_k)}"
        )
    if not isinstance(local_k_slice, slice) or not isinstance(local_k_slice.start, int):
        raise ValueError(f"local_k_slice: expected a slice of ints, got {local_k_slice!r}")
    if local_k_slice.stop - local_k_slice.start != cu_k[-1]:
        raise ValueError(
            f"local_k_slice: {local_k_slice} holds {local_k_slice.stop - local_k_slice.start} "
            f"keys, cu_seqlens_k says {cu_k[-1]}"
        )
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {m!r}")
    hq, hk = q.shape[1], k.shape[1]
    s = heads_k_stride
    if isinstance(s, bool) or not isinstance(s, int) or s < 1 or hk % s:
        raise ValueError(
            f"heads_k_stride: expected a positive divisor of k's {hk} heads, got {s!r}"
        )
    rank, w = _core.world(group)
    variant = _core.variant_for(alibi_slopes, q, 1)
    mine = (cu_q, cu_k, local_k_slice.start, local_k_slice.stop)
    cu = _global_cu(mine, causal, rank, w, group, q.device)
    p = _core.layout_plan("llama3", cu, causal, window, group, w, _core.ALLGATHER)
    g = hq // hk  # query heads per KV head
    outs, lses = [], []
    for i in range(0, hk, s):
        qs = q[None, :, i * g : (i + s) * g]
        vi = variant
        if vi is not None and vi.alibi_slopes is not None:
            from ...variants import Softmax

            vi = Softmax(alibi_slopes=vi.alibi_slopes[..., i * g : (i + s) * g])
        out, lse = _core.attend_bshd(qs, k[None, :, i : i + s], v[None, :, i : i + s], p,
                                     softmax_scale, vi)  # fmt: skip
        outs.append(out[0])
        lses.append(lse[0])
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=0)
    return _core.finish(out, lse, return_attn_probs)


def llama3_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, heads_k_stride, local_k_slice, dropout_p=0.0,
                                  softmax_scale=None, causal=False, window_size=(-1, -1),
                                  alibi_slopes=None, deterministic=False,
                                  return_attn_probs=False, group=None):  # fmt: skip
    """ring-flash-attention's ``llama3_flash_attn_varlen_func``: q, k, v ``[T_local, H,
    D]`` of the contiguous cut, the arguments from
    :func:`llama3_flash_attn_prepare_cu_seqlens` (see the module)."""
    return _llama3(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   heads_k_stride, local_k_slice, dropout_p, softmax_scale, causal,
                   window_size, alibi_slopes, deterministic, return_attn_probs, group)  # fmt: skip


def llama3_flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                           max_seqlen_k, heads_k_stride, local_k_slice,
                                           dropout_p=0.0, softmax_scale=None, causal=False,
                                           window_size=(-1, -1), alibi_slopes=None,
                                           deterministic=False, return_attn_probs=False,
                                           group=None):  # fmt: skip
    """As :func:`llama3_flash_attn_varlen_func` with kv ``[T_local, 2, Hk, D]``."""
    k, v = _core.unpack(kv, 2, "kv", token_dims=1)
    return _llama3(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   heads_k_stride, local_k_slice, dropout_p, softmax_scale, causal,
                   window_size, alibi_slopes, deterministic, return_attn_probs, group)  # fmt: skip


def llama3_flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                            max_seqlen_k, heads_k_stride, local_k_slice,
                                            dropout_p=0.0, softmax_scale=None, causal=False,
                                            window_size=(-1, -1), alibi_slopes=None,
                                            deterministic=False, return_attn_probs=False,
                                            group=None):  # fmt: skip
    """As :func:`llama3_flash_attn_varlen_func` with qkv ``[T_local, 3, H, D]``."""
    q, k, v = _core.unpack(qkv, 3, "qkv", token_dims=1)
    return _llama3(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   heads_k_stride, local_k_slice, dropout_p, softmax_scale, causal,
                   window_size, alibi_slopes, deterministic, return_attn_probs, group)  # fmt: skip
