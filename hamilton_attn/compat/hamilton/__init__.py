"""The Hamilton Attention API (names and parameters of its docs), mapped onto the core.

Local shards follow ring-flash-attention's conventions: ``[B, S_local, H, D]`` (BSND);
``ring_*`` expects rank r to hold the r-th contiguous slice of the sequence,
``zigzag_*`` chunks r and 2W-1-r of 2W equal chunks. Functions return ``(out, lse)``
with lse ``[B, H, S_local]`` and are differentiable.

The ``hamilton_*`` functions run the ``hamilton`` (``K_{m x u}``) and
``hamilton_2level`` (``(m-K_m-m)^u``) schedules; the cycles always come from
:mod:`hamilton_attn.topology` (re-exported here under the reference names). Token
layout the caller must use (every rank the same number ``S_local`` of tokens):

* ``hamilton_attention_forward_full_flash_attn`` and ``..._two_nodes``: contiguous,
  rank r holds tokens ``[r * S_local, (r + 1) * S_local)``.
* ``hamilton_attention_forward_causal_flash_attn``: zigzag, the global sequence is cut
  into 2W equal chunks of ``S_local / 2`` tokens (``S_local`` even) and rank r holds
  chunk r followed by chunk 2W-1-r.

The global length is ``W * S_local``; it need not be a multiple of ``n (n - 1)``: the
schedule cuts each rank's KV into as-equal-as-possible pieces (the reference's
per-cycle chunks). ``k`` / ``v`` may be tensors (laid out as q) or the reference's lists
of per-cycle chunks, one per cycle: for the contiguous functions the list is joined
along the sequence dimension; for the causal function entry j holds piece j of each
zigzag half (see :func:`hamilton_attention_forward_causal_flash_attn`). ``looping`` and the
routing tables are optional: when given they must equal what the library computes for
the group (ValueError otherwise, on every rank, before any communication).
"""

from __future__ import annotations

import functools

import torch

from ... import config
from ...api import calc_attn
from ...masks import Mask
from ...merge import merge
from ...planner.plans import plan
from ...runtime.comm import group_info
from ...runtime.profile import Profiler
from ...topology.seed_names import (
    calculate_in_mapping_circle,
    calculate_inter_node_mapping,
    calculate_intra_node_in_mapping_two_nodes,
    calculate_intra_node_out_mapping_two_nodes,
    calculate_out_mapping_circle,
    calculate_source_rank_per_iter,
    gen_hamilton_circle,
    gen_hamilton_circle_two_nodes,
    gen_hamilton_path_local,
    source_rank_per_iter,
)
from .comm import A2AComm, RingComm

__all__ = [
    "A2AComm",
    "RingComm",
    "calculate_in_mapping_circle",
    "calculate_inter_node_mapping",
    "calculate_intra_node_in_mapping_two_nodes",
    "calculate_intra_node_out_mapping_two_nodes",
    "calculate_out_mapping_circle",
    "calculate_source_rank_per_iter",
    "gen_hamilton_circle",
    "gen_hamilton_circle_two_nodes",
    "gen_hamilton_path_local",
    "hamilton_attention_forward_causal_flash_attn",
    "hamilton_attention_forward_causal_flash_attn_profile",
    "hamilton_attention_forward_full_flash_attn",
    "hamilton_attention_forward_full_flash_attn_profile",
    "hamilton_attention_forward_full_flash_attn_two_nodes",
    "hamilton_attention_forward_full_flash_attn_two_nodes_profile",
    "ring_attention_forward_flash_attn",
    "ring_attention_forward_flash_attn_profile",
    "update_out_and_lse",
    "zigzag_ring_attention_forward_flash_attn",
    "zigzag_ring_attention_forward_flash_attn_profile",
]


def _unsupported(dropout_p, alibi_slopes=None) -> None:
    if dropout_p:
        raise NotImplementedError(
            "dropout_p > 0 is not supported: hamilton-attn computes exact "
            "attention without dropout; apply dropout outside attention"
        )
    if alibi_slopes is not None:
        raise NotImplementedError(
            "alibi_slopes is not supported yet; express the bias with a "
            "FlexAttention score_mod on one device instead"
        )


def _mask(seqlen: int, causal: bool, window_size) -> Mask:
    left, right = window_size
    if causal:
        right = 0
    if left < 0 and right < 0:
        return Mask.full(seqlen)
    if left < 0 and right == 0:
        return Mask.causal(seqlen)
    return Mask.sliding_window(seqlen, (left, right))


def _run(process_group, q, k, v, softmax_scale, causal, window_size, dispatch):
    _, w, _ = group_info(process_group)
    if q.dim() != 4:
        raise ValueError(f"q: expected a [B, S_local, H, D] shard, got shape {tuple(q.shape)}")
    s_local = q.shape[1]
    if dispatch == "zigzag" and s_local % 2:
        raise ValueError(f"q: zigzag shards hold two equal chunks, got {s_local} local tokens")
    p = plan(
        _mask(s_local * w, causal, window_size), process_group, schedule="ring", dispatch=dispatch
    )
    return calc_attn(q, k, v, p, scale=softmax_scale, return_lse=True)


