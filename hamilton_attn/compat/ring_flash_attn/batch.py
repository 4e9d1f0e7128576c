"""ring-flash-attention's batch functions (``flash_attn_func``'s arguments) for the
contiguous, zigzag and stripe shard layouts, and their ``kvpacked`` / ``qkvpacked`` forms.

Every rank passes its local shards ``[B, S_local, H, D]`` (layout bshd); the global
sequence has ``S = W * S_local`` tokens and is the same for every batch row:

* ``ring_flash_attn_*``: rank r holds tokens ``[r * S_local, (r + 1) * S_local)``;
* ``zigzag_ring_flash_attn_*``: the sequence cut into 2W runs of ``S_local / 2``
  tokens, rank r holds runs r and 2W-1-r, in that order (``S_local`` even);
* ``stripe_flash_attn_*``: token t is on rank ``t % W`` (rank r holds r, r+W, ...).

``causal`` and ``window_size`` mean what they mean to ``flash_attn_func`` on the whole
sequence (bottom-right aligned, ``(-1, -1)``: no window); ``alibi_slopes`` ``[Hq]`` or
``[B, Hq]`` float32 adds ``-slope * |i - j|`` on global positions. Returns ``out``
``[B, S_local, Hq, D]`` in q's dtype, or with ``return_attn_probs`` ``(out,
softmax_lse, None)``, softmax_lse ``[B, Hq, S_local]`` float32 (natural log; float64 for
float64 inputs). Differentiable in q, k, v (and the packed tensors). ``dropout_p`` must be
0; ``deterministic`` is accepted (the core is deterministic). A bad argument raises
ValueError naming it before any message is sent.
"""

from __future__ import annotations

from . import _core


def _batch(layout, q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
           deterministic, return_attn_probs, group):  # fmt: skip
    window = _core.check_options(dropout_p, window_size, deterministic, return_attn_probs)
    if not isinstance(causal, bool):
        raise ValueError(f"causal: expected a bool, got {causal!r}")
    _core.check_qkv(q, k, v, token_dims=2)
    rank, w = _core.world(group)
    s_local = q.shape[1]
    if layout == "zigzag" and s_local % 2:
        raise ValueError(
            f"q: the zigzag layout holds two equal runs per rank, so S_local must be even, "
            f"got {s_local}"
        )
    if s_local == 0:
        raise ValueError("q: S_local must be > 0")
    variant = _core.variant_for(alibi_slopes, q, q.shape[0])
    p = _core.layout_plan(layout, (0, w * s_local), causal, window, group, w, _core.RING)
    out, lse = _core.attend_bshd(q, k, v, p, softmax_scale, variant)
    return _core.finish(out, lse, return_attn_probs)


def _make(layout: str, family: str):
    def func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
             alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):  # fmt: skip
        return _batch(layout, q, k, v, dropout_p, softmax_scale, causal, window_size,
                      alibi_slopes, deterministic, return_attn_probs, group)  # fmt: skip

    def kvpacked(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                 alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):  # fmt: skip
        k, v = _core.unpack(kv, 2, "kv", token_dims=2)
        return _batch(layout, q, k, v, dropout_p, softmax_scale, causal, window_size,
                      alibi_slopes, deterministic, return_attn_probs, group)  # fmt: skip

    def qkvpacked(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                  alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):  # fmt: skip
        q, k, v = _core.unpack(qkv, 3, "qkv", token_dims=2)
        return _batch(layout, q, k, v, dropout_p, softmax_scale, causal, window_size,
                      alibi_slopes, deterministic, return_attn_probs, group)  # fmt: skip

    forms = (
        ("func", func, "q, k, v ``[B, S_local, H, D]``"),
        ("kvpacked_func", kvpacked, "q ``[B, S_local, Hq, D]``, kv ``[B, S_local, 2, Hk, D]``"),
        ("qkvpacked_func", qkvpacked, "qkv ``[B, S_local, 3, H, D]``"),
    )
    return _core.named_forms(
        family,
        __name__,
        forms,
        lambda name, args: (
            f"ring-flash-attention's ``{name}`` on the core: {args}, the ``{layout}`` "
            "shard layout (see :mod:`hamilton_attn.compat.ring_flash_attn.batch`)."
        ),
    )


ring_flash_attn_func, ring_flash_attn_kvpacked_func, ring_flash_attn_qkvpacked_func = _make(
    "contiguous", "ring_flash_attn"
)
(
    zigzag_ring_flash_attn_func,
    zigzag_ring_flash_attn_kvpacked_func,
    zigzag_ring_flash_attn_qkvpacked_func,
) = _make("zigzag", "zigzag_ring_flash_attn")
stripe_flash_attn_func, stripe_flash_attn_kvpacked_func, stripe_flash_attn_qkvpacked_func = _make(
    "stripe", "stripe_flash_attn"
)
