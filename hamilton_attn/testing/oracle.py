"""Oracles for checking attention: dense masks and textbook softmax attention, written from
the mask spec and the softmax formula only, and honest error bounds.

Nothing here imports :mod:`hamilton_attn.masks` or the kernels: the dense masks are built
with plain loops / broadcasting from the rectangle semantics, and the attention oracles
are the textbook softmax in float64 (or in the inputs' precision, for error baselines).

The bound follows flash-attention's tests: a kernel's error against a float64 oracle may
be at most ``factor`` times the error that plain torch math in the kernel's own precision
makes, plus a small absolute slack.

Legend: B batch, S/T tokens (Sq queries, Sk keys), H heads (Hq, Hk), D head dim.
Oracle tensors are ``bhsd``; masks are bool ``[Sq, Sk]`` (True = visible).
"""

from __future__ import annotations

import math

import torch

_TYPE_NAMES = ("full", "causal", "inv_causal", "bi_causal")


# -- dense masks -----------------------------------------------------------------------


def _type_name(t) -> str:
    """'full' / 'causal' / 'inv_causal' / 'bi_causal' from a string, enum or 0..3."""
    if isinstance(t, int) and not isinstance(t, bool):
        return _TYPE_NAMES[t]
    name = getattr(t, "value", t)
    name = str(name).strip().lower()
    if name not in _TYPE_NAMES:
        raise KeyError(name)
    return name


def rect_dense(lq: int, lk: int, kind) -> torch.Tensor:
    """Bool ``[lq, lk]`` of one rectangle of ``kind`` in its own coordinates."""
    kind = _type_name(kind)
    i = torch.arange(lq).view(-1, 1)
    j = torch.arange(lk).view(1, -1)
    allowed = torch.ones(lq, lk, dtype=torch.bool)
    if kind in ("causal", "bi_causal"):
        allowed &= j <= i + (lk - lq)  # bottom-right aligned
    if kind in ("inv_causal", "bi_causal"):
        allowed &= j >= i  # top-left aligned
    return allowed


def dense_from_rects(q_ranges, k_ranges, types, seqlen_q: int, seqlen_k: int) -> torch.Tensor:
    """Brute-force union of typed rectangles: a key is visible if ANY rectangle allows it."""
    if isinstance(types, str) or not hasattr(types, "__len__"):
        types = [types] * len(q_ranges)
    dense = torch.zeros(seqlen_q, seqlen_k, dtype=torch.bool)
    for (q0, q1), (k0, k1), t in zip(q_ranges, k_ranges, types, strict=True):
        dense[q0:q1, k0:k1] |= rect_dense(q1 - q0, k1 - k0, t)
    return dense


def dense_window(lq: int, lk: int, left: int, right: int) -> torch.Tensor:
    """flash-attn window inside one ``lq x lk`` block: keys ``[i+lk-lq-left, i+lk-lq+right]``."""
    i = torch.arange(lq).view(-1, 1)
    j = torch.arange(lk).view(1, -1)
    c = i + (lk - lq)  # the bottom-right aligned diagonal
    out = torch.ones(lq, lk, dtype=torch.bool)
    if left >= 0:
        out &= j >= c - left
    if right >= 0:
        out &= j <= c + right
    return out


def dense_varlen(cu_q, cu_k=None, *, causal=False, window=(-1, -1)) -> torch.Tensor:
    """Packed documents; ``causal`` / ``window`` bottom-right aligned per document."""
    cu_k = cu_q if cu_k is None else cu_k
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    dense = torch.zeros(cu_q[-1], cu_k[-1], dtype=torch.bool)
    for d in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[d], cu_q[d + 1], cu_k[d], cu_k[d + 1]
        dense[q0:q1, k0:k1] = dense_window(q1 - q0, k1 - k0, left, right)
    return dense


def dense_block_causal(block_sizes) -> torch.Tensor:
    """Queries of block b see every key of blocks 0..b."""
    s = sum(block_sizes)
    block_of = []
    for b, n in enumerate(block_sizes):
        block_of += [b] * n
    block_of = torch.tensor(block_of, dtype=torch.long).view(-1)
    if s == 0:
        return torch.zeros(0, 0, dtype=torch.bool)
    return block_of.view(1, -1) <= block_of.view(-1, 1)


def dense_prefix_lm(seqlen: int, prefix_len: int) -> torch.Tensor:
    i = torch.arange(seqlen).view(-1, 1)
    j = torch.arange(seqlen).view(1, -1)
    return (j < prefix_len) | (j <= i)


def dense_shared_question(question_len: int, answer_lens) -> torch.Tensor:
    """Causal over the question; each answer sees the whole question and itself causally."""
    seg = [0] * question_len
    for a, n in enumerate(answer_lens):
        seg += [a + 1] * n
    seg = torch.tensor(seg, dtype=torch.long).view(-1)
    i = torch.arange(seg.numel()).view(-1, 1)
    j = torch.arange(seg.numel()).view(1, -1)
    same_or_question = (seg.view(1, -1) == 0) | (seg.view(1, -1) == seg.view(-1, 1))
    return (j <= i) & same_or_question