def ring_attention_forward_flash_attn(
    process_group,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale,
    dropout_p=0,
    causal=False,
    window_size=(-1, -1),
):
    """Ring attention over contiguous shards; returns ``(out, lse)``."""
    _unsupported(dropout_p)
    return _run(process_group, q, k, v, softmax_scale, causal, window_size, "contiguous")


def zigzag_ring_attention_forward_flash_attn(
    process_group,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale,
    dropout_p=0,
    causal=True,
    window_size=(-1, -1),
    alibi_slopes=None,
    deterministic=False,
):
    """Ring attention over zigzag shards (load-balanced causal); returns ``(out, lse)``.
    ``deterministic`` is accepted: results here are always deterministic."""
    _unsupported(dropout_p, alibi_slopes)
    return _run(process_group, q, k, v, softmax_scale, causal, window_size, "zigzag")


def update_out_and_lse(out, lse, block_out: torch.Tensor, block_lse: torch.Tensor):
    """Fold a block's result into running ``(out, lse)`` (ring-flash-attention's shapes):
    ``block_out`` ``[B, S, H, D]``, ``block_lse`` ``[B, H, S]``; the running ``out`` is
    float32 ``[B, S, H, D]`` and ``lse`` ``[B, S, H, 1]`` (None to start)."""
    block_lse_BSH1 = block_lse.transpose(-2, -1).unsqueeze(-1).float()
    if out is None:
        return block_out.float(), block_lse_BSH1
    o, l = merge(out, lse.squeeze(-1), block_out, block_lse_BSH1.squeeze(-1))
    return o, l.unsqueeze(-1)


# --------------------------------------------------------------------------- #
# Hamilton Attention
# --------------------------------------------------------------------------- #

_LAYOUTS = ("BSND", "BNSD")


def _as_list(x):
    """Nested lists / tuples / tensors as nested lists (for comparing routing tables)."""
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (list, tuple)):
        return [_as_list(y) for y in x]
    return x


def _require_match(name: str, given, *expected) -> None:
    """``given`` (if not None) must equal one of ``expected``: the schedule always comes
    from :mod:`hamilton_attn.topology`, a caller's table only documents what it expects."""
    if given is None:
        return
    g = _as_list(given)
    if not any(g == _as_list(e) for e in expected):
        raise ValueError(
            f"{name}: differs from the one hamilton_attn computes for this group "
            f"(omit it, or pass what hamilton_attn.compat.hamilton's generators return)"
        )


def _bsnd(x, layout: str, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a 4-d {layout} local shard, got {shape}")
    return x.transpose(1, 2) if layout == "BNSD" else x


def _kv(x, layout: str, num_chunks: int, name: str, zigzag: bool = False) -> torch.Tensor:
    """A local K or V shard as one ``[B, S_local, H, D]`` tensor.

    A list of per-cycle chunks is joined along the sequence dimension. With ``zigzag``
    (the causal function) each entry is the reference's ``cat(piece j of block r,
    piece j of block 2W-1-r)``: the first halves of all entries make block r and the
    second halves block 2W-1-r, so entries are split before joining. Joining them as
    they come would put block 2W-1-r's pieces among block r's and silently break the
    causal mask."""
    if not isinstance(x, (list, tuple)):
        return _bsnd(x, layout, name)
    if len(x) != num_chunks:
        raise ValueError(
            f"{name}: expected a tensor or {num_chunks} per-cycle chunks, got {len(x)}"
        )
    pieces = [_bsnd(c, layout, f"{name}[{i}]") for i, c in enumerate(x)]
    if not zigzag:
        return torch.cat(pieces, dim=1)
    for i, c in enumerate(pieces):
        if c.shape[1] % 2:
            raise ValueError(
                f"{name}[{i}]: expected an even number of tokens (one equal piece of each "
                f"zigzag half, cat(chunk r*m + j, chunk 2*m*n - m - r*m + j)), got {c.shape[1]}"
            )
    halves = [c.chunk(2, dim=1) for c in pieces]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=1)


