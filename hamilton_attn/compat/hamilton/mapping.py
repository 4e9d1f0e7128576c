"""Routing tables of KV chunks on the Hamiltonian cycles (the seed's "Mapping
Computation"), by the seed's names (pure Python). Terms as in :mod:`.cycles`."""

from __future__ import annotations

from ...topology import inter_node_arcs
from .cycles import num_ranks


def _neighbour_table(looping: list[list[int]], hop: int) -> list[list[int]]:
    """``table[rank][c]`` = the rank ``hop`` places after ``rank`` on cycle ``c``."""
    n = num_ranks(looping)
    table = [[0] * len(looping) for _ in range(n)]
    for c, cyc in enumerate(looping):
        for i, r in enumerate(cyc):
            table[r][c] = cyc[(i + hop) % n]
    return table


def calculate_out_mapping_circle(looping: list[list[int]]) -> list[list[int]]:
    """Successor tables: ``out_mapping[rank][c]`` = rank that ``rank`` sends to on cycle ``c``.

    Args:
        looping: ``C`` Hamiltonian cycles over ``n`` ranks, shape ``[C][n]``.

    Returns:
        shape ``[n][C]`` (``[n][n - 1]`` for :func:`~.cycles.gen_hamilton_circle`).  For a
        Hamiltonian decomposition row ``rank`` is a permutation of the other ranks,
        which is what an all-to-all exchange needs.
    """
    return _neighbour_table(looping, 1)


def calculate_in_mapping_circle(looping: list[list[int]]) -> list[list[int]]:
    """Predecessor tables: ``in_mapping[rank][c]`` = rank that ``rank`` receives from on cycle ``c``.

    Returns:
        shape ``[n][C]``; the inverse of :func:`calculate_out_mapping_circle`
        (``out_mapping[in_mapping[r][c]][c] == r``).
    """
    return _neighbour_table(looping, -1)


def _intra_node_table(path0: list[list[int]], node: int, outgoing: bool) -> list[list[int]]:
    """``table[local][c]`` = global rank device ``node * m + local`` sends to
    (``outgoing``) or receives from on path ``c`` inside its node; -1 where it has none."""
    m = num_ranks(path0, closed=False)
    base = node * m
    table = [[-1] * len(path0) for _ in range(m)]
    for c, path in enumerate(path0):
        for a, b in zip(path, path[1:]):
            here, peer = (a, b) if outgoing else (b, a)
            table[here][c] = base + peer
    return table


def calculate_intra_node_out_mapping_two_nodes(
    path0: list[list[int]], node: int = 0
) -> list[list[int]]:
    """Intra-node successor tables of the two-level schedule.

    Args:
        path0: node 0's ``m`` directed Hamiltonian paths over local ranks
            ``0 .. m-1`` (shape ``[m][m]``, e.g. :func:`~.cycles.gen_hamilton_path_local`).
        node: which node's table to return (default 0).

    Returns:
        shape ``[m][m]``: entry ``[local][c]`` is the global rank that device
        ``node * m + local`` sends to inside its node on cycle/path ``c``, or
        ``-1`` when that device is the last vertex of path ``c`` (its send on
        cycle ``c`` is the inter-node one, see :func:`calculate_inter_node_mapping`).
        Node ``k``'s table is node 0's plus ``k * m`` (``-1`` stays ``-1``).
    """
    return _intra_node_table(path0, node, outgoing=True)


def calculate_intra_node_in_mapping_two_nodes(
    path0: list[list[int]], node: int = 0
) -> list[list[int]]:
    """Intra-node predecessor tables of the two-level schedule.

    Returns:
        shape ``[m][m]``: entry ``[local][c]`` is the global rank that device
        ``node * m + local`` receives from inside its node on cycle/path ``c``, or
        ``-1`` when that device is the first vertex of path ``c`` (it receives
        that chunk over the inter-node link).  Node ``k``'s table is node 0's
        plus ``k * m``.
    """
    return _intra_node_table(path0, node, outgoing=False)


def calculate_inter_node_mapping(
    looping: list[list[int]], node_size: int | None = None, direction: str = "out"
) -> list[tuple[int, int]]:
    """Per-rank inter-node routing of the two-level schedule, derived from the cycles.

    Args:
        looping: the two-level cycles (:func:`~.cycles.gen_hamilton_circle_two_nodes`),
            shape ``[m][n]``.
        node_size: devices per node; defaults to ``len(looping)`` (the two-level
            schedule has one cycle per device of a node).
        direction: ``"out"`` (what each rank sends) or ``"in"`` (what it receives).

    Returns:
        A list of ``n`` tuples, indexed by global rank: ``(peer, chunk)`` where
        ``peer`` is the global rank of the receiver (``"out"``) or of the sender
        (``"in"``) of that rank's single inter-node transfer, and ``chunk`` is the
        KV chunk index (= index of the cycle the transfer belongs to).

    Raises:
        ValueError: if some rank does not have exactly one inter-node transfer in
            that direction.
    """
    if direction not in ("out", "in"):
        raise ValueError(f"direction must be 'out' or 'in', got {direction!r}")
    n = num_ranks(looping)
    m = len(looping) if node_size is None else node_size
    if m <= 0 or n % m != 0:
        raise ValueError(f"{n} ranks do not split into nodes of {m}")
    mapping: list[tuple[int, int] | None] = [None] * n
    for c, cyc in enumerate(looping):
        for src, dst in inter_node_arcs([cyc], m):
            rank, peer = (src, dst) if direction == "out" else (dst, src)
            if mapping[rank] is not None:
                raise ValueError(f"rank {rank} has more than one inter-node {direction} transfer")
            mapping[rank] = (peer, c)
    missing = [r for r, x in enumerate(mapping) if x is None]
    if missing:
        raise ValueError(f"ranks {missing} have no inter-node {direction} transfer")
    return [x for x in mapping if x is not None]
