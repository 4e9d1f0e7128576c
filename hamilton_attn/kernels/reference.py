"""Plain-torch attention for any mask: the oracle, and the CPU path.

Computes in float64 for float64 inputs and float32 otherwise, materialising scores
``[B, H, rows, Sk]`` a chunk of query rows at a time so memory stays bounded.

**Non-finite inputs.** A dense product ``P @ V`` multiplies the zeros of masked pairs
by V, and ``0 x NaN = NaN``: a NaN or inf in V at a key that a row cannot see would
reach that row. When any input holds a NaN or an infinity the kernel takes an exact
path instead: every product runs on the inputs with their non-finite entries zeroed,
and the non-finite entries are added back, for the few keys (or query rows) that hold
them, only at the pairs the mask makes visible. So a row's output, its dq, and the
dk / dv of keys it does not see are untouched by a value at a key it does not see,
while a row that sees it gets what the formula gives. With finite inputs the only cost
is one ``isfinite`` pass per input.
"""

from __future__ import annotations

import functools

import torch

from ..masks import Mask
from .base import (
    AttentionKernel,
    all_finite,
    check_block,
    expand_kv,
    lse_dtype,
    reduce_kv_grad,
)

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


class _Split:
    """``x`` ``[B, H, N, D]`` as its finite part (non-finite entries zeroed, the operand
    of the dense products) and, for the N-indices holding a non-finite entry, the
    non-finite part alone (zeros where ``x`` is finite)."""

    def __init__(self, x: torch.Tensor):
        bad = ~torch.isfinite(x)
        self.finite = x.masked_fill(bad, 0.0)
        self.idx = bad.any(-1).any(1).any(0).nonzero().flatten()
        # x - finite is exactly 0 at finite entries and x itself (NaN, +-inf) elsewhere.
        self.rest = (x - self.finite).index_select(2, self.idx)


def _visible_mm(a: torch.Tensor, b: _Split, vis: torch.Tensor) -> torch.Tensor:
    """``sum_j a[..., i, j] * x[..., j, :]`` over the pairs with ``vis[i, j]`` only.

    ``a`` must be 0 (and finite) off ``vis``; ``x`` is the tensor ``b`` was split from.
    The finite part goes through one matmul (0 x finite = 0 off ``vis``); the non-finite
    entries are added per visible pair, in slices of keys sized like one chunk of
    scores, so memory stays bounded even when every key holds one."""
    out = torch.matmul(a, b.finite)
    n = b.idx.numel()
    if n == 0:
        return out
    step = max(1, a.shape[-1] // max(1, b.rest.shape[-1]))
    for j0 in range(0, n, step):
        idx = b.idx[j0 : j0 + step]
        seen = vis.index_select(-1, idx).unsqueeze(-1)  # [rows, J, 1]
        terms = a.index_select(-1, idx).unsqueeze(-1) * b.rest[:, :, j0 : j0 + step].unsqueeze(-3)
        out = out + torch.where(seen, terms, terms.new_zeros(())).sum(-2)
    return out


class ReferenceKernel(AttentionKernel):
    name = "reference"

    def variant_problem(self, variant, device=None) -> str | None:
        return None  # every variant, score_mod included (in plain torch)

    def forward(self, q, k, v, mask: Mask, scale: float, variant=None):
        check_block(q, k, v, mask)
        ct = _compute_dtype(q)
        hq = q.shape[1]
        kf, vf = expand_kv(k.to(ct), hq), expand_kv(v.to(ct), hq)
        dense = _dense(mask, q.device)
        exact = not all_finite(k, v)  # a non-finite q only reaches its own row
        vs = _Split(vf) if exact else None
        summed = variant is not None and not variant.normalised
        out = torch.empty(q.shape[:3] + (v.shape[-1],), dtype=q.dtype, device=q.device)
        lse = (
            None if summed else torch.empty(q.shape[:3], dtype=lse_dtype(q.dtype), device=q.device)
        )
        for r0, r1 in _row_chunks(q, k.shape[2]):
            vis = dense[r0:r1]
            s = torch.matmul(q[:, :, r0:r1].to(ct), kf.transpose(-1, -2)) * scale
            if variant is not None:
                s = variant.transform(s, slice(r0, r1))
            if summed:
                w = variant.weights(s).masked_fill(~vis, 0.0)
                mm = _visible_mm(w, vs, vis) if exact else torch.matmul(w, vf)
                out[:, :, r0:r1] = mm.to(q.dtype)
                continue
            s = s.masked_fill(~vis, float("-inf"))
            l = torch.logsumexp(s, dim=-1)
            empty = torch.isneginf(l)
            if exact:
                # A row whose visible scores are all -inf is not a row that sees nothing:
                # the formula's exp(-inf - lse) is NaN there.
                empty = empty & ~vis.any(-1)
            safe = torch.where(empty, torch.zeros_like(l), l)
            p = torch.exp(s - safe.unsqueeze(-1))  # exp(-inf) = 0 on masked keys
            if exact:
                # A NaN lse (a visible NaN score) makes exp(-inf - NaN) NaN off the mask.
                p = p.masked_fill(~vis, 0.0)
                out[:, :, r0:r1] = _visible_mm(p, vs, vis).to(q.dtype)
            else:
                out[:, :, r0:r1] = torch.matmul(p, vf).to(q.dtype)
            lse[:, :, r0:r1] = l.to(lse.dtype)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, mask: Mask, scale: float, variant=None):
        check_block(q, k, v, mask)
        ct = _compute_dtype(q)
        hq, hk = q.shape[1], k.shape[1]
        kf, vf = expand_kv(k.to(ct), hq), expand_kv(v.to(ct), hq)
        dense = _dense(mask, q.device)
        summed = variant is not None and not variant.normalised
        # A merged out / lse may be NaN on rows poisoned by another block, and dout on
        # the rows a loss made NaN from them: each would reach every key through 0 x NaN.
        if summed:
            exact = not all_finite(q, k, v, dout)
        else:
            exact = not all_finite(q, k, v, dout, out, lse=lse)
        ks = _Split(kf) if exact else None
        dq = torch.empty_like(q, dtype=ct)
        dk = torch.zeros_like(kf)
        dv = torch.zeros_like(vf)
        for r0, r1 in _row_chunks(q, k.shape[2]):
            vis = dense[r0:r1]
            qc = q[:, :, r0:r1].to(ct)
            do = dout[:, :, r0:r1].to(ct)
            s = torch.matmul(qc, kf.transpose(-1, -2)) * scale
            dp = torch.matmul(do, vf.transpose(-1, -2))
            if variant is None:
                p, ds = self._softmax_grads(s, vis, dp, do, out, lse, r0, r1, ct)
            else:
                p, ds = _variant_grads(variant, s, vis, dp, do, out, lse, r0, r1, ct)
            if exact:
                # dp = dO V^T needs no care: off the mask it only meets p = 0 here.
                p, ds = p.masked_fill(~vis, 0.0), ds.masked_fill(~vis, 0.0)
                vis_t = vis.transpose(-1, -2)
                dq[:, :, r0:r1] = _visible_mm(ds, ks, vis) * scale
                dk += _visible_mm(ds.transpose(-1, -2), _Split(qc), vis_t) * scale
                dv += _visible_mm(p.transpose(-1, -2), _Split(do), vis_t)
            else:
                dq[:, :, r0:r1] = torch.matmul(ds, kf) * scale
                dk += torch.matmul(ds.transpose(-1, -2), qc) * scale
                dv += torch.matmul(p.transpose(-1, -2), do)
        return (
            dq.to(q.dtype),
            reduce_kv_grad(dk, hk).to(k.dtype),
            reduce_kv_grad(dv, hk).to(v.dtype),
        )

    @staticmethod
    def _softmax_grads(s, vis, dp, do, out, lse, r0, r1, ct):
        """Plain softmax: the weights ``p`` and the scores' gradient ``ds``."""
        l = lse[:, :, r0:r1].to(ct)
        safe = torch.where(torch.isneginf(l), torch.full_like(l, float("inf")), l)
        s = s.masked_fill(~vis, float("-inf"))
        p = torch.exp(s - safe.unsqueeze(-1))  # rows with lse=-inf get p = 0
        delta = (do * out[:, :, r0:r1].to(ct)).sum(-1, keepdim=True)
        return p, p * (dp - delta)