def _run_hamilton(process_group, q, k, v, scale, layout, num_chunks, causal, schedule, **opts):
    if layout not in _LAYOUTS:
        raise ValueError(f"layout: expected one of {_LAYOUTS}, got {layout!r}")
    _, w, _ = group_info(process_group)
    q_ = _bsnd(q, layout, "q")
    k_ = _kv(k, layout, num_chunks, "k", zigzag=causal)
    v_ = _kv(v, layout, num_chunks, "v", zigzag=causal)
    s_local = q_.shape[1]
    dispatch = "zigzag" if causal else "contiguous"
    if causal and s_local % 2:
        raise ValueError(f"q: zigzag shards hold two equal chunks, got {s_local} local tokens")
    mask = Mask.causal(s_local * w) if causal else Mask.full(s_local * w)
    p = plan(mask, process_group, schedule=schedule, dispatch=dispatch, **opts)
    out, lse = calc_attn(q_, k_, v_, p, scale=scale, return_lse=True)
    return (out.transpose(1, 2) if layout == "BNSD" else out), lse


def _check_k_mxu(process_group, world_size, looping, out_mapping, in_mapping, source=None):
    """Validate the ``K_{m x u}`` arguments; returns the number of per-cycle chunks."""
    rank, w, _ = group_info(process_group)
    if world_size != w:
        raise ValueError(f"world_size: got {world_size}, but the process group has {w} ranks")
    if w == 1:
        if any(x is not None for x in (looping, out_mapping, in_mapping, source)):
            raise ValueError("looping: a group of one rank has no Hamiltonian cycles")
        return 1
    cycles = gen_hamilton_circle(w)
    _require_match("looping", looping, cycles)
    outs, ins = calculate_out_mapping_circle(cycles), calculate_in_mapping_circle(cycles)
    _require_match("out_mapping", out_mapping, outs, outs[rank])
    _require_match("in_mapping", in_mapping, ins, ins[rank])
    if source is not None:
        flags, srcs = calculate_source_rank_per_iter(cycles), source_rank_per_iter(cycles)
        _require_match("source_rank_per_iter", source, flags, srcs)
    return len(cycles)


def hamilton_attention_forward_full_flash_attn(
    process_group,
    q: torch.Tensor,
    k,
    v,
    softmax_scale0,
    dropout_p=0,
    world_size=8,
    looping=None,
    out_mapping=None,
    in_mapping=None,
    layout="BSND",
):
    """Non-causal Hamilton Attention (``K_{m x u}`` schedule ``hamilton``); ``(out, lse)``.

    Shards are contiguous: rank r holds tokens ``[r * S_local, (r + 1) * S_local)``,
    ``S_local`` equal on all ranks. ``k`` / ``v``: tensors or lists of ``W - 1``
    per-cycle chunks. ``world_size`` must be the group's size; ``looping``,
    ``out_mapping``, ``in_mapping`` (optional) must equal :func:`gen_hamilton_circle`'s
    cycles and their tables (full tables or this rank's row). ``softmax_scale0`` None
    means ``1 / sqrt(D)``. ``layout``: ``BSND`` or ``BNSD`` (out follows it; lse is
    ``[B, N, S_local]``).
    """
    _unsupported(dropout_p)
    chunks = _check_k_mxu(process_group, world_size, looping, out_mapping, in_mapping)
    return _run_hamilton(process_group, q, k, v, softmax_scale0, layout, chunks, False, "hamilton")


def hamilton_attention_forward_causal_flash_attn(
    process_group,
    q: torch.Tensor,
    k,
    v,
    softmax_scale0,
    dropout_p=0,
    world_size=8,
    looping=None,
    out_mapping=None,
    in_mapping=None,
    source_rank_per_iter=None,
    layout="BSND",
):
    """Causal Hamilton Attention (``K_{m x u}`` schedule ``hamilton``); ``(out, lse)``.

    Shards are zigzag (load-balanced): the global sequence of ``W * S_local`` tokens is
    cut into 2W equal blocks and ``q`` of rank r holds block r followed by block 2W-1-r
    (``S_local`` even and equal on all ranks). ``k`` / ``v`` are accepted in two layouts,
    told apart by type:

    * a tensor: the zigzag shard, laid out as ``q``;
    * a list (or tuple) of ``W - 1`` tensors: the reference implementation's layout,
      where entry j is ``cat(piece j of block r, piece j of block 2W-1-r)`` (with the
      reference's 2W(W-1) chunks of the sequence: chunk ``r*m + j`` then chunk
      ``2*m*n - m - r*m + j``, m = W-1, n = W). Each entry must have an even length,
      its two halves being one piece of each block (ValueError otherwise). A zigzag
      shard merely split into W-1 parts is *not* this layout: pass it as a tensor.

    ``source_rank_per_iter`` (optional) must
    equal :func:`calculate_source_rank_per_iter` (flags) or
    :func:`~hamilton_attn.topology.seed_names.source_rank_per_iter` (ranks) of the
    library's cycles; the causal skipping itself comes from the plan. Other arguments as
    :func:`hamilton_attention_forward_full_flash_attn`.
    """
    _unsupported(dropout_p)
    chunks = _check_k_mxu(
        process_group, world_size, looping, out_mapping, in_mapping, source_rank_per_iter
    )
    return _run_hamilton(process_group, q, k, v, softmax_scale0, layout, chunks, True, "hamilton")


