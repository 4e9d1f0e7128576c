"""MagiAttention's ``magi_attention.api``: every name its examples import."""

from ..common import AttnMaskType, AttnOverlapMode, AttnRanges
from ..config import (
    DispatchConfig,
    DistAttnConfig,
    MinHeapDispatchAlg,
    OverlapConfig,
    RandomDispatchAlg,
    SequentialDispatchAlg,
    UniformOverlapAlg,
)
from ..functional import flex_flash_attn_func
from .functools import (
    compute_pad_size,
    full_attention_to_varlen_attention,
    infer_attn_mask_from_cu_seqlens,
    infer_attn_mask_from_sliding_window,
    init_hierarchical_mesh,
    squash_batch_dim,
)
from .magi_attn_interface import (
    calc_attn,
    dispatch,
    get_most_recent_key,
    get_position_ids,
    magi_attn_flex_dispatch,
    magi_attn_flex_key,
    magi_attn_varlen_dispatch,
    magi_attn_varlen_key,
    undispatch,
)

# In MagiAttention's order: functions, then the types its examples build.
__all__ = [
    "calc_attn",
    "dispatch",
    "magi_attn_flex_dispatch",
    "magi_attn_flex_key",
    "magi_attn_varlen_dispatch",
    "magi_attn_varlen_key",
    "undispatch",
    "get_most_recent_key",
    "flex_flash_attn_func",
    "get_position_ids",
    "compute_pad_size",
    "squash_batch_dim",
    "full_attention_to_varlen_attention",
    "infer_attn_mask_from_sliding_window",
    "infer_attn_mask_from_cu_seqlens",
    "init_hierarchical_mesh",
    "AttnMaskType",
    "AttnOverlapMode",
    "AttnRanges",
    "DistAttnConfig",
    "DispatchConfig",
    "MinHeapDispatchAlg",
    "OverlapConfig",
    "UniformOverlapAlg",
    "SequentialDispatchAlg",
    "RandomDispatchAlg",
]
