"""The Hamilton Attention API (names and parameters of its docs), mapped onto the core.

Local shards follow ring-flash-attention's conventions: ``[B, S_local, H, D]`` (BSND);
``ring_*`` expects rank r to hold the r-th contiguous slice of the sequence,
``zigzag_*`` chunks r and 2W-1-r of 2W equal chunks. Functions return ``(out, lse)``
with lse ``[B, H, S_local]`` and are differentiable.
"""

from __future__ import annotations

import torch

from ..api import calc_attn
from ..comm import A2AComm, RingComm, group_info
from ..masks import Mask
from ..merge import merge
from ..plans import plan

__all__ = [
    "A2AComm",
    "RingComm",
    "ring_attention_forward_flash_attn",
    "update_out_and_lse",
    "zigzag_ring_attention_forward_flash_attn",
]


def _unsupported(dropout_p, alibi_slopes=None) -> None:
    if dropout_p:
        raise NotImplementedError(
            "dropout_p > 0 is not supported: hamilton-attn computes exact "
            "attention without dropout; apply dropout outside attention"
        )
    if alibi_slopes is not None:
        raise NotImplementedError(
            "alibi_slopes is not supported yet; express the bias with a "
            "FlexAttention score_mod on one device instead"
        )


def _mask(seqlen: int, causal: bool, window_size) -> Mask:
    left, right = window_size
    if causal:
        right = 0
    if left < 0 and right < 0:
        return Mask.full(seqlen)
    if left < 0 and right == 0:
        return Mask.causal(seqlen)
    return Mask.sliding_window(seqlen, (left, right))


def _run(process_group, q, k, v, softmax_scale, causal, window_size, dispatch):
    _, w, _ = group_info(process_group)
    if q.dim() != 4:
        raise ValueError(f"q: expected a [B, S_local, H, D] shard, got shape {tuple(q.shape)}")
    s_local = q.shape[1]
    if dispatch == "zigzag" and s_local % 2:
        raise ValueError(f"q: zigzag shards hold two equal chunks, got {s_local} local tokens")
    p = plan(
        _mask(s_local * w, causal, window_size), process_group, schedule="ring", dispatch=dispatch
    )
    return calc_attn(q, k, v, p, scale=softmax_scale, return_lse=True)


def ring_attention_forward_flash_attn(
    process_group,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale,
    dropout_p=0,
    causal=False,
    window_size=(-1, -1),
):
    """Ring attention over contiguous shards; returns ``(out, lse)``."""
    _unsupported(dropout_p)
    return _run(process_group, q, k, v, softmax_scale, causal, window_size, "contiguous")


def zigzag_ring_attention_forward_flash_attn(
    process_group,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale,
    dropout_p=0,
    causal=True,
    window_size=(-1, -1),
    alibi_slopes=None,
    deterministic=False,
):
    """Ring attention over zigzag shards (load-balanced causal); returns ``(out, lse)``.
    ``deterministic`` is accepted: results here are always deterministic."""
    _unsupported(dropout_p, alibi_slopes)
    return _run(process_group, q, k, v, softmax_scale, causal, window_size, "zigzag")


def update_out_and_lse(out, lse, block_out: torch.Tensor, block_lse: torch.Tensor):
    """Fold a block's result into running ``(out, lse)`` (ring-flash-attention's shapes):
    ``block_out`` ``[B, S, H, D]``, ``block_lse`` ``[B, H, S]``; the running ``out`` is
    float32 ``[B, S, H, D]`` and ``lse`` ``[B, S, H, 1]`` (None to start)."""
    block_lse_BSH1 = block_lse.transpose(-2, -1).unsqueeze(-1).float()
    if out is None:
        return block_out.float(), block_lse_BSH1
    o, l = merge(out, lse.squeeze(-1), block_out, block_lse_BSH1.squeeze(-1))
    return o, l.unsqueeze(-1)
