"""The ``auto`` backend's choice between cuDNN calls (``sdpa``) and one FlexAttention
call (``flex``) for a block both can run, from a small cost model.

``sdpa`` runs a block as one op call per dense piece (two for a bottom-right causal
rectangle on cuDNN) and merges calls that share rows; ``flex`` runs it as one call
over the block-sparse mask at a lower rate. Few large pieces favour ``sdpa``, many
small ones ``flex``: the host needs about a tenth of a millisecond to issue each cuDNN
call, so a block of many small pieces is bound by the CPU, not the GPU.

Model, in seconds, for ``F`` flops (``4 B Hq D`` per visible pair):

- sdpa: ``max(n_calls * HOST_CALL + n_merges * HOST_MERGE,
  sum(F_call / CUDNN_RATE + GPU_CALL))``: host issue and GPU run overlap, the slower
  one sets the pace.
- flex: ``HOST_FLEX + F / FLEX_RATE``.

Constants from ``benchmarks/gpu_block_choice.py`` on one H200 (bf16, 32 heads, head dim
128; ``benchmarks/results/block_choice_H200_2026-11-30.md``): cuDNN runs large calls at 590-640
TF/s and costs 0.06-0.16 ms of host time per call; flex (compiled, dynamic shapes) runs
at 230-300 TF/s on packed documents and about 380 on dense causal blocks.
"""

from __future__ import annotations

import functools

from ..masks import Mask

HOST_CALL = 85e-6
HOST_MERGE = 80e-6
GPU_CALL = 20e-6
CUDNN_RATE = 620e12
HOST_FLEX = 200e-6
FLEX_RATE = 300e12


def _flops(q0, q1, k0, k1, causal: bool, per_pair: float) -> float:
    n, m = q1 - q0, k1 - k0
    pairs = n * m - (n * (n - 1) // 2 if causal else 0)
    return per_pair * pairs


def sdpa_seconds(calls, per_pair: float) -> float:
    """Estimated time of a block run as ``calls`` (``sdpa.Call`` tuples)."""
    seen: list[tuple[int, int]] = []
    merges = 0
    for c in calls:
        if any(c.q0 < b and a < c.q1 for a, b in seen):
            merges += 1
        seen.append((c.q0, c.q1))
    host = len(calls) * HOST_CALL + merges * HOST_MERGE
    gpu = sum(
        _flops(c.q0, c.q1, c.k0, c.k1, c.causal, per_pair) / CUDNN_RATE + GPU_CALL for c in calls
    )
    return max(host, gpu)


def flex_seconds(mask: Mask, per_pair: float) -> float:
    return HOST_FLEX + per_pair * mask.area() / FLEX_RATE


@functools.lru_cache(maxsize=4096)
def prefer_sdpa(mask: Mask, calls: tuple, per_pair: float) -> bool:
    """True when ``calls`` on cuDNN should beat one flex call on ``mask`` (cached)."""
    return sdpa_seconds(calls, per_pair) <= flex_seconds(mask, per_pair)


__all__ = ["prefer_sdpa", "sdpa_seconds", "flex_seconds"]
