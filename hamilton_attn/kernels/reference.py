"""Plain-torch attention for any mask: the oracle, and the CPU path.

Computes in float64 for float64 inputs and float32 otherwise, materialising scores
``[B, H, rows, Sk]`` a chunk of query rows at a time so memory stays bounded.
"""

from __future__ import annotations

import functools

import torch

from ..masks import Mask
from .base import AttentionKernel, check_block, expand_kv, lse_dtype, reduce_kv_grad

# Scores materialised at once, in elements (B * H * rows * Sk).
_CHUNK_ELEMS = 1 << 25


@functools.lru_cache(maxsize=256)
def _dense(mask: Mask, device: torch.device) -> torch.Tensor:
    return mask.to_dense(device)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _row_chunks(q: torch.Tensor, sk: int):
    b, h, sq, _ = q.shape
    rows = max(1, _CHUNK_ELEMS // max(1, b * h * sk))
    for r0 in range(0, sq, rows):
        yield r0, min(sq, r0 + rows)


class ReferenceKernel(AttentionKernel):
    name = "reference"

    def forward(self, q, k, v, mask: Mask, scale: float):
        check_block(q, k, v, mask)
        ct = _compute_dtype(q)
        hq = q.shape[1]
        kf, vf = expand_kv(k.to(ct), hq), expand_kv(v.to(ct), hq)
        dense = _dense(mask, q.device)
        out = torch.empty(q.shape[:3] + (v.shape[-1],), dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:3], dtype=lse_dtype(q.dtype), device=q.device)
        for r0, r1 in _row_chunks(q, k.shape[2]):
            s = torch.matmul(q[:, :, r0:r1].to(ct), kf.transpose(-1, -2)) * scale
            s = s.masked_fill(~dense[r0:r1], float("-inf"))
            l = torch.logsumexp(s, dim=-1)
            safe = torch.where(torch.isneginf(l), torch.zeros_like(l), l)
            p = torch.exp(s - safe.unsqueeze(-1))  # exp(-inf) = 0 on masked keys
            out[:, :, r0:r1] = torch.matmul(p, vf).to(q.dtype)
            lse[:, :, r0:r1] = l.to(lse.dtype)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, mask: Mask, scale: float):
        check_block(q, k, v, mask)
        ct = _compute_dtype(q)
        hq, hk = q.shape[1], k.shape[1]
        kf, vf = expand_kv(k.to(ct), hq), expand_kv(v.to(ct), hq)
        dense = _dense(mask, q.device)
        dq = torch.empty_like(q, dtype=ct)
        dk = torch.zeros_like(kf)
        dv = torch.zeros_like(vf)
        for r0, r1 in _row_chunks(q, k.shape[2]):
            qc = q[:, :, r0:r1].to(ct)
            do = dout[:, :, r0:r1].to(ct)
            l = lse[:, :, r0:r1].to(ct)
            safe = torch.where(torch.isneginf(l), torch.full_like(l, float("inf")), l)
            s = torch.matmul(qc, kf.transpose(-1, -2)) * scale
            s = s.masked_fill(~dense[r0:r1], float("-inf"))
            p = torch.exp(s - safe.unsqueeze(-1))  # rows with lse=-inf get p = 0
            delta = (do * out[:, :, r0:r1].to(ct)).sum(-1, keepdim=True)
            dp = torch.matmul(do, vf.transpose(-1, -2))
            ds = p * (dp - delta)
            dq[:, :, r0:r1] = torch.matmul(ds, kf) * scale
            dk += torch.matmul(ds.transpose(-1, -2), qc) * scale
            dv += torch.matmul(p.transpose(-1, -2), do)
        return (
            dq.to(q.dtype),
            reduce_kv_grad(dk, hk).to(k.dtype),
            reduce_kv_grad(dv, hk).to(v.dtype),
        )
