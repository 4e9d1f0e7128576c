"""ring-flash-attention's public API (``ring_flash_attn``) on the core.

Porting code written for ring-flash-attention means changing the import line::

    from hamilton_attn.compat.ring_flash_attn import zigzag_ring_flash_attn_func

Every function takes what ring-flash-attention's takes (this rank's LOCAL shards in that
library's layout, flash-attn's keyword arguments, ``group``) and returns what it returns
(``out``, or ``(out, softmax_lse, None)`` with ``return_attn_probs=True``). Inside, the
call rebuilds the global mask, plans once with a placement that is exactly the layout of
the shards it was handed, and runs :func:`hamilton_attn.calc_attn`: results are exact
(float32 accumulation, the same numbers whatever the layout) and ``window_size`` /
``alibi_slopes`` hold across ranks as flash-attn defines them on the whole sequence.

Modules: :mod:`.batch` (``ring_flash_attn_*``, ``zigzag_ring_flash_attn_*``,
``stripe_flash_attn_*``: the layouts are described there), :mod:`.varlen` (the varlen
ring and zigzag forms), :mod:`.llama3` (``llama3_flash_attn_*`` and
:func:`llama3_flash_attn_prepare_cu_seqlens`), :mod:`.hf_adapter`
(:func:`substitute_hf_flash_attn`, :func:`update_ring_flash_attn_params`), :mod:`._core`
(the shared checks, placements and plan cache). ``docs/peer_apis.md`` lists every
function and where it differs from ring-flash-attention's.
"""

from .batch import (
    ring_flash_attn_func,
    ring_flash_attn_kvpacked_func,
    ring_flash_attn_qkvpacked_func,
    stripe_flash_attn_func,
    stripe_flash_attn_kvpacked_func,
    stripe_flash_attn_qkvpacked_func,
    zigzag_ring_flash_attn_func,
    zigzag_ring_flash_attn_kvpacked_func,
    zigzag_ring_flash_attn_qkvpacked_func,
)
from .hf_adapter import substitute_hf_flash_attn, update_ring_flash_attn_params, use_ring_attn
from .llama3 import (
    llama3_flash_attn_prepare_cu_seqlens,
    llama3_flash_attn_varlen_func,
    llama3_flash_attn_varlen_kvpacked_func,
    llama3_flash_attn_varlen_qkvpacked_func,
)
from .varlen import (
    ring_flash_attn_varlen_func,
    ring_flash_attn_varlen_kvpacked_func,
    ring_flash_attn_varlen_qkvpacked_func,
    zigzag_ring_flash_attn_varlen_func,
    zigzag_ring_flash_attn_varlen_kvpacked_func,
    zigzag_ring_flash_attn_varlen_qkvpacked_func,
)

__all__ = [
    "llama3_flash_attn_prepare_cu_seqlens",
    "llama3_flash_attn_varlen_func",
    "llama3_flash_attn_varlen_kvpacked_func",
    "llama3_flash_attn_varlen_qkvpacked_func",
    "ring_flash_attn_func",
    "ring_flash_attn_kvpacked_func",
    "ring_flash_attn_qkvpacked_func",
    "ring_flash_attn_varlen_func",
    "ring_flash_attn_varlen_kvpacked_func",
    "ring_flash_attn_varlen_qkvpacked_func",
    "stripe_flash_attn_func",
    "stripe_flash_attn_kvpacked_func",
    "stripe_flash_attn_qkvpacked_func",
    "substitute_hf_flash_attn",
    "update_ring_flash_attn_params",
    "use_ring_attn",
    "zigzag_ring_flash_attn_func",
    "zigzag_ring_flash_attn_kvpacked_func",
    "zigzag_ring_flash_attn_qkvpacked_func",
    "zigzag_ring_flash_attn_varlen_func",
    "zigzag_ring_flash_attn_varlen_kvpacked_func",
    "zigzag_ring_flash_attn_varlen_qkvpacked_func",
]
