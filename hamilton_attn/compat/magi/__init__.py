"""MagiAttention's API (names, parameters, semantics of its docs) on top of our core.

Porting code written for ``magi_attention.api`` means changing the import line::

    from hamilton_attn.compat.magi import (
        DistAttnConfig, DispatchConfig, MinHeapDispatchAlg, OverlapConfig, AttnOverlapMode,
        UniformOverlapAlg, compute_pad_size, magi_attn_varlen_dispatch, calc_attn, undispatch,
    )

Legend: T tokens (global ``T = total_seqlen``, local ``T_local``), B batch, H heads
(Hq query, Hk key/value), D head dim, W the context-parallel size (``cp_size``).

How the names map onto the core (:func:`hamilton_attn.plan` and friends):

* **Mask.** ``(q_ranges, k_ranges, attn_mask_type)`` becomes
  :meth:`hamilton_attn.Mask.from_ranges` (``full | causal | inv_causal | bi_causal``,
  causal bottom-right aligned as in MagiAttention). A (q, k) pair covered by several
  rectangles counts once (union), also in :func:`flex_flash_attn_func`.
* **Runtime key.** ``magi_attn_*_key`` build a :class:`DistAttnRuntimeKey`: frozen and
  hashable, it holds the :class:`hamilton_attn.Plan` (schedule ``groupcast``: each KV
  chunk goes only to the ranks that need it), the total sequence lengths, the padding
  and the chunk size. Equal arguments give an equal key (plans are cached).
* **Padding and chunks.** Tokens are cut into chunks of ``chunk_size`` and every rank
  holds as many chunks; ``pad_size`` tokens are appended at the end of the sequence
  (they see nothing and are seen by nothing). Given both, ``total_seqlen_q +
  pad_size`` must be a multiple of ``cp_size * chunk_size`` (what
  :func:`compute_pad_size` returns); given only ``chunk_size``, the padding is computed;
  given neither, the core picks the chunks (16 per rank). ``head_dim`` is accepted and
  unused (no kernel limit on it here).
* **Dispatch algorithm.** ``DispatchConfig(alg=MinHeapDispatchAlg())`` is the core's
  ``dispatch="minheap"`` (chunks costed by the mask's area, largest first to the least
  loaded rank); ``SequentialDispatchAlg`` is ``"sequential"`` (rank r takes the r-th run
  of consecutive chunks) and ``RandomDispatchAlg(seed)`` is ``"random"``.
* **Self / cross-attention.** ``is_same_source=True``: keys and values are the queries'
  tokens, dispatched the same way (needs ``total_seqlen_q == total_seqlen_k``). Otherwise
  keys and values are dispatched on their own (``kv_dispatch``), and any ``Sq x Sk``
  mask is allowed; keys are padded to a multiple of ``cp_size * chunk_size`` of their
  own. ``is_q_permutable=False`` / ``is_k_permutable=False`` dispatch that side
  ``sequential`` (for self-attention, either flag makes both sequential, since queries
  and keys must then be placed alike). ``dispatch(x, key)`` dispatches query-side
  tensors (q, and for self-attention k and v too); for cross-attention dispatch the
  key/value source with ``dispatch(x_kv, key, role="kv")`` and gather key-side tensors
  with ``undispatch(..., role="kv")``.
* **Overlap.** ``OverlapConfig(mode=STATIC, degree=n)`` runs the groupcast transfers in
  n stages, each overlapped with the previous stage's compute; ``mode=DYNAMIC`` lets the
  core's cost model choose; ``enable=False`` is one stage. ``min_chunk_size``,
  ``max_num_chunks``, ``alg`` and the cost factors are validated and otherwise unused.
* **Hierarchy.** ``cp_mesh`` (from :func:`init_hierarchical_mesh`, dims ``("inter",
  "intra")``) runs on one group over all the mesh's ranks with ``node_size`` = the
  intra size: a KV chunk crosses to another node once and is fanned out inside it.
  Nodes are runs of consecutive ranks (torch orders a group's members by rank).
  ``DistAttnConfig(high_bandwith_domain_size=n)`` with n > 1 gives ``node_size=n``
  without a mesh.

Layouts. MagiAttention is token-major: ``x`` is ``(T, ...)`` and ``calc_attn`` takes
``(T_local, H, D)``. As an extension a batch of sequences that share the mask can be
kept unflattened: ``x`` ``(B, T, ...)`` (sequence dim 1, found when dim 0 is not a
sequence length, or pass ``seq_dim=1``) and ``calc_attn`` on ``(B, T_local, H, D)``.
``dispatch`` accepts ``x`` with or without the padding (``magi_attn_*_key`` return it
padded, as MagiAttention's did). ``calc_attn`` returns ``(out, lse)`` with lse
``(T_local, Hq)`` (``(B, T_local, Hq)`` batched), float32 (float64 for float64
inputs); a query that sees no key gets out 0 and lse -inf.

Not supported (ValueError): ``softcap != 0`` and attention ``sink``. Deterministic and
kernel-tuning knobs are accepted and ignored (the core is deterministic).

Package layout, as MagiAttention's (each module names its MagiAttention original):

* ``api``: the functions its examples import; ``api.magi_attn_interface`` (keys,
  dispatch / calc_attn / undispatch, ``get_most_recent_key``) and ``api.functools``
  (``compute_pad_size``, ``infer_attn_mask_from_*``, ``init_hierarchical_mesh``, ...).
* ``common``: ``AttnRange``, ``AttnRanges``, the enums ``AttnMaskType`` (the core's) and
  ``AttnOverlapMode``; ``common.mask`` converts triples to and from the core's Mask.
* ``config``: ``DistAttnConfig`` and the dispatch / overlap configs.
* ``dist_attn_runtime_mgr``: ``DistAttnRuntimeKey`` and ``RECENT_KEY``, the one place
  that remembers the most recent key.
* ``functional``: ``flex_flash_attn_func`` (one device).
"""

from . import api
from . import v1_1 as v1_1  # MagiAttention 1.1's forms (key functions without x, ...)
from .api import *  # noqa: F403 - the api's names, listed once in api.__all__
from .common import AttnRange as AttnRange
from .config import DispatchAlg as DispatchAlg
from .dist_attn_runtime_mgr import DistAttnRuntimeKey as DistAttnRuntimeKey
from .v1_1 import AttnForwardMeta as AttnForwardMeta
from .v1_1 import clear_cache as clear_cache
from .v1_1 import roll as roll
from .v1_1 import roll_simple as roll_simple

# The api's names and three types MagiAttention exports from their own modules; the
# names MagiAttention 1.1 added that do not clash with the seed's forms, and v1_1.
_V1_1 = ["AttnForwardMeta", "clear_cache", "roll", "roll_simple", "v1_1"]
__all__ = sorted([*api.__all__, "AttnRange", "DispatchAlg", "DistAttnRuntimeKey", *_V1_1])
