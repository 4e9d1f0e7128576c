"""MagiAttention's ``cp_group`` / ``cp_mesh`` as the core's process group and node size.

A 1-d ``DeviceMesh`` is its own group (``mesh.get_group()``). A 2-d one (``("inter",
"intra")``, from :func:`init_hierarchical_mesh`) runs on one group over all its ranks
with ``node_size`` = its intra size. That group is the world when the mesh covers the
world (``init_hierarchical_mesh`` always does); a mesh over part of the world (a slice
``world_mesh["inter", "intra"]`` of a larger mesh, one per data-parallel replica) gets
a group made with ``torch.distributed.new_group``, once per rank set
(``runtime.comm.mesh_group``).

Public torch.distributed groups order their members by global rank, so node ``i`` of
the plan is group ranks ``[i * node_size, (i + 1) * node_size)``: a mesh whose nodes
are not runs of consecutive ranks (``[[0, 2], [1, 3]]``) gets its node size, not its
layout.
"""

from __future__ import annotations

from ...runtime.comm import as_group, group_info, is_mesh


def resolve_group(cp_group, cp_mesh, domain_size: int):
    """``(group, group size, node_size or None)`` from MagiAttention's ``cp_group`` /
    ``cp_mesh`` and ``DistAttnConfig.high_bandwith_domain_size``."""
    if cp_group is not None and cp_mesh is not None:
        raise ValueError("cp_group, cp_mesh: give one of them, not both")
    if cp_mesh is None:  # MagiAttention >= 1.0 passes a mesh as ``cp_group_or_mesh``
        spec = as_group(cp_group, "cp_group", two_d="nodes")
    elif is_mesh(cp_mesh):
        spec = as_group(cp_mesh, "cp_mesh", two_d="nodes")
    else:
        raise ValueError(f"cp_mesh: expected a DeviceMesh, got {type(cp_mesh).__name__}")
    group, node_size = spec.group, spec.node_size
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
