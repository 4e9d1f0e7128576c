"""MagiAttention's ``cp_group`` / ``cp_mesh`` as the core's process group and node size.

A 1-d ``DeviceMesh`` is its own group (``mesh.get_group()``). A 2-d one (``("inter",
"intra")``, from :func:`init_hierarchical_mesh`) runs on one group over all its ranks
with ``node_size`` = its intra size. That group is the world when the mesh covers the
world (``init_hierarchical_mesh`` always does); a mesh over part of the world (a slice
``world_mesh["inter", "intra"]`` of a larger mesh, one per data-parallel replica) gets
a group made with ``torch.distributed.new_group``, once per rank set: see
:class:`_MeshGroups`.

Public torch.distributed groups order their members by global rank, so node ``i`` of
the plan is group ranks ``[i * node_size, (i + 1) * node_size)``: a mesh whose nodes
are not runs of consecutive ranks (``[[0, 2], [1, 3]]``) gets its node size, not its
layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ...runtime.comm import exchange_status, exchange_timeout, group_info


def _is_mesh(obj) -> bool:
    from torch.distributed.device_mesh import DeviceMesh

    return isinstance(obj, DeviceMesh)


class _MeshGroups:
    """Groups over the ranks of meshes that cover part of the world, made once.

    ``new_group`` wants every rank of the world to create every group, in one order.
    So the first call for an unknown rank set is collective over the world: each rank
    says which ranks its mesh holds (every replica its own), and all ranks create the
    groups of all the sets they heard, sorted; later calls with a known set are
    local. Every rank of the world must therefore call the key functions (with its own
    mesh), as training loops with a ``dp x cp`` mesh do; a rank that stays away makes
    the others fail at the exchange's timeout (``HAMILTON_ATTN_TIMEOUT``).
    """

    def __init__(self) -> None:
        # (sorted global ranks, the default group) -> group; a new world, new groups
        self._groups: dict = {}

    def get(self, ranks: tuple[int, ...], device_type: str):
        world = dist.group.WORLD
        if (ranks, world) not in self._groups:
            w = dist.get_world_size()
            mine = [int(r in ranks) for r in range(w)]
            rows = exchange_status(mine, world, torch.device(device_type), exchange_timeout())
            for s in sorted({tuple(r for r in range(w) if row[r]) for row in rows}):
                self._groups[(s, world)] = dist.new_group(list(s))
        return self._groups[(ranks, world)]


_MESH_GROUPS = _MeshGroups()


def _mesh_group(cp_mesh):
    """``(group, node_size or None)`` of a 1-d or 2-d DeviceMesh."""
    if cp_mesh.ndim == 1:
        return cp_mesh.get_group(), None
    if cp_mesh.ndim != 2:
        raise ValueError(f"cp_mesh: expected a 1-d or 2-d mesh, got {cp_mesh.ndim}-d")
    ranks = tuple(sorted(cp_mesh.mesh.flatten().tolist()))
    if ranks == tuple(range(dist.get_world_size())):
        group = dist.group.WORLD
    else:
        group = _MESH_GROUPS.get(ranks, cp_mesh.device_type)
    return group, int(cp_mesh.mesh.shape[1])


def resolve_group(cp_group, cp_mesh, domain_size: int):
    """``(group, group size, node_size or None)`` from MagiAttention's ``cp_group`` /
    ``cp_mesh`` and ``DistAttnConfig.high_bandwith_domain_size``."""
    if cp_group is not None and cp_mesh is not None:
        raise ValueError("cp_group, cp_mesh: give one of them, not both")
    if _is_mesh(cp_group):  # MagiAttention >= 1.0 passes ``cp_group_or_mesh``
        cp_group, cp_mesh = None, cp_group
    if cp_mesh is None:
        group, node_size = cp_group, None
    elif _is_mesh(cp_mesh):
        group, node_size = _mesh_group(cp_mesh)
    else:
        raise ValueError(f"cp_mesh: expected a DeviceMesh, got {type(cp_mesh).__name__}")
    _, w, _ = group_info(group)
    if domain_size > 1:
        if node_size is not None and node_size != domain_size:
            raise ValueError(
                f"high_bandwith_domain_size: {domain_size} disagrees with cp_mesh's intra "
                f"size {node_size}"
            )
        node_size = domain_size
    if node_size is not None and w % node_size:
        raise ValueError(f"high_bandwith_domain_size: {node_size} must divide the group size {w}")
    # One node, or nodes of one rank, is the flat schedule.
    if node_size is not None and not 1 < node_size < w:
        node_size = None
    return group, w, node_size
