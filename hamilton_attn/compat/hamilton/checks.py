"""Argument checks shared by the forward functions of :mod:`.attention`: features the
core does not offer, and the optional cycles / routing tables, which must equal what the
library computes for the group (ValueError otherwise, on every rank, before any
communication)."""

from __future__ import annotations

import torch

from ... import config
from ...runtime.comm import as_group, group_info
from .causal import calculate_source_rank_per_iter, source_rank_per_iter
from .cycles import gen_hamilton_circle, gen_hamilton_circle_two_nodes, gen_hamilton_path_local
from .mapping import (
    calculate_in_mapping_circle,
    calculate_inter_node_mapping,
    calculate_intra_node_in_mapping_two_nodes,
    calculate_intra_node_out_mapping_two_nodes,
    calculate_out_mapping_circle,
)


def unsupported(dropout_p, alibi_slopes=None) -> None:
    """Refuse dropout and ALiBi, which the core does not compute."""
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


def seed_group(process_group):
    """The seed's ``process_group``: a process group, None (the default group) or a 1-d
    DeviceMesh (e.g. ``mesh["cp"]``), as the process group it names (ValueError for
    anything else, before any communication)."""
    return as_group(process_group, "process_group", two_d=None).group


def check_k_mxu(process_group, world_size, looping, out_mapping, in_mapping, source=None):
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


def _two_level_node_size(w: int, node_size) -> int:
    """Explicit ``node_size``, else ``LOCAL_WORLD_SIZE`` when it splits the group into at
    least two nodes, else two nodes of ``W // 2``."""
    if node_size is not None:
        return node_size
    env = config.get().local_world_size or 0
    if env > 0 and w % env == 0 and w // env >= 2:
        return env
    return max(1, w // 2)


def check_two_level(
    process_group, node_size, inter_in_mapping, inter_out_mapping, out_mapping, in_mapping
):
    """Validate the ``(m-K_m-m)^u`` arguments; returns the devices per node ``m`` (also
    the number of per-cycle chunks)."""
    rank, w, _ = group_info(process_group)
    m = _two_level_node_size(w, node_size)
    if w % m or w // m < 2:
        raise ValueError(f"node_size: {m} must divide the world size {w} into at least 2 nodes")
    if all(x is None for x in (inter_in_mapping, inter_out_mapping, out_mapping, in_mapping)):
        return m
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
    return m