def _two_level_node_size(w: int, node_size) -> int:
    """Explicit ``node_size``, else ``LOCAL_WORLD_SIZE`` when it splits the group into at
    least two nodes, else two nodes of ``W // 2``."""
    if node_size is not None:
        return node_size
    env = config.get().local_world_size or 0
    if env > 0 and w % env == 0 and w // env >= 2:
        return env
    return max(1, w // 2)


def hamilton_attention_forward_full_flash_attn_two_nodes(
    process_group,
    q: torch.Tensor,
    k,
    v,
    softmax_scale0,
    dropout_p=0,
    inter_in_mapping=None,
    inter_out_mapping=None,
    out_mapping=None,
    in_mapping=None,
    layout="BSND",
    *,
    node_size=None,
):
    """Non-causal two-level Hamilton Attention (``(m-K_m-m)^u``, schedule
    ``hamilton_2level``); ``(out, lse)``.

    Contiguous shards as :func:`hamilton_attention_forward_full_flash_attn`; ``k`` /
    ``v`` tensors or lists of ``m`` per-cycle chunks. ``node_size`` (devices per node
    ``m``) defaults to ``LOCAL_WORLD_SIZE`` if that gives at least two nodes, else to
    half the group. Optional tables must equal the library's:
    ``inter_*_mapping`` = :func:`calculate_inter_node_mapping` of
    :func:`gen_hamilton_circle_two_nodes` (whole list or this rank's tuple);
    ``out_mapping`` / ``in_mapping`` = the ``calculate_intra_node_*_mapping_two_nodes``
    tables of :func:`gen_hamilton_path_local` (node 0's or this rank's node's).
    """
    _unsupported(dropout_p)
    rank, w, _ = group_info(process_group)
    m = _two_level_node_size(w, node_size)
    if w % m or w // m < 2:
        raise ValueError(f"node_size: {m} must divide the world size {w} into at least 2 nodes")
    if any(x is not None for x in (inter_in_mapping, inter_out_mapping, out_mapping, in_mapping)):
        cycles = gen_hamilton_circle_two_nodes(w, m)
        for name, given, direction in (
            ("inter_in_mapping", inter_in_mapping, "in"),
            ("inter_out_mapping", inter_out_mapping, "out"),
        ):
            table = calculate_inter_node_mapping(cycles, m, direction)
            _require_match(name, given, table, table[rank])
        paths, node = gen_hamilton_path_local(m), rank // m
        for name, given, fn in (
            ("out_mapping", out_mapping, calculate_intra_node_out_mapping_two_nodes),
            ("in_mapping", in_mapping, calculate_intra_node_in_mapping_two_nodes),
        ):
            mine = fn(paths, node)
            _require_match(name, given, fn(paths, 0), mine, mine[rank % m])
    return _run_hamilton(
        process_group, q, k, v, softmax_scale0, layout, m, False, "hamilton_2level", node_size=m
    )


# --------------------------------------------------------------------------- #
# Profiling variants
# --------------------------------------------------------------------------- #


def _profiled(fn):
    """``fn``'s variant returning ``(out, lse, timings)``: one dict per forward step of
    this rank, ``{"step", "compute_ms", "comm_ms", "exposed_ms", "bytes_sent"}``, from
    :class:`hamilton_attn.runtime.profile.Profiler` (CUDA events on GPU, wall clock on CPU). The
    backward pass is not timed (wrap it in a Profiler of your own)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with Profiler() as prof:
            out, lse = fn(*args, **kwargs)
        timings = [
            {
                "step": r["step"],
                "compute_ms": r["compute_ms"],
                "comm_ms": r["transfer_ms"],
                "exposed_ms": r["exposed_ms"],
                "bytes_sent": r["bytes_sent"],
            }
            for r in prof.rows()
            if r["phase"] == "fwd"
        ]
        return out, lse, timings

    run.__name__ = run.__qualname__ = fn.__name__ + "_profile"
    run.__doc__ = f"{fn.__name__} with per-step timings: returns ``(out, lse, timings)``.\n\n" + (
        _profiled.__doc__ or ""
    )
    return run


ring_attention_forward_flash_attn_profile = _profiled(ring_attention_forward_flash_attn)
zigzag_ring_attention_forward_flash_attn_profile = _profiled(
    zigzag_ring_attention_forward_flash_attn
)
hamilton_attention_forward_full_flash_attn_profile = _profiled(
    hamilton_attention_forward_full_flash_attn
)
hamilton_attention_forward_causal_flash_attn_profile = _profiled(
    hamilton_attention_forward_causal_flash_attn
)
hamilton_attention_forward_full_flash_attn_two_nodes_profile = _profiled(
    hamilton_attention_forward_full_flash_attn_two_nodes
)
