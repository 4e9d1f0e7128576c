"""The aten SDPA ops that return the log-sum-exp, one call at a time.

This is the one place in the project that calls those private aten ops (public
``F.scaled_dot_product_attention`` does not return lse, which a context-parallel
merge needs). Their signatures are checked for torch 2.11 - 2.13
(:mod:`hamilton_attn.kernels.sdpa` refuses older torch with a clear error).

Ops, by device (``bhsd`` tensors; ``lse`` natural log, ``[B, H, S]`` after this
module's normalisation, float32, float64 for float64 inputs):

- ``cudnn``: ``_scaled_dot_product_cudnn_attention`` (+ ``_backward``); fp16 / bf16;
  GQA native; lse returned as ``[B, H, S, 1]``.
- ``flash``: ``_scaled_dot_product_flash_attention`` (+ ``_backward``); fp16 / bf16;
  GQA native; lse ``[B, H, S]``.
- ``efficient``: ``_scaled_dot_product_efficient_attention`` (+ ``_backward``); fp32,
  fp16, bf16; K/V heads expanded for GQA; lse padded to a multiple of 32 rows.
- ``cpu_flash``: ``_scaled_dot_product_flash_attention_for_cpu`` (+ ``_backward``);
  fp64, fp32, fp16, bf16; GQA native (checked on torch 2.11 and 2.13).

Which op runs which call, and how calls make up a block, is
:mod:`hamilton_attn.kernels.sdpa`'s business.
"""

from __future__ import annotations

import math

import torch

from .base import expand_kv, lse_dtype, reduce_kv_grad

CUDNN, FLASH, EFFICIENT, CPU_FLASH = "cudnn", "flash", "efficient", "cpu_flash"
OPS = (CUDNN, FLASH, EFFICIENT, CPU_FLASH)
_aten = torch.ops.aten


# ---------------------------------------------------------------------------------------
# Per-op forward / backward on one call. q/k/v are bhsd views; returns out in q.dtype
# and lse [B, H, Lq] in lse_dtype(q.dtype) (the GPU ops only see float32 lse).
# ---------------------------------------------------------------------------------------

# What each GPU op's forward returned for its philox seed/offset and the rank of the
# cuDNN lse, reused by the backward exactly as torch's autograd formula would. With
# dropout 0 the backward never reads the philox tensors.
_RNG: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
_CUDNN_LSE_RANK: dict[torch.device, int] = {}


def _rng(op: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    state = _RNG.get((op, device))
    if state is None:
        zero = torch.zeros((), dtype=torch.int64, device=device)
        state = (zero, zero)
    return state


def forward_call(op: str, q, k, v, causal: bool, scale: float):
    lq = q.shape[2]
    if op == CPU_FLASH:
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale
        )
        return out, lse.to(lse_dtype(q.dtype))  # already float64 for float64 inputs
    if op == CUDNN:
        r = _aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale
        )
        _RNG[(op, q.device)] = (r[6], r[7])
        _CUDNN_LSE_RANK[q.device] = r[1].dim()
        lse = r[1].squeeze(-1) if r[1].dim() == 4 else r[1]  # [B, H, S, 1] on torch 2.11-2.13
        return r[0], lse.float()
    if op == FLASH:
        r = _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        _RNG[(op, q.device)] = (r[6], r[7])
        return r[0], r[1].float()
    if op == EFFICIENT:
        hq = q.shape[1]
        r = _aten._scaled_dot_product_efficient_attention(
            q, expand_kv(k, hq), expand_kv(v, hq), None, True, 0.0, causal, scale=scale
        )
        _RNG[(op, q.device)] = (r[2], r[3])
        return r[0], r[1][:, :, :lq].float()  # lse is padded to a multiple of 32 rows
    raise ValueError(f"op: expected one of {OPS}, got {op!r}")


def backward_call(op: str, dout, q, k, v, out, lse, causal: bool, scale: float):
    """Gradients of one call given the (possibly merged) ``out`` / ``lse`` of its rows."""
    lq, lk = q.shape[2], k.shape[2]
    if op == CPU_FLASH:
        lse_in = lse.to(lse_dtype(q.dtype))  # the op wants float64 lse for float64 q
        return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse_in, 0.0, causal, scale=scale
        )
    if op == CUDNN:
        lse_in = lse.contiguous()
        if _CUDNN_LSE_RANK.get(q.device, 4) == 4:
            lse_in = lse_in.unsqueeze(-1)
        if out.stride() != dout.stride():
            # Older cuDNN assumes dO has O's strides; make both plain bhsd.
            out, dout = out.contiguous(), dout.contiguous()
        philox = _rng(op, q.device)  # (seed, offset)
        r = _aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse_in, *philox, None, None, None, lq, lk, 0.0, causal, scale=scale
        )
        return r[0], r[1], r[2]
    if op == FLASH:
        seed, offset = _rng(op, q.device)
        lse_in = lse.contiguous()
        return _aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse_in, None, None, lq, lk, 0.0, causal, seed, offset, scale=scale
        )
    if op == EFFICIENT:
        hq, hk = q.shape[1], k.shape[1]
        b, h, _ = lse.shape
        # The kernel reads O with a fixed row stride of H * D (BMHK memory), and lse with
        # the forward's padding of the row count to a multiple of 32.
        out_e = out.transpose(1, 2).contiguous().transpose(1, 2)
        lse_pad = torch.full(
            (b, h, 32 * math.ceil(lq / 32)), float("inf"), dtype=torch.float32, device=lse.device
        )
        lse_pad[:, :, :lq] = lse
        seed, offset = _rng(op, q.device)
        k_e, v_e = expand_kv(k, hq), expand_kv(v, hq)
        wanted = [True, True, True, False]  # gradients of q, k, v; none of a bias
        r = _aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k_e, v_e, None, out_e, lse_pad, seed, offset, 0.0, wanted, causal, scale=scale
        )
        return r[0], reduce_kv_grad(r[1], hk), reduce_kv_grad(r[2], hk)
    raise ValueError(f"op: expected one of {OPS}, got {op!r}")
