"""hamilton-attn: exact attention over very long sequences, on one device or many.

The public API, by what it is for (``docs/DESIGN.md`` draws the layers behind it):

* masks as data: :class:`Mask` (bands: causal, windows, documents, MagiAttention's
  range kinds), :class:`AttnMaskType`;
* attention on one device, any mask: :func:`attention`; partial results combined
  exactly: :func:`merge`, :func:`merge_many`;
* attention variants as data (:mod:`hamilton_attn.variants`): :class:`Softmax`
  (softcap, ALiBi, sinks), :class:`Sigmoid`, :class:`ReLU`, and ``score_mod``;
* context parallelism: :func:`plan` (where tokens live and how KV moves, verified
  before anything runs; :class:`Plan`), :func:`dispatch` / :func:`undispatch`
  (global <-> local tensors), :func:`calc_attn` (the distributed call, forward and
  backward), :class:`ContextParallelAttention` (the same as a module),
  :func:`get_position_ids`, :func:`compute_pad_size`, :class:`SimulatedGroup` (plans
  for ranks that exist only on paper);
* linear attention (:mod:`hamilton_attn.linear`): :func:`linear_attention` (a scalar
  decay per head or per token, one device or context parallel: states, not KV, move
  between ranks), :func:`retention`, :func:`simple_gla`, :func:`ssd` (Mamba2);
* CUDA-graph replay: :func:`cuda_graph`, :class:`CudaGraphed`;
* settings: :mod:`hamilton_attn.config` (every environment variable, one typed
  object, ``config.override`` for a block).

Peers' APIs live in :mod:`hamilton_attn.compat` (``compat.magi``, ``compat.hamilton``).
"""

from . import config

# Masks as data.
from .masks import AttnMaskType, Mask

# Attention on one device, and the exact merge of partial results.
from .attention import attention
from .merge import merge, merge_many
from .variants import ReLU, Sigmoid, Softmax

# Context parallelism: plan, move tokens, attend.
from .api import (
    ContextParallelAttention,
    Plan,
    calc_attn,
    dispatch,
    get_position_ids,
    plan,
    undispatch,
)
from .placement import compute_pad_size
from .runtime.comm import SimulatedGroup

# Linear attention (retention, simple GLA, Mamba2's SSD), one device or context parallel.
from .linear import linear_attention, retention, simple_gla, ssd

# CUDA-graph replay of any of the above.
from .runtime.graphs import CudaGraphed, cuda_graph

__version__ = "0.1.0"

__all__ = [
    # masks
    "AttnMaskType",
    "Mask",
    # one device
    "attention",
    "merge",
    "merge_many",
    # variants
    "ReLU",
    "Sigmoid",
    "Softmax",
    # context parallelism
    "ContextParallelAttention",
    "Plan",
    "SimulatedGroup",
    "calc_attn",
    "compute_pad_size",
    "dispatch",
    "get_position_ids",
    "plan",
    "undispatch",
    # linear attention
    "linear_attention",
    "retention",
    "simple_gla",
    "ssd",
    # CUDA graphs
    "CudaGraphed",
    "cuda_graph",
    # settings
    "config",
]
