"""The seed's distributed attention API: ring and zigzag ring attention (ring-flash-
attention's functions) and Hamilton Attention (full and causal on ``K_{m x u}``, full on
``(m-K_m-m)^u``), each one :func:`hamilton_attn.planner.plans.plan` and one
:func:`hamilton_attn.api.calc_attn`. Token layouts: see :mod:`hamilton_attn.compat.hamilton`.

The signatures are the seed's, written compactly as in its docs (``# fmt: skip``).
"""

from __future__ import annotations

import torch

from ...api import calc_attn
from ...masks import Mask
from ...planner.plans import plan
from ...runtime.comm import group_info
from .checks import check_k_mxu, check_two_level, seed_group, unsupported

_LAYOUTS = ("BSND", "BNSD")


def _mask(seqlen: int, causal: bool, window_size) -> Mask:
    left, right = window_size
    if causal:
        right = 0
    if left < 0 and right < 0:
        return Mask.full(seqlen)
    if left < 0 and right == 0:
        return Mask.causal(seqlen)
    return Mask.sliding_window(seqlen, (left, right))


def _run_ring(process_group, q, k, v, softmax_scale, causal, window_size, dispatch):
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
    process_group, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale,
    dropout_p=0, causal=False, window_size=(-1, -1),
):  # fmt: skip
    """Ring attention over contiguous shards; returns ``(out, lse)``."""
    process_group = seed_group(process_group)
    unsupported(dropout_p)
    return _run_ring(process_group, q, k, v, softmax_scale, causal, window_size, "contiguous")


def zigzag_ring_attention_forward_flash_attn(
    process_group, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale,
    dropout_p=0, causal=True, window_size=(-1, -1), alibi_slopes=None, deterministic=False,
):  # fmt: skip
    """Ring attention over zigzag shards (load-balanced causal); returns ``(out, lse)``.
    ``deterministic`` is accepted: results here are always deterministic."""
    process_group = seed_group(process_group)
    unsupported(dropout_p, alibi_slopes)
    return _run_ring(process_group, q, k, v, softmax_scale, causal, window_size, "zigzag")


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


def hamilton_attention_forward_full_flash_attn(
    process_group, q: torch.Tensor, k, v, softmax_scale0, dropout_p=0,
    world_size=8, looping=None, out_mapping=None, in_mapping=None, layout="BSND",
):  # fmt: skip
    """Non-causal Hamilton Attention (``K_{m x u}`` schedule ``hamilton``); ``(out, lse)``.

    Shards are contiguous: rank r holds tokens ``[r * S_local, (r + 1) * S_local)``,
    ``S_local`` equal on all ranks. ``k`` / ``v``: tensors or lists of ``W - 1``
    per-cycle chunks. ``world_size`` must be the group's size; ``looping``,
    ``out_mapping``, ``in_mapping`` (optional) must equal
    :func:`~hamilton_attn.compat.hamilton.cycles.gen_hamilton_circle`'s cycles and their
    tables (full tables or this rank's row). ``softmax_scale0`` None means
    ``1 / sqrt(D)``. ``layout``: ``BSND`` or ``BNSD`` (out follows it; lse is
    ``[B, N, S_local]``).
    """
    process_group = seed_group(process_group)
    unsupported(dropout_p)
    chunks = check_k_mxu(process_group, world_size, looping, out_mapping, in_mapping)
    return _run_hamilton(process_group, q, k, v, softmax_scale0, layout, chunks, False, "hamilton")


def hamilton_attention_forward_causal_flash_attn(
    process_group, q: torch.Tensor, k, v, softmax_scale0, dropout_p=0,
    world_size=8, looping=None, out_mapping=None, in_mapping=None,
    source_rank_per_iter=None, layout="BSND",
):  # fmt: skip
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

    ``source_rank_per_iter`` (optional) must equal
    :func:`~hamilton_attn.compat.hamilton.causal.calculate_source_rank_per_iter` (flags)
    or :func:`~hamilton_attn.compat.hamilton.causal.source_rank_per_iter` (ranks) of the
    library's cycles; the causal skipping itself comes from the plan. Other arguments as
    :func:`hamilton_attention_forward_full_flash_attn`.
    """
    process_group = seed_group(process_group)
    unsupported(dropout_p)
    chunks = check_k_mxu(
        process_group, world_size, looping, out_mapping, in_mapping, source_rank_per_iter
    )
    return _run_hamilton(process_group, q, k, v, softmax_scale0, layout, chunks, True, "hamilton")


def hamilton_attention_forward_full_flash_attn_two_nodes(
    process_group, q: torch.Tensor, k, v, softmax_scale0, dropout_p=0,
    inter_in_mapping=None, inter_out_mapping=None, out_mapping=None, in_mapping=None,
    layout="BSND", *, node_size=None,
):  # fmt: skip
    """Non-causal two-level Hamilton Attention (``(m-K_m-m)^u``, schedule
    ``hamilton_2level``); ``(out, lse)``.

    Contiguous shards as :func:`hamilton_attention_forward_full_flash_attn`; ``k`` /
    ``v`` tensors or lists of ``m`` per-cycle chunks. ``node_size`` (devices per node
    ``m``) defaults to ``LOCAL_WORLD_SIZE`` if that gives at least two nodes, else to
    half the group. Optional tables must equal the library's (see
    :mod:`hamilton_attn.compat.hamilton.mapping`): ``inter_*_mapping`` =
    ``calculate_inter_node_mapping`` of ``gen_hamilton_circle_two_nodes`` (whole list or
    this rank's tuple); ``out_mapping`` / ``in_mapping`` = the
    ``calculate_intra_node_*_mapping_two_nodes`` tables of ``gen_hamilton_path_local``
    (node 0's or this rank's node's).
    """
    process_group = seed_group(process_group)
    unsupported(dropout_p)
    m = check_two_level(
        process_group, node_size, inter_in_mapping, inter_out_mapping, out_mapping, in_mapping
    )
    return _run_hamilton(
        process_group, q, k, v, softmax_scale0, layout, m, False, "hamilton_2level", node_size=m
    )
