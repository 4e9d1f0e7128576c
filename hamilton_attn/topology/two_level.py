"""Two-level Hamiltonian cycles: ``u`` nodes of ``m`` devices each.

Global rank ``r = node * m + local``.  Inside a node every device can reach every
other one (NVLink-style all-to-all), across nodes each device has one NIC.  The
``(m - K_m - m)^u`` construction of Hamilton Attention builds ``m`` Hamiltonian
cycles over all ``m * u`` devices such that

* each node's intra-node arcs are covered exactly once (every node runs all of
  Walecki's ``m`` directed Hamiltonian paths of ``K*_m``, one per cycle), and
* per step, each device sends ``m - 1`` chunks inside its node and exactly one
  chunk across nodes (and receives likewise), so the NIC of every device is used
  exactly once and no intra-node link carries two chunks.

Cycle ``c`` walks path ``c`` on node 0, jumps from that path's last device to
the first device of path ``c`` on node 1, walks it, ..., and from node ``u - 1``
jumps back to node 0.  Because every device is the last vertex of exactly one
Walecki path (and the first of exactly one), every device owns exactly one
outgoing and one incoming inter-node arc.
"""

from __future__ import annotations

from .complete_graph import walecki_paths

__all__ = ["inter_node_arcs", "two_level_cycles", "verify_two_level"]


def _check_sizes(num_nodes: int, node_size: int) -> None:
    if num_nodes < 2:
        raise ValueError(
            f"two-level cycles need num_nodes >= 2, got {num_nodes}; "
            "for one node use hamiltonian_decomposition(node_size)"
        )
    if node_size < 2 or node_size % 2 == 1:
        raise ValueError(f"node_size must be an even number >= 2, got {node_size}")


def two_level_cycles(num_nodes: int, node_size: int) -> list[list[int]]:
    """The ``m`` Hamiltonian cycles of the two-level (``(m-K_m-m)^u``) schedule.

    Args:
        num_nodes: ``u >= 2`` nodes.
        node_size: ``m`` devices per node, even, ``m >= 2``.

    Returns:
        ``cycles`` of shape ``[m][m * u]``: ``cycles[c]`` visits every global rank
        once, starting at the first device of ``walecki_paths(m)[c]`` on node 0;
        the arcs are consecutive pairs plus ``last -> first``.  Cycle ``c`` is
        ``path_c + 0*m, path_c + 1*m, ..., path_c + (u-1)*m`` concatenated, where
        ``path_c + k*m`` is Walecki path ``c`` relabelled to node ``k``'s ranks.
        The result is checked with :func:`verify_two_level` before it is returned.
    """
    _check_sizes(num_nodes, node_size)
    m = node_size
    paths = walecki_paths(m)
    cycles = []
    for path in paths:
        cycles.append([node * m + local for node in range(num_nodes) for local in path])
    verify_two_level(cycles, num_nodes, node_size)
    return cycles


def inter_node_arcs(cycles: list[list[int]], node_size: int) -> list[tuple[int, int]]:
    """The arcs of ``cycles`` whose ends lie on different nodes.

    Args:
        cycles: Hamiltonian cycles over global ranks ``node * node_size + local``.
        node_size: devices per node.

    Returns:
        ``(src, dst)`` global-rank pairs, in cycle order and, within a cycle, in
        visiting order (the closing arc ``last -> first`` comes last).  For
        :func:`two_level_cycles` there are ``u`` per cycle, ``m * u`` in total,
        one leaving and one entering each device.
    """
    arcs: list[tuple[int, int]] = []
    for cyc in cycles:
        length = len(cyc)
        for i in range(length):
            a, b = cyc[i], cyc[(i + 1) % length]
            if a // node_size != b // node_size:
                arcs.append((a, b))
    return arcs


def verify_two_level(cycles: list[list[int]], num_nodes: int, node_size: int) -> None:
    """Check the two-level schedule properties.

    Checks that there are ``m`` cycles, each Hamiltonian over the ``m * u``
    global ranks, that no arc is used twice, that every intra-node arc of every
    node is used by exactly one cycle, and the per-device degree property:
    across the ``m`` cycles each device's out-arcs go to ``m - 1`` distinct
    devices of its own node plus exactly one device of another node, and likewise
    for its in-arcs.

    Raises:
        ValueError: naming the first problem found.
    """
    _check_sizes(num_nodes, node_size)
    m, u = node_size, num_nodes
    n = m * u
    if len(cycles) != m:
        raise ValueError(f"expected {m} cycles (one per device of a node), got {len(cycles)}")
    used: dict[tuple[int, int], int] = {}
    intra_out: list[set[int]] = [set() for _ in range(n)]
    intra_in: list[set[int]] = [set() for _ in range(n)]
    inter_out = [0] * n
    inter_in = [0] * n
    for c, cyc in enumerate(cycles):
        cyc = list(cyc)
        if len(cyc) != n or sorted(cyc) != list(range(n)):
            raise ValueError(f"cycle {c} does not visit each of the {n} ranks exactly once")
        for i in range(n):
            a, b = cyc[i], cyc[(i + 1) % n]
            if (a, b) in used:
                raise ValueError(f"arc {a}->{b} is used by cycles {used[(a, b)]} and {c}")
            used[(a, b)] = c
            if a // m == b // m:
                intra_out[a].add(b)
                intra_in[b].add(a)
            else:
                inter_out[a] += 1
                inter_in[b] += 1
    for r in range(n):
        # m - 1 distinct intra peers over m cycles, i.e. all of them: every intra arc
        # leaving r is used (and by exactly one cycle, since arcs are not repeated).
        if len(intra_out[r]) != m - 1:
            raise ValueError(
                f"rank {r} sends to {len(intra_out[r])} distinct intra-node peers, expected {m - 1}"
            )
        if len(intra_in[r]) != m - 1:
            raise ValueError(
                f"rank {r} receives from {len(intra_in[r])} distinct intra-node peers, "
                f"expected {m - 1}"
            )
        if inter_out[r] != 1:
            raise ValueError(f"rank {r} has {inter_out[r]} inter-node sends, expected exactly 1")
        if inter_in[r] != 1:
            raise ValueError(f"rank {r} has {inter_in[r]} inter-node receives, expected exactly 1")
