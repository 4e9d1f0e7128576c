"""The Hamilton Attention API (names and parameters of its docs), mapped onto the core.

Local shards follow ring-flash-attention's conventions: ``[B, S_local, H, D]`` (BSND);
``ring_*`` expects rank r to hold the r-th contiguous slice of the sequence,
``zigzag_*`` chunks r and 2W-1-r of 2W equal chunks. Functions return ``(out, lse)``
with lse ``[B, H, S_local]`` and are differentiable.

The ``hamilton_*`` functions run the ``hamilton`` (``K_{m x u}``) and
``hamilton_2level`` (``(m-K_m-m)^u``) schedules; the cycles always come from
:mod:`hamilton_attn.topology` (:mod:`.cycles` gives them the reference's names). Token
layout the caller must use (every rank the same number ``S_local`` of tokens):

* ``hamilton_attention_forward_full_flash_attn`` and ``..._two_nodes``: contiguous,
  rank r holds tokens ``[r * S_local, (r + 1) * S_local)``.
* ``hamilton_attention_forward_causal_flash_attn``: zigzag, the global sequence is cut
  into 2W equal chunks of ``S_local / 2`` tokens (``S_local`` even) and rank r holds
  chunk r followed by chunk 2W-1-r.

The global length is ``W * S_local``; it need not be a multiple of ``n (n - 1)``: the
schedule cuts each rank's KV into as-equal-as-possible pieces (the reference's
per-cycle chunks). ``k`` / ``v`` may be tensors (laid out as q) or the reference's lists
of per-cycle chunks, one per cycle: for the contiguous functions the list is joined
along the sequence dimension; for the causal function entry j holds piece j of each
zigzag half (see :func:`hamilton_attention_forward_causal_flash_attn`). ``looping`` and the
routing tables are optional: when given they must equal what the library computes for
the group (ValueError otherwise, on every rank, before any communication).

Modules, after the sections of the seed's API document:

* :mod:`.comm`: communication primitives (``RingComm``, ``A2AComm``).
* :mod:`.attention`: the distributed attention API (ring, zigzag ring, Hamilton full /
  causal / two-node); :mod:`.checks` holds their argument checks.
* :mod:`.profile`: the profiling-enabled variants (``*_profile``).
* :mod:`.update`: output and LSE update (``update_out_and_lse``).
* :mod:`.cycles`, :mod:`.mapping`, :mod:`.causal`: cycle generation, routing tables and
  causal source ranks (pure Python).
"""

from .attention import (
    hamilton_attention_forward_causal_flash_attn,
    hamilton_attention_forward_full_flash_attn,
    hamilton_attention_forward_full_flash_attn_two_nodes,
    ring_attention_forward_flash_attn,
    zigzag_ring_attention_forward_flash_attn,
)
from .causal import calculate_source_rank_per_iter

# Not in __all__ (the seed's docs do not name it), but importable from here as before.
from .causal import source_rank_per_iter as source_rank_per_iter
from .comm import A2AComm, RingComm
from .cycles import gen_hamilton_circle, gen_hamilton_circle_two_nodes, gen_hamilton_path_local
from .mapping import (
    calculate_in_mapping_circle,
    calculate_inter_node_mapping,
    calculate_intra_node_in_mapping_two_nodes,
    calculate_intra_node_out_mapping_two_nodes,
    calculate_out_mapping_circle,
)
from .profile import (
    hamilton_attention_forward_causal_flash_attn_profile,
    hamilton_attention_forward_full_flash_attn_profile,
    hamilton_attention_forward_full_flash_attn_two_nodes_profile,
    ring_attention_forward_flash_attn_profile,
    zigzag_ring_attention_forward_flash_attn_profile,
)
from .update import update_out_and_lse

__all__ = [
    "A2AComm",
    "RingComm",
    "calculate_in_mapping_circle",
    "calculate_inter_node_mapping",
    "calculate_intra_node_in_mapping_two_nodes",
    "calculate_intra_node_out_mapping_two_nodes",
    "calculate_out_mapping_circle",
    "calculate_source_rank_per_iter",
    "gen_hamilton_circle",
    "gen_hamilton_circle_two_nodes",
    "gen_hamilton_path_local",
    "hamilton_attention_forward_causal_flash_attn",
    "hamilton_attention_forward_causal_flash_attn_profile",
    "hamilton_attention_forward_full_flash_attn",
    "hamilton_attention_forward_full_flash_attn_profile",
    "hamilton_attention_forward_full_flash_attn_two_nodes",
    "hamilton_attention_forward_full_flash_attn_two_nodes_profile",
    "ring_attention_forward_flash_attn",
    "ring_attention_forward_flash_attn_profile",
    "update_out_and_lse",
    "zigzag_ring_attention_forward_flash_attn",
    "zigzag_ring_attention_forward_flash_attn_profile",
]
