"""Pure-Python graph constructions behind the Hamiltonian-cycle schedules (no torch).

* :mod:`.complete_graph`: Hamiltonian decompositions of the complete directed
  graph ``K*_n`` (one cycle per KV chunk) and Walecki's Hamiltonian paths.
* :mod:`.two_level`: the ``(m-K_m-m)^u`` cycles for ``u`` nodes of ``m`` devices
  (one inter-node send per device per step).
* :mod:`.seed_names`: the Hamilton Attention reference API names (cycle
  generators, routing tables, causal source ranks) built on the two above.
"""

from .complete_graph import (
    hamiltonian_decomposition,
    has_decomposition,
    verify_decomposition,
    verify_path_decomposition,
    walecki_cycles,
    walecki_paths,
)
from .seed_names import (
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
from .two_level import inter_node_arcs, two_level_cycles, verify_two_level

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
    "hamiltonian_decomposition",
    "has_decomposition",
    "inter_node_arcs",
    "source_rank_per_iter",
    "two_level_cycles",
    "verify_decomposition",
    "verify_path_decomposition",
    "verify_two_level",
    "walecki_cycles",
    "walecki_paths",
]
