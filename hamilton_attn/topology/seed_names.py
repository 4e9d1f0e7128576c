"""The Hamilton Attention reference API names, built on :mod:`.complete_graph` / :mod:`.two_level`.

Terminology shared by all functions here:

* ``looping`` is a list of directed Hamiltonian cycles over ranks ``0 .. n-1``
  (shape ``[C][n]``, arcs are consecutive pairs plus ``last -> first``).  For the
  ``K_{m x u}`` schedule ``C = n - 1`` (:func:`gen_hamilton_circle`); for the
  two-level ``(m-K_m-m)^u`` schedule ``C = m`` (:func:`gen_hamilton_circle_two_nodes`).
* Every rank splits its KV into ``C`` chunks; chunk ``c`` of every rank travels
  along cycle ``c``.  So "cycle index" and "KV chunk index" are the same number.
* In iteration ``t`` (``0 <= t <= n - 2``) every rank forwards, along each cycle
  ``c``, the chunk it holds for that cycle to its successor on cycle ``c`` and
  receives one from its predecessor.  The chunk rank ``r`` receives in iteration
  ``t`` has travelled ``t + 1`` hops: it is the chunk of the rank ``t + 1`` steps
  before ``r`` on cycle ``c``.  After ``n - 1`` iterations every rank has seen the
  chunk ``c`` of every other rank, for every ``c``.
"""

from __future__ import annotations

from .complete_graph import hamiltonian_decomposition, walecki_paths
from .two_level import inter_node_arcs, two_level_cycles

__all__ = [
    "calculate_in_mapping_circle",
    "calculate_inter_node_mapping",
    "calculate_intra_node_in_mapping_two_nodes",
    "calculate_intra_node_out_mapping_two_nodes",
    "calculate_out_mapping_circle",
    "calculate_source_rank_per_iter",
    "gen_hamilton_circle",
    "gen_hamilton_circle_two_nodes",
    "gen_hamilton_path_local",
    "source_rank_per_iter",
]


def _num_ranks(looping: list[list[int]], *, closed: bool = True) -> int:
    """Common length of the cycles (or paths) in ``looping``; checks each is a permutation."""
    kind = "cycle" if closed else "path"
    if not looping:
        raise ValueError(f"need at least one {kind}")
    n = len(looping[0])
    for c, seq in enumerate(looping):
        if len(seq) != n or sorted(seq) != list(range(n)):
            raise ValueError(f"{kind} {c} is not a permutation of 0..{n - 1}")
    return n


# --------------------------------------------------------------------------- #
# Cycle generation
# --------------------------------------------------------------------------- #


def gen_hamilton_circle(n: int) -> list[list[int]]:
    """Cycles of the ``K_{m x u}`` schedule: a Hamiltonian decomposition of ``K*_n``.

    Returns:
        ``n - 1`` cycles, shape ``[n - 1][n]``, each starting at rank 0; every
        ordered pair of ranks is an arc of exactly one cycle.  See
        :func:`~hamilton_attn.topology.complete_graph.hamiltonian_decomposition`
        (raises ``ValueError`` for ``n = 4`` and ``n = 6``).
    """
    return hamiltonian_decomposition(n)


def gen_hamilton_path_local(m: int) -> list[list[int]]:
    """Node-local Hamiltonian paths of the two-level schedule (``path0``).

    Returns:
        ``m`` directed Hamiltonian paths of ``K*_m`` over local ranks, shape
        ``[m][m]`` (:func:`~hamilton_attn.topology.complete_graph.walecki_paths`).
    """
    return walecki_paths(m)


