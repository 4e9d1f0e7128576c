"""Pure-Python graph constructions behind the Hamiltonian-cycle schedules (no torch).

* :mod:`.complete_graph`: Hamiltonian decompositions of the complete directed
  graph ``K*_n`` (one cycle per KV chunk) and Walecki's Hamiltonian paths.
* :mod:`.two_level`: the ``(m-K_m-m)^u`` cycles for ``u`` nodes of ``m`` devices
  (one inter-node send per device per step).

The Hamilton Attention reference's names for these (cycle generators, routing tables,
causal source ranks) live with the rest of its API, in :mod:`hamilton_attn.compat.hamilton`.
"""

from .complete_graph import (
    hamiltonian_decomposition,
    has_decomposition,
    verify_decomposition,
    verify_path_decomposition,
    walecki_cycles,
    walecki_paths,
)
from .two_level import inter_node_arcs, two_level_cycles, verify_two_level

__all__ = [
    "hamiltonian_decomposition",
    "has_decomposition",
    "inter_node_arcs",
    "two_level_cycles",
    "verify_decomposition",
    "verify_path_decomposition",
    "verify_two_level",
    "walecki_cycles",
    "walecki_paths",
]
