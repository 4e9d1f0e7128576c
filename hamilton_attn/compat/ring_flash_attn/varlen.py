"""ring-flash-attention's varlen functions (``flash_attn_varlen_func``'s arguments) for
its ring and zigzag layouts, with their ``kvpacked`` / ``qkvpacked`` forms.

Packed documents: every rank passes ``[T_local, H, D]`` shards (layout thd) and the
LOCAL ``cu_seqlens`` (the global offsets divided by W, as ring-flash-attention takes
them); document d has ``W * (cu_seqlens[d+1] - cu_seqlens[d])`` tokens globally and

* ``ring_flash_attn_varlen_*``: each document cut into W equal runs, rank r holds run r
  of every document, documents in order;
* ``zigzag_ring_flash_attn_varlen_*``: each document cut into 2W runs, rank r holds runs
  r and 2W-1-r of every document (local document lengths even).

``causal``, ``window_size`` and ``alibi_slopes`` apply inside each global document as
``flash_attn_varlen_func`` applies them on the unsharded batch. ``max_seqlen`` is
accepted and unused (no kernel needs it). Returns ``out`` ``[T_local, Hq, D]``, or
``(out, softmax_lse, None)`` with softmax_lse ``[Hq, T_local]`` float32 (flash-attn's
packed varlen layout). Differentiable; ``dropout_p`` must be 0.
"""

from __future__ import annotations

from . import _core


def _varlen(layout, q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal,
            window_size, alibi_slopes, deterministic, return_attn_probs, group):  # fmt: skip
    window = _core.check_options(dropout_p, window_size, deterministic, return_attn_probs)
    if not isinstance(causal, bool):
        raise ValueError(f"causal: expected a bool, got {causal!r}")
    _core.check_qkv(q, k, v, token_dims=1)
    local_cu = _core.cu_list(cu_seqlens, "cu_seqlens")
    if local_cu[-1] != q.shape[0]:
        raise ValueError(
            f"cu_seqlens: its last offset {local_cu[-1]} must be q's T_local {q.shape[0]} "
            "(ring-flash-attention's varlen functions take the local offsets)"
        )
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen: expected an int >= 0, got {max_seqlen!r}")
    if layout == "zigzag":
        odd = [i for i, (a, b) in enumerate(zip(local_cu, local_cu[1:])) if (b - a) % 2]
        if odd:
            raise ValueError(
                f"cu_seqlens: the zigzag layout holds two equal runs of each document per "
                f"rank, so local document lengths must be even; document {odd[0]} has "
                f"{local_cu[odd[0] + 1] - local_cu[odd[0]]}"
            )
    _, w = _core.world(group)
    variant = _core.variant_for(alibi_slopes, q, 1)
    cu = tuple(w * x for x in local_cu)
    p = _core.layout_plan(layout, cu, causal, window, group, w, _core.RING)
    out, lse = _core.attend_bshd(q[None], k[None], v[None], p, softmax_scale, variant)
    return _core.finish(out[0], lse[0], return_attn_probs)


def _make(layout: str, family: str):
    def func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
             window_size=(-1, -1), alibi_slopes=None, deterministic=False,
             return_attn_probs=False, group=None):  # fmt: skip
        return _varlen(layout, q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                       causal, window_size, alibi_slopes, deterministic, return_attn_probs,
                       group)  # fmt: skip

    def kvpacked(q, kv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                 causal=False, window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                 return_attn_probs=False, group=None):  # fmt: skip
        k, v = _core.unpack(kv, 2, "kv", token_dims=1)
        return _varlen(layout, q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                       causal, window_size, alibi_slopes, deterministic, return_attn_probs,
                       group)  # fmt: skip

    def qkvpacked(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                  window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                  return_attn_probs=False, group=None):  # fmt: skip
        q, k, v = _core.unpack(qkv, 3, "qkv", token_dims=1)
        return _varlen(layout, q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                       causal, window_size, alibi_slopes, deterministic, return_attn_probs,
                       group)  # fmt: skip

    forms = (
        ("func", func, "q, k, v ``[T_local, H, D]``"),
        ("kvpacked_func", kvpacked, "q ``[T_local, Hq, D]``, kv ``[T_local, 2, Hk, D]``"),
        ("qkvpacked_func", qkvpacked, "qkv ``[T_local, 3, H, D]``"),
    )
    return _core.named_forms(
        family,
        __name__,
        forms,
        lambda name, args: (
            f"ring-flash-attention's ``{name}`` on the core: {args} and the local "
            f"``cu_seqlens``, the ``{layout}`` per-document layout (see "
            ":mod:`hamilton_attn.compat.ring_flash_attn.varlen`)."
        ),
    )


(
    ring_flash_attn_varlen_func,
    ring_flash_attn_varlen_kvpacked_func,
    ring_flash_attn_varlen_qkvpacked_func,
) = _make("contiguous", "ring_flash_attn_varlen")
(
    zigzag_ring_flash_attn_varlen_func,
    zigzag_ring_flash_attn_varlen_kvpacked_func,
    zigzag_ring_flash_attn_varlen_qkvpacked_func,
) = _make("zigzag", "zigzag_ring_flash_attn_varlen")