def gen_hamilton_circle_two_nodes(n: int, node_size: int = 8) -> list[list[int]]:
    """Cycles of the two-level ``(m-K_m-m)^u`` schedule over ``n = m * u`` devices.

    Args:
        n: total number of devices, a multiple of ``node_size`` with at least two nodes.
        node_size: devices per node ``m`` (even; the reference uses 8).

    Returns:
        ``m`` cycles of shape ``[m][n]`` (:func:`~hamilton_attn.topology.two_level.two_level_cycles`).
    """
    if n % node_size != 0:
        raise ValueError(f"n={n} devices is not a multiple of node_size={node_size}")
    return two_level_cycles(n // node_size, node_size)


# --------------------------------------------------------------------------- #
# Routing tables
# --------------------------------------------------------------------------- #


def calculate_out_mapping_circle(looping: list[list[int]]) -> list[list[int]]:
    """Successor tables: ``out_mapping[rank][c]`` = rank that ``rank`` sends to on cycle ``c``.

    Args:
        looping: ``C`` Hamiltonian cycles over ``n`` ranks, shape ``[C][n]``.

    Returns:
        shape ``[n][C]`` (``[n][n - 1]`` for :func:`gen_hamilton_circle`).  For a
        Hamiltonian decomposition row ``rank`` is a permutation of the other ranks,
        which is what an all-to-all exchange needs.
    """
    n = _num_ranks(looping)
    out = [[0] * len(looping) for _ in range(n)]
    for c, cyc in enumerate(looping):
        for i, r in enumerate(cyc):
            out[r][c] = cyc[(i + 1) % n]
    return out


def calculate_in_mapping_circle(looping: list[list[int]]) -> list[list[int]]:
    """Predecessor tables: ``in_mapping[rank][c]`` = rank that ``rank`` receives from on cycle ``c``.

    Returns:
        shape ``[n][C]``; the inverse of :func:`calculate_out_mapping_circle`
        (``out_mapping[in_mapping[r][c]][c] == r``).
    """
    n = _num_ranks(looping)
    inn = [[0] * len(looping) for _ in range(n)]
    for c, cyc in enumerate(looping):
        for i, r in enumerate(cyc):
            inn[r][c] = cyc[(i - 1) % n]
    return inn


def calculate_intra_node_out_mapping_two_nodes(
    path0: list[list[int]], node: int = 0
) -> list[list[int]]:
    """Intra-node successor tables of the two-level schedule.

    Args:
        path0: node 0's ``m`` directed Hamiltonian paths over local ranks
            ``0 .. m-1`` (shape ``[m][m]``, e.g. :func:`gen_hamilton_path_local`).
        node: which node's table to return (default 0).

    Returns:
        shape ``[m][m]``: entry ``[local][c]`` is the global rank that device
        ``node * m + local`` sends to inside its node on cycle/path ``c``, or
        ``-1`` when that device is the last vertex of path ``c`` (its send on
        cycle ``c`` is the inter-node one, see :func:`calculate_inter_node_mapping`).
        Node ``k``'s table is node 0's plus ``k * m`` (``-1`` stays ``-1``).
    """
    m = _num_ranks(path0, closed=False)
    base = node * m
    out = [[-1] * len(path0) for _ in range(m)]
    for c, path in enumerate(path0):
        for a, b in zip(path, path[1:]):
            out[a][c] = base + b
    return out


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
    m = _num_ranks(path0, closed=False)
    base = node * m
    inn = [[-1] * len(path0) for _ in range(m)]
    for c, path in enumerate(path0):
        for a, b in zip(path, path[1:]):
            inn[b][c] = base + a
    return inn


def calculate_inter_node_mapping(
    looping: list[list[int]], node_size: int | None = None, direction: str = "out"
) -> list[tuple[int, int]]:
    """Per-rank inter-node routing of the two-level schedule, derived from the cycles.

    Args:
        looping: the two-level cycles (:func:`gen_hamilton_circle_two_nodes`),
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
    n = _num_ranks(looping)
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


# --------------------------------------------------------------------------- #
# Causal masking
# --------------------------------------------------------------------------- #


def source_rank_per_iter(looping: list[list[int]]) -> list[list[list[int]]]:
    """Origin of every received KV chunk.

    Returns:
        ``src`` of shape ``[n - 1][n][C]``: ``src[t][r][c]`` is the rank whose
        chunk ``c`` rank ``r`` receives in iteration ``t`` along cycle ``c``, i.e.
        the rank ``t + 1`` hops before ``r`` on cycle ``c`` (``t = 0`` is the
        direct predecessor).  Never equal to ``r``; over ``t`` it runs through all
        other ranks.
    """
    n = _num_ranks(looping)
    num_c = len(looping)
    pos = []  # pos[c][r] = index of r in cycle c
    for cyc in looping:
        p = [0] * n
        for i, r in enumerate(cyc):
            p[r] = i
        pos.append(p)
    return [
        [[looping[c][(pos[c][r] - (t + 1)) % n] for c in range(num_c)] for r in range(n)]
        for t in range(n - 1)
    ]


def calculate_source_rank_per_iter(looping: list[list[int]]) -> list[list[list[bool]]]:
    """Causal-mask flags: is the chunk received in iteration ``t`` from ``r``'s past?

    Convention: iteration ``t`` (``0 <= t <= n - 2``) is the chunk that has
    travelled ``t + 1`` hops along cycle ``c`` (see :func:`source_rank_per_iter`).
    With the sequence split contiguously in rank order, a chunk from a rank
    ``s < r`` lies entirely before ``r``'s queries and is attended with the full
    (unmasked) rectangle; a chunk from ``s > r`` lies entirely in the future and is
    skipped.

    Returns:
        shape ``[n - 1][n][C]``: ``flags[t][r][c] = source_rank_per_iter(looping)[t][r][c] < r``.
    """
    src = source_rank_per_iter(looping)
    return [[[s < r for s in row] for r, row in enumerate(step)] for step in src]
