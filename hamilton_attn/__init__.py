"""hamilton-attn: exact attention over very long sequences, on one device or many.

Public surface: :func:`attention` (one device, any mask), the mask builders
(:class:`Mask`, :class:`AttnMaskType`), :mod:`merge`, and the context-parallel API.
"""

from .api import (
    ContextParallelAttention,
    Plan,
    calc_attn,
    dispatch,
    get_position_ids,
    plan,
    undispatch,
)
from .attention import attention
from .masks import AttnMaskType, Band, Mask
from .merge import merge, merge_, merge_many
from .placement import compute_pad_size
from .runtime.comm import SimulatedGroup
from .runtime.graphs import CudaGraphed, cuda_graph

__version__ = "0.1.0"

__all__ = [
    "AttnMaskType",
    "Band",
    "ContextParallelAttention",
    "CudaGraphed",
    "Mask",
    "Plan",
    "SimulatedGroup",
    "attention",
    "calc_attn",
    "compute_pad_size",
    "cuda_graph",
    "dispatch",
    "get_position_ids",
    "merge",
    "merge_",
    "merge_many",
    "plan",
    "undispatch",
]