def dense_from_band(q0, q1, k0, k1, lo, hi, seqlen_q, seqlen_k) -> torch.Tensor:
    """Pairs with ``q0 <= q < q1``, ``k0 <= k < k1``, ``lo <= k - q <= hi``."""
    out = torch.zeros(seqlen_q, seqlen_k, dtype=torch.bool)
    q = torch.arange(max(q0, 0), min(q1, seqlen_q)).view(-1, 1)
    k = torch.arange(max(k0, 0), min(k1, seqlen_k)).view(1, -1)
    if q.numel() and k.numel():
        out[q[0, 0] : q[-1, 0] + 1, k[0, 0] : k[0, -1] + 1] = (k - q >= lo) & (k - q <= hi)
    return out


# -- attention oracles -----------------------------------------------------------------


def _heads_and_scale(q_BHSD, k_BHSD, v_BHSD, scale, dtype):
    """q, k, v in ``dtype`` with k, v's heads repeated to q's (GQA), and the scale
    (``1/sqrt(D)`` when None)."""
    hq, hk = q_BHSD.shape[1], k_BHSD.shape[1]
    scale = 1.0 / math.sqrt(q_BHSD.shape[-1]) if scale is None else scale
    q, k, v = (t.to(dtype) for t in (q_BHSD, k_BHSD, v_BHSD))
    k = k.repeat_interleave(hq // hk, dim=1)
    v = v.repeat_interleave(hq // hk, dim=1)
    return q, k, v, scale


def attention_oracle(q_BHSD, k_BHSD, v_BHSD, dense_SqSk, scale, dtype=torch.float64):
    """Plain softmax attention over a bool mask, differentiable by autograd.

    Computes in ``dtype`` (float64 for the oracle; the inputs' own dtype for a
    same-precision baseline). Rows that see no key give out 0 and lse -inf, and their
    gradients are 0 (never NaN). Returns ``(out_BHSD, lse_BHS)`` in ``dtype``.
    """
    q, k, v, scale = _heads_and_scale(q_BHSD, k_BHSD, v_BHSD, scale, dtype)
    visible = dense_SqSk.to(q.device)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~visible, float("-inf"))
    # The row max only stabilises the exp; softmax does not depend on it, so detaching
    # keeps empty rows (max = -inf) away from NaN gradients.
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    out = (p @ v) / torch.where(denom > 0, denom, torch.ones_like(denom))
    lse = (m + torch.log(denom)).squeeze(-1)
    return out, lse


def dense_attention(q_BHSD, k_BHSD, v_BHSD, mask_dense, scale=None, dtype=None):
    """Softmax attention by the textbook formula in ``dtype`` (default q's dtype), on a
    bool ``[Sq, Sk]`` mask, normalised before ``@ v`` (``torch.softmax``); rows that see
    nothing give 0. Differentiable. The out of :func:`attention_oracle` up to rounding."""
    q, k, v, scale = _heads_and_scale(q_BHSD, k_BHSD, v_BHSD, scale, dtype or q_BHSD.dtype)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask_dense.to(s.device), float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # fully masked rows
    return torch.matmul(p, v)


# -- errors and bounds -----------------------------------------------------------------


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, in float64 (0 for empty tensors)."""
    if a.numel() == 0:
        return 0.0
    return (a.detach().double() - b.detach().double()).abs().max().item()


def error_bound(ref_same_precision_err: float, *, factor: float = 2.0, atol: float = 1e-5) -> float:
    """flash-attention's bound on the error against the float64 oracle: ``factor`` times
    the same-precision oracle's error, plus ``atol``."""
    return factor * ref_same_precision_err + atol


def default_atol(t: torch.Tensor, ref: torch.Tensor) -> float:
    """A few ulps of ``t``'s dtype at the reference's magnitude."""
    mag = max(1.0, ref.detach().abs().max().item()) if ref.numel() else 1.0
    return 2.0 * torch.finfo(t.dtype).eps * mag


def assert_close_to_oracle(
    out, out_ref64, out_ref_same_precision, factor=2.0, atol=None, name="out"
):
    """flash-attention's bound: ``err(out, ref64) <= factor * err(same_precision, ref64) + atol``.

    ``out_ref_same_precision`` is the oracle computed in ``out``'s own precision; its
    error against the float64 oracle is what that precision costs, and ``out`` may be at
    most ``factor`` times worse. ``atol`` defaults to two ulps of ``out``'s dtype.
    """
    assert out.shape == out_ref64.shape, (
        f"{name}: shape {tuple(out.shape)} != {tuple(out_ref64.shape)}"
    )
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    if atol is None:
        atol = default_atol(out, out_ref64)
    err = max_err(out, out_ref64)
    base = max_err(out_ref_same_precision, out_ref64)
    bound = error_bound(base, factor=factor, atol=atol)
    assert err <= bound, (
        f"{name}: max error {err:.3e} vs float64 oracle exceeds {factor} x "
        f"{base:.3e} (same-precision oracle) + {atol:.1e}"
    )


# -- attention variants ----------------------------------------------------------------


def _variant_fields(variant):
    """``(kind, softcap, alibi_slopes, sink, bias)`` read off a variant: None or
    ``"softmax"`` / ``"sigmoid"`` / ``"relu"``, or an object with those attributes
    (``hamilton_attn.variants.Softmax(...)`` etc.; only its data is read)."""
    if variant is None:
        return "softmax", None, None, None, 0.0
    if isinstance(variant, str):
        return variant.lower(), None, None, None, 0.0
    return (
        variant.kind,
        getattr(variant, "softcap", None),
        getattr(variant, "alibi_slopes", None),
        getattr(variant, "sink", None),
        float(getattr(variant, "bias", 0.0)),
    )


def variant_attention_oracle(
    q_BHSD,
    k_BHSD,
    v_BHSD,
    dense_SqSk,
    *,
    scale,
    variant,
    score_mod=None,
    q_pos=None,
    k_pos=None,
    shift=None,
    dtype=torch.float64,
):
    """Attention of any variant, from the formulas, differentiable by autograd in q, k,
    v and in the variant's ``sink`` / ``alibi_slopes`` (used as given, not detached).

    With ``s = scale * q_i . k_j`` (``scale`` None: ``1/sqrt(D)``), ``i = q_pos[row]``,
    ``j = k_pos[col]`` (global token indices; default ``arange``), ``shift = Sk - Sq``
    (default: of the given tensors)::

        s = score_mod(s, b, h, i, j)        # on broadcast index tensors, h = query head
        softmax: s = cap * tanh(s / cap); s -= slope[h] * |i + shift - j|   (slopes [Hq]
                 or [B, Hq]); out_i = sum_j e^{s_ij} v_j / (e^{sink_h} + sum_j e^{s_ij}),
                 lse_i = log(e^{sink_h} + sum_j e^{s_ij})
        sigmoid: out_i = sum_j sigmoid(s_ij + bias) v_j        relu: sum_j relu(s_ij) v_j

    sums over the keys ``dense_SqSk`` (bool, True = visible) lets row i see. Computes in
    ``dtype`` (float64: the oracle; float32: the same-precision baseline of the error
    bound). Returns ``(out_BHSD, lse_BHS)``, lse None for sigmoid / relu. A row that
    sees nothing gets out 0, lse -inf (``sink_h`` with a sink) and zero gradients.
    """
    kind, cap, slopes, sink, bias = _variant_fields(variant)
    if kind not in ("softmax", "sigmoid", "relu"):
        raise ValueError(f"variant: unknown kind {kind!r}")
    q, k, v, scale = _heads_and_scale(q_BHSD, k_BHSD, v_BHSD, scale, dtype)
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    dev = q.device
    qp = torch.arange(sq, device=dev) if q_pos is None else torch.as_tensor(q_pos).to(dev)
    kp = torch.arange(sk, device=dev) if k_pos is None else torch.as_tensor(k_pos).to(dev)
    shift = sk - sq if shift is None else shift
    visible = dense_SqSk.to(dev).view(1, 1, sq, sk)
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if score_mod is not None:
        bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
        hi = torch.arange(h, device=dev).view(1, h, 1, 1)
        s = torch.broadcast_to(
            score_mod(s, bi, hi, qp.view(1, 1, sq, 1), kp.view(1, 1, 1, sk)), s.shape
        ).to(dtype)
    if kind == "sigmoid":
        w = torch.where(visible, torch.sigmoid(s + bias), torch.zeros_like(s))
        return torch.einsum("bhij,bhjd->bhid", w, v), None
    if kind == "relu":
        w = torch.where(visible, torch.relu(s), torch.zeros_like(s))
        return torch.einsum("bhij,bhjd->bhid", w, v), None
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    if slopes is not None:
        sl = slopes.to(dtype)
        sl = sl.view(1, h, 1, 1) if sl.dim() == 1 else sl.view(b, h, 1, 1)
        dist = (qp.view(-1, 1) + shift - kp.view(1, -1)).abs().to(dtype)
        s = s - sl * dist
    s = torch.where(visible, s, torch.full_like(s, float("-inf")))
    # The stabiliser m does not change the result; detached, it keeps empty rows finite.
    m = s.detach().amax(dim=-1, keepdim=True)
    if sink is not None:
        snk = sink.to(dtype).view(1, h, 1, 1).expand(b, h, sq, 1)
        m = torch.maximum(m, snk.detach())
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    if sink is not None:
        denom = denom + torch.exp(snk - m)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.einsum("bhij,bhjd->bhid", p, v) / safe
    lse = (m + torch.log(denom)).squeeze(-1)
    return out, lse
