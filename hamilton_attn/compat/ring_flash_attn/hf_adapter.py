"""ring-flash-attention's HuggingFace adapter: :func:`substitute_hf_flash_attn` and
:func:`update_ring_flash_attn_params`, through transformers' public ``AttentionInterface``.

ring-flash-attention replaces transformers' private ``_flash_attention_forward`` (and so
breaks when its signature moves); here the attention function is registered with
``AttentionInterface`` under ``"ring_attention"`` and, as ring-flash-attention does,
under ``"flash_attention_2"`` (a model loaded with ``attn_implementation=
"flash_attention_2"`` then runs the ring). On a machine without flash-attn, switch a
model with ``model.set_attn_implementation("ring_attention")``. The attention is
llama3's (:func:`~.llama3.llama3_flash_attn_varlen_func`): the model runs on ``[1,
T_local]`` token ids, rank r holding the r-th of W equal runs of the packed batch
(``torch.chunk(x, W, dim=1)[r]``, as in ring-flash-attention's README), with the
documents of the GLOBAL ``cu_seqlens`` given to :func:`update_ring_flash_attn_params`
before each forward. Layers are causal, a layer's ``sliding_window`` w is flash-attn's
window ``(w - 1, 0)`` as in transformers' own flash path, ``softcap`` is applied where
the core has variants. ``use_ring_attn(False)`` switches back to transformers' own
function for ``"flash_attention_2"`` (the switch ring-flash-attention's adapter has).

This is the drop-in path; :mod:`hamilton_attn.integrations.transformers` is the full
integration (balanced placements, position ids and labels sharded for you).
"""

from __future__ import annotations

import torch

from . import _core
from .llama3 import llama3_flash_attn_prepare_cu_seqlens, llama3_flash_attn_varlen_func

NAME = "ring_attention"  # a name without "flash": transformers reads those as flash kernels
_STATE: dict = {"group": None, "heads_k_stride": 1, "params": None, "on": True, "previous": None}


def update_ring_flash_attn_params(cu_seqlens: torch.Tensor, process_group) -> None:
    """Give the ring the GLOBAL ``cu_seqlens`` of the packed batch (offsets of its
    documents in the ``[1, T]`` row) for the next forward calls on ``process_group``."""
    rank, w = _core.world(process_group)
    _STATE["params"] = llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, True, rank, w)
    _STATE["group"] = process_group


def use_ring_attn(flag: bool) -> None:
    """Route ``"flash_attention_2"`` to the ring (True) or to what was registered before
    :func:`substitute_hf_flash_attn` (False)."""
    _STATE["on"] = bool(flag)


@torch.compiler.disable
def ring_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling=None, sliding_window=None, softcap=None, **kwargs):  # fmt: skip
    """transformers' attention-function contract: query ``[1, Hq, T_local, D]``, key and
    value ``[1, Hk, T_local, D]`` (bhsd); returns ``(out [1, T_local, Hq, D], None)``."""
    if not _STATE["on"] and _STATE["previous"] is not None:
        return _STATE["previous"](module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, sliding_window=sliding_window,
                                  softcap=softcap, **kwargs)  # fmt: skip
    params = _STATE["params"]
    if params is None:
        raise ValueError(
            "cu_seqlens: call update_ring_flash_attn_params(cu_seqlens, group) before the "
            "model's forward (the ring needs the packed batch's documents)"
        )
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise ValueError(
            "attention_mask: padding is not applied by the ring; pack the documents and give "
            "their cu_seqlens to update_ring_flash_attn_params"
        )
    if dropout:
        raise ValueError(f"dropout_p: only 0.0 is supported, got attention dropout {dropout}")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise ValueError("s_aux: attention sinks are not supported by the ring adapter")
    if softcap:
        raise ValueError(f"softcap: {softcap} is not supported by ring-flash-attention's functions")
    if not getattr(module, "is_causal", True):
        raise ValueError("module: the ring adapter runs causal self-attention only")
    if query.dim() != 4 or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise ValueError(
            f"query, key: expected [1, H, T_local, D] self-attention tensors, got "
            f"{tuple(query.shape)}, {tuple(key.shape)} (batch of one packed row, no KV cache)"
        )
    cu_q, cu_k, max_q, max_k, k_slice = params
    window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T_local, H, D]
    out = llama3_flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max_q, max_k, _STATE["heads_k_stride"], k_slice,
        softmax_scale=scaling, causal=True, window_size=window, group=_STATE["group"],
    )  # fmt: skip
    return out[None], None


def _no_mask(*args, attention_mask=None, **kwargs):
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "attention_mask: padding is not applied by the ring; pack the documents and give "
            "their cu_seqlens to update_ring_flash_attn_params"
        )
    return None


def substitute_hf_flash_attn(process_group, heads_k_stride: int) -> None:
    """Make transformers' attention run the ring on ``process_group``, ``heads_k_stride``
    KV heads gathered at a time (see the module): registers ``"ring_attention"`` and
    ``"flash_attention_2"`` with ``AttentionInterface``."""
    from transformers import AttentionInterface, AttentionMaskInterface

    _core.world(process_group)
    if (
        isinstance(heads_k_stride, bool)
        or not isinstance(heads_k_stride, int)
        or heads_k_stride < 1
    ):
        raise ValueError(f"heads_k_stride: expected a positive int, got {heads_k_stride!r}")
    _STATE["group"], _STATE["heads_k_stride"] = process_group, heads_k_stride
    before = AttentionInterface().get("flash_attention_2")
    if before is not ring_attention_forward:
        _STATE["previous"] = before
    AttentionInterface.register(NAME, ring_attention_forward)
    AttentionInterface.register("flash_attention_2", ring_attention_forward)
    AttentionMaskInterface.register(NAME, _no_mask)
