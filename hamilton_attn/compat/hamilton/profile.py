"""The seed's profiling variants (``*_profile``): each forward function of
:mod:`.attention`, also returning per-step timings from the core's
:class:`hamilton_attn.runtime.profile.Profiler`."""

from __future__ import annotations

import functools

from ...runtime.profile import Profiler
from .attention import (
    hamilton_attention_forward_causal_flash_attn,
    hamilton_attention_forward_full_flash_attn,
    hamilton_attention_forward_full_flash_attn_two_nodes,
    ring_attention_forward_flash_attn,
    zigzag_ring_attention_forward_flash_attn,
)


def _profiled(fn):
    """``fn``'s variant returning ``(out, lse, timings)``: one dict per forward step of
    this rank, ``{"step", "compute_ms", "comm_ms", "exposed_ms", "bytes_sent"}``, from
    :class:`hamilton_attn.runtime.profile.Profiler` (CUDA events on GPU, wall clock on CPU). The
    backward pass is not timed (wrap it in a Profiler of your own)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with Profiler() as prof:
            out, lse = fn(*args, **kwargs)
        timings = [
            {
                "step": r["step"],
                "compute_ms": r["compute_ms"],
                "comm_ms": r["transfer_ms"],
                "exposed_ms": r["exposed_ms"],
                "bytes_sent": r["bytes_sent"],
            }
            for r in prof.rows()
            if r["phase"] == "fwd"
        ]
        return out, lse, timings

    run.__name__ = run.__qualname__ = fn.__name__ + "_profile"
    run.__doc__ = f"{fn.__name__} with per-step timings: returns ``(out, lse, timings)``.\n\n" + (
        _profiled.__doc__ or ""
    )
    return run


ring_attention_forward_flash_attn_profile = _profiled(ring_attention_forward_flash_attn)
zigzag_ring_attention_forward_flash_attn_profile = _profiled(
    zigzag_ring_attention_forward_flash_attn
)
hamilton_attention_forward_full_flash_attn_profile = _profiled(
    hamilton_attention_forward_full_flash_attn
)
hamilton_attention_forward_causal_flash_attn_profile = _profiled(
    hamilton_attention_forward_causal_flash_attn
)
hamilton_attention_forward_full_flash_attn_two_nodes_profile = _profiled(
    hamilton_attention_forward_full_flash_attn_two_nodes
)
