"""Output and LSE update (the seed's ``_update_out_and_lse``, after ring-flash-attention),
on the core's :func:`hamilton_attn.merge.merge`."""

from __future__ import annotations

import torch

from ...merge import merge


def update_out_and_lse(out, lse, block_out: torch.Tensor, block_lse: torch.Tensor):
    """Fold a block's result into running ``(out, lse)`` (ring-flash-attention's shapes):
    ``block_out`` ``[B, S, H, D]``, ``block_lse`` ``[B, H, S]``; the running ``out`` is
    float32 ``[B, S, H, D]`` and ``lse`` ``[B, S, H, 1]`` (None to start)."""
    block_lse_BSH1 = block_lse.transpose(-2, -1).unsqueeze(-1).float()
    if out is None:
        return block_out.float(), block_lse_BSH1
    o, l = merge(out, lse.squeeze(-1), block_out, block_lse_BSH1.squeeze(-1))
    return o, l.unsqueeze(-1)
