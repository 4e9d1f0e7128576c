"""Cycle generation (the seed's "Decomposition of Topology"), by the seed's names, on the
constructions of :mod:`hamilton_attn.topology` (pure Python).

Terminology shared by this module, :mod:`.mapping` and :mod:`.causal`:

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

from ...topology import hamiltonian_decomposition, two_level_cycles, walecki_paths


def num_ranks(looping: list[list[int]], *, closed: bool = True) -> int:
    """Common length of the cycles (or paths) in ``looping``; checks each is a permutation."""
    kind = "cycle" if closed else "path"
    if not looping:
        raise ValueError(f"need at least one {kind}")
    n = len(looping[0])
    for c, seq in enumerate(looping):
        if len(seq) != n or sorted(seq) != list(range(n)):
            raise ValueError(f"{kind} {c} is not a permutation of 0..{n - 1}")
    return n


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