def _variant_grads(variant, s, vis, dp, do, out, lse, r0, r1, ct):
    """A variant's weights ``p`` (softmax probabilities, or ``f(t)``) and the gradient
    of the RAW scores ``s``, through score_mod / softcap / ALiBi by autograd. ALiBi is
    the pipeline's last step (``t -= slope * dist``), so the block's d(slopes) is
    ``-sum dt * dist``, summed in float64 into ``variant.alibi_grad`` (a sum over every
    visible pair: float32 would lose digits the other gradients keep)."""
    with torch.enable_grad():
        s_leaf = s.detach().requires_grad_(True)
        t = variant.transform(s_leaf, slice(r0, r1))
        td = t.detach()
        if variant.normalised:
            l = lse[:, :, r0:r1].to(ct)
            safe = torch.where(torch.isneginf(l), torch.full_like(l, float("inf")), l)
            p = torch.exp(td.masked_fill(~vis, float("-inf")) - safe.unsqueeze(-1))
            delta = (do * out[:, :, r0:r1].to(ct)).sum(-1, keepdim=True)
            dt = p * (dp - delta)
        else:
            p = variant.weights(td).masked_fill(~vis, 0.0)
            dt = (variant.weights_grad(td) * dp).masked_fill(~vis, 0.0)
        ds = None  # a transform that ignores the scores has no graph to them
        if t.requires_grad:
            (ds,) = torch.autograd.grad(t, (s_leaf,), dt, allow_unused=True)
    if variant.alibi is not None and variant.alibi_grad is not None:
        qp, kp = variant.positions(slice(r0, r1), s.shape[-1], s.device)
        dist = (qp.view(-1, 1) + variant.shift - kp.view(1, -1)).abs().to(torch.float64)
        share = -(dt.to(torch.float64) * dist).sum((2, 3))
        variant.alibi_grad += share.to(variant.alibi_grad.dtype)
    ds = torch.zeros_like(s) if ds is None else ds
    return p, ds.masked_fill(~vis, 0.0)
